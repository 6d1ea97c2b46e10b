//! Replicated metadata: on a cluster member every topology change (vhosts,
//! users, permissions, exchanges, queues, bindings) is proposed to the Paxos
//! log, and the decided log is applied, in order, to this node's broker. The
//! node that proposed a change answers its client with the outcome of
//! applying it, so conflicting concurrent declarations on two nodes resolve
//! exactly as on one broker: the first decided wins, the other gets 406.
//!
//! Must not: apply a command anywhere but in decided-log order (every node
//! must hold the same metadata), or decide anything itself (Paxos does).
//!
//! Restart: the topology is NOT read back from the message store; the node
//! replays its stored Paxos log (from the last compaction snapshot), then
//! the store's messages go back into the queues that exist at that point.
//! Transient and exclusive queues homed on a restarted node are then
//! deleted through the log, as RabbitMQ drops them with their node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::broker::Broker;
use crate::cluster::{self, Applied, ClusterNode};
use crate::meta::{Command, MetaError, Outcome};
use crate::paxos::Value;

/// Version of the encoding of log entries and snapshots written here.
pub const FORMAT_VERSION: u32 = 1;
/// Applied entries between two compactions of the Paxos log.
pub const COMPACT_EVERY_ENTRIES: u64 = 10_000;
/// How long a client waits for its change to be decided and applied.
pub const DECISION_TIMEOUT: Duration = Duration::from_secs(15);
/// At startup, how long the node waits for its stored log to be replayed.
pub const REPLAY_TIMEOUT: Duration = Duration::from_secs(120);
/// Changes of this node waiting for their decision.
pub const WAITERS_MAX: usize = 100_000;

/// A proposed change as it travels through the log.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    /// [`FORMAT_VERSION`].
    v: u32,
    /// The proposing node.
    origin: String,
    /// The proposing process (a restarted node must not mistake a replayed
    /// entry of its previous life for one of its pending requests).
    boot: u64,
    /// Request number within `boot`.
    id: u64,
    /// The change.
    command: Command,
}

/// A compaction snapshot: the whole metadata as commands.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotData {
    v: u32,
    commands: Vec<Command>,
}

/// The outcome of a change, now or once decided.
#[derive(Debug)]
pub enum Decision {
    /// Applied already (single node, or nothing to decide).
    Now(Result<Outcome, MetaError>),
    /// Proposed; the receiver yields the outcome once decided and applied.
    Later(oneshot::Receiver<Result<Outcome, MetaError>>),
}

impl Decision {
    /// Waits for the outcome.
    pub async fn wait(self) -> Result<Outcome, MetaError> {
        match self {
            Decision::Now(result) => result,
            Decision::Later(receiver) => receiver.await.unwrap_or_else(|_| {
                Err(MetaError::Unavailable(
                    "the cluster member stopped before the change was decided".into(),
                ))
            }),
        }
    }
}

type Waiter = oneshot::Sender<Result<Outcome, MetaError>>;

/// This node's side of the replicated metadata.
#[derive(Debug)]
pub struct Replication {
    node: String,
    boot: u64,
    cluster: Arc<ClusterNode>,
    next_id: AtomicU64,
    waiters: Mutex<HashMap<u64, Waiter>>,
    /// Last slot applied (or covered by an applied snapshot).
    applied: watch::Sender<u64>,
}

impl Replication {
    /// Replication for `node` through `cluster`.
    pub fn new(node: &str, cluster: Arc<ClusterNode>) -> Arc<Replication> {
        let (applied, _) = watch::channel(0);
        Arc::new(Replication {
            node: node.to_string(),
            boot: rand::random(),
            cluster,
            next_id: AtomicU64::new(1),
            waiters: Mutex::new(HashMap::new()),
            applied,
        })
    }

    /// The cluster member.
    pub fn cluster(&self) -> &Arc<ClusterNode> {
        &self.cluster
    }

