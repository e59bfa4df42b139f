//! Weir's Redis sink: `[sink] type = "redis"`. Each window result is one hash,
//! `PREFIX:ID` where ID is the result's `weir.id` (`User3@2024-06-27T15:00:00Z`), holding
//! every field of the result (strings as they are, numbers and other values as JSON text),
//! and each result's ID is a member of the sorted set `PREFIX:windows` (score 0, member
//! `WINDOW_START|ID`, so `ZRANGEBYLEX` walks the results in window order). A batch is one
//! MULTI/EXEC and is acknowledged to the engine once EXEC has answered; writing a result
//! again (after a crash: same id, same values) overwrites its hash with the same values.

mod config;
mod error;
mod sink;

pub use config::RedisConfig;
pub use error::RedisSinkError;
pub use sink::RedisSink;
