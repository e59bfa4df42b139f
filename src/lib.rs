//! The `weir` package: the CLI binary plus the registry of broker backends (one line per
//! backend, behind its cargo feature), chosen by `pipeline.broker`, so that tests and Rust
//! users can build any backend from a `pipeline.toml`.

pub mod assemble;
pub mod backend;
pub mod demo;
pub mod golden;
pub mod http;
pub mod observe;
pub mod serve;
pub mod store;

pub use backend::Backend;
