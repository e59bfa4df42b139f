//! What the test bed knows of each backend, in one place: where its broker is, the `--set`
//! overrides that keep one test's topics and checkpoints apart from another's, how to
//! clean up after a test, and what it cannot do. Adding a backend to the suite is one
//! `impl TestBroker` here, one entry in [`ALL`] and a `tests/backend_NAME.rs` that calls
//! `conformance::suite!`.

use std::time::Duration;

use async_trait::async_trait;

/// A backend as the test bed sees it.
#[async_trait]
pub trait TestBroker: Sync {
    /// The backend's name, as `--broker` takes it.
    fn name(&self) -> &'static str;

    /// Where its broker runs, if it has one outside the process.
    fn address(&self) -> Option<Address> {
        None
    }

    /// `--set` overrides for a bed whose names end in `id`, beyond its topics and group
    /// (which every bed makes unique).
    fn sets(&self, _id: &str, _opts: &BedOptions) -> Vec<String> {
        Vec::new()
    }

    /// `--set` overrides that give the topics a bed creates a single partition.
    fn one_partition(&self) -> Vec<String>;

    /// `--set` overrides under which the bed's source has 4 partitions that several
    /// `weir run` processes in one group split between them (the scale-out scenarios);
    /// `None` if no other process can reach its topics.
    fn scale_out(&self) -> Option<Vec<String>>;

    /// Whether its tests run on a multi-threaded runtime (two workers).
    fn multi_thread(&self) -> bool {
        false
    }

    /// How many partitions of the suite's source topics deliver records independently
    /// (the crash test waits until each delivered before it crashes).
    fn partitions(&self) -> usize;

    /// Removes what the beds `ids` of a finished test left on the broker, if the broker
    /// needs that.
    async fn clean_up(&self, _ids: &[String]) {}

    /// What it truly cannot do. The scenario's test then checks that it indeed fails, with
    /// that message, so the entry goes once the backend can.
    fn cannot(&self) -> &'static [Cannot] {
        &[]
    }
}

/// Where a broker runs.
pub struct Address {
    /// The environment variable that points the tests at another broker.
    pub env: &'static str,
    /// Its value when unset: where `scripts/brokers up` starts it (`pipelines/brokers.toml`).
    pub default: &'static str,
    /// The setting that takes the variable's value.
    pub key: &'static str,
    /// `host:port` of the value, for the reachability check.
    pub host_port: fn(&str) -> String,
    /// What to run when it is not there.
    pub start: &'static str,
}

impl Address {
    /// The configured address (the environment's, or the default).
    pub fn value(&self) -> String {
        std::env::var(self.env).unwrap_or_else(|_| self.default.to_string())
    }
}

/// A scenario a backend cannot run.
pub struct Cannot {
    /// The scenario (its function's name).
    pub scenario: &'static str,
    /// Why (what the README's backend table says).
    pub why: &'static str,
    /// What its failure says.
    pub fails_with: &'static str,
}

/// The scale-out scenarios (`tests/conformance/scale.rs`), all failing for `why` with
/// `fails_with`.
const fn cannot_scale_out(why: &'static str, fails_with: &'static str) -> [Cannot; 3] {
    [
        Cannot {
            scenario: "instances_split_the_work",
            why,
            fails_with,
        },
        Cannot {
            scenario: "a_killed_instance_is_taken_over",
            why,
            fails_with,
        },
        Cannot {
            scenario: "unkeyed_input_meets_a_second_instance",
            why,
            fails_with,
        },
    ]
}

/// The repartition scenarios (`tests/conformance/repartition.rs`), all failing for `why`
/// with `fails_with`.
const fn cannot_repartition(why: &'static str, fails_with: &'static str) -> [Cannot; 4] {
    [
        Cannot {
            scenario: "repartitioned_instance_killed_during_a_join",
            why,
            fails_with,
        },
        Cannot {
            scenario: "repartitioned_instances_split_unkeyed_input",
            why,
            fails_with,
        },
        Cannot {
            scenario: "repartitioned_input_survives_a_kill",
            why,
            fails_with,
        },
        Cannot {
            scenario: "repartition_waits_for_a_lagging_partition",
            why,
            fails_with,
        },
    ]
}

