//! The lease table: one DynamoDB item per shard in the Kinesis Client Library's model
//! (`leaseKey` = shard id, `leaseOwner`, `leaseCounter`, `checkpoint`, `parentShardId`),
//! plus what Weir keeps with a shard (`weirPartition`, `weirNextOffset`,
//! `weirCheckpoint`) and the token of the current holding (`weirToken`). Every write is
//! conditional: taking on the counter (and owner) seen, renewing and checkpointing on
//! owner and token, creating on the item's absence.
//!
//! Partition indexes are claimed with items of their own (`leaseKey` =
//! `weir-partition-N`, `shard` = the shard), created only if absent, so instances that
//! discover the same shards concurrently agree on every shard's index.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ScalarAttributeType, TableStatus,
};
use aws_sdk_dynamodb::Client;
use weir_engine::checkpoint_store::Committed;
use weir_engine::{Checkpoint, EngineError, Result};

use crate::error::KinesisError;

/// The `checkpoint` of a shard read and committed to its end.
pub(crate) const SHARD_END: &str = "SHARD_END";
const CLAIM_PREFIX: &str = "weir-partition-";

/// One shard's lease as the table holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Lease {
    pub(crate) shard: String,
    pub(crate) owner: Option<String>,
    pub(crate) counter: u64,
    pub(crate) token: Option<String>,
    /// Sequence number reading resumes after, or [`SHARD_END`].
    pub(crate) checkpoint: Option<String>,
    pub(crate) partition: u32,
    pub(crate) next_offset: u64,
    pub(crate) engine: Option<String>,
    pub(crate) parents: Vec<String>,
}

impl Lease {
    /// Whether the shard was read and committed to its end.
    pub(crate) fn finished(&self) -> bool {
        self.checkpoint.as_deref() == Some(SHARD_END)
    }

    /// What the source resumes from.
    pub(crate) fn committed(&self) -> Committed {
        Committed {
            partition: self.partition,
            name: Some(self.shard.clone()),
            offset: Some(self.next_offset),
            cursor: self.checkpoint.clone().filter(|c| c != SHARD_END),
            checkpoint: self.engine.as_deref().and_then(Checkpoint::decode),
        }
    }

    fn from_item(item: &HashMap<String, AttributeValue>) -> Option<Lease> {
        let s = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
        let n = |k: &str| {
            item.get(k)
                .and_then(|v| v.as_n().ok())
                .and_then(|n| n.parse::<u64>().ok())
        };
        Some(Lease {
            shard: s("leaseKey")?,
            owner: s("leaseOwner"),
            counter: n("leaseCounter").unwrap_or(0),
            token: s("weirToken"),
            checkpoint: s("checkpoint"),
            partition: u32::try_from(n("weirPartition")?).ok()?,
            next_offset: n("weirNextOffset").unwrap_or(0),
            engine: s("weirCheckpoint"),
            parents: item
                .get("parentShardId")
                .and_then(|v| v.as_ss().ok())
                .cloned()
                .unwrap_or_default(),
        })
    }
}

/// What a scan of the table found.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub(crate) leases: BTreeMap<String, Lease>,
    /// Partition index -> the shard that claimed it.
    pub(crate) claims: BTreeMap<u32, String>,
}

/// The lease table of one (stream, group).
#[derive(Debug, Clone)]
pub(crate) struct LeaseTable {
    pub(crate) client: Client,
    pub(crate) table: String,
    pub(crate) endpoint: String,
}

/// An operation's error as the SDK gives it.
trait ServiceError:
    aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static
{
}

impl<E> ServiceError for E where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static
{
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_string())
}

impl LeaseTable {
    fn err<E: ServiceError, R: std::fmt::Debug>(
        &self,
        op: &'static str,
        e: aws_sdk_dynamodb::error::SdkError<E, R>,
    ) -> KinesisError {
        KinesisError::from_sdk(op, &self.endpoint, e)
    }

