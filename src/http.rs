//! The HTTP/1 front of `weir serve` and of `weir run --metrics-listen`, with the limits
//! that keep stalled clients from locking everyone out (`[serve]`): a client must send its
//! request headers within `header_timeout`, and its body within `body_timeout` plus one
//! second per `min_body_rate` bytes received (a body that stops, or trickles slower, gets
//! 408 and the connection is closed); a connection without a request in progress is closed
//! after `idle_timeout`; and at `max_connections` the connection that has been idle, or
//! stalled in its request body, the longest is closed to make room for a new one (when
//! every connection is busy, new ones wait in the listen queue).
//!
//! An upgraded connection (`/ws`) keeps its place under `max_connections` while it lasts
//! (its handler takes the request's [`Slot`]); at the limit it is closed to make room only
//! when no idle or stalled connection is left, the oldest upgraded one first.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::IntoResponse as _;
use axum::Router;
use bytes::Bytes;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// The server's limits (`[serve]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time allowed to send a request's headers.
    pub header_timeout: Duration,
    /// Time allowed to send a request's body, beyond what `min_body_rate` grants.
    pub body_timeout: Duration,
    /// Each this many bytes of a body received grant one more second for the rest.
    pub min_body_rate: u64,
    /// Time a connection may stay open with no request in progress.
    pub idle_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

impl From<&weir_engine::config::ServeConfig> for Limits {
    fn from(c: &weir_engine::config::ServeConfig) -> Self {
        Limits {
            header_timeout: c.header_timeout,
            body_timeout: c.body_timeout,
            min_body_rate: c.min_body_rate,
            idle_timeout: c.idle_timeout,
            max_connections: c.max_connections,
        }
    }
}

/// One open connection, as the accept loop sees it.
struct Conn {
    /// Requests in progress.
    busy: AtomicUsize,
    /// Requests whose body is still being received.
    receiving: AtomicUsize,
    /// When it last started or finished a request (ms since the server started).
    last_active: AtomicU64,
    /// When the first byte of the next request's head arrived (ms since the server
    /// started, plus one; 0: none yet).
    head_started: AtomicU64,
    /// Notified when `head_started` is set.
    head: tokio::sync::Notify,
    /// Cancelled to close it.
    close: CancellationToken,
    /// Upgraded (`/ws`): closed to make room only after every idle connection.
    upgraded: AtomicBool,
}