/// Why RabbitMQ and Kinesis cannot repartition yet, and what their beds fail with.
const NO_REPARTITION: (&str, &str) = (
    "repartitioning is exact on Kafka only (its forwarder writes in a transaction); on this \
     backend a crash would forward records twice, and the windowing stage does not drop such \
     copies yet, so `[source] repartition = true` is refused",
    "cannot repartition yet",
);

/// What RabbitMQ and Kinesis cannot do: every repartition scenario.
static NO_REPARTITION_SCENARIOS: [Cannot; 5] = {
    let (why, fails_with) = NO_REPARTITION;
    let [join, split, kill, lag] = cannot_repartition(why, fails_with);
    [
        join,
        split,
        kill,
        lag,
        Cannot {
            scenario: "repartition_in_one_process",
            why,
            fails_with,
        },
    ]
};

/// How a bed is made.
#[derive(Debug, Clone, Copy)]
pub struct BedOptions {
    /// RabbitMQ: whether the bed's queues expire once unused (else the test deletes them).
    pub expiring: bool,
}

/// Every backend of the suite.
pub static ALL: [&dyn TestBroker; 4] = [&Memory, &Kafka, &Amqp, &Kinesis];

/// The backend named `name`.
pub fn get(name: &str) -> &'static dyn TestBroker {
    ALL.iter()
        .copied()
        .find(|b| b.name() == name)
        .unwrap_or_else(|| panic!("no test bed for backend `{name}`"))
}

/// Waits up to 30 s until Kinesis stream `stream` is ACTIVE again (after a split or a
/// merge).
#[cfg(feature = "kinesis")]
#[allow(dead_code)] // not every test binary reshards
pub async fn kinesis_wait_active(client: &weir_kinesis::aws_sdk_kinesis::Client, stream: &str) {
    let active = weir_kinesis::aws_sdk_kinesis::types::StreamStatus::Active;
    let start = tokio::time::Instant::now();
    loop {
        let d = client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .expect("DescribeStreamSummary");
        if d.stream_description_summary().unwrap().stream_status() == &active {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{stream} is not ACTIVE 30 s after resharding"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Panics with the way out unless the broker answers at its address.
pub fn require(b: &dyn TestBroker) {
    let Some(a) = b.address() else { return };
    let value = a.value();
    let hp = (a.host_port)(&value);
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&hp)
        .ok()
        .and_then(|mut s| s.next())
        .is_some_and(|sa| {
            std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(3)).is_ok()
        });
    assert!(
        reachable,
        "{} at {hp} is not reachable: run {} (or set {})",
        b.name(),
        a.start,
        a.env
    );
}

/// The embedded broker: nothing to start, nothing to clean.
struct Memory;

impl TestBroker for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn partitions(&self) -> usize {
        4
    }
    fn one_partition(&self) -> Vec<String> {
        vec!["brokers.memory.partitions=1".into()]
    }
    fn scale_out(&self) -> Option<Vec<String>> {
        None
    }
    fn cannot(&self) -> &'static [Cannot] {
        static CANNOT: [Cannot; 8] = {
            let why =
                "its topics live inside one `weir run` process: no other instance can read them";
            let fails_with = "several `weir run` processes cannot share its topics";
            let [split, takeover, unkeyed] = cannot_scale_out(why, fails_with);
            let [rp_join, rp_split, rp_kill, rp_lag] = cannot_repartition(why, fails_with);
            [
                Cannot {
                    scenario: "shipped_pipelines_run_with_broker_alone",
                    why: "its topics live inside one `weir run` process, so nothing outside \
                          it can feed them (`weir produce` refuses it); `weir test` runs the \
                          same golden cases on it",
                    fails_with: "`weir produce` needs a broker whose topics outlive this process",
                },
                split,
                takeover,
                unkeyed,
                rp_join,
                rp_split,
                rp_kill,
                rp_lag,
            ]
        };
        &CANNOT
    }
}

