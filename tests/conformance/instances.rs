//! `weir run` processes of one bed, run side by side as instances of one pipeline: each
//! with the bed's `--set` overrides, an info log of its own and a metrics endpoint on a
//! free port, watched through its log lines (`partitions assigned`, `pipeline stopped`)
//! and its `/metrics`, and killed with SIGKILL.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Bed;

/// One `weir run` of a bed's pipeline.
pub struct Instance {
    /// Its name in messages (`a`, `b`, ...).
    pub name: String,
    child: Child,
    log: PathBuf,
    /// The base URL of its metrics endpoint, once its log said it.
    metrics: Option<String>,
}

/// What an instance's `pipeline stopped` line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    pub events_in: u64,
    pub late: u64,
}

impl Instance {
    /// Starts `weir run PIPELINE --broker B --set ... --exit-when-idle IDLE`, its log in
    /// `dir/NAME.log`.
    pub fn spawn(bed: &Bed, dir: &Path, name: &str, idle: &str) -> Instance {
        let log = dir.join(format!("{name}.log"));
        let err = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_weir"));
        cmd.arg("run")
            .arg(super::pipeline_file())
            .arg("--broker")
            .arg(&bed.config.broker);
        for s in &bed.sets {
            cmd.arg("--set").arg(s);
        }
        let child = cmd
            .args(["--exit-when-idle", idle, "--metrics-listen", "127.0.0.1:0"])
            .env_remove("WEIR_BROKER")
            .env("WEIR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("weir run");
        Instance {
            name: name.to_string(),
            child,
            log,
            metrics: None,
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last 40 lines of its log, for messages.
    pub fn tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- {} ---\n{}",
            self.name,
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }

    /// The source partitions it owns now, as its `partitions assigned` (the whole set)
    /// and `partitions revoked` lines say.
    pub fn owned(&self) -> BTreeSet<u32> {
        owned_after(&self.log(), 0)
    }

    /// How many events it has read so far (its `/metrics`); 0 before its endpoint is up.
    pub async fn events_in(&mut self) -> u64 {
        if self.metrics.is_none() {
            self.metrics = self.log().lines().find_map(|l| {
                let rest = l.split("metrics: ").nth(1)?;
                Some(rest.split_whitespace().next()?.to_string())
            });
        }
        let Some(url) = &self.metrics else { return 0 };
        let Ok(resp) = reqwest::get(url).await else {
            return 0;
        };
        let text = resp.text().await.unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with("weir_events_in_total{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    /// Kills it with SIGKILL (nothing flushed, nothing committed) and reaps it.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    /// Waits up to `limit` for it to exit, however it ends.
    pub async fn exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "instance {} did not end within {limit:?}\n{}",
                    self.name,
                    self.tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits up to `limit` for it to exit with success; what its `pipeline stopped` line
    /// says (which must balance).
    pub async fn finish(&mut self, limit: Duration) -> Stopped {
        let status = self.exit(limit).await;
        assert!(status.success(), "weir run: {status}\n{}", self.tail());
        let log = self.log();
        let line = log
            .lines()
            .rfind(|l| l.contains("pipeline stopped ("))
            .unwrap_or_else(|| panic!("no `pipeline stopped` line\n{}", self.tail()));
        assert!(line.contains("(balanced)"), "{line}");
        Stopped {
            events_in: term(line, "events_in"),
            late: term(line, "late"),
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// The number after ` NAME=` in a summary line.
fn term(line: &str, name: &str) -> u64 {
    line.split(&format!(" {name}="))
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

/// The partitions owned after the log lines from byte `from` on, starting from none.
pub fn owned_after(log: &str, from: usize) -> BTreeSet<u32> {
    let mut owned = BTreeSet::new();
    for l in log.get(from..).unwrap_or_default().lines() {
        let Some(list) = l.split("partitions=[").nth(1) else {
            continue;
        };
        let list = list.split(']').next().unwrap_or_default();
        if l.contains("partitions assigned") {
            // `[(0, None), (2, Some(Checkpoint { .. }))]`: the whole current set.
            owned = list
                .split('(')
                .filter_map(|t| t.split(',').next()?.trim().parse().ok())
                .collect();
        } else if l.contains("partitions revoked") {
            for p in list.split(',').filter_map(|t| t.trim().parse::<u32>().ok()) {
                owned.remove(&p);
            }
        }
    }
    owned
}

/// Waits up to `limit` until `instances` own disjoint, non-empty sets of partitions that
/// together are `0..partitions` (the group has settled); panics with their logs if not.
pub async fn wait_until_split(instances: &mut [Instance], partitions: u32, limit: Duration) {
    let t0 = Instant::now();
    loop {
        let exited: Vec<&str> = instances
            .iter_mut()
            .filter_map(|i| (!matches!(i.child.try_wait(), Ok(None))).then_some(i.name.as_str()))
            .collect();
        let exited = exited.join(", ");
        let sets: Vec<BTreeSet<u32>> = instances.iter().map(Instance::owned).collect();
        let all: BTreeSet<u32> = sets.iter().flatten().copied().collect();
        let total: usize = sets.iter().map(BTreeSet::len).sum();
        let split = sets.iter().all(|s| !s.is_empty())
            && total == all.len()
            && all == (0..partitions).collect();
        if split {
            return;
        }
        if t0.elapsed() > limit || !exited.is_empty() {
            let owners: Vec<String> = instances
                .iter()
                .zip(&sets)
                .map(|(i, s)| format!("{} owns {s:?}", i.name))
                .collect();
            let logs: Vec<String> = instances.iter().map(Instance::tail).collect();
            panic!(
                "the instances did not split the {partitions} partitions (waited {:?}; exited: [{exited}]): {}\n{}",
                t0.elapsed(),
                owners.join(", "),
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
