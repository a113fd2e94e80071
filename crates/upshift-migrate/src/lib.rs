//! The schema engine of upshift: revision files, the revision graph, a SQL lexer, and the
//! SQLite and PostgreSQL engines that apply and revert revisions under a lock, each in one
//! transaction with its bookkeeping row, and the linter that reads what a revision would do
//! to the code that runs beside it.

pub mod engine;
mod error;
pub mod external;
pub mod graph;
pub mod lexer;
pub mod lint;
mod migrator;
pub mod source;
mod url;

pub use engine::{AppliedRevision, Direction, Engine, connect};
pub use error::Error;
pub use migrator::{DownTarget, Migrator, Status, UpTarget};
pub use source::{Phase, Revision};
pub use url::{DatabaseUrl, redact};