struct Conns {
    started: Instant,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Conns {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Closes the connection that has been idle, or waiting for a request body, longest;
    /// false when every connection is busy otherwise.
    fn evict_idle(&self) -> bool {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let oldest = open
            .values()
            .filter(|c| c.evictable() && !c.close.is_cancelled())
            .min_by_key(|c| {
                (
                    c.upgraded.load(Ordering::Relaxed),
                    c.last_active.load(Ordering::Relaxed),
                )
            });
        match oldest {
            Some(c) => {
                c.close.cancel();
                true
            }
            None => false,
        }
    }
}

/// A connection's place under `max_connections`, in every request's extensions. A
/// handler that upgrades the connection takes it with [`Slot::keep`], so that the upgraded
/// connection still counts; otherwise it is given back when the connection closes.
#[derive(Clone)]
pub struct Slot(Arc<SlotInner>);

struct SlotInner {
    id: u64,
    conn: Arc<Conn>,
    conns: Arc<Conns>,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl Slot {
    /// The slot, for an upgraded connection to hold while it lasts; `None` if taken.
    pub fn keep(&self) -> Option<Kept> {
        let permit = self
            .0
            .permit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        self.0.conn.upgraded.store(true, Ordering::Relaxed);
        self.0
            .conn
            .last_active
            .store(self.0.conns.now(), Ordering::Relaxed);
        Some(Kept {
            slot: self.clone(),
            _permit: permit,
        })
    }

    /// Frees the slot of a connection that ended, unless an upgraded one keeps it.
    fn release(&self) {
        let kept = self
            .0
            .permit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if kept.is_some() {
            self.0.conns.forget(self.0.id);
        }
    }
}

/// An upgraded connection's slot: given back when dropped.
pub struct Kept {
    slot: Slot,
    _permit: OwnedSemaphorePermit,
}

impl Kept {
    /// Resolves when the server closes the connection: to make room for others at
    /// `max_connections`, or at shutdown.
    pub async fn closed(&self) {
        self.slot.0.conn.close.cancelled().await
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.slot.0.conns.forget(self.slot.0.id);
    }
}

impl Conns {
    fn forget(&self, id: u64) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }
}

impl Conn {
    /// Idle, or waiting for a request body: closing it loses no work of the server's.
    fn evictable(&self) -> bool {
        self.busy.load(Ordering::Relaxed) == 0 || self.receiving.load(Ordering::Relaxed) > 0
    }
}

/// Serves `router` on `listener` within `limits` until `stop`, then lets requests in
/// progress finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let conns = Arc::new(Conns {
        started: Instant::now(),
        open: Mutex::default(),
    });
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let tasks = tokio_util::task::TaskTracker::new();
    let mut next_id = 0u64;
    let mut evictions = 0u64;
    loop {
        let (stream, _peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors (EMFILE) or a connection reset before it was
                    // accepted: make room and go on.
                    tracing::warn!(error = %e, "http: accept failed");
                    conns.evict_idle();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // A connection beyond the limit makes room by closing another, and waits (the
        // ones after it wait in the listen queue, taking no file descriptor) when every
        // connection is busy. Room is made only for a connection that came: a `/ws`
        // client at the limit stays until someone needs its place.
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if conns.evict_idle() {
                    evictions += 1;
                    if evictions.is_power_of_two() {
                        tracing::warn!(
                            max_connections = limits.max_connections,
                            evicted = evictions,
                            "http: connection limit reached; closing the connections idle, or stalled in a request body, longest"
                        );
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                }
            }
        };
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        let conn = Arc::new(Conn {
            busy: AtomicUsize::new(0),
            receiving: AtomicUsize::new(0),
            last_active: AtomicU64::new(conns.now()),
            head_started: AtomicU64::new(0),
            head: tokio::sync::Notify::new(),
            close: stop.child_token(),
            upgraded: AtomicBool::new(false),
        });
        conns
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, conn.clone());
        let router = router.clone();
        let conns = conns.clone();
        let slot = Slot(Arc::new(SlotInner {
            id,
            conn: conn.clone(),
            conns: conns.clone(),
            permit: Mutex::new(Some(permit)),
        }));
        tasks.spawn(async move {
            serve_connection(stream, router, &conn, &conns, limits, &slot).await;
            slot.release();
        });
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    router: Router,
    conn: &Arc<Conn>,
    conns: &Arc<Conns>,
    limits: Limits,
    slot: &Slot,
) {
    let service = {
        let conn = conn.clone();
        let conns = conns.clone();
        let slot = slot.clone();
        hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            let router = router.clone();
            let conn = conn.clone();
            let conns = conns.clone();
            req.extensions_mut().insert(slot.clone());
            async move {
                conn.busy.fetch_add(1, Ordering::Relaxed);
                conn.last_active.store(conns.now(), Ordering::Relaxed);
                conn.head_started.store(0, Ordering::Relaxed);
                let timed_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let body = TimedBody::new(&conn, &conns, limits, timed_out.clone());
                let res = router.oneshot(req.map(|b| Body::new(body.wrap(b)))).await;
                conn.last_active.store(conns.now(), Ordering::Relaxed);
                conn.head_started.store(0, Ordering::Relaxed);
                conn.busy.fetch_sub(1, Ordering::Relaxed);
                let res = match res {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                Ok::<_, Infallible>(if timed_out.load(Ordering::Relaxed) {
                    body_timed_out(limits)
                } else {
                    res
                })
            }
        })
    };
    // The timeouts are this loop's, not hyper's: hyper's header timer also runs while a
    // kept-alive connection waits for its next request, which would make it the idle
    // timeout too.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(None);
    let io = Watched {
        inner: stream,
        conn: conn.clone(),
        conns: conns.clone(),
    };
    let http = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(http);
    let mut graceful = false;
    loop {
        let last = conn.last_active.load(Ordering::Relaxed);
        let head = conn.head_started.load(Ordering::Relaxed);
        let at = |ms: u64, limit: Duration| conns.started + Duration::from_millis(ms) + limit;
        let idle_at = if conn.busy.load(Ordering::Relaxed) > 0 {
            Instant::now() + limits.idle_timeout
        } else if head > 0 {
            at(head - 1, limits.header_timeout).min(at(last, limits.idle_timeout))
        } else {
            at(last, limits.idle_timeout)
        };
        let head_arrives = conn.head.notified();
        tokio::select! {
            r = http.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "http: connection ended with an error");
                }
                return;
            }
            _ = conn.close.cancelled(), if !graceful => {
                // Shutdown or eviction: an idle connection, or one still sending a request
                // body, closes at once; a busy one after its response.
                graceful = true;
                http.as_mut().graceful_shutdown();
                if conn.evictable() {
                    return;
                }
            }
            _ = head_arrives, if head == 0 => {}
            _ = tokio::time::sleep_until(idle_at) => {
                let still_idle = conn.busy.load(Ordering::Relaxed) == 0
                    && conn.last_active.load(Ordering::Relaxed) == last;
                if still_idle {
                    if conn.head_started.load(Ordering::Relaxed) > 0 {
                        tracing::debug!("http: closing a connection that did not send its request headers in time");
                    }
                    return;
                }
            }
        }
    }
}