    /// Proposes `command`; the receiver yields its outcome once it is
    /// decided and applied here, or why it could not be.
    pub fn propose(self: &Arc<Self>, command: Command) -> Decision {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            if waiters.len() >= WAITERS_MAX {
                return Decision::Now(Err(MetaError::Unavailable(
                    "too many metadata changes are waiting for the cluster; retry later".into(),
                )));
            }
            waiters.insert(id, tx);
        }
        let envelope = Envelope {
            v: FORMAT_VERSION,
            origin: self.node.clone(),
            boot: self.boot,
            id,
            command,
        };
        let data = serde_json::to_vec(&envelope).expect("metadata commands always serialize");
        let this = self.clone();
        tokio::spawn(async move {
            let decided = tokio::time::timeout(DECISION_TIMEOUT, this.cluster.propose(data)).await;
            let failure = match decided {
                // Decided: the applier answers once it has applied the slot.
                Ok(Ok(_slot)) => return,
                Ok(Err(err)) => unavailable(&this.node, &err),
                Err(_) => unavailable(&this.node, &cluster::Error::Timeout),
            };
            this.answer(id, Err(failure));
        });
        Decision::Later(rx)
    }

    fn answer(&self, id: u64, result: Result<Outcome, MetaError>) {
        let waiter = self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(result);
        }
    }

    /// Last slot applied.
    pub fn applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Waits until every slot up to `index` is applied (false on timeout).
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        let mut applied = self.applied.subscribe();
        tokio::time::timeout(timeout, applied.wait_for(|i| *i >= index))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Applies the decided log to `broker`, in order, until the cluster
    /// member stops. Runs as a task for the life of the node.
    pub async fn run_applier(
        self: Arc<Self>,
        broker: Arc<Broker>,
        mut applied: mpsc::Receiver<Applied>,
    ) {
        let mut since_compaction = 0u64;
        while let Some(item) = applied.recv().await {
            match item {
                Applied::Snapshot { index, data } => {
                    match decode_snapshot(&data) {
                        Ok(commands) => broker.reset_metadata(commands),
                        Err(err) => {
                            // Every node wrote it with this code; a snapshot
                            // that does not decode means a newer format.
                            tracing::error!(index, %err, "metadata snapshot does not decode; stopping the applier");
                            return;
                        }
                    }
                    since_compaction = 0;
                    self.applied.send_replace(index);
                }
                Applied::Entry { slot, value } => {
                    if let Value::Command(data) = value {
                        self.apply_entry(&broker, slot, &data);
                        since_compaction += 1;
                    }
                    self.applied.send_replace(slot);
                    if since_compaction >= COMPACT_EVERY_ENTRIES {
                        since_compaction = 0;
                        self.compact(&broker, slot);
                    }
                }
            }
        }
        // The member stopped: nobody will answer the waiting clients.
        let waiters = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|p| p.into_inner()));
        for (_, waiter) in waiters {
            let _ = waiter.send(Err(MetaError::Unavailable(
                "the cluster member stopped".into(),
            )));
        }
    }

    fn apply_entry(&self, broker: &Broker, slot: u64, data: &[u8]) {
        let envelope: Envelope = match serde_json::from_slice(data) {
            Ok(envelope) => envelope,
            Err(err) => {
                // Skipping is deterministic: every node skips it alike.
                tracing::error!(slot, %err, "decided metadata entry does not decode; skipped");
                return;
            }
        };
        if envelope.v != FORMAT_VERSION {
            tracing::error!(
                slot,
                version = envelope.v,
                "decided metadata entry of an unknown format version; skipped"
            );
            return;
        }
        let result = broker.execute(envelope.command);
        if envelope.origin == self.node && envelope.boot == self.boot {
            self.answer(envelope.id, result);
        }
    }

    fn compact(self: &Arc<Self>, broker: &Broker, slot: u64) {
        let data = encode_snapshot(broker.metadata_commands());
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(err) = this.cluster.compact(slot, data).await {
                tracing::warn!(slot, %err, "Paxos log compaction refused");
            }
        });
    }

    /// Deletes, through the log, the transient and exclusive queues homed on
    /// this node that its previous run left in the metadata (their owners
    /// and contents died with that run). Retries until decided or `deadline`.
    pub async fn drop_stale_queues(self: Arc<Self>, broker: Arc<Broker>, deadline: Duration) {
        let stale = broker.stale_local_queues();
        if stale.is_empty() {
            return;
        }
        tracing::info!(
            queues = stale.len(),
            "deleting transient queues left by this node's previous run"
        );
        let give_up = tokio::time::Instant::now() + deadline;
        for (vhost, name) in stale {
            loop {
                let command = Command::DeleteQueue {
                    vhost: vhost.clone(),
                    name: name.clone(),
                };
                match self.propose(command).wait().await {
                    Ok(_) | Err(MetaError::NotFound(_)) => break,
                    Err(err) if tokio::time::Instant::now() < give_up => {
                        tracing::debug!(%err, %vhost, %name, "stale queue not deleted yet; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(err) => {
                        tracing::warn!(%err, %vhost, %name, "stale transient queue not deleted");
                        break;
                    }
                }
            }
        }
    }
}

/// The client-facing error for a change the cluster could not decide.
fn unavailable(node: &str, err: &cluster::Error) -> MetaError {
    let why = match err {
        cluster::Error::NoQuorum | cluster::Error::Timeout => {
            "cannot reach a majority of the cluster".to_string()
        }
        cluster::Error::NotMember => "is not a member of the cluster".to_string(),
        other => format!("cannot decide the change ({other})"),
    };
    MetaError::Unavailable(format!(
        "node '{node}' {why}; metadata changes are refused until it can (retry, or use another node)"
    ))
}

fn encode_snapshot(commands: Vec<Command>) -> Vec<u8> {
    serde_json::to_vec(&SnapshotData {
        v: FORMAT_VERSION,
        commands,
    })
    .expect("metadata commands always serialize")
}

/// Empty data is the initial state (no commands).
fn decode_snapshot(data: &[u8]) -> Result<Vec<Command>, String> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let snapshot: SnapshotData = serde_json::from_slice(data).map_err(|e| e.to_string())?;
    if snapshot.v != FORMAT_VERSION {
        return Err(format!(
            "snapshot format version {} (this build reads {FORMAT_VERSION})",
            snapshot.v
        ));
    }
    Ok(snapshot.commands)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_round_trip_and_empty_data_is_the_initial_state() {
        // Goal: a compaction snapshot decodes to the commands it was made
        // of, empty data to none, and another version is refused.
        let commands = vec![Command::AddVhost { name: "v".into() }];
        let data = encode_snapshot(commands.clone());
        assert_eq!(decode_snapshot(&data).expect("decodes"), commands);
        assert!(decode_snapshot(&[]).expect("empty").is_empty());
        let other = serde_json::to_vec(&SnapshotData {
            v: FORMAT_VERSION + 1,
            commands,
        })
        .expect("encodes");
        assert!(decode_snapshot(&other).is_err());
    }

    #[test]
    fn no_quorum_reads_as_a_clear_unavailable_error() {
        // Goal: the text a client sees names the node and the reason.
        let err = unavailable("n2", &cluster::Error::NoQuorum);
        assert_eq!(err.reply_code(), crate::protocol::reply::RESOURCE_LOCKED);
        let text = err.to_string();
        assert!(text.contains("n2") && text.contains("majority"), "{text}");
    }
}
