//! `weir serve`'s live feed over WebSocket, as the page reads it: window results to every
//! client, counters, and the demo feeding it until Ctrl-C.

#[path = "serve/support.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{event, next_of, Server};

#[tokio::test]
async fn ws_streams_window_results_to_every_client() {
    let s = Server::start(&["brokers.memory.partitions=1"], &[]);
    let ws_url = s.ws_url();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
        let hello = next_of(&mut ws, "hello").await;
        assert_eq!(hello["group_by"], json!(["user_id"]));
        assert_eq!(hello["values"], json!(["count"]));
        assert_eq!(hello["backend"], "memory");
        let counters = next_of(&mut ws, "counters").await;
        assert_eq!(counters["results_out"], 0);
        clients.push(ws);
    }
    let mut events: Vec<String> = (1..=3)
        .map(|i| event("User1", &format!("2024-06-27T15:00:0{i}Z")))
        .chain((4..=5).map(|i| event("User2", &format!("2024-06-27T15:00:0{i}Z"))))
        .collect();
    // An event 30 s later moves the watermark past the first window's end + grace.
    events.push(event("User3", "2024-06-27T15:00:30Z"));
    let (code, body) = s
        .post("/track/batch", format!("[{}]", events.join(",")))
        .await;
    assert_eq!(code, 202, "{body}");

    for ws in &mut clients {
        let mut got = Vec::new();
        for _ in 0..2 {
            let r = next_of(ws, "result").await["result"].clone();
            got.push((
                r["user_id"].clone(),
                r["count"].clone(),
                r["window_start"].clone(),
            ));
        }
        got.sort_by_key(|g| g.0.to_string());
        assert_eq!(
            got,
            [
                (json!("User1"), json!(3), json!("2024-06-27T15:00:00Z")),
                (json!("User2"), json!(2), json!("2024-06-27T15:00:00Z")),
            ]
        );
        // Counters follow within a tick and add up; the one window closed has its emit
        // latency (it is recorded just after `results_out`, once the sink acknowledged).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let c = next_of(ws, "counters").await;
            assert!(std::time::Instant::now() < deadline, "{c}");
            if c["results_out"] == 2 && c["emit_latency"]["windows"] == 1 {
                assert_eq!(
                    (c["events_in"].clone(), c["dead_letters"].clone()),
                    (json!(6), json!(0))
                );
                let p99 = c["emit_latency"]["p99_ms"].as_f64().unwrap();
                assert!(p99 > 0.0 && p99 <= 10_000.0, "{c}");
                break;
            }
        }
    }
    // A client that joins later gets the latest results first.
    let (mut late, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    assert_eq!(
        next_of(&mut late, "result").await["result"]["window_start"],
        "2024-06-27T15:00:00Z"
    );

    assert_eq!(s.metric("weir_events_in_total").await, 6.0);
    assert_eq!(s.metric("weir_results_out_total").await, 2.0);
    assert_eq!(s.metric("weir_live_clients").await, 4.0);
    let lag = s.metric("weir_watermark_lag_seconds").await;
    assert!(lag > 3600.0, "the watermark is in 2024: {lag}");
}

#[tokio::test]
async fn demo_feeds_the_live_view_and_ctrl_c_stops_cleanly() {
    let mut s = Server::start_with(
        &[
            "window.size=1s",
            "window.grace=0s",
            "demo.interval=100ms",
            "demo.invalid_every=5",
        ],
        &[],
        &["--demo"],
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url()).await.unwrap();
    let r = next_of(&mut ws, "result").await["result"].clone();
    assert!(r["user_id"].as_str().unwrap().starts_with("User"), "{r}");
    assert!(r["count"].as_u64().unwrap() >= 1, "{r}");
    // One in five demo events is spoiled: the counters show them as dead letters.
    loop {
        let c = next_of(&mut ws, "counters").await;
        // Every term of the balance is on the page.
        for k in [
            "events_in",
            "windowed",
            "dead_letters",
            "late",
            "filtered",
            "replayed",
            "retried",
            "skipped",
            "blank_lines",
            "late_window_misses",
        ] {
            assert!(c[k].is_u64(), "{k} missing from {c}");
        }
        if c["dead_letters"].as_u64().unwrap() > 0 {
            break;
        }
    }

    let kill = Command::new("kill")
        .args(["-INT", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "weir serve did not stop on Ctrl-C"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        status.code(),
        Some(0),
        "a graceful stop with balanced counters"
    );
}

/// Live-view clients count against `serve.max_connections`: with the limit reached by
/// `/ws` clients, a new connection closes the oldest client to make room (idle HTTP
/// connections would go first), so requests are still answered and the open connections
/// never exceed the limit.
#[tokio::test]
async fn ws_clients_count_against_max_connections_and_make_room() {
    use futures_util::StreamExt as _;
    let s = Server::start(
        &["serve.max_connections=3", "brokers.memory.partitions=1"],
        &[],
    );
    let ws_url = s.ws_url();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
        next_of(&mut ws, "hello").await;
        clients.push(ws);
        // Distinct ages: the oldest is the one to go.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let health = client.get(s.at("/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    drop(client);
    // The oldest client was closed for it; the two others still stream.
    let mut oldest = clients.remove(0);
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match oldest.next().await {
                None | Some(Err(_)) => break,
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) => break,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the oldest /ws client was not closed");
    // Another client replaces it (closing the now oldest idle one, if any), and the feed
    // still reaches the two that stayed.
    let (mut fresh, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    next_of(&mut fresh, "hello").await;
    let events: Vec<String> = vec![
        event("User1", "2024-06-27T15:00:01Z"),
        event("User3", "2024-06-27T15:00:30Z"),
    ];
    let (code, body) = s
        .post("/track/batch", format!("[{}]", events.join(",")))
        .await;
    assert_eq!(code, 202, "{body}");
    let r = next_of(&mut fresh, "result").await;
    assert_eq!(r["result"]["user_id"], "User1", "{r}");
}
