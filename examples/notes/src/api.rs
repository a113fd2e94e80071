//! The routes: `/health`, `/api/notes` and `/slow`, gated on the release.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::database::{Database, DatabaseError, NewNote};
use crate::http::{Request, Response};
use crate::release::{Release, Schema};
use crate::server::log;

/// The longest `/slow` sleep.
const MAX_SLOW_MS: u64 = 60_000;

/// What a request handler needs.
pub(crate) struct App {
    pub(crate) release: Release,
    pub(crate) database: Database,
    /// The share of `/api/notes` requests that answer 500 on purpose (`--error-percent`).
    pub(crate) error_percent: u8,
    /// `/api/notes` requests so far, to spread those failures evenly.
    pub(crate) served: AtomicU64,
}

impl App {
    /// Answers one request.
    pub(crate) fn handle(&self, request: &Request) -> Response {
        let method = request.method.as_str();
        match request.path() {
            "/health" => match method {
                "GET" => self.health(),
                _ => not_allowed(method, "GET"),
            },
            "/api/notes" if self.fails_on_purpose() => Response::error(
                500,
                format!("notes {} fails {}% of requests (--error-percent)", self.release, self.error_percent),
            ),
            "/api/notes" => match method {
                "GET" => self.list(),
                "POST" => self.create(&request.body),
                _ => not_allowed(method, "GET, POST"),
            },
            "/slow" => match method {
                "GET" => slow(request),
                _ => not_allowed(method, "GET"),
            },
            path => Response::error(404, format!("no route for {method} {path}")),
        }
    }

    /// Whether this request is one of the `--error-percent` that fail.
    fn fails_on_purpose(&self) -> bool {
        let n = self.served.fetch_add(1, Ordering::Relaxed);
        let percent = u64::from(self.error_percent);
        // Spread evenly: request n fails when the running count of failures steps up.
        (n + 1) * percent / 100 > n * percent / 100
    }

    fn health(&self) -> Response {
        let release = self.release.as_str();
        if self.release == Release::V3 {
            // 3.0.0 exists to fail its health check after start, so upshift rolls it back.
            return Response::json(503, &Health { status: "failing", release, error: None });
        }
        match self.database.check(self.release.schema()) {
            Ok(()) => Response::json(200, &Health { status: "ok", release, error: None }),
            Err(error) => {
                log(format_args!("notes {release}: health check failed: {error}"));
                Response::json(503, &Health { status: "failing", release, error: Some(error.to_string()) })
            }
        }
    }

    fn list(&self) -> Response {
        match self.database.list(self.release.schema()) {
            Ok(notes) => Response::json(200, &notes),
            Err(error) => self.database_error(&error),
        }
    }

    fn create(&self, body: &[u8]) -> Response {
        let note = match parse_note(self.release.schema(), body) {
            Ok(note) => note,
            Err(message) => return Response::error(400, message),
        };
        match self.database.create(&note) {
            Ok(note) => Response::json(201, &note),
            Err(error) => self.database_error(&error),
        }
    }

    fn database_error(&self, error: &DatabaseError) -> Response {
        log(format_args!("notes {}: database error: {error}", self.release));
        Response::error(500, format!("database error: {error}"))
    }
}

/// The body of `GET /health`.
#[derive(Serialize)]
struct Health<'a> {
    /// `ok` or `failing`.
    status: &'static str,
    release: &'a str,
    /// Why the database check failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The body of `POST /api/notes` for 1.0.0. Unknown fields (2.0.0's `tags`) are ignored, so
/// one client can talk to both releases during a switch.
#[derive(Deserialize)]
struct TitledNote {
    title: String,
    body: String,
}

/// The body of `POST /api/notes` for 2.0.0 and 3.0.0. A `title` is accepted and ignored.
#[derive(Deserialize)]
struct TaggedNote {
    body: String,
    #[serde(default)]
    tags: Vec<String>,
}

fn parse_note(schema: Schema, body: &[u8]) -> Result<NewNote, String> {
    let explain = |error: serde_json::Error| match error.classify() {
        serde_json::error::Category::Data => format!("invalid note: {error}"),
        _ => format!("invalid JSON: {error}"),
    };
    match schema {
        Schema::Titles => {
            let note: TitledNote = serde_json::from_slice(body).map_err(explain)?;
            Ok(NewNote::Titled { title: note.title, body: note.body })
        }
        Schema::Tags => {
            let note: TaggedNote = serde_json::from_slice(body).map_err(explain)?;
            if note.tags.iter().any(String::is_empty) {
                return Err("invalid note: a tag cannot be empty".into());
            }
            let tags: BTreeSet<String> = note.tags.into_iter().collect();
            Ok(NewNote::Tagged { body: note.body, tags: tags.into_iter().collect() })
        }
    }
}

fn slow(request: &Request) -> Response {
    let Some(ms) = request.query("ms") else {
        return Response::error(400, "missing query parameter `ms`, e.g. /slow?ms=500");
    };
    let Some(ms) = ms.parse::<u64>().ok().filter(|ms| *ms <= MAX_SLOW_MS) else {
        return Response::error(400, format!("`ms` must be a whole number from 0 to {MAX_SLOW_MS}"));
    };
    // Said aloud, so a test can wait until a slow request is in flight.
    crate::server::log(format_args!("notes: slow request sleeping {ms} ms"));
    thread::sleep(Duration::from_millis(ms));
    Response::json(200, &json!({ "slept_ms": ms }))
}

fn not_allowed(method: &str, allow: &str) -> Response {
    Response::error(405, format!("method {method} is not allowed here; allowed: {allow}")).with_header("Allow", allow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_notes_per_schema() {
        let NewNote::Tagged { body, tags } =
            parse_note(Schema::Tags, br#"{"title":"t","body":"b","tags":["z","a","z"]}"#).unwrap()
        else {
            panic!("expected a tagged note");
        };
        assert_eq!((body.as_str(), tags), ("b", vec!["a".to_owned(), "z".to_owned()]));
        assert!(matches!(
            parse_note(Schema::Titles, br#"{"title":"t","body":"b","tags":["a"]}"#),
            Ok(NewNote::Titled { .. })
        ));
        assert!(parse_note(Schema::Titles, br#"{"body":"b"}"#).unwrap_err().starts_with("invalid note: missing field"));
        assert!(parse_note(Schema::Tags, b"{").unwrap_err().starts_with("invalid JSON"));
        assert!(parse_note(Schema::Tags, br#"{"body":"b","tags":[""]}"#).is_err());
        assert!(parse_note(Schema::Tags, br#"{"body":"b","tags":"a"}"#).unwrap_err().starts_with("invalid note"));
    }
}