/// 408 for a request whose body did not arrive in time; the connection closes after it.
fn body_timed_out(limits: Limits) -> axum::response::Response {
    let message = format!(
        "request body not received in time (serve.body_timeout = {}, then at least {} bytes/s)",
        weir_engine::time::human(limits.body_timeout),
        limits.min_body_rate
    );
    (
        StatusCode::REQUEST_TIMEOUT,
        [(header::CONNECTION, HeaderValue::from_static("close"))],
        axum::Json(serde_json::json!({ "message": message })),
    )
        .into_response()
}

/// What a request's body needs to keep its time limit (see [`Limits::body_timeout`]).
struct TimedBody {
    conn: Arc<Conn>,
    conns: Arc<Conns>,
    limits: Limits,
    timed_out: Arc<std::sync::atomic::AtomicBool>,
}

impl TimedBody {
    fn new(
        conn: &Arc<Conn>,
        conns: &Arc<Conns>,
        limits: Limits,
        timed_out: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        TimedBody {
            conn: conn.clone(),
            conns: conns.clone(),
            limits,
            timed_out,
        }
    }

    /// `inner` with the time limit; the connection counts as receiving until it ends.
    fn wrap(self, inner: Incoming) -> Timed {
        use hyper::body::Body as _;
        let receiving = !inner.is_end_stream();
        if receiving {
            self.conn.receiving.fetch_add(1, Ordering::Relaxed);
        }
        let started = Instant::now();
        Timed {
            inner,
            deadline: Box::pin(tokio::time::sleep_until(started + self.limits.body_timeout)),
            started,
            received: 0,
            receiving,
            with: self,
        }
    }
}

/// A request body that fails once it is late: after `body_timeout` plus one second per
/// `min_body_rate` bytes received.
struct Timed {
    inner: Incoming,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    started: Instant,
    received: u64,
    receiving: bool,
    with: TimedBody,
}

impl Timed {
    /// The body ended (or failed, or was dropped): the connection is no longer waiting.
    fn done(&mut self) {
        if std::mem::take(&mut self.receiving) {
            self.with.conn.receiving.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        self.done();
    }
}

impl http_body::Body for Timed {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    let with = &this.with;
                    with.conn
                        .last_active
                        .store(with.conns.now(), Ordering::Relaxed);
                    let rate = with.limits.min_body_rate.max(1);
                    let granted = Duration::from_millis(this.received.saturating_mul(1000) / rate);
                    let at = this.started + with.limits.body_timeout + granted;
                    this.deadline.as_mut().reset(at);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.done();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.done();
                Poll::Ready(None)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.done();
                    this.with.timed_out.store(true, Ordering::Relaxed);
                    tracing::debug!(
                        received = this.received,
                        "http: closing a connection whose request body did not arrive in time"
                    );
                    Poll::Ready(Some(Err("request body not received in time".into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's socket, noting when the first byte of a request head arrives (for
/// the header timeout).
struct Watched {
    inner: tokio::net::TcpStream,
    conn: Arc<Conn>,
    conns: Arc<Conns>,
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before
            && self.conn.busy.load(Ordering::Relaxed) == 0
            && self.conn.head_started.load(Ordering::Relaxed) == 0
        {
            let now = self.conns.now() + 1;
            self.conn.head_started.store(now, Ordering::Relaxed);
            self.conn.head.notify_waiters();
        }
        r
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
