//! The `[serve]` and `[observability]` sections: the HTTP sides of `weir serve` and
//! `weir run`.

use std::time::Duration;

use super::model::{ObservabilityConfig, ServeConfig, MIB};
use super::reader::{Diagnostics, TableReader};
use super::tree::Loc;

/// An `IP:PORT` setting.
fn socket_addr(
    t: &mut TableReader<'_>,
    d: &mut Diagnostics,
    key: &'static str,
    path: &str,
) -> Option<std::net::SocketAddr> {
    let node = t.node(key);
    match t.str(d, key).map(str::parse) {
        None => None,
        Some(Ok(a)) => Some(a),
        Some(Err(_)) => {
            d.push(
                &node.map(|n| n.loc.clone()).unwrap_or(Loc::Nowhere),
                path,
                "expected IP:PORT, e.g. \"127.0.0.1:9090\"",
            );
            None
        }
    }
}

/// `[observability]`: where `/metrics` and `/healthz` are served.
pub(super) fn observability(r: &mut TableReader<'_>, d: &mut Diagnostics) -> ObservabilityConfig {
    let stuck_default = Duration::from_secs(30);
    let Some(mut t) = r.table(d, "observability") else {
        return ObservabilityConfig {
            listen: None,
            stuck_after: stuck_default,
        };
    };
    let c = ObservabilityConfig {
        listen: socket_addr(&mut t, d, "listen", "observability.listen"),
        stuck_after: t.duration_or(d, "stuck_after", stuck_default),
    };
    t.finish(d);
    c
}

/// `[serve]`: `weir serve`'s settings, and the limits of every HTTP front (`weir serve`
/// and `weir run`'s metrics endpoint).
pub(super) fn serve(
    r: &mut TableReader<'_>,
    d: &mut Diagnostics,
    max_payload: usize,
) -> ServeConfig {
    let def = ServeConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 8000)),
        max_body_bytes: max_payload,
        max_batch_bytes: 4 * MIB as usize,
        queue: 10_000,
        publish_timeout: Duration::from_secs(5),
        token_env: "WEIR_SERVE_TOKEN".into(),
        header_timeout: Duration::from_secs(10),
        body_timeout: Duration::from_secs(10),
        min_body_rate: 1024,
        idle_timeout: Duration::from_secs(60),
        max_connections: 512,
    };
    let Some(mut t) = r.table(d, "serve") else {
        return def;
    };
    let listen = socket_addr(&mut t, d, "listen", "serve.listen").unwrap_or(def.listen);
    let u = |t: &mut TableReader<'_>, d: &mut Diagnostics, key, default: usize, max: u64| {
        t.uint_or(d, key, default as u64, 0..=max) as usize
    };
    let c = ServeConfig {
        listen,
        max_body_bytes: u(&mut t, d, "max_body_bytes", def.max_body_bytes, 64 * MIB),
        max_batch_bytes: u(
            &mut t,
            d,
            "max_batch_bytes",
            def.max_batch_bytes,
            1024 * MIB,
        ),
        queue: u(&mut t, d, "queue", def.queue, 10_000_000),
        publish_timeout: t.duration_or(d, "publish_timeout", def.publish_timeout),
        token_env: t.str_or(d, "token_env", &def.token_env),
        header_timeout: t.duration_or(d, "header_timeout", def.header_timeout),
        body_timeout: t.duration_or(d, "body_timeout", def.body_timeout),
        min_body_rate: t.uint_or(d, "min_body_rate", def.min_body_rate, 1..=1 << 40),
        idle_timeout: t.duration_or(d, "idle_timeout", def.idle_timeout),
        max_connections: u(&mut t, d, "max_connections", def.max_connections, 1_000_000).max(1),
    };
    t.finish(d);
    c
}
