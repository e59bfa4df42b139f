//! Weir's PostgreSQL sink: `[sink] type = "postgres"`. Window results are upserted into a
//! table (one row per key and window, keyed by the group fields and `window_start`) in one
//! transaction per batch, and a batch is acknowledged to the engine only once that
//! transaction has committed. A result written again after a crash (same id, same count)
//! lands on its own row, so the table is exact behind every source broker.

mod config;
mod error;
mod sink;
mod table;

pub use config::PostgresConfig;
pub use error::PostgresError;
pub use sink::PostgresSink;
pub use table::{ColType, Column, Layout};