    /// `Ok(false)` for a refused condition, the error otherwise.
    fn conditional<T, E: ServiceError, R: std::fmt::Debug>(
        &self,
        op: &'static str,
        r: std::result::Result<T, aws_sdk_dynamodb::error::SdkError<E, R>>,
    ) -> Result<Option<T>> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) => {
                let e = self.err(op, e);
                if e.code() == Some("ConditionalCheckFailedException") {
                    Ok(None)
                } else {
                    Err(e.into())
                }
            }
        }
    }

    /// Makes sure the table exists and is ACTIVE, creating it when `create`.
    pub(crate) async fn ensure(&self, create: bool) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let mut created = false;
        loop {
            let status = match self
                .client
                .describe_table()
                .table_name(&self.table)
                .send()
                .await
            {
                Ok(out) => out.table().and_then(|t| t.table_status().cloned()),
                Err(e) => {
                    let e = self.err("DynamoDB DescribeTable", e);
                    if e.code() != Some("ResourceNotFoundException") {
                        return Err(e.into());
                    }
                    if !create {
                        return Err(EngineError::backend(
                            "kinesis",
                            format!("lease table `{}` does not exist at {} (create it, or set brokers.kinesis.create_lease_table = true)", self.table, self.endpoint),
                            false,
                        ));
                    }
                    if !created {
                        self.create_table().await?;
                        created = true;
                    }
                    None
                }
            };
            match status {
                Some(TableStatus::Active) | Some(TableStatus::Updating) => return Ok(()),
                _ if tokio::time::Instant::now() > deadline => {
                    return Err(EngineError::backend(
                        "kinesis",
                        format!(
                            "lease table `{}` did not become ACTIVE within 120 s",
                            self.table
                        ),
                        true,
                    ))
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn create_table(&self) -> Result<()> {
        let def = AttributeDefinition::builder()
            .attribute_name("leaseKey")
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(|e| EngineError::backend("kinesis", e.to_string(), false))?;
        let schema = KeySchemaElement::builder()
            .attribute_name("leaseKey")
            .key_type(KeyType::Hash)
            .build()
            .map_err(|e| EngineError::backend("kinesis", e.to_string(), false))?;
        match self
            .client
            .create_table()
            .table_name(&self.table)
            .attribute_definitions(def)
            .key_schema(schema)
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(table = %self.table, "created the DynamoDB lease table");
                Ok(())
            }
            Err(e) => {
                let e = self.err("DynamoDB CreateTable", e);
                if e.code() == Some("ResourceInUseException") {
                    Ok(())
                } else {
                    Err(e.into())
                }
            }
        }
    }

    /// Every lease and partition claim (strongly consistent).
    pub(crate) async fn scan(&self) -> Result<Snapshot> {
        let mut out = Snapshot::default();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.err("DynamoDB Scan", e))?;
            for item in page.items() {
                let key = item.get("leaseKey").and_then(|v| v.as_s().ok());
                if let Some(i) = key.and_then(|k| k.strip_prefix(CLAIM_PREFIX)) {
                    let shard = item.get("shard").and_then(|v| v.as_s().ok());
                    if let (Ok(i), Some(shard)) = (i.parse::<u32>(), shard) {
                        out.claims.insert(i, shard.clone());
                    }
                } else if let Some(l) = Lease::from_item(item) {
                    out.leases.insert(l.shard.clone(), l);
                }
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(out),
            }
        }
    }

    /// Claims partition index `index` for `shard`; the shard that holds it afterwards.
    pub(crate) async fn claim(&self, index: u32, shard: &str) -> Result<String> {
        let key = format!("{CLAIM_PREFIX}{index}");
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("leaseKey", s(&key))
            .item("shard", s(shard))
            .condition_expression("attribute_not_exists(leaseKey)")
            .send()
            .await;
        if self.conditional("DynamoDB PutItem", put)?.is_some() {
            return Ok(shard.to_string());
        }
        let got = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("leaseKey", s(&key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.err("DynamoDB GetItem", e))?;
        Ok(got
            .item()
            .and_then(|i| i.get("shard"))
            .and_then(|v| v.as_s().ok())
            .cloned()
            .unwrap_or_default())
    }

    /// Creates `shard`'s lease, unowned, unless it exists.
    pub(crate) async fn create(
        &self,
        shard: &str,
        partition: u32,
        parents: &[String],
    ) -> Result<()> {
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("leaseKey", s(shard))
            .item("leaseCounter", n(0))
            .item("ownerSwitchesSinceCheckpoint", n(0))
            .item("weirPartition", n(partition.into()))
            .item("weirNextOffset", n(0))
            .condition_expression("attribute_not_exists(leaseKey)");
        if !parents.is_empty() {
            put = put.item("parentShardId", AttributeValue::Ss(parents.to_vec()));
        }
        self.conditional("DynamoDB PutItem", put.send().await)?;
        Ok(())
    }

    /// Takes `seen` for `owner` if its counter (and owner) are still what was seen: the
    /// lease as it is now, or `None` when someone else changed it first.
    pub(crate) async fn take(
        &self,
        seen: &Lease,
        owner: &str,
        token: &str,
    ) -> Result<Option<Lease>> {
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("leaseKey", s(&seen.shard))
            .update_expression("SET leaseOwner = :me, weirToken = :tok, leaseCounter = :next ADD ownerSwitchesSinceCheckpoint :one")
            .expression_attribute_values(":me", s(owner))
            .expression_attribute_values(":tok", s(token))
            .expression_attribute_values(":next", n(seen.counter + 1))
            .expression_attribute_values(":seen", n(seen.counter))
            .expression_attribute_values(":one", n(1))
            .return_values(ReturnValue::AllNew);
        req = match &seen.owner {
            Some(prev) => req
                .condition_expression("leaseCounter = :seen AND leaseOwner = :prev")
                .expression_attribute_values(":prev", s(prev)),
            None => req
                .condition_expression("leaseCounter = :seen AND attribute_not_exists(leaseOwner)"),
        };
        let out = self.conditional("DynamoDB UpdateItem", req.send().await)?;
        Ok(out.and_then(|o| o.attributes().and_then(Lease::from_item)))
    }

    /// Renews a lease held with `token` (its counter goes up); false when it is lost.
    pub(crate) async fn renew(&self, shard: &str, owner: &str, token: &str) -> Result<bool> {
        let req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("leaseKey", s(shard))
            .update_expression("ADD leaseCounter :one")
            .condition_expression("leaseOwner = :me AND weirToken = :tok")
            .expression_attribute_values(":me", s(owner))
            .expression_attribute_values(":tok", s(token))
            .expression_attribute_values(":one", n(1));
        Ok(self
            .conditional("DynamoDB UpdateItem", req.send().await)?
            .is_some())
    }

    /// Stores `c` in a lease held with `token` (its counter goes up too), as finished when
    /// `finished`; false when the lease is lost (nothing was written).
    pub(crate) async fn checkpoint(
        &self,
        owner: &str,
        token: &str,
        c: &Committed,
        finished: bool,
    ) -> Result<bool> {
        let shard = c.name.as_deref().unwrap_or_default();
        let mut set = vec![
            "weirNextOffset = :off",
            "ownerSwitchesSinceCheckpoint = :zero",
        ];
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("leaseKey", s(shard))
            .condition_expression("leaseOwner = :me AND weirToken = :tok")
            .expression_attribute_values(":me", s(owner))
            .expression_attribute_values(":tok", s(token))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":off", n(c.offset.unwrap_or(0)));
        let cursor = if finished {
            Some(SHARD_END)
        } else {
            c.cursor.as_deref()
        };
        if let Some(cur) = cursor {
            set.push("checkpoint = :cp");
            req = req.expression_attribute_values(":cp", s(cur));
        }
        if let Some(cp) = c.checkpoint {
            set.push("weirCheckpoint = :eng");
            req = req.expression_attribute_values(":eng", s(&cp.encode()));
        }
        let req = req.update_expression(format!("SET {} ADD leaseCounter :one", set.join(", ")));
        Ok(self
            .conditional("DynamoDB UpdateItem", req.send().await)?
            .is_some())
    }
}
