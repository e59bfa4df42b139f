//! `weir serve` on the memory backend, driven over HTTP as a client would: every status
//! code of the ingest API, health, metrics and the page, and the limits on connections.
//! The live feed of window results is in `tests/serve_live.rs`.

#[path = "cli/fds.rs"]
mod fds;
#[path = "serve/support.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{event, Server};

/// The `content-type` of `resp`.
fn content_type(resp: &reqwest::Response) -> &str {
    resp.headers()["content-type"].to_str().unwrap()
}

#[tokio::test]
async fn track_answers_202_and_422_with_every_problem() {
    let s = Server::start(&[], &[]);
    let (code, body) = s
        .post("/track", event("User1", "2024-06-27 15:43:43.315342"))
        .await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(
        body,
        json!({"message": "event accepted", "user_id": "User1"})
    );

    let (code, body) = s
        .post(
            "/track",
            r#"{"event_type":"hover","user_id":7,"timestamp":"soon"}"#,
        )
        .await;
    assert_eq!(code, 422, "{body}");
    let problems: Vec<&str> = body["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(problems.len(), 4, "{problems:?}");
    assert!(problems[0].contains("`hover` is not one of page_view, scroll, click"));
    assert!(problems[1].contains("`user_id`: expected string, got an integer"));
    assert!(problems[2].contains("missing field `action`"));
    assert!(problems[3].contains("`timestamp`"));

    let (code, body) = s.post("/track", "not json").await;
    assert_eq!(code, 422);
    assert!(body["problems"][0]
        .as_str()
        .unwrap()
        .starts_with("invalid JSON"));

    let batch = format!(
        "[{},{}]",
        event("User1", "2024-06-27T15:43:44Z"),
        event("User2", "2024-06-27T15:43:45Z")
    );
    let (code, body) = s.post("/track/batch", batch).await;
    assert_eq!((code, &body["accepted"]), (202, &json!(2)), "{body}");

    // One bad event refuses the whole batch, naming it by index.
    let batch = format!(
        "[{},{{\"user_id\":\"x\"}}]",
        event("User3", "2024-06-27T15:43:46Z")
    );
    let (code, body) = s.post("/track/batch", batch).await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["errors"][0]["index"], 1, "{body}");
    let (code, body) = s.post("/track/batch", "[{}]").await;
    assert_eq!(code, 422);
    assert_eq!(body["errors"][0]["index"], 0, "{body}");
    assert_eq!(
        body["errors"][0]["problems"].as_array().unwrap().len(),
        4,
        "{body}"
    );
    let (code, body) = s.post("/track/batch", r#"{"not":"an array"}"#).await;
    assert_eq!(code, 422);
    assert!(body["problems"][0]
        .as_str()
        .unwrap()
        .starts_with("expected a JSON array"));

    assert_eq!(s.metric("weir_http_events_accepted_total").await, 3.0);
    assert_eq!(s.refused("invalid").await, 5.0);
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let s = Server::start(
        &["serve.max_body_bytes=200", "serve.max_batch_bytes=400"],
        &[],
    );
    let small = event("User1", "2024-06-27T15:43:43Z");
    assert!(small.len() < 200);
    assert_eq!(s.post("/track", small.clone()).await.0, 202);
    let big = format!(
        r#"{{"event_type":"click","user_id":"User1","action":"{}","timestamp":"2024-06-27T15:43:43Z"}}"#,
        "x".repeat(300)
    );
    let (code, body) = s.post("/track", big).await;
    assert_eq!(code, 413);
    assert!(
        body["message"].as_str().unwrap().contains("length limit"),
        "{body}"
    );
    let batch = format!("[{small},{small},{small},{small}]");
    assert!(batch.len() > 400);
    let (code, body) = s.post("/track/batch", batch).await;
    assert_eq!((code, body["message"].is_string()), (413, true), "{body}");
    assert_eq!(s.post("/track/batch", format!("[{small}]")).await.0, 202);
}

#[tokio::test]
async fn a_token_from_the_environment_guards_ingest_only() {
    let s = Server::start(
        &["serve.token_env=WEIR_TEST_SERVE_TOKEN"],
        &[("WEIR_TEST_SERVE_TOKEN", "test-token-not-a-secret")],
    );
    let ev = event("User1", "2024-06-27T15:43:43Z");
    assert_eq!(s.post("/track", ev.clone()).await.0, 401);
    assert_eq!(
        s.post_with("/track", ev.clone(), Some("wrong")).await.0,
        401
    );
    assert_eq!(
        s.post_with("/track/batch", "[]", Some("test-token-n"))
            .await
            .0,
        401
    );
    let (code, body) = s
        .post_with("/track", ev.clone(), Some("test-token-not-a-secret"))
        .await;
    assert_eq!(code, 202, "{body}");
    // The scheme is case-insensitive (RFC 9110 §11.1); the token is not.
    for header in [
        "bearer test-token-not-a-secret",
        "BEARER   test-token-not-a-secret",
    ] {
        let resp = reqwest::Client::new()
            .post(s.at("/track"))
            .header("authorization", header)
            .body(ev.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202, "{header}");
    }
    let resp = reqwest::Client::new()
        .post(s.at("/track"))
        .header("authorization", "bearer TEST-TOKEN-NOT-A-SECRET")
        .body(ev.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let health = reqwest::get(s.at("/healthz")).await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert_eq!(s.refused("unauthorized").await, 4.0);
}

/// A memory partition of 2 records that the pipeline cannot commit (their window stays
/// open): the broker stops acknowledging, as a full or unreachable broker does.
#[tokio::test]
async fn a_stalled_broker_gets_503_not_a_hang_and_a_full_queue_503_at_once() {
    let s = Server::start(
        &[
            "brokers.memory.partitions=1",
            "brokers.memory.capacity=2",
            "window.idle_timeout=1h",
            "serve.queue=1",
            "serve.publish_timeout=2s",
        ],
        &[],
    );
    for _ in 0..2 {
        assert_eq!(
            s.post("/track", event("User1", "2024-06-27T15:43:43Z"))
                .await
                .0,
            202
        );
    }
    let stalled = {
        let url = s.at("/track");
        tokio::spawn(async move {
            let t = Instant::now();
            let r = reqwest::Client::new()
                .post(url)
                .body(event("User1", "2024-06-27T15:43:44Z"))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), t.elapsed(), r.text().await.unwrap())
        })
    };
    // Wait until the stalled event holds the queue's only place.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.metric("weir_http_queue_events").await < 1.0 {
        assert!(Instant::now() < deadline, "the event never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = Instant::now();
    let (code, body) = s
        .post("/track", event("User2", "2024-06-27T15:43:45Z"))
        .await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("queue"),
        "{body}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "503 at once, took {:?}",
        t.elapsed()
    );

    let (code, took, body) = stalled.await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("did not acknowledge within 2s"), "{body}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert_eq!(
        reqwest::get(s.at("/healthz"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(s.refused("unavailable").await, 2.0);
}

#[tokio::test]
async fn page_health_and_metrics_are_served() {
    let s = Server::start(&[], &[]);
    let page = reqwest::get(s.at("/")).await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(content_type(&page).starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"<script src="/app.js"></script>"#));
    assert!(!html.contains("https://"), "nothing from a CDN");
    let js = reqwest::get(s.at("/app.js")).await.unwrap();
    assert!(content_type(&js).starts_with("text/javascript"));
    assert!(js.text().await.unwrap().contains("new WebSocket"));

    let health: Value = reqwest::get(s.at("/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        health,
        json!({"status": "ok", "pipeline": "user_activity", "backend": "memory"})
    );
    let metrics = reqwest::get(s.at("/metrics")).await.unwrap();
    assert!(content_type(&metrics).starts_with("text/plain; version=0.0.4"));
    let text = metrics.text().await.unwrap();
    for name in [
        "weir_events_in_total",
        "weir_results_out_total",
        "weir_dead_letters_total",
        "weir_late_events_total",
        "weir_events_windowed_total",
        "weir_filtered_total",
        "weir_replayed_total",
        "weir_retried_total",
        "weir_skipped_total",
        "weir_blank_lines_total",
        "weir_late_window_misses_total",
        "weir_watermark_lag_seconds",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} in\n{text}"
        );
    }
    let nope = reqwest::get(s.at("/nope")).await.unwrap();
    assert_eq!(nope.status().as_u16(), 404);
    assert_eq!(
        nope.json::<Value>().await.unwrap(),
        json!({"message": "no such route"})
    );
    // Errors axum writes itself are JSON too.
    let wrong_method = reqwest::get(s.at("/track")).await.unwrap();
    assert_eq!(wrong_method.status().as_u16(), 405);
    assert!(content_type(&wrong_method).starts_with("application/json"));
    assert!(wrong_method.json::<Value>().await.unwrap()["message"].is_string());
}

/// The issue's lock-out: 1,100 connections that never send a byte, against a server
/// limited to 1,024 file descriptors. With the default `[serve]` limits the server keeps
/// accepting (closing the longest-idle connections past `max_connections`), so a real
/// request still gets its answer.
#[tokio::test]
async fn idle_connections_do_not_lock_out_a_request_under_a_1024_descriptor_limit() {
    fds::allow_files(4096);
    // The server under `ulimit -n 1024`, as the issue found it.
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        r#"ulimit -n 1024 && exec "$0" "$@""#,
        env!("CARGO_BIN_EXE_weir"),
    ]);
    let s = Server::start_cmd(&[], &[], &[], cmd);
    let addr = s.addr();
    let idle = fds::hold_connections(&addr, 1100).await;
    answers_within(&s, Duration::from_secs(10)).await;
    drop(idle);
}

