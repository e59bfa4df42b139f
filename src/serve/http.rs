//! The HTTP/1 server loop of `weir serve`, with the limits that keep stalled clients from
//! locking everyone out: a client must send its request headers within `header_timeout`,
//! a connection without a request in progress is closed after `idle_timeout`, and at
//! `max_connections` the longest-idle connection is closed to make room for a new one
//! (when every connection is busy, new ones wait in the listen queue).
//!
//! Upgraded connections (`/ws`) leave this loop once upgraded and are not counted.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// The server's limits (`[serve]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time allowed to send a request's headers.
    pub header_timeout: Duration,
    /// Time a connection may stay open with no request in progress.
    pub idle_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

impl From<&weir_engine::config::ServeConfig> for Limits {
    fn from(c: &weir_engine::config::ServeConfig) -> Self {
        Limits {
            header_timeout: c.header_timeout,
            idle_timeout: c.idle_timeout,
            max_connections: c.max_connections,
        }
    }
}

/// One open connection, as the accept loop sees it.
struct Conn {
    /// Requests in progress.
    busy: AtomicUsize,
    /// When it last started or finished a request (ms since the server started).
    last_active: AtomicU64,
    /// When the first byte of the next request's head arrived (ms since the server
    /// started, plus one; 0: none yet).
    head_started: AtomicU64,
    /// Notified when `head_started` is set.
    head: tokio::sync::Notify,
    /// Cancelled to close it.
    close: CancellationToken,
}

struct Conns {
    started: Instant,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Conns {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Closes the connection that has been idle longest; false when none is idle.
    fn evict_idle(&self) -> bool {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let oldest = open
            .values()
            .filter(|c| c.busy.load(Ordering::Relaxed) == 0 && !c.close.is_cancelled())
            .min_by_key(|c| c.last_active.load(Ordering::Relaxed));
        match oldest {
            Some(c) => {
                c.close.cancel();
                true
            }
            None => false,
        }
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
        // A slot first, so a connection beyond the limit waits in the listen queue rather
        // than taking a file descriptor.
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if conns.evict_idle() {
                    evictions += 1;
                    if evictions.is_power_of_two() {
                        tracing::warn!(
                            max_connections = limits.max_connections,
                            evicted = evictions,
                            "serve: connection limit reached; closing the longest-idle connections"
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
        let (stream, _peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors (EMFILE) or a connection reset before it was
                    // accepted: make room and go on.
                    tracing::warn!(error = %e, "serve: accept failed");
                    conns.evict_idle();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        let conn = Arc::new(Conn {
            busy: AtomicUsize::new(0),
            last_active: AtomicU64::new(conns.now()),
            head_started: AtomicU64::new(0),
            head: tokio::sync::Notify::new(),
            close: stop.child_token(),
        });
        conns
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, conn.clone());
        let router = router.clone();
        let conns = conns.clone();
        tasks.spawn(async move {
            serve_connection(stream, router, &conn, &conns, limits).await;
            conns
                .open
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            drop(permit);
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
) {
    let service = {
        let conn = conn.clone();
        let conns = conns.clone();
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let router = router.clone();
            let conn = conn.clone();
            let conns = conns.clone();
            async move {
                conn.busy.fetch_add(1, Ordering::Relaxed);
                conn.last_active.store(conns.now(), Ordering::Relaxed);
                conn.head_started.store(0, Ordering::Relaxed);
                let res = router.oneshot(req.map(Body::new)).await;
                conn.last_active.store(conns.now(), Ordering::Relaxed);
                conn.head_started.store(0, Ordering::Relaxed);
                conn.busy.fetch_sub(1, Ordering::Relaxed);
                Ok::<_, Infallible>(match res {
                    Ok(r) => r,
                    Err(never) => match never {},
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
                    tracing::debug!(error = %e, "serve: connection ended with an error");
                }
                return;
            }
            _ = conn.close.cancelled(), if !graceful => {
                // Shutdown or eviction: an idle connection closes at once, a busy one after
                // its response.
                graceful = true;
                http.as_mut().graceful_shutdown();
                if conn.busy.load(Ordering::Relaxed) == 0 {
                    return;
                }
            }
            _ = head_arrives, if head == 0 => {}
            _ = tokio::time::sleep_until(idle_at) => {
                let still_idle = conn.busy.load(Ordering::Relaxed) == 0
                    && conn.last_active.load(Ordering::Relaxed) == last;
                if still_idle {
                    if conn.head_started.load(Ordering::Relaxed) > 0 {
                        tracing::debug!("serve: closing a connection that did not send its request headers in time");
                    }
                    return;
                }
            }
        }
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
