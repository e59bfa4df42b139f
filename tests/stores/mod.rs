//! Shared by the tests of the stores results can go to (`tests/sink_postgres.rs`,
//! `tests/sink_redis.rs`, the crash tests): the seed pipeline with its `[sink]` replaced;
//! in `pg`, the test bed's PostgreSQL (`scripts/brokers up postgres`, or
//! `WEIR_POSTGRES_URL`), servers of a test's own (`scripts/brokers postgres-serve`), and a
//! table read back as counts an oracle can be compared with; in `redis`, the same for
//! Redis (`scripts/brokers up redis`, or `WEIR_REDIS_URL`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A name (table, key prefix) no other test or run uses.
pub fn unique_name(case: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("t_{case}_{}_{nanos}", std::process::id())
}

/// `pipelines/user_activity.toml` (and the `brokers.toml` it includes) copied into `dir`,
/// its `[sink]` table's keys replaced by `sink` (TOML lines). Other settings come from
/// `--set` as usual.
pub fn pipeline(dir: &Path, sink: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let text = std::fs::read_to_string(root.join("user_activity.toml")).unwrap();
    let old = "[sink]\ntopic = \"user-activity-stats\"\n";
    assert!(text.contains(old), "the seed pipeline's [sink] changed");
    let text = text.replace(old, &format!("[sink]\n{sink}"));
    let file = dir.join("user_activity_store.toml");
    std::fs::write(&file, text).unwrap();
    std::fs::copy(root.join("brokers.toml"), dir.join("brokers.toml")).unwrap();
    file
}

