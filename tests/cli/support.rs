//! What the tests of the `weir` binary share (`tests/cli.rs`, `tests/cli_observe.rs`);
//! each uses part of it.

#![allow(dead_code)]

use std::process::{Command, Output};

/// The pipeline they run: the seed's tumbling count.
pub const USER_ACTIVITY: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/user_activity.toml");

/// `weir`, with no broker from the environment and warnings only in its log.
pub fn weir() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_weir"));
    c.env_remove("WEIR_BROKER").env("WEIR_LOG", "warn");
    c
}

/// [`USER_ACTIVITY`], as an argument.
pub fn pipeline() -> String {
    USER_ACTIVITY.to_string()
}

/// `weir generate` of `events` events of `users` users from `seed`, with `more` flags.
pub fn generate(events: &str, users: &str, seed: &str, more: &[&str]) -> Output {
    weir()
        .args([
            "generate", "--events", events, "--users", users, "--seed", seed,
        ])
        .args(more)
        .output()
        .unwrap()
}

/// Sends signal `sig` (`-INT`, `-TERM`) to process `pid` with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let kill = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
}
