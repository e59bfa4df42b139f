//! The `[demo]` generator: like the seed's timer, `events` random seed-shaped events every
//! `interval` with wall-clock times, published to the pipeline's source topic; with
//! `[enrich]`, also a profile per demo user published to the enrichment table.

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weir_engine::config::{DemoConfig, PipelineConfig};
use weir_engine::generate::EventGenerator;
use weir_engine::{OutRecord, Sink};

use crate::Backend;

/// Starts the generator (and the profiles) on `tasks`, publishing until `stop`.
pub async fn start(
    tasks: &TaskTracker,
    c: &PipelineConfig,
    backend: &Backend,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(
        events = c.demo.events,
        every = %weir_engine::time::human(c.demo.interval),
        users = c.demo.users,
        topic = %c.source.topic,
        "demo generator feeding the source topic (the seed's timer)"
    );
    if let Some(e) = &c.enrich {
        let table =
            crate::assemble::connect(c, backend, &format!("opening topic {}", e.table), || {
                backend.feeder(&e.table)
            })
            .await?;
        tasks.spawn(profiles(
            table,
            c.demo.clone(),
            e.table_key.clone(),
            stop.clone(),
        ));
    }
    let sink = crate::assemble::connect(
        c,
        backend,
        &format!("opening topic {}", c.source.topic),
        || backend.feeder(&c.source.topic),
    )
    .await?;
    tasks.spawn(events(sink, c.demo.clone(), stop));
    Ok(())
}

/// Profiles arrive a little after the first events, so the demo shows events waiting in
/// the retry topic and then being counted.
async fn profiles(
    mut table: Box<dyn Sink>,
    demo: DemoConfig,
    key: String,
    stop: CancellationToken,
) {
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = tokio::time::sleep(demo.interval * 2) => {}
    }
    let countries = ["NL", "DE", "FR", "JP", "BR"];
    let rows: Vec<OutRecord> = (0..demo.users)
        .map(|u| OutRecord {
            payload: serde_json::json!({
                key.as_str(): format!("User{u}"),
                "country": countries[u % countries.len()],
            })
            .to_string()
            .into_bytes()
            .into(),
            ..Default::default()
        })
        .collect();
    match table.send(&rows).await {
        Ok(()) => tracing::info!(
            rows = rows.len(),
            "demo profiles published to the enrichment table"
        ),
        Err(e) => tracing::warn!(error = %e, "demo could not publish profiles"),
    }
}

async fn events(mut sink: Box<dyn Sink>, demo: DemoConfig, stop: CancellationToken) {
    let mut g = EventGenerator::new(weir_engine::time::now_millis() as u64, demo.users as u64)
        .with_invalid_every(demo.invalid_every as u64);
    let mut tick = tokio::time::interval(demo.interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = weir_engine::time::now_millis();
        let batch: Vec<OutRecord> = (0..demo.events)
            .map(|_| {
                let payload = g.event(now);
                OutRecord {
                    key: Some(g.last_user().into_bytes().into()),
                    payload: payload.into_bytes().into(),
                    ..Default::default()
                }
            })
            .collect();
        if let Err(e) = sink.send(&batch).await {
            tracing::warn!(error = %e, "demo generator could not publish");
        }
    }
}
