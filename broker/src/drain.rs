//! Drain: a node marked draining in the metadata (`Command::SetDraining`)
//! moves every queue homed on it to other voters, metadata and messages,
//! then proposes its own removal from the Paxos configuration. Must not:
//! decide anything itself (every move and the removal go through the log),
//! move exclusive queues (they follow their connection), or delete a
//! message here before its new home confirmed it (persistent at the new
//! home when the message and the queue are durable).
//!
//! Moving one queue `q` from this node X to target T:
//! 1. T is the voter, not draining, holding the fewest queues; it stays
//!    `q`'s target across retries (T may already hold copied messages).
//! 2. X takes `q`'s messages from the head, in order, and sends them to T
//!    as targeted publishes on a data link channel in confirm mode. T holds
//!    them in a *staged* queue (not yet its home: `Broker::publish_to_queues`).
//!    Each message is deleted at X only when T confirmed it; a nack or a
//!    failed link puts it back at X, in its place. Consumers at X keep
//!    consuming meanwhile (each message goes either to them or to T).
//! 3. Once `q` is empty at X, X proposes `MoveQueue { home: T }`. When it
//!    is decided every node routes to T; T adopts the staged queue; X
//!    detaches its runtime queue and cancels its consumers
//!    (consumer-cancel-notify: clients, also those relayed from other
//!    nodes, re-consume from T). A publish that still reaches X afterwards
//!    (a node that has not applied the move yet) is forwarded to T.
//! 4. X copies what arrived between steps 2 and 3, and deliveries its
//!    consumers give back (requeued) for up to `DRAIN_UNACKED_WAIT_MS`,
//!    then drops the queue locally.
//!
//! Known limits: the redelivered flag is not carried over; message TTLs
//! restart at the new home; if X crashes after step 3 and before step 4
//! ends, the messages that were still at X are lost (X no longer homes
//! `q` when it restarts); a staged queue whose move never gets decided
//! (X removed by force meanwhile) keeps its messages only until T restarts.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic};
use tokio::sync::mpsc;

use crate::broker::Broker;
use crate::cluster::forward::{self, LinkChannel, LinkEvent, LinkEventKind};
use crate::connection::Outbound;
use crate::limits::{
    DRAIN_CONFIRM_TIMEOUT_MS, DRAIN_IN_FLIGHT_MAX, DRAIN_RETRY_DELAY_MS, DRAIN_UNACKED_WAIT_MS,
};
use crate::meta::{Command, MetaError};
use crate::queue::{Entry, Queue};

