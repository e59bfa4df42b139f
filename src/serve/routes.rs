//! The HTTP routes of `weir serve`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::ingest::Refused;
use super::App;

/// The router: ingest (behind the optional token), live view, health and metrics.
pub fn router(app: Arc<App>) -> Router {
    let c = &app.config.serve;
    let ingest = Router::new()
        .route(
            "/track",
            post(track).layer(DefaultBodyLimit::max(c.max_body_bytes)),
        )
        .route(
            "/track/batch",
            post(track_batch).layer(DefaultBodyLimit::max(c.max_batch_bytes)),
        )
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .route(
            "/",
            get(|| async { Html(include_str!("static/index.html")) }),
        )
        .route("/app.js", get(app_js))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/ws", get(ws))
        .merge(ingest)
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(json!({"message": "no such route"})),
            )
        })
        .layer(middleware::map_response(json_errors))
        .with_state(app)
}

/// Every error answer is JSON `{"message": …}`: the ones axum itself writes as plain text
/// (413 over a body limit, 405, a bad WebSocket upgrade, …) are rewritten.
async fn json_errors(res: Response) -> Response {
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let message = match text.trim() {
        "" => status.canonical_reason().unwrap_or("error").to_string(),
        t => t.to_string(),
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let body = serde_json::to_vec(&json!({"message": message})).unwrap_or_default();
    Response::from_parts(parts, axum::body::Body::from(body))
}

async fn app_js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("static/app.js"),
    )
}

/// 401 unless the request carries `Authorization: Bearer TOKEN` (when a token is set).
async fn require_token(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(token) = &app.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .unwrap_or("");
        if !same(given.as_bytes(), token.as_bytes()) {
            app.unauthorized.fetch_add(1, Ordering::Relaxed);
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))],
                Json(json!({"message": "missing or wrong bearer token"})),
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// The token of an `Authorization` value whose scheme is `Bearer`, in any case (RFC 9110:
/// schemes are case-insensitive), with any amount of space after it.
fn bearer(v: &str) -> Option<&str> {
    let (scheme, token) = v.trim().split_once([' ', '\t'])?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

/// Compares without stopping at the first difference (no timing hint about the token).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn refused(r: Refused) -> Response {
    match r {
        Refused::Invalid(problems) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"message": "invalid event", "problems": problems})),
        )
            .into_response(),
        Refused::InvalidEvents(events) => {
            let errors: Vec<_> = events
                .iter()
                .map(|(i, p)| json!({"index": i, "problems": p}))
                .collect();
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({"message": "invalid events; none was published", "errors": errors})),
            )
                .into_response()
        }
        Refused::Unavailable(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, HeaderValue::from_static("1"))],
            Json(json!({"message": why})),
        )
            .into_response(),
    }
}

/// 503 when the broker is still not connected after `publish_timeout`.
fn starting() -> Response {
    refused(Refused::Unavailable(
        "starting: connecting to the broker".into(),
    ))
}

async fn track(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let Some(ingest) = app.ingest().await else {
        return starting();
    };
    match ingest.track(&body).await {
        Ok(fields) => {
            let mut answer = serde_json::Map::new();
            answer.insert("message".into(), "event accepted".into());
            answer.extend(fields);
            (StatusCode::ACCEPTED, Json(answer)).into_response()
        }
        Err(r) => refused(r),
    }
}

async fn track_batch(State(app): State<Arc<App>>, body: Bytes) -> Response {
    let Some(ingest) = app.ingest().await else {
        return starting();
    };
    match ingest.track_batch(&body).await {
        Ok(n) => (
            StatusCode::ACCEPTED,
            Json(json!({"message": format!("{n} events accepted"), "accepted": n})),
        )
            .into_response(),
        Err(r) => refused(r),
    }
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    crate::observe::health_response(&app.observer)
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    crate::observe::metrics_response(super::prom::render(&app))
}

/// The live feed. The upgraded connection keeps its place under `serve.max_connections`
/// while it lasts.
async fn ws(
    State(app): State<Arc<App>>,
    slot: Option<axum::Extension<crate::http::Slot>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let kept = slot.and_then(|s| s.keep());
    upgrade.on_upgrade(move |socket| stream(app, socket, kept))
}

/// Resolves when the server closes this upgraded connection to make room (never without a
/// slot).
async fn evicted(kept: &Option<crate::http::Kept>) {
    match kept {
        Some(k) => k.closed().await,
        None => std::future::pending().await,
    }
}

/// Sends the hello, the latest results and then every message of the hub until the client
/// leaves, the server stops or it needs the connection for others. A client too slow to
/// keep up skips what it missed.
async fn stream(app: Arc<App>, mut socket: WebSocket, kept: Option<crate::http::Kept>) {
    let (recent, mut rx) = app.hub.subscribe();
    let hello = app.hello();
    let counters = app.counters();
    for msg in [hello, counters].into_iter().chain(recent) {
        if !send(&mut socket, &msg).await {
            return;
        }
    }
    loop {
        let msg = tokio::select! {
            _ = app.stop.cancelled() => break,
            _ = evicted(&kept) => {
                tracing::debug!("a live-view client closed to make room (serve.max_connections)");
                break;
            }
            m = rx.recv() => match m {
                Ok(m) => m,
                Err(RecvError::Lagged(n)) => {
                    tracing::debug!(skipped = n, "a live-view client fell behind");
                    format!(r#"{{"type":"lagged","skipped":{n}}}"#).into()
                }
                Err(RecvError::Closed) => break,
            },
            incoming = socket.recv() => match incoming {
                // Pings are answered by axum; anything else from the client is ignored.
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => continue,
            },
        };
        if !send(&mut socket, &msg).await {
            return;
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}

/// How long one message may take to reach a client before the client is dropped.
const CLIENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn send(socket: &mut WebSocket, msg: &str) -> bool {
    let sent = tokio::time::timeout(CLIENT_TIMEOUT, socket.send(Message::Text(msg.into()))).await;
    match sent {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            tracing::info!(
                "dropping a live-view client that took over {CLIENT_TIMEOUT:?} to take one message"
            );
            false
        }
    }
}
