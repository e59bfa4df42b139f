//! Third-party clients for the interop tests: Python's confluent-kafka (librdkafka 2.16),
//! pika and boto3 (with aws-kinesis-agg for KPL aggregation), from the venv that
//! `scripts/interop-venv` makes from PyPI. A venv that cannot be made fails the test,
//! loudly; it is never a skip.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The venv's python, made on first use.
pub fn python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(root.join("scripts/interop-venv"))
            .stderr(Stdio::inherit())
            .output()
            .expect("cannot run scripts/interop-venv");
        assert!(
            out.status.success(),
            "scripts/interop-venv failed: the interop tests need python3 with venv and PyPI"
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// Runs `script` with the venv's python, `stdin` on its standard input and `env` set;
/// panics with its stderr unless it exits 0; returns its stdout.
pub fn run(script: &str, env: &[(&str, &str)], stdin: &[u8]) -> String {
    let mut child = Command::new(python())
        .arg("-c")
        .arg(script)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python failed: {stderr}\n--- script:\n{script}"
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Like [`run`] off the async runtime's threads.
pub async fn run_async(script: &'static str, env: Vec<(String, String)>, stdin: Vec<u8>) -> String {
    tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run(script, &env, &stdin)
    })
    .await
    .unwrap()
}

/// A producer configured the way a Java client commonly is: idempotent, acks=all,
/// Java's murmur2 partitioner, 5 ms linger; compression from `CODEC`. Reads
/// `key\tvalue` lines (an empty key = no key) from stdin; prints how many were delivered.
pub const KAFKA_PRODUCE: &str = r#"
import os, sys
from confluent_kafka import Producer
p = Producer({
    "bootstrap.servers": os.environ["BOOTSTRAP"],
    "compression.type": os.environ["CODEC"],
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "partitioner": "murmur2_random",
    "message.max.bytes": int(os.environ.get("MAX_BYTES", "1000000")),
})
ok = [0]
def done(err, msg):
    if err is not None:
        sys.exit("delivery failed: %s" % err)
    ok[0] += 1
for line in sys.stdin.buffer:
    line = line.rstrip(b"\n")
    key, _, value = line.partition(b"\t")
    if value == b"\\N":
        value = None
    while True:
        try:
            p.produce(os.environ["TOPIC"], value=value, key=key or None, on_delivery=done)
            break
        except BufferError:
            p.poll(0.1)
    p.poll(0)
left = p.flush(30)
if left:
    sys.exit("%d records not delivered" % left)
print(ok[0])
"#;

