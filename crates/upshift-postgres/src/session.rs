//! A blocking connection that can send several statements in one message and say how far
//! the server got when one of them fails.
//!
//! The blocking `postgres::Client` collects a simple query's replies and, on an error,
//! returns the error alone. Sending a revision's statements, its bookkeeping row and its
//! `COMMIT` as one message (one round trip instead of one per statement) needs the count
//! of statements the server completed before the error, to name the one that failed; so a
//! `Session` drives tokio-postgres itself, on a current-thread runtime as the `postgres`
//! crate does.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use futures::stream::StreamExt;
use postgres::types::ToSql;
use postgres::{Row, SimpleQueryMessage};
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use crate::{Config, ConnectError};

/// A PostgreSQL connection for code that runs one statement after another.
pub struct Session {
    runtime: Runtime,
    /// Always `Some` but while dropping: the client goes first, so the connection can say
    /// goodbye to the server.
    client: Option<tokio_postgres::Client>,
    connection: Option<JoinHandle<()>>,
}

/// A simple-query batch that failed: the error and how many of its statements completed
/// before it (those of a batch that ends its own transaction may stay committed).
#[derive(Debug)]
pub struct BatchError {
    /// The statements the server completed before the error.
    pub completed: usize,
    /// The error.
    pub error: postgres::Error,
}

impl Session {
    /// Connects as `config` says (TLS and all, as [`Config::connect`]).
    pub fn connect(config: &Config) -> Result<Session, ConnectError> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| ConnectError {
            mode: config.tls.mode,
            message: format!("could not start the client's runtime: {e}"),
            hint: None,
            source: None,
        })?;
        let (client, connection) = config.connect_with(|config, tls| {
            runtime.block_on(async {
                // The connection runs as a task of this runtime: it makes progress
                // whenever a call below blocks on the runtime.
                Ok::<_, postgres::Error>(match tls {
                    None => {
                        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
                        (
                            client,
                            runtime.spawn(async move {
                                let _ = connection.await;
                            }),
                        )
                    }
                    Some(tls) => {
                        let (client, connection) = config.connect(tls).await?;
                        (
                            client,
                            runtime.spawn(async move {
                                let _ = connection.await;
                            }),
                        )
                    }
                })
            })
        })?;
        Ok(Session { runtime, client: Some(client), connection: Some(connection) })
    }

    fn run<'a, T, F: Future<Output = Result<T, postgres::Error>>>(
        &'a self,
        call: impl FnOnce(&'a tokio_postgres::Client) -> F,
    ) -> Result<T, postgres::Error> {
        let client = self.client.as_ref().expect("the client lives until drop");
        self.runtime.block_on(call(client))
    }

    /// Runs `sql` (one or more statements, no parameters) with the simple query protocol.
    pub fn batch_execute(&mut self, sql: &str) -> Result<(), postgres::Error> {
        self.run(|client| client.batch_execute(sql))
    }

    /// Runs a statement with parameters; returns the rows it changed.
    pub fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, postgres::Error> {
        self.run(|client| client.execute(sql, params))
    }

    /// Runs a query; returns its rows.
    pub fn query(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, postgres::Error> {
        self.run(|client| client.query(sql, params))
    }

    /// Runs a query that returns exactly one row.
    pub fn query_one(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, postgres::Error> {
        self.run(|client| client.query_one(sql, params))
    }

    /// Runs a query that returns at most one row.
    pub fn query_opt(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>, postgres::Error> {
        self.run(|client| client.query_opt(sql, params))
    }

    /// Sends `sql`, several statements, as one simple query and reads every reply: one
    /// round trip. On an error the server skips the statements after the failing one;
    /// [`BatchError::completed`] says how many completed before it. (A syntax error
    /// anywhere stops the batch before its first statement: the server parses all of it
    /// first. Its position in `sql` says where.)
    pub fn simple_batch(&mut self, sql: &str) -> Result<Vec<SimpleQueryMessage>, BatchError> {
        let client = self.client.as_ref().expect("the client lives until drop");
        self.runtime.block_on(async {
            let mut completed = 0;
            let mut messages = Vec::new();
            let stream = client.simple_query_raw(sql).await.map_err(|error| BatchError { completed, error })?;
            let mut stream = pin!(stream);
            while let Some(message) = stream.next().await {
                let message = message.map_err(|error| BatchError { completed, error })?;
                if matches!(message, SimpleQueryMessage::CommandComplete(_)) {
                    completed += 1;
                }
                messages.push(message);
            }
            Ok(messages)
        })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Dropping the client makes the connection send Terminate and end; give it a
        // moment to, so the server sees a goodbye rather than a dropped socket.
        drop(self.client.take());
        if let Some(connection) = self.connection.take() {
            // The timer must be made inside the runtime.
            let _ = self.runtime.block_on(async { tokio::time::timeout(Duration::from_secs(1), connection).await });
        }
    }
}
