//! The PostgreSQL sink's one error type and its retry classification.

use weir_engine::error::Retryable;

/// What can go wrong writing results to PostgreSQL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostgresError {
    /// The server refused or the connection failed (`what` says which step; the client's
    /// error and its causes follow, e.g. `Connection refused`).
    #[error("{what}: {}", chain(error))]
    Db {
        /// The step that failed (connecting, creating the table, an upsert).
        what: String,
        /// The client's error (in the message with its causes, so not a `source()`: a
        /// report of the chain would say it twice).
        error: tokio_postgres::Error,
    },
    /// A step took longer than the sink's `timeout` (a server that stopped answering).
    #[error("{0} did not finish within {1:?}")]
    Timeout(String, std::time::Duration),
    /// The table does not fit the pipeline's results (a missing column, a wrong type, no
    /// unique key on the group fields and `window_start`). Not retryable.
    #[error("{0}")]
    Table(String),
    /// A result was not the JSON object the pipeline's layout describes. Not retryable.
    #[error("{0}")]
    Result(String),
}

impl Retryable for PostgresError {
    fn is_retryable(&self) -> bool {
        match self {
            PostgresError::Db { error, .. } => db_retryable(error),
            PostgresError::Timeout(..) => true,
            PostgresError::Table(_) | PostgresError::Result(_) => false,
        }
    }
}

/// Lost connections, a server shutting down or starting, resource shortage and
/// serialization conflicts may pass; a refused statement (a wrong column, a constraint)
/// will not.
fn db_retryable(e: &tokio_postgres::Error) -> bool {
    let Some(code) = e.code() else {
        // No SQLSTATE: the socket, the connection closing, a connect failure.
        return true;
    };
    let c = code.code();
    // 08: connection exception; 53: insufficient resources; 57P: the server shutting
    // down, crashing or starting; 57014: a statement cancelled; 40001/40P01: conflicts.
    c.starts_with("08")
        || c.starts_with("53")
        || c.starts_with("57P")
        || c == "57014"
        || c == "40001"
        || c == "40P01"
}

/// `e: its cause: its cause's cause…` (the client's own text omits the causes).
fn chain(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

impl PostgresError {
    /// `source` of the step `what`.
    pub(crate) fn db(what: impl Into<String>, error: tokio_postgres::Error) -> Self {
        PostgresError::Db {
            what: what.into(),
            error,
        }
    }
}
