//! Queues: messages, consumers, redelivery, TTL, length limits, dead-lettering.
//!
//! Each queue is one locked struct ([`Queue`]); every operation takes its
//! lock briefly and never awaits or calls into another queue while holding
//! it. Dead letters are returned to the caller, who routes them after the
//! lock is released (so a dead-letter cycle cannot deadlock). This is the
//! boundary where persistence records and a remote home node plug in.

pub mod args;
pub mod dead_letter;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus::IntGauge;
use tokio::sync::mpsc;

use crate::connection::Outbound;
use crate::message::Message;
use crate::meta::QueueDef;
use crate::metrics::Metrics;
use crate::protocol::{AmqpError, reply};
pub use args::{Overflow, QueueArgs};
pub use dead_letter::DeadLetter;

/// Prefetch accounting shared by a queue (which takes credit when it
/// delivers) and a channel (which returns it on ack).
#[derive(Debug, Default)]
pub struct Credit {
    /// Prefetch count; 0 means unlimited.
    pub prefetch: AtomicU32,
    /// Deliveries not yet acknowledged.
    pub in_flight: AtomicU32,
    /// `channel.flow(active=false)` pauses deliveries.
    pub paused: AtomicBool,
}

impl Credit {
    /// A credit with `prefetch` (0 = unlimited).
    pub fn new(prefetch: u32) -> Arc<Credit> {
        Arc::new(Credit {
            prefetch: AtomicU32::new(prefetch),
            ..Credit::default()
        })
    }

    fn has_room(&self) -> bool {
        let prefetch = self.prefetch.load(Ordering::Relaxed);
        !self.paused.load(Ordering::Relaxed)
            && (prefetch == 0 || self.in_flight.load(Ordering::Relaxed) < prefetch)
    }

    /// Returns `n` credits after acks, rejects or requeues.
    pub fn release(&self, n: u32) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }
}

/// A message in a queue.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Position in the queue's enqueue order (requeues go back in order).
    pub seq: u64,
    /// The shared message.
    pub message: Arc<Message>,
    /// Delivered before.
    pub redelivered: bool,
    /// When TTL makes it expire.
    pub expires_at: Option<Instant>,
}

/// A consumer as the queue sees it.
#[derive(Debug, Clone)]
pub struct Consumer {
    /// Consumer tag.
    pub tag: Arc<str>,
    /// Connection id.
    pub connection_id: u64,
    /// Channel number.
    pub channel_id: u16,
    /// Deliveries need no ack.
    pub no_ack: bool,
    /// Exclusive consumer.
    pub exclusive: bool,
    /// Per-consumer prefetch.
    pub credit: Arc<Credit>,
    /// Per-channel (global) prefetch.
    pub channel_credit: Arc<Credit>,
    /// The connection's outbound mailbox.
    pub sender: mpsc::UnboundedSender<Outbound>,
}

/// A delivery the queue hands to a connection.
#[derive(Debug)]
pub struct Delivery {
    /// Channel number.
    pub channel_id: u16,
    /// Consumer tag.
    pub consumer_tag: Arc<str>,
    /// The queue it came from.
    pub queue: Arc<Queue>,
    /// The message.
    pub entry: Entry,
    /// Needs no ack (already removed from the queue).
    pub no_ack: bool,
}

/// Result of offering a message to a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// The queue holds (or delivered) it.
    Accepted,
    /// The queue refused it (`x-overflow = reject-publish`).
    Rejected,
}

/// Message counts of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueCounts {
    /// Ready for delivery.
    pub ready: u64,
    /// Delivered, not yet acked.
    pub unacked: u64,
    /// Consumers.
    pub consumers: u64,
    /// Bytes of ready bodies.
    pub ready_bytes: u64,
}

#[derive(Debug)]
struct State {
    ready: VecDeque<Entry>,
    ready_bytes: u64,
    n_unacked: u64,
    consumers: Vec<Consumer>,
    next_consumer: usize,
    next_seq: u64,
    last_used: Instant,
    deleted: bool,
    had_consumer: bool,
}

/// One queue: its definition, parsed arguments and locked state.
#[derive(Debug)]
pub struct Queue {
    /// Vhost name.
    pub vhost: String,
    /// Queue definition from the metadata.
    pub def: QueueDef,
    /// Parsed arguments.
    pub args: QueueArgs,
    state: Mutex<State>,
    gauge_ready: IntGauge,
    gauge_unacked: IntGauge,
    gauge_consumers: IntGauge,
    metrics: Metrics,
    memory_bytes: Arc<AtomicI64>,
}