/// Kafka: the test bed's Apache Kafka, or any Kafka at WEIR_KAFKA_BOOTSTRAP.
struct Kafka;

impl TestBroker for Kafka {
    fn name(&self) -> &'static str {
        "kafka"
    }
    /// Tansu (`WEIR_KAFKA_IMPL=tansu scripts/brokers up kafka`) drops commit metadata:
    /// checkpoints go to a topic of the bed's own as well.
    fn sets(&self, id: &str, _opts: &BedOptions) -> Vec<String> {
        if std::env::var("WEIR_KAFKA_IMPL").is_ok_and(|v| v == "tansu") {
            vec![format!("brokers.kafka.checkpoint_topic=conf-ckpt-{id}")]
        } else {
            Vec::new()
        }
    }
    fn address(&self) -> Option<Address> {
        Some(Address {
            env: "WEIR_KAFKA_BOOTSTRAP",
            default: "127.0.0.1:19092",
            key: "brokers.kafka.bootstrap_servers",
            host_port: |v| v.split(',').next().unwrap_or_default().trim().to_string(),
            start: "scripts/brokers up kafka",
        })
    }
    fn partitions(&self) -> usize {
        4
    }
    fn one_partition(&self) -> Vec<String> {
        vec!["brokers.kafka.partitions=1".into()]
    }
    /// Created topics get 4 partitions; the consumer group splits them.
    fn scale_out(&self) -> Option<Vec<String>> {
        Some(vec!["brokers.kafka.partitions=4".into()])
    }
}

/// RabbitMQ: the machine's, or any at WEIR_AMQP_URL.
struct Amqp;

/// The queues per topic of RabbitMQ's scale-out beds.
const SCALE_PARTITIONS: u32 = 4;

#[async_trait]
impl TestBroker for Amqp {
    fn cannot(&self) -> &'static [Cannot] {
        &NO_REPARTITION_SCENARIOS
    }
    fn name(&self) -> &'static str {
        "amqp"
    }
    fn address(&self) -> Option<Address> {
        Some(Address {
            env: "WEIR_AMQP_URL",
            default: "amqp://guest:guest@127.0.0.1:5672/%2f",
            key: "brokers.amqp.url",
            host_port: |url| {
                let rest = url.split_once("://").map_or(url, |(_, r)| r);
                let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
                let hp = rest.split('/').next().unwrap_or_default();
                if hp.contains(':') {
                    hp.to_string()
                } else {
                    format!("{hp}:5672")
                }
            },
            start: "scripts/brokers up amqp",
        })
    }
    fn sets(&self, _id: &str, opts: &BedOptions) -> Vec<String> {
        // RabbitMQ deletes the run's queues once they are unused for this long.
        if opts.expiring {
            vec!["brokers.amqp.queue_expires=10m".into()]
        } else {
            Vec::new()
        }
    }
    /// A queue is one partition.
    fn partitions(&self) -> usize {
        1
    }
    fn one_partition(&self) -> Vec<String> {
        Vec::new()
    }
    /// Every topic split into 4 queues; the instances' heartbeat group splits them.
    fn scale_out(&self) -> Option<Vec<String>> {
        Some(vec![format!("brokers.amqp.partitions={SCALE_PARTITIONS}")])
    }
    /// The beds' queues and their checkpoint queues go (those made with `queue_expires`
    /// would also expire; the shipped pipelines' runs set no such thing).
    #[cfg(feature = "amqp")]
    async fn clean_up(&self, ids: &[String]) {
        let url = self.address().unwrap().value();
        let Ok(conn) = lapin::Connection::connect(&url, Default::default()).await else {
            return;
        };
        for id in ids {
            for prefix in super::TOPIC_PREFIXES {
                let topic = format!("{prefix}{id}");
                // The topic's queue, or its partition queues in the scale-out scenarios
                // (deleting a queue that does not exist is no error).
                let queues = std::iter::once(topic.clone()).chain(
                    (0..SCALE_PARTITIONS)
                        .map(|p| weir_amqp::partition_queue(&topic, p, SCALE_PARTITIONS)),
                );
                for queue in queues {
                    for q in [weir_amqp::checkpoint_queue(&queue), queue] {
                        // A channel per deletion: an error closes the channel it happened on.
                        if let Ok(ch) = conn.create_channel().await {
                            let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
                            let _ = ch.close(200, "done".into()).await;
                        }
                    }
                }
            }
        }
        let _ = conn.close(200, "done".into()).await;
    }
}

