//! A crash point for the crash tests: `WEIR_CRASH_AFTER_COMMITS=N` ends the process with
//! `abort()` right after its N-th commit returns — no flush, no destructor, as a kill -9
//! landing in the narrowest window there is: everything the commit covered must already be
//! durable (a sink whose flush returned before the broker acknowledged its records loses
//! them here). A random kill lands there too rarely to find such a bug. Unset, it costs one
//! load of a `OnceLock` per commit.

use std::sync::OnceLock;

/// The commit after which to abort, from `WEIR_CRASH_AFTER_COMMITS`.
fn after() -> Option<u64> {
    static AFTER: OnceLock<Option<u64>> = OnceLock::new();
    *AFTER.get_or_init(|| {
        std::env::var("WEIR_CRASH_AFTER_COMMITS")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|n| *n > 0)
    })
}

/// Called with the number of commits made so far, right after one.
pub(super) fn committed(commits: u64) {
    if after() == Some(commits) {
        eprintln!("WEIR_CRASH_AFTER_COMMITS={commits}: aborting right after commit {commits}");
        std::process::abort();
    }
}
