//! The PostgreSQL sink's one error type and its retry classification.

use weir_engine::error::Retryable;

/// What can go wrong writing results to PostgreSQL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostgresError {
    /// The server refused or the connection failed (`what` says which step).
    #[error("{what}: {source}")]
    Db {
        /// The step that failed (connecting, creating the table, an upsert).
        what: String,
        /// The client's error.
        #[source]
        source: tokio_postgres::Error,
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
            PostgresError::Db { source, .. } => db_retryable(source),
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

impl PostgresError {
    /// `source` of the step `what`.
    pub(crate) fn db(what: impl Into<String>, source: tokio_postgres::Error) -> Self {
        PostgresError::Db {
            what: what.into(),
            source,
        }
    }
}