/// The Kafka bootstrap address of the test bed.
pub fn kafka_bootstrap() -> String {
    std::env::var("WEIR_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// The RabbitMQ URL of the test bed.
pub fn amqp_url() -> String {
    std::env::var("WEIR_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// pika, as a standard consumer: `queue_declare(Q, durable=True)` (plus `ARGS`, JSON, if
/// set) for each queue of `QUEUES` (comma-separated), then, unless `DECLARE_ONLY`, reads
/// every message of each with basic_get and prints one JSON line per message:
/// {queue, body, content_type, headers}.
pub const PIKA_CONSUME: &str = r#"
import json, os, sys, pika
conn = pika.BlockingConnection(pika.URLParameters(os.environ["URL"]))
ch = conn.channel()
args = json.loads(os.environ.get("ARGS") or "null")
for q in os.environ["QUEUES"].split(","):
    ch.queue_declare(q, durable=True, arguments=args)
    if os.environ.get("DECLARE_ONLY"):
        continue
    while True:
        method, props, body = ch.basic_get(q, auto_ack=True)
        if method is None:
            break
        h = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in (props.headers or {}).items()}
        print(json.dumps({"queue": q, "body": body.decode(), "content_type": props.content_type, "headers": h}))
conn.close()
"#;

/// pika deletes the queues of `QUEUES` (comma-separated; missing ones are fine).
pub const PIKA_DELETE: &str = r#"
import os, pika
conn = pika.BlockingConnection(pika.URLParameters(os.environ["URL"]))
for q in os.environ["QUEUES"].split(","):
    ch = conn.channel()
    try:
        ch.queue_delete(q)
    except Exception:
        pass
conn.close()
"#;

/// The Kinesis endpoint of the test bed.
pub fn kinesis_endpoint() -> String {
    std::env::var("WEIR_KINESIS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4567".into())
}

/// boto3 putting `key\tvalue` lines from stdin to stream `STREAM`: the first `PLAIN` as
/// plain records, the rest aggregated the way the KPL does (aws-kinesis-agg's
/// RecordAggregator, aggregates of at most `AGG_BYTES`). Prints
/// "<kinesis records> <user records>".
pub const KPL_PUT: &str = r#"
import os, sys, boto3
from aws_kinesis_agg.aggregator import RecordAggregator
k = boto3.client("kinesis", endpoint_url=os.environ["ENDPOINT"], region_name="us-east-1",
                 aws_access_key_id="weir", aws_secret_access_key="weir")
stream = os.environ["STREAM"]
plain = int(os.environ.get("PLAIN", "0"))
agg = RecordAggregator(max_size=int(os.environ.get("AGG_BYTES", "51200")))
puts = users = 0
def put(rec):
    global puts
    pk, ehk, data = rec.get_contents()
    args = dict(StreamName=stream, Data=data, PartitionKey=pk)
    if ehk:
        args["ExplicitHashKey"] = ehk
    k.put_record(**args)
    puts += 1
for i, line in enumerate(sys.stdin.buffer):
    key, _, value = line.rstrip(b"\n").partition(b"\t")
    users += 1
    if i < plain:
        k.put_record(StreamName=stream, Data=value, PartitionKey=key.decode() or "none")
        puts += 1
        continue
    full = agg.add_user_record(key.decode(), value)
    if full is not None:
        put(full)
last = agg.clear_and_get()
if last is not None and last.get_num_user_records():
    put(last)
print(puts, users)
"#;

/// confluent-kafka: reads `COUNT` records of `TOPIC` from the beginning (a group of its
/// own) and prints one JSON line per record: {key, value, headers: [[name, value|null]]}.
pub const KAFKA_CONSUME: &str = r#"
import json, os, sys, time, uuid
from confluent_kafka import Consumer
c = Consumer({"bootstrap.servers": os.environ["BOOTSTRAP"], "group.id": "interop-" + uuid.uuid4().hex,
              "auto.offset.reset": "earliest", "session.timeout.ms": 6000, "enable.auto.commit": False})
c.subscribe([os.environ["TOPIC"]])
want = int(os.environ["COUNT"])
got = 0
deadline = time.time() + 45
while got < want and time.time() < deadline:
    m = c.poll(0.5)
    if m is None:
        continue
    if m.error():
        sys.exit("consume error: %s" % m.error())
    dec = lambda b: None if b is None else b.decode("utf-8", "replace")
    print(json.dumps({"key": dec(m.key()), "value": dec(m.value()),
                      "headers": [[k, dec(v)] for k, v in (m.headers() or [])]}))
    got += 1
c.close()
if got < want:
    sys.exit("only %d of %d records" % (got, want))
"#;

/// Writes one record batch that says it is zstd-compressed but holds garbage (valid CRC),
/// to partition 0 of `TOPIC` with a raw Kafka ProduceRequest v3, as a broken or
/// incompatible producer could; prints the broker's error code (0 = stored).
pub const KAFKA_CORRUPT_ZSTD_BATCH: &str = r#"
import os, socket, struct, sys, time
def crc32c(data):
    poly = 0x82F63B78
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
assert crc32c(b"123456789") == 0xE3069283
def batch(payload, codec):
    now = int(time.time() * 1000)
    after_crc = struct.pack(">hiqqqhii", codec, 0, now, now, -1, -1, -1, 1) + payload
    body = struct.pack(">ib", -1, 2) + struct.pack(">I", crc32c(after_crc)) + after_crc
    return struct.pack(">qi", 0, len(body)) + body
def s16(s):
    b = s.encode(); return struct.pack(">h", len(b)) + b
host, port = os.environ["BOOTSTRAP"].split(",")[0].rsplit(":", 1)
topic = os.environ["TOPIC"]
rb = batch(b"\x28\xb5\x2f\xfd" + os.urandom(64), 4)   # zstd magic, garbage after
req = struct.pack(">hhi", 0, 3, 7) + s16("weir-interop") + struct.pack(">hhi", -1, -1, 10000)
req += struct.pack(">i", 1) + s16(topic) + struct.pack(">i", 1) + struct.pack(">i", 0) + struct.pack(">i", len(rb)) + rb
sock = socket.create_connection((host, int(port)), timeout=10)
sock.sendall(struct.pack(">i", len(req)) + req)
def recvn(n):
    out = b""
    while len(out) < n:
        c = sock.recv(n - len(out))
        if not c: sys.exit("connection closed")
        out += c
    return out
size = struct.unpack(">i", recvn(4))[0]
resp = recvn(size)
corr, ntopics = struct.unpack(">ii", resp[:8])
tl = struct.unpack(">h", resp[8:10])[0]
pos = 10 + tl
nparts, part, err = struct.unpack(">iih", resp[pos:pos+10])
print(err)
"#;

/// [`KAFKA_PRODUCE`] of `input` (`key\tvalue` lines) to `topic` with `codec`, allowed
/// `max_bytes` if given; returns what it printed.
pub async fn kafka_produce(
    topic: &str,
    codec: &str,
    max_bytes: Option<&str>,
    input: Vec<u8>,
) -> String {
    kafka_produce_to(&kafka_bootstrap(), topic, codec, max_bytes, input).await
}

/// [`kafka_produce`] to the broker at `bootstrap`.
pub async fn kafka_produce_to(
    bootstrap: &str,
    topic: &str,
    codec: &str,
    max_bytes: Option<&str>,
    input: Vec<u8>,
) -> String {
    let mut env = vec![
        ("BOOTSTRAP".to_string(), bootstrap.to_string()),
        ("TOPIC".to_string(), topic.to_string()),
        ("CODEC".to_string(), codec.to_string()),
    ];
    if let Some(max) = max_bytes {
        env.push(("MAX_BYTES".to_string(), max.to_string()));
    }
    run_async(KAFKA_PRODUCE, env, input).await
}

/// [`KPL_PUT`] of `input` (`key\tvalue` lines) to `stream`, the first `plain` of them
/// unaggregated if given; returns what it printed.
pub async fn kpl_put(stream: &str, plain: Option<&str>, input: Vec<u8>) -> String {
    let mut env = vec![
        ("ENDPOINT".to_string(), kinesis_endpoint()),
        ("STREAM".to_string(), stream.to_string()),
    ];
    if let Some(plain) = plain {
        env.push(("PLAIN".to_string(), plain.to_string()));
    }
    run_async(KPL_PUT, env, input).await
}

/// [`PIKA_CONSUME`] of `queues` (comma-separated), declared with `args` (JSON) if given,
/// only declared with `declare_only`; returns what it printed.
pub async fn pika_consume(queues: &str, args: Option<&str>, declare_only: bool) -> String {
    let mut env = vec![
        ("URL".to_string(), amqp_url()),
        ("QUEUES".to_string(), queues.to_string()),
    ];
    if let Some(args) = args {
        env.push(("ARGS".to_string(), args.to_string()));
    }
    if declare_only {
        env.push(("DECLARE_ONLY".to_string(), "1".to_string()));
    }
    run_async(PIKA_CONSUME, env, Vec::new()).await
}

/// `script` run with the test bed's RabbitMQ as `URL` and `queues` as `QUEUES`.
pub async fn pika_run(script: &'static str, queues: &str) -> String {
    let env = vec![
        ("URL".to_string(), amqp_url()),
        ("QUEUES".to_string(), queues.to_string()),
    ];
    run_async(script, env, Vec::new()).await
}