/// Why one step of a drain failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Every other voter is draining too, or there is no cluster.
    #[error("no other voter that is not draining can take the queue")]
    NoTarget,
    /// The data link to the target could not be used.
    #[error("data link: {0}")]
    Link(#[from] forward::Error),
    /// The target stopped answering during the copy.
    #[error("the data link to '{0}' failed during the copy")]
    LinkDown(String),
    /// The target did not confirm copied messages in time.
    #[error("'{0}' did not confirm copied messages in time")]
    ConfirmTimeout(String),
    /// The move could not be decided.
    #[error("{0}")]
    Meta(#[from] MetaError),
}

/// Runs for the life of a cluster member: drains this node whenever it is
/// marked draining (at startup too, when its log says so). Holds the
/// broker only while draining, so a stopped broker is dropped (and its
/// data directory unlocked) even when this task has not noticed yet.
pub async fn supervise(broker: Arc<Broker>) {
    let me = broker.settings.node_name.clone();
    let wakeup = broker.drain_wakeup();
    let Some(mut shutdown) = broker.cluster().map(|c| c.transport().shutdown_signal()) else {
        return;
    };
    let weak = Arc::downgrade(&broker);
    drop(broker);
    loop {
        {
            let Some(broker) = weak.upgrade() else {
                return;
            };
            if broker.is_draining(&me) {
                run(&broker, &shutdown).await;
            }
        }
        tokio::select! {
            _ = wakeup.notified() => {}
            changed = shutdown.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        if *shutdown.borrow() {
            return;
        }
    }
}

/// Moves every movable queue homed here away, then removes this node from
/// the configuration. Returns when done, when the mark is cleared, or when
/// this node is no longer a member.
async fn run(broker: &Arc<Broker>, shutdown: &tokio::sync::watch::Receiver<bool>) {
    let me = broker.settings.node_name.clone();
    let retry = Duration::from_millis(DRAIN_RETRY_DELAY_MS);
    let mut targets: HashMap<(String, String), String> = HashMap::new();
    tracing::info!(node = %me, "draining: moving this node's queues to other nodes");
    loop {
        if *shutdown.borrow() {
            return;
        }
        if !broker.is_draining(&me) {
            tracing::info!("drain cancelled: this node is no longer marked draining");
            return;
        }
        let Some(cluster) = broker.cluster().cloned() else {
            return;
        };
        let status = cluster.status();
        if !status.members.iter().any(|m| m.name == me) {
            // Removed (by this drain, or by force): nothing more to do.
            return;
        }
        if !status.ready {
            tokio::time::sleep(retry).await;
            continue;
        }
        let homed = broker.queues_homed_on(&me);
        let (exclusive, movable): (Vec<_>, Vec<_>) = homed
            .into_iter()
            .partition(|(_, def)| def.exclusive_owner.is_some());
        if movable.is_empty() {
            if !exclusive.is_empty() {
                // Exclusive queues go with their connections, as when a
                // single node stops.
                for (_, def) in &exclusive {
                    if let Some(owner) = &def.exclusive_owner {
                        broker.close_connection(owner, "this node is leaving the cluster");
                    }
                }
                tokio::time::sleep(retry).await;
                continue;
            }
            match cluster.remove_member(&me).await {
                Ok(_) => {
                    tracing::info!(node = %me, "drained: removed from the cluster");
                    return;
                }
                Err(err) => {
                    tracing::info!(%err, "drained; removal not decided yet, retrying");
                    tokio::time::sleep(retry).await;
                    continue;
                }
            }
        }
        for (vhost, def) in movable {
            let key = (vhost.clone(), def.name.clone());
            let target = match targets.get(&key) {
                Some(t) if broker.is_member(t) && !broker.is_draining(t) => t.clone(),
                _ => match broker.least_loaded_home(Some(&me)) {
                    Some(t) => t,
                    None => {
                        tracing::warn!("drain: no node can take the queues; retrying");
                        tokio::time::sleep(retry).await;
                        break;
                    }
                },
            };
            targets.insert(key, target.clone());
            if let Err(err) = move_queue(broker, &vhost, &def.name, &target).await {
                tracing::info!(%err, %vhost, queue = %def.name, %target, "queue not moved yet; retrying");
                tokio::time::sleep(retry).await;
                break;
            }
        }
    }
}

/// Moves `vhost`/`name` from this node to `target` (steps 2 to 4 above).
async fn move_queue(
    broker: &Arc<Broker>,
    vhost: &str,
    name: &str,
    target: &str,
) -> Result<(), Error> {
    let queue = broker.queue(vhost, name);
    if let Some(queue) = &queue {
        let mut copier = Copier::open(broker, target, vhost)?;
        let copied = copier.copy(broker, queue, None).await;
        copier.close();
        copied?;
    }
    let command = Command::MoveQueue {
        vhost: vhost.to_string(),
        name: name.to_string(),
        home: target.to_string(),
    };
    match broker.submit(command).await {
        Ok(_) => {}
        // Deleted meanwhile: nothing to move.
        Err(MetaError::NotFound(_)) => return Ok(()),
        Err(err) => return Err(err.into()),
    }
    broker.metrics.cluster_queues_moved_total.inc();
    tracing::info!(%vhost, queue = %name, %target, "queue moved");
    if let Some(queue) = queue {
        copy_tail(broker, &queue, vhost, target).await;
        queue.mark_deleted();
    }
    Ok(())
}

/// Step 4: copies what is left in the detached queue, including
/// deliveries requeued by consumers, until it is empty and settled or
/// `DRAIN_UNACKED_WAIT_MS` passed.
async fn copy_tail(broker: &Arc<Broker>, queue: &Arc<Queue>, vhost: &str, target: &str) {
    let deadline = Instant::now() + Duration::from_millis(DRAIN_UNACKED_WAIT_MS);
    loop {
        let copied = match Copier::open(broker, target, vhost) {
            Ok(mut copier) => {
                let copied = copier.copy(broker, queue, Some(deadline)).await;
                copier.close();
                copied
            }
            Err(err) => Err(err),
        };
        match copied {
            Ok(()) => return,
            Err(err) if Instant::now() < deadline => {
                tracing::info!(%err, queue = %queue.name(), "copying the rest of a moved queue; retrying");
                tokio::time::sleep(Duration::from_millis(DRAIN_RETRY_DELAY_MS)).await;
            }
            Err(err) => {
                let counts = queue.counts();
                tracing::warn!(%err, queue = %queue.name(), ready = counts.ready, unacked = counts.unacked,
                    "messages left at the old home of a moved queue are dropped");
                return;
            }
        }
    }
}

/// A data link channel to the target with the copies awaiting its confirm.
struct Copier {
    channel: Arc<LinkChannel>,
    events: mpsc::UnboundedReceiver<Outbound>,
    /// Publishes sent on the channel (the target numbers its confirms alike).
    published: u64,
    /// Copies awaiting confirms: (link sequence number, the entry taken at X).
    in_flight: VecDeque<(u64, Entry)>,
}

impl Copier {
    fn open(broker: &Broker, target: &str, vhost: &str) -> Result<Copier, Error> {
        let links = broker.links().ok_or(forward::Error::NoLinks)?;
        let (owner, events) = mpsc::unbounded_channel();
        let channel = links.open_channel(target, vhost, owner, 0)?;
        Ok(Copier {
            channel,
            events,
            published: 0,
            in_flight: VecDeque::new(),
        })
    }

    fn close(&mut self) {
        self.channel.close();
    }

    /// Copies `queue`'s ready messages, in order, until it is empty and
    /// every copy is confirmed. With `settle_by`, also waits (until then)
    /// for its unacked deliveries to be settled, copying those requeued.
    async fn copy(
        &mut self,
        broker: &Broker,
        queue: &Arc<Queue>,
        settle_by: Option<Instant>,
    ) -> Result<(), Error> {
        let name = queue.name().to_string();
        let result = self.copy_inner(broker, queue, &name, settle_by).await;
        if result.is_err() {
            // Nothing in flight is known to be at the target: back in place.
            let entries: Vec<Entry> = self.in_flight.drain(..).map(|(_, e)| e).collect();
            self.channel.link().release(entries.len());
            let mut dead = Vec::new();
            queue.requeue(entries, Instant::now(), &mut dead);
            broker.dead_letter(dead);
        }
        result
    }

    async fn copy_inner(
        &mut self,
        broker: &Broker,
        queue: &Arc<Queue>,
        name: &str,
        settle_by: Option<Instant>,
    ) -> Result<(), Error> {
        let confirm_timeout = Duration::from_millis(DRAIN_CONFIRM_TIMEOUT_MS);
        let mut quiet_seen = false;
        loop {
            let mut full = false;
            while self.in_flight.len() < DRAIN_IN_FLIGHT_MAX && !full {
                let mut dead = Vec::new();
                let taken = queue.get(false, Instant::now(), &mut dead);
                broker.dead_letter(dead);
                let Some((entry, _)) = taken else {
                    break;
                };
                full = !self.channel.publish(&entry.message, &[name]);
                self.published += 1;
                self.in_flight.push_back((self.published, entry));
            }
            if self.in_flight.is_empty() {
                let counts = queue.counts();
                if counts.ready > 0 {
                    continue;
                }
                match settle_by {
                    Some(deadline) if counts.unacked > 0 && Instant::now() < deadline => {
                        // Consumers still hold deliveries: look again soon.
                        tokio::time::sleep(Duration::from_millis(DRAIN_RETRY_DELAY_MS)).await;
                        continue;
                    }
                    Some(_) if !quiet_seen => {
                        // A publish that picked this queue just before the
                        // move may still be adding to it: look once more
                        // after a pause before the queue is dropped.
                        quiet_seen = true;
                        tokio::time::sleep(Duration::from_millis(DRAIN_RETRY_DELAY_MS)).await;
                        continue;
                    }
                    _ => return Ok(()),
                }
            }
            let peer = self.channel.peer().to_string();
            let event = match tokio::time::timeout(confirm_timeout, self.events.recv()).await {
                Ok(Some(event)) => event,
                Ok(None) => return Err(Error::LinkDown(peer)),
                Err(_) => return Err(Error::ConfirmTimeout(peer)),
            };
            let Outbound::Link(LinkEvent { kind, .. }) = event else {
                continue;
            };
            match kind {
                LinkEventKind::Method(method) => match *method {
                    AMQPClass::Basic(basic::AMQPMethod::Ack(ack)) => {
                        self.settle(broker, queue, ack.delivery_tag, true);
                    }
                    AMQPClass::Basic(basic::AMQPMethod::Nack(nack)) => {
                        self.settle(broker, queue, nack.delivery_tag, false);
                    }
                    _ => {}
                },
                LinkEventKind::Content(..) => {}
                LinkEventKind::Closed { .. } | LinkEventKind::Down => {
                    return Err(Error::LinkDown(peer));
                }
            }
        }
    }

    /// The target answered copies up to `tag` (confirms come in order, so
    /// an answer settles everything up to its tag that is still waiting):
    /// confirmed ones leave this node for good; refused ones go back in place.
    fn settle(&mut self, broker: &Broker, queue: &Arc<Queue>, tag: u64, ok: bool) {
        let mut refused = Vec::new();
        let mut n = 0usize;
        while self.in_flight.front().is_some_and(|(seq, _)| *seq <= tag) {
            let Some((_, entry)) = self.in_flight.pop_front() else {
                break;
            };
            n += 1;
            if ok {
                queue.ack(1);
                queue.forget(&entry);
                broker.metrics.cluster_messages_moved_total.inc();
            } else {
                refused.push(entry);
            }
        }
        self.channel.link().release(n);
        if !refused.is_empty() {
            let mut dead = Vec::new();
            queue.requeue(refused, Instant::now(), &mut dead);
            broker.dead_letter(dead);
        }
    }
}
