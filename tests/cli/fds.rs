//! Open-file limits for the tests that hold many sockets (`tests/serve.rs`,
//! `tests/cli_observe.rs`).

/// Raises this process's open-file limit so it can hold many sockets.
pub fn allow_files(n: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let want = Rlimit {
        current: Some(n.min(lim.maximum.unwrap_or(u64::MAX))),
        maximum: lim.maximum,
    };
    if lim.current.is_some_and(|c| c < n) {
        setrlimit(Resource::Nofile, want).unwrap();
    }
    let now = getrlimit(Resource::Nofile).current;
    assert!(
        now.is_none_or(|c| c >= n),
        "this test needs {n} open files; the hard limit is {:?}",
        lim.maximum
    );
}

/// `n` connections to `addr` that send nothing, held until dropped.
pub async fn hold_connections(addr: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    held
}
