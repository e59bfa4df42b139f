//! The `weir` package: the CLI binary plus the closed set of broker backends, chosen by
//! `pipeline.broker`, so that tests and Rust users can build any backend from a
//! `pipeline.toml`.

pub mod assemble;
pub mod backend;
pub mod demo;
pub mod golden;
pub mod observe;
pub mod serve;

pub use backend::Backend;