impl Queue {
    /// A new empty queue. `memory_bytes` is the broker-wide tally of
    /// ready message bytes that drives `connection.blocked`.
    pub fn new(
        vhost: &str,
        def: QueueDef,
        args: QueueArgs,
        metrics: Metrics,
        memory_bytes: Arc<AtomicI64>,
    ) -> Arc<Queue> {
        let labels = [vhost, def.name.as_str()];
        metrics.queues.inc();
        Arc::new(Queue {
            vhost: vhost.to_string(),
            gauge_ready: metrics.queue_messages_ready.with_label_values(&labels),
            gauge_unacked: metrics.queue_messages_unacked.with_label_values(&labels),
            gauge_consumers: metrics.queue_consumers.with_label_values(&labels),
            def,
            args,
            state: Mutex::new(State {
                ready: VecDeque::new(),
                ready_bytes: 0,
                n_unacked: 0,
                consumers: Vec::new(),
                next_consumer: 0,
                next_seq: 0,
                last_used: Instant::now(),
                deleted: false,
                had_consumer: false,
            }),
            metrics,
            memory_bytes,
        })
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.def.name
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a bug panicked mid-update; the state may
        // be inconsistent, but crashing every connection would be worse
        // than continuing with counts that may be off.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update_gauges(&self, state: &State) {
        self.gauge_ready.set(state.ready.len() as i64);
        self.gauge_unacked.set(state.n_unacked as i64);
        self.gauge_consumers.set(state.consumers.len() as i64);
    }

    /// Current counts.
    pub fn counts(&self) -> QueueCounts {
        let state = self.lock();
        QueueCounts {
            ready: state.ready.len() as u64,
            unacked: state.n_unacked,
            consumers: state.consumers.len() as u64,
            ready_bytes: state.ready_bytes,
        }
    }

    /// Whether the queue was deleted (late operations become no-ops).
    pub fn is_deleted(&self) -> bool {
        self.lock().deleted
    }