/// `weir run file --input` of `lines` (written to `dir`), dead letters to a file in `dir`:
/// its exit status and stderr.
pub fn run_input(dir: &Path, file: &Path, lines: &[Vec<u8>]) -> (std::process::ExitStatus, String) {
    use std::io::Write as _;
    let input = dir.join("input.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
    for l in lines {
        f.write_all(l).unwrap();
        f.write_all(b"\n").unwrap();
    }
    f.flush().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("run")
        .arg(file)
        .arg("--input")
        .arg(&input)
        .arg("--dead-letter")
        .arg(dir.join("dead.jsonl"))
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `weir validate file` with `--set`s, which must fail with exit 2: its stderr, with
/// `@LINE(text)` in each of `wants` replaced by the line of `file` that starts with `text`;
/// fails unless every one of `wants` is in it.
pub fn validate_fails(file: &Path, sets: &[&str], wants: &[&str]) {
    let text = std::fs::read_to_string(file).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_weir"));
    cmd.arg("validate").arg(file);
    for s in sets {
        cmd.arg("--set").arg(s);
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for want in wants {
        let mut want = want.replace("FILE", &file.display().to_string());
        while let Some(i) = want.find("@LINE(") {
            let j = i + want[i..].find(')').unwrap();
            let needle = &want[i + 6..j];
            let line = text.lines().position(|l| l.starts_with(needle)).unwrap() + 1;
            want.replace_range(i..=j, &line.to_string());
        }
        assert!(stderr.contains(&want), "want `{want}` in:\n{stderr}");
    }
}

/// PostgreSQL.
pub mod pg {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// The test bed's server: `WEIR_POSTGRES_URL`, or what `scripts/brokers up postgres` starts.
    pub fn url() -> String {
        std::env::var("WEIR_POSTGRES_URL")
            .unwrap_or_else(|_| "postgresql://weir@127.0.0.1:15432/weir".into())
    }

    /// A table name no other test or run uses.
    pub fn unique_table(case: &str) -> String {
        super::unique_name(case)
    }

    /// The seed pipeline with its results in `table` at `url`.
    pub fn pipeline(dir: &Path, url: &str, table: &str) -> PathBuf {
        super::pipeline(
            dir,
            &format!("type = \"postgres\"\nurl = \"{url}\"\ntable = \"{table}\"\n"),
        )
    }

    /// A client of `url`; fails, saying how to start the server, when there is none.
    pub async fn client(url: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| {
                panic!("no PostgreSQL at {url} ({e}): start it with `scripts/brokers up postgres` or set WEIR_POSTGRES_URL")
            });
        tokio::spawn(conn);
        client
    }

    /// A client of `url` once the server answers (up to `limit`).
    pub async fn client_when_up(url: &str, limit: Duration) -> tokio_postgres::Client {
        let deadline = Instant::now() + limit;
        loop {
            match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
                Ok((client, conn)) => {
                    tokio::spawn(conn);
                    return client;
                }
                Err(e) if Instant::now() > deadline => panic!("PostgreSQL at {url}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The rows of `table`: (user, window start in ms) -> count, and the number of rows.
    /// Fails on a window that is not 10 s long.
    pub async fn counts(
        client: &tokio_postgres::Client,
        table: &str,
    ) -> (HashMap<(String, i64), u64>, usize) {
        let rows = client
            .query(
                &format!(
                    "SELECT user_id, (extract(epoch FROM window_start) * 1000)::bigint, \
                     (extract(epoch FROM window_end - window_start) * 1000)::bigint, count FROM {table}"
                ),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("reading {table}: {e}"));
        let mut c = HashMap::new();
        for r in &rows {
            let (user, start, len, count): (String, i64, i64, i64) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            assert_eq!(len, 10_000, "{user} at {start}");
            c.insert((user, start), count as u64);
        }
        (c, rows.len())
    }

    /// A PostgreSQL server of one test's own (`scripts/brokers postgres-serve DIR PORT`), so
    /// that stopping it never touches the shared one. Dropping it stops it.
    pub struct OwnServer {
        pub dir: PathBuf,
        pub port: u16,
        child: Option<Child>,
    }

    impl OwnServer {
        /// Starts a server on a free port with its cluster in `dir` (made on the first start).
        pub async fn start(dir: &Path) -> OwnServer {
            // The server runs as `postgres` when the tests run as root: it must reach `dir`.
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut s = OwnServer {
                dir: dir.to_path_buf(),
                port,
                child: None,
            };
            s.restart().await;
            s
        }

        /// The connection string of its `postgres` database.
        pub fn url(&self) -> String {
            format!("postgresql://weir@127.0.0.1:{}/postgres", self.port)
        }

        /// Starts it again on the same directory and waits until it answers.
        pub async fn restart(&mut self) {
            assert!(self.child.is_none(), "already running");
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/brokers");
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join("server.log"))
                .unwrap();
            let child = Command::new(script)
                .arg("postgres-serve")
                .arg(self.dir.join("pg"))
                .arg(self.port.to_string())
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("scripts/brokers postgres-serve");
            self.child = Some(child);
            let _ = client_when_up(&self.url(), Duration::from_secs(90)).await;
        }

        /// Stops it the way a crash does: SIGQUIT, the immediate shutdown (no checkpoint; the
        /// next start recovers from the WAL), and waits for it to exit.
        pub fn crash(&mut self) {
            let mut child = self.child.take().expect("running");
            let ok = Command::new("kill")
                .arg("-QUIT")
                .arg(child.id().to_string())
                .status()
                .unwrap();
            assert!(ok.success());
            let status = child.wait().unwrap();
            eprintln!("own PostgreSQL on port {} stopped: {status}", self.port);
        }
    }

    impl Drop for OwnServer {
        fn drop(&mut self) {
            if let Some(mut c) = self.child.take() {
                let _ = Command::new("kill")
                    .arg("-INT")
                    .arg(c.id().to_string())
                    .status();
                let _ = c.wait();
            }
        }
    }
}

/// Redis.
pub mod redis {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};

    /// The test bed's server: `WEIR_REDIS_URL`, or what `scripts/brokers up redis` starts.
    pub fn url() -> String {
        std::env::var("WEIR_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:16379/".into())
    }

    /// The seed pipeline with its results under the key prefix `prefix` at `url`.
    pub fn pipeline(dir: &Path, url: &str, prefix: &str) -> PathBuf {
        super::pipeline(
            dir,
            &format!("type = \"redis\"\nurl = \"{url}\"\nprefix = \"{prefix}\"\n"),
        )
    }

    /// A connection to `url`; fails, saying how to start the server, when there is none.
    pub async fn connect(url: &str) -> ::redis::aio::MultiplexedConnection {
        let c = ::redis::Client::open(url).unwrap();
        c.get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| {
                panic!("no Redis at {url} ({e}): start it with `scripts/brokers up redis` or set WEIR_REDIS_URL")
            })
    }

    /// The results under `prefix`: (user, window start in ms) -> count, read from the
    /// hashes, and the number of members of the `PREFIX:windows` index. Fails on a hash
    /// whose window is not 10 s long or whose index entry is missing.
    pub async fn counts(
        conn: &mut ::redis::aio::MultiplexedConnection,
        prefix: &str,
    ) -> (HashMap<(String, i64), u64>, usize) {
        let index = format!("{prefix}:windows");
        let members: Vec<String> = ::redis::cmd("ZRANGE")
            .arg(&index)
            .arg(0)
            .arg(-1)
            .query_async(conn)
            .await
            .unwrap();
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}:*@*"))
                .arg("COUNT")
                .arg(10_000)
                .query_async(conn)
                .await
                .unwrap();
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let ms = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .unwrap()
                .timestamp_millis()
        };
        let mut c = HashMap::new();
        for key in &keys {
            let h: HashMap<String, String> = ::redis::cmd("HGETALL")
                .arg(key)
                .query_async(conn)
                .await
                .unwrap();
            let (start, end) = (ms(&h["window_start"]), ms(&h["window_end"]));
            assert_eq!(end - start, 10_000, "{key}");
            let id = key.strip_prefix(&format!("{prefix}:")).unwrap();
            assert!(
                members.contains(&format!("{}|{id}", h["window_start"])),
                "{key} is in {index}"
            );
            c.insert((h["user_id"].clone(), start), h["count"].parse().unwrap());
        }
        assert_eq!(members.len(), keys.len(), "one index entry per hash");
        (c, keys.len())
    }
}