/// `/healthz` answers 200 and `POST /track` 202, both within `limit`.
async fn answers_within(s: &Server, limit: Duration) {
    let client = reqwest::Client::builder().timeout(limit).build().unwrap();
    let started = Instant::now();
    let health = client.get(s.at("/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let ev = event("User1", "2024-06-27T15:43:43Z");
    let tracked = client.post(s.at("/track")).body(ev).send().await.unwrap();
    assert_eq!(tracked.status().as_u16(), 202);
    assert!(started.elapsed() < limit, "{:?}", started.elapsed());
}

/// A client that sends half its headers is closed after `header_timeout`; one that sends
/// nothing, or nothing more after a response, after `idle_timeout`.
#[tokio::test]
async fn slow_and_idle_connections_are_closed_after_their_timeouts() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let s = Server::start(&["serve.header_timeout=1s", "serve.idle_timeout=4s"], &[]);
    let addr = s.addr();
    let closed_within = |mut c: tokio::net::TcpStream, limit: Duration| async move {
        let started = Instant::now();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(limit, c.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "still open after {limit:?}");
        (started.elapsed(), String::from_utf8_lossy(&buf).to_string())
    };

    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(
        b"GET /healthz HTTP/1.1
Host: x
",
    )
    .await
    .unwrap();
    let (took, _) = closed_within(slow, Duration::from_secs(3)).await;
    assert!(took >= Duration::from_millis(900), "{took:?}");

    let silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (took, _) = closed_within(silent, Duration::from_secs(8)).await;
    assert!(took >= Duration::from_millis(3900), "{took:?}");

    let mut kept = tokio::net::TcpStream::connect(&addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (took, answer) = closed_within(kept, Duration::from_secs(8)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        took >= Duration::from_millis(3900),
        "kept alive until idle: {took:?}"
    );
}

/// The issue's other lock-out: 700 connections that send complete `POST /track` headers
/// and then one byte of the body, or none. They count against `max_connections` (512 by
/// default) and are closed to make room, so `/healthz` and `POST /track` answer at once,
/// well before the body timeout (10 s by default) would close them.
#[tokio::test]
async fn stalled_request_bodies_do_not_lock_out_the_server() {
    use tokio::io::AsyncWriteExt as _;
    fds::allow_files(4096);
    let s = Server::start(&[], &[]);
    let addr = s.addr();
    let head = b"POST /track HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    let mut stalled = Vec::with_capacity(700);
    for i in 0..700 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        c.write_all(head).await.unwrap();
        if i % 2 == 0 {
            c.write_all(b"{").await.unwrap();
        }
        stalled.push(c);
    }
    answers_within(&s, Duration::from_secs(5)).await;
    drop(stalled);
}

/// A body that stops gets 408 after `body_timeout`; one that trickles slower than
/// `min_body_rate` too, a little later; a body sent in pieces at a good rate is served.
#[tokio::test]
async fn a_stalled_or_trickling_body_gets_408_after_the_body_timeout() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let s = Server::start(&["serve.body_timeout=1s", "serve.min_body_rate=100"], &[]);
    let addr = s.addr();
    let ev = event("User1", "2024-06-27T15:43:43Z");
    let head = format!(
        "POST /track HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        ev.len()
    );
    let answer = |mut c: tokio::net::TcpStream| async move {
        let started = Instant::now();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "still open after 10 s");
        (started.elapsed(), String::from_utf8_lossy(&buf).to_string())
    };

    let mut stalled = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(&ev.as_bytes()[..1]).await.unwrap();
    let (took, text) = answer(stalled).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("request body not received in time"), "{text}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // 10 bytes/s against a minimum of 100: at most 1 s + 10 bytes / 100 bytes/s, plus a tick.
    let mut trickle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    trickle.write_all(head.as_bytes()).await.unwrap();
    let body = ev.clone().into_bytes();
    let (tx, done) = tokio::sync::oneshot::channel();
    let (mut rd, mut wr) = trickle.into_split();
    tokio::spawn(async move {
        for b in body {
            if wr.write_all(&[b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = tx.send(wr);
    });
    let started = Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut buf))
        .await
        .expect("closed")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    drop(done);

    // Two pieces 300 ms apart: in time.
    let mut pieces = tokio::net::TcpStream::connect(&addr).await.unwrap();
    pieces.write_all(head.as_bytes()).await.unwrap();
    let (a, b) = ev.as_bytes().split_at(ev.len() / 2);
    pieces.write_all(a).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    pieces.write_all(b).await.unwrap();
    let mut first = vec![0u8; 12];
    pieces.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 202");
}