    /// Offers a message. Dead letters (overflow, immediate expiry) are
    /// appended to `dead`.
    pub fn publish(
        self: &Arc<Self>,
        message: Arc<Message>,
        now: Instant,
        dead: &mut Vec<DeadLetter>,
    ) -> Enqueued {
        let mut state = self.lock();
        if state.deleted {
            return Enqueued::Accepted;
        }
        let size = message.body_size();
        let full = self
            .args
            .length_max
            .is_some_and(|max| state.ready.len() as u64 >= max)
            || self
                .args
                .length_bytes_max
                .is_some_and(|max| state.ready_bytes + size > max);
        if full {
            match self.args.overflow {
                Overflow::DropHead => {}
                Overflow::RejectPublish => return Enqueued::Rejected,
                Overflow::RejectPublishDlx => {
                    dead.extend(self.dead_letter(&message, dead_letter::Reason::MaxLen));
                    return Enqueued::Rejected;
                }
            }
        }
        let ttl_ms = match (self.args.message_ttl_ms, message.expiration_ms()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let seq = state.next_seq;
        state.next_seq += 1;
        state.ready_bytes += size;
        self.memory_bytes.fetch_add(size as i64, Ordering::Relaxed);
        state.ready.push_back(Entry {
            seq,
            message,
            redelivered: false,
            expires_at: ttl_ms.map(|ms| now + Duration::from_millis(ms)),
        });
        self.enforce_length(&mut state, dead);
        self.dispatch_locked(&mut state, now, dead);
        self.update_gauges(&state);
        Enqueued::Accepted
    }

    fn enforce_length(&self, state: &mut State, dead: &mut Vec<DeadLetter>) {
        loop {
            let over = self
                .args
                .length_max
                .is_some_and(|max| state.ready.len() as u64 > max)
                || self
                    .args
                    .length_bytes_max
                    .is_some_and(|max| state.ready_bytes > max);
            if !over {
                return;
            }
            let Some(entry) = self.pop_ready(state) else {
                return;
            };
            dead.extend(self.dead_letter(&entry.message, dead_letter::Reason::MaxLen));
        }
    }

    fn pop_ready(&self, state: &mut State) -> Option<Entry> {
        let entry = state.ready.pop_front()?;
        let size = entry.message.body_size();
        state.ready_bytes -= size;
        self.memory_bytes.fetch_sub(size as i64, Ordering::Relaxed);
        Some(entry)
    }

    fn drop_expired_head(&self, state: &mut State, now: Instant, dead: &mut Vec<DeadLetter>) {
        while state
            .ready
            .front()
            .is_some_and(|e| e.expires_at.is_some_and(|at| at <= now))
        {
            if let Some(entry) = self.pop_ready(state) {
                dead.extend(self.dead_letter(&entry.message, dead_letter::Reason::Expired));
            }
        }
    }

    fn dead_letter(
        &self,
        message: &Arc<Message>,
        reason: dead_letter::Reason,
    ) -> Option<DeadLetter> {
        let exchange = self.args.dead_letter_exchange.clone()?;
        Some(DeadLetter {
            message: message.clone(),
            reason,
            vhost: self.vhost.clone(),
            queue: self.def.name.clone(),
            exchange,
            routing_key: self.args.dead_letter_routing_key.clone(),
        })
    }

    /// Delivers ready messages to consumers with credit.
    pub fn dispatch(self: &Arc<Self>, now: Instant, dead: &mut Vec<DeadLetter>) {
        let mut state = self.lock();
        self.dispatch_locked(&mut state, now, dead);
        self.update_gauges(&state);
    }

    fn dispatch_locked(
        self: &Arc<Self>,
        state: &mut State,
        now: Instant,
        dead: &mut Vec<DeadLetter>,
    ) {
        self.drop_expired_head(state, now, dead);
        while !state.ready.is_empty() && !state.consumers.is_empty() {
            let n = state.consumers.len();
            let Some(index) = (0..n).map(|i| (state.next_consumer + i) % n).find(|&i| {
                let c = &state.consumers[i];
                c.no_ack || (c.credit.has_room() && c.channel_credit.has_room())
            }) else {
                break;
            };
            state.next_consumer = (index + 1) % n;
            let Some(entry) = self.pop_ready(state) else {
                break;
            };
            let consumer = &state.consumers[index];
            if !consumer.no_ack {
                consumer.credit.in_flight.fetch_add(1, Ordering::Relaxed);
                consumer
                    .channel_credit
                    .in_flight
                    .fetch_add(1, Ordering::Relaxed);
                state.n_unacked += 1;
            }
            let redelivered = entry.redelivered;
            let delivery = Delivery {
                channel_id: consumer.channel_id,
                consumer_tag: consumer.tag.clone(),
                queue: self.clone(),
                entry,
                no_ack: consumer.no_ack,
            };
            match consumer.sender.send(Outbound::Deliver(delivery)) {
                Ok(()) => {
                    self.metrics.messages_delivered_total.inc();
                    if redelivered {
                        self.metrics.messages_redelivered_total.inc();
                    }
                }
                Err(mpsc::error::SendError(outbound)) => {
                    // The connection is gone: take the message back and
                    // forget the consumer; its channel cleanup is moot.
                    let consumer = state.consumers.remove(index);
                    if !consumer.no_ack {
                        state.n_unacked -= 1;
                    }
                    self.metrics.consumers.dec();
                    if let Outbound::Deliver(delivery) = outbound {
                        self.insert_sorted(state, delivery.entry);
                    }
                    state.next_consumer = 0;
                }
            }
            self.drop_expired_head(state, now, dead);
        }
    }

    fn insert_sorted(&self, state: &mut State, entry: Entry) {
        let size = entry.message.body_size();
        state.ready_bytes += size;
        self.memory_bytes.fetch_add(size as i64, Ordering::Relaxed);
        let at = state.ready.partition_point(|e| e.seq < entry.seq);
        state.ready.insert(at, entry);
    }

    /// `basic.get`: takes the head message. With `no_ack = false` it counts
    /// as unacked until settled. Returns the entry and the remaining count.
    pub fn get(
        &self,
        no_ack: bool,
        now: Instant,
        dead: &mut Vec<DeadLetter>,
    ) -> Option<(Entry, u32)> {
        let mut state = self.lock();
        state.last_used = now;
        self.drop_expired_head(&mut state, now, dead);
        let entry = self.pop_ready(&mut state)?;
        if !no_ack {
            state.n_unacked += 1;
        }
        self.metrics.messages_delivered_total.inc();
        if entry.redelivered {
            self.metrics.messages_redelivered_total.inc();
        }
        let remaining = state.ready.len() as u32;
        self.update_gauges(&state);
        Some((entry, remaining))
    }

    /// Settles `n` deliveries positively.
    pub fn ack(&self, n: u64) {
        let mut state = self.lock();
        state.n_unacked = state.n_unacked.saturating_sub(n);
        self.update_gauges(&state);
    }

    /// Puts unacked deliveries back, in their original order, marked
    /// redelivered, and delivers again.
    pub fn requeue(
        self: &Arc<Self>,
        entries: Vec<Entry>,
        now: Instant,
        dead: &mut Vec<DeadLetter>,
    ) {
        let mut state = self.lock();
        state.n_unacked = state.n_unacked.saturating_sub(entries.len() as u64);
        if state.deleted {
            return;
        }
        for mut entry in entries {
            entry.redelivered = true;
            self.insert_sorted(&mut state, entry);
        }
        self.dispatch_locked(&mut state, now, dead);
        self.update_gauges(&state);
    }

    /// Settles a delivery negatively without requeue: dead-letters it when
    /// the queue has a dead-letter exchange.
    pub fn reject(&self, entry: &Entry, dead: &mut Vec<DeadLetter>) {
        let mut state = self.lock();
        state.n_unacked = state.n_unacked.saturating_sub(1);
        self.update_gauges(&state);
        if !state.deleted {
            dead.extend(self.dead_letter(&entry.message, dead_letter::Reason::Rejected));
        }
    }

    /// Adds a consumer; enforces exclusivity as RabbitMQ does (403).
    pub fn add_consumer(
        self: &Arc<Self>,
        consumer: Consumer,
        now: Instant,
        dead: &mut Vec<DeadLetter>,
    ) -> Result<(), AmqpError> {
        let mut state = self.lock();
        if state.deleted {
            return Err(AmqpError::new(
                reply::NOT_FOUND,
                format!("no queue '{}' in vhost '{}'", self.def.name, self.vhost),
            ));
        }
        if state.consumers.iter().any(|c| c.exclusive)
            || (consumer.exclusive && !state.consumers.is_empty())
        {
            return Err(AmqpError::new(
                reply::ACCESS_REFUSED,
                format!(
                    "queue '{}' in vhost '{}' in exclusive use",
                    self.def.name, self.vhost
                ),
            ));
        }
        state.consumers.push(consumer);
        state.had_consumer = true;
        state.last_used = now;
        self.metrics.consumers.inc();
        self.dispatch_locked(&mut state, now, dead);
        self.update_gauges(&state);
        Ok(())
    }

    /// Removes a consumer. Returns true when the queue is auto-delete and
    /// just lost its last consumer (the caller deletes it).
    pub fn remove_consumer(
        &self,
        connection_id: u64,
        channel_id: u16,
        tag: &str,
        now: Instant,
    ) -> bool {
        let mut state = self.lock();
        let before = state.consumers.len();
        state.consumers.retain(|c| {
            !(c.connection_id == connection_id && c.channel_id == channel_id && &*c.tag == tag)
        });
        let removed = before - state.consumers.len();
        self.metrics.consumers.sub(removed as i64);
        state.next_consumer = 0;
        state.last_used = now;
        self.update_gauges(&state);
        removed > 0
            && self.def.auto_delete
            && state.had_consumer
            && state.consumers.is_empty()
            && !state.deleted
    }

    /// Drops every ready message; returns how many.
    pub fn purge(&self) -> u64 {
        let mut state = self.lock();
        let n = state.ready.len() as u64;
        self.memory_bytes
            .fetch_sub(state.ready_bytes as i64, Ordering::Relaxed);
        state.ready.clear();
        state.ready_bytes = 0;
        self.update_gauges(&state);
        n
    }

    /// Marks the queue deleted; returns its consumers (to be told with
    /// `basic.cancel`) and the number of ready messages dropped.
    pub fn mark_deleted(&self) -> (Vec<Consumer>, u64) {
        let mut state = self.lock();
        if state.deleted {
            return (Vec::new(), 0);
        }
        state.deleted = true;
        let n = state.ready.len() as u64;
        self.memory_bytes
            .fetch_sub(state.ready_bytes as i64, Ordering::Relaxed);
        state.ready.clear();
        state.ready_bytes = 0;
        let consumers = std::mem::take(&mut state.consumers);
        self.metrics.consumers.sub(consumers.len() as i64);
        self.metrics.queues.dec();
        let labels = [self.vhost.as_str(), self.def.name.as_str()];
        let _ = self
            .metrics
            .queue_messages_ready
            .remove_label_values(&labels);
        let _ = self
            .metrics
            .queue_messages_unacked
            .remove_label_values(&labels);
        let _ = self.metrics.queue_consumers.remove_label_values(&labels);
        (consumers, n)
    }

    /// Periodic work: expires messages at the head; returns true when
    /// `x-expires` says the unused queue should now be deleted.
    pub fn tick(self: &Arc<Self>, now: Instant, dead: &mut Vec<DeadLetter>) -> bool {
        let mut state = self.lock();
        if state.deleted {
            return false;
        }
        self.dispatch_locked(&mut state, now, dead);
        self.update_gauges(&state);
        self.args.expires_ms.is_some_and(|ms| {
            state.consumers.is_empty()
                && now.duration_since(state.last_used) >= Duration::from_millis(ms)
        })
    }

    /// Records use for `x-expires` (declare, get, consume).
    pub fn touch(&self, now: Instant) {
        self.lock().last_used = now;
    }
}
