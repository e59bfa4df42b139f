//! A bounded load test of `weir serve`'s `POST /track` on the memory backend, on loopback:
//! CONNS keep-alive connections post seed events as fast as answers come for a fixed time;
//! prints requests/s, latency percentiles, refusals and the process's peak RSS (VmHWM).
//!
//! `cargo bench --bench serve_load` runs the server in this process (the RSS then covers
//! server and client). Env: WEIR_LOAD_SECS (10), WEIR_LOAD_CONNS (64), and WEIR_LOAD_URL to
//! load an already running `weir serve` instead (e.g. one under `/usr/bin/time -v`, whose
//! report gives the server's own peak RSS).

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use weir::Backend;
use weir_engine::config::Overrides;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `n`th event: one of 1,000 users, stamped with the wall clock (epoch millis) as the
/// seed's demo does, so windows close as time passes and nothing is late.
fn event(n: u64) -> String {
    format!(
        r#"{{"event_type":"page_view","user_id":"User{}","action":"view","timestamp":{},"metadata":{{"session_id":"s{n}","page":"/search"}}}}"#,
        n % 1000,
        weir_engine::time::now_millis()
    )
}

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    let secs = env_or("WEIR_LOAD_SECS", 10);
    let conns = env_or("WEIR_LOAD_CONNS", 64);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let stop = CancellationToken::new();
        let (url, server) = match std::env::var("WEIR_LOAD_URL") {
            Ok(u) => (u.trim_end_matches('/').to_string(), None),
            Err(_) => {
                let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("pipelines/user_activity.toml");
                let (c, backend) = Backend::load(&path, &Overrides::default()).expect("pipeline");
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let url = format!("http://{}", listener.local_addr().unwrap());
                let s = weir::serve::serve(c, backend, listener, false, stop.clone());
                (url, Some(tokio::spawn(s)))
            }
        };
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(conns as usize)
            .build()
            .unwrap();
        let end = Instant::now() + Duration::from_secs(secs);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..conns {
            let (client, url) = (client.clone(), format!("{url}/track"));
            tasks.push(tokio::spawn(async move {
                let (mut lat, mut refused, mut n) = (Vec::new(), 0u64, c);
                while Instant::now() < end {
                    let t = Instant::now();
                    let r = client.post(&url).body(event(n)).send().await;
                    match r {
                        Ok(r) if r.status().as_u16() == 202 => {
                            let _ = r.bytes().await;
                        }
                        _ => refused += 1,
                    }
                    lat.push(t.elapsed().as_micros() as u32);
                    n += conns;
                }
                (lat, refused)
            }));
        }
        let mut all = Vec::new();
        let mut refused = 0;
        for t in tasks {
            let (lat, r) = t.await.unwrap();
            all.extend(lat);
            refused += r;
        }
        let took = started.elapsed().as_secs_f64();
        all.sort_unstable();
        let pct =
            |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1000.0;
        println!(
            "serve_load: {} requests in {took:.1} s over {conns} connections = {:.0} requests/s; \
             latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {refused} not 202",
            all.len(),
            all.len() as f64 / took,
            pct(0.50),
            pct(0.99),
            pct(1.0),
        );
        if let Some(kib) = peak_rss_kib() {
            let whose = if server.is_some() {
                "server + client"
            } else {
                "client only"
            };
            println!(
                "serve_load: peak RSS (VmHWM) {:.1} MiB ({whose})",
                kib as f64 / 1024.0
            );
        }
        stop.cancel();
        if let Some(s) = server {
            s.await
                .unwrap()
                .expect("weir serve stops cleanly, its counters balanced");
        }
    });
}
