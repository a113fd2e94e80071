//! `[notify]`: telling people a run started, succeeded, failed or was rolled back.
//!
//! One JSON message per event, sent by `POST` to the webhook (HTTP/1.1, `https://` through rustls
//! with the system's roots, or `SSL_CERT_FILE`) and written to the command's stdin. A
//! notification never fails a run: the runner journals whether each one arrived.

use serde::Serialize;

use crate::manifest::{Notify, NotifyEvent};

/// What a notification says (its JSON body).
#[derive(Debug, Serialize)]
pub struct Message<'a> {
    /// `[app] name`.
    pub app: Option<&'a str>,
    /// The run's id.
    pub run: &'a str,
    /// `upgrade` or `rollback`.
    pub kind: &'a str,
    /// `start`, `success`, `failure` or `rollback`.
    pub event: &'a str,
    /// The version it started from.
    pub from: Option<&'a str>,
    /// The version it goes to.
    pub to: &'a str,
    /// `running`, `succeeded`, `rolled-back` or `stuck`.
    pub outcome: &'a str,
    /// The undo's depth, when there was one.
    pub undo: Option<&'a str>,
    /// What failed.
    pub failure: Option<&'a str>,
    /// Time since the run began, in milliseconds.
    pub duration_ms: u64,
}

/// Sends `message` for `event` to each target that listens to it; returns each target's
/// name (`webhook`, `command`) and how it went, errors redacted with `redact`.
pub fn send(
    notify: &Notify,
    event: NotifyEvent,
    message: &Message<'_>,
    redact: &dyn Fn(&str) -> String,
) -> Vec<(&'static str, Result<(), String>)> {
    if !notify.on.contains(&event) {
        return Vec::new();
    }
    let body = serde_json::to_vec(message).expect("a message serializes");
    let mut sent = Vec::new();
    if let Some(url) = &notify.webhook {
        let result = crate::http::post(url, &body, notify.timeout).map_err(|e| redact(&format!("webhook {url}: {e}")));
        sent.push(("webhook", result));
    }
    if let Some(command) = &notify.command {
        let env = [("UPSHIFT_EVENT".to_owned(), event.as_str().to_owned())];
        let result = crate::command::run_with(
            command,
            notify.timeout,
            &crate::command::Options { env: &env, stdin: Some(&body), ..Default::default() },
        )
        .and_then(|done| done.success(command))
        .map(drop)
        .map_err(|e| redact(&format!("command: {e}")));
        sent.push(("command", result));
    }
    sent
}
