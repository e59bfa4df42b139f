//! `weir serve` driven as a client would (`tests/serve.rs`, `tests/serve_live.rs`): the
//! server process, an event, the live feed's messages. Each test file uses part of it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// A `weir serve` process on a free loopback port, killed when dropped.
pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Server {
    pub fn start(sets: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_with(sets, env, &[])
    }

    pub fn start_with(sets: &[&str], env: &[(&str, &str)], args: &[&str]) -> Server {
        Server::start_cmd(sets, env, args, Command::new(env!("CARGO_BIN_EXE_weir")))
    }

    pub fn start_cmd(
        sets: &[&str],
        env: &[(&str, &str)],
        args: &[&str],
        mut cmd: Command,
    ) -> Server {
        let pipeline = concat!(env!("CARGO_MANIFEST_DIR"), "/pipelines/user_activity.toml");
        cmd.args(["serve", pipeline, "--listen", "127.0.0.1:0"])
            .env_remove("WEIR_BROKER")
            .env_remove("WEIR_SERVE_TOKEN")
            .env("WEIR_LOG", "warn")
            .stdout(Stdio::piped());
        for s in sets {
            cmd.args(["--set", s]);
        }
        cmd.envs(env.iter().copied()).args(args);
        let mut child = cmd.spawn().expect("weir serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in {line:?}"))
            .trim_end_matches('/')
            .to_string();
        Server { child, url }
    }

    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// `host:port`, for raw TCP connections.
    pub fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }

    /// The live feed's WebSocket URL.
    pub fn ws_url(&self) -> String {
        self.at("/ws").replace("http://", "ws://")
    }

    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        self.post_with(path, body, None).await
    }

    pub async fn post_with(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let mut req = reqwest::Client::new().post(self.at(path)).body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let code = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// The value of metric `name` (the first of its series).
    pub async fn metric(&self, name: &str) -> f64 {
        self.series(&format!("{name}{{")).await
    }

    /// How many ingest requests were refused for `reason`.
    pub async fn refused(&self, reason: &str) -> f64 {
        self.series(&format!(
            r#"weir_http_requests_refused_total{{pipeline="user_activity",backend="memory",reason="{reason}"}}"#
        ))
        .await
    }

    pub async fn series(&self, prefix: &str) -> f64 {
        let text = reqwest::get(self.at("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A click event of `user` at `time`.
pub fn event(user: &str, time: &str) -> String {
    json!({"event_type": "click", "user_id": user, "action": "buy", "timestamp": time,
           "metadata": {"page": "/search"}})
    .to_string()
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next message of type `kind` (skipping others), within 10 s.
pub async fn next_of(ws: &mut Ws, kind: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {kind} message within 10 s"))
            .expect("the feed stays open")
            .unwrap();
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == kind {
                return v;
            }
        }
    }
}