/// Kinesis: the test bed's kinesalite, or any emulator at WEIR_KINESIS_ENDPOINT.
struct Kinesis;

impl Kinesis {
    fn checkpoint_dir(id: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("weir-kinesis-checkpoints-{id}"))
    }
}

#[async_trait]
impl TestBroker for Kinesis {
    fn cannot(&self) -> &'static [Cannot] {
        &NO_REPARTITION_SCENARIOS
    }
    fn name(&self) -> &'static str {
        "kinesis"
    }
    fn address(&self) -> Option<Address> {
        Some(Address {
            env: "WEIR_KINESIS_ENDPOINT",
            default: "http://127.0.0.1:4567",
            key: "brokers.kinesis.endpoint_url",
            host_port: |ep| {
                ep.trim_start_matches("http://")
                    .trim_start_matches("https://")
                    .trim_end_matches('/')
                    .to_string()
            },
            start: "scripts/brokers up kinesis",
        })
    }
    fn sets(&self, id: &str, _opts: &BedOptions) -> Vec<String> {
        // Checkpoint files per bed, so a test never resumes from another's.
        let dir = Kinesis::checkpoint_dir(id);
        vec![format!("brokers.kinesis.checkpoint_dir={}", dir.display())]
    }
    fn multi_thread(&self) -> bool {
        true
    }
    /// The crash test waits for one shard only: shard readers start one by one.
    fn partitions(&self) -> usize {
        1
    }
    fn one_partition(&self) -> Vec<String> {
        vec!["brokers.kinesis.shards=1".into()]
    }
    /// Streams created with 4 shards, read under shard leases in the test bed's DynamoDB
    /// (dynalite, or WEIR_DYNAMODB_ENDPOINT) with 3 s leases: a dead instance's shards
    /// move 3 to 4 s after its last renewal.
    fn scale_out(&self) -> Option<Vec<String>> {
        let ddb = std::env::var("WEIR_DYNAMODB_ENDPOINT")
            .unwrap_or_else(|_| "http://127.0.0.1:4568".into());
        Some(vec![
            "brokers.kinesis.shards=4".into(),
            "brokers.kinesis.leases=dynamodb".into(),
            format!("brokers.kinesis.dynamodb_endpoint_url={ddb}"),
            "brokers.kinesis.create_lease_table=true".into(),
            "brokers.kinesis.lease_duration=3s".into(),
        ])
    }
    /// kinesalite keeps every stream in memory (and caps the shards of all together):
    /// the streams and checkpoint folders of the test's beds go.
    #[cfg(feature = "kinesis")]
    async fn clean_up(&self, ids: &[String]) {
        let bed = super::Bed::new("kinesis", "cleanup", &[]);
        let Some(kinesis) = bed.backend.get::<weir_kinesis::KinesisBroker>() else {
            unreachable!("a kinesis bed has the Kinesis backend")
        };
        let client = kinesis.client().await.expect("client");
        let mut names = Vec::new();
        let mut start: Option<String> = None;
        loop {
            let mut req = client.list_streams().limit(100);
            if let Some(s) = &start {
                req = req.exclusive_start_stream_name(s);
            }
            let out = req.send().await.expect("ListStreams");
            names.extend(out.stream_names().iter().cloned());
            start = out.stream_names().last().cloned();
            if !out.has_more_streams() {
                break;
            }
        }
        let mine = |name: &str| ids.iter().any(|id| name.ends_with(&format!("-{id}")));
        for name in names.iter().filter(|n| mine(n)) {
            let _ = client.delete_stream().stream_name(name).send().await;
        }
        for id in ids {
            let _ = std::fs::remove_dir_all(Kinesis::checkpoint_dir(id));
        }
    }
}
