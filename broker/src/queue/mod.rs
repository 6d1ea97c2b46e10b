//! Queues: messages, consumers, redelivery, TTL, length limits, dead-lettering.
//!
//! Each queue is one locked struct ([`Queue`]); every operation takes its
//! lock briefly and never awaits or calls into another queue while holding
//! it. Dead letters are returned to the caller, who routes them after the
//! lock is released (so a dead-letter cycle cannot deadlock). This is the
//! boundary where persistence records and a remote home node plug in.
//!
//! Paging: a durable queue keeps at most its log's `memory_max_bytes` of
//! ready bodies in memory. Beyond that, persistent bodies already durable in
//! the store's log are dropped from memory and only their index (store id,
//! size, flags) stays; they are read back from the log, a batch at a time,
//! as they reach the head. The ready list is three regions, in order:
//!
//! ```text
//! [ head: all loaded ][ middle: paged, or loaded if transient ][ tail: all loaded ]
//! ```
//!
//! New messages join the tail. Paging out walks the tail from its front
//! (oldest first, so the first to be durable), after letting the head fill
//! to half the budget; paging in moves a batch from the middle to the head.
//! Deliveries always carry loaded messages. Transient messages are never
//! paged: beyond the budget they stay in memory, where the broker's memory
//! watermark (`connection.blocked`) bounds them. Reads happen under the
//! queue lock on the calling task; they are bounded by
//! [`limits::PAGE_IN_BATCH_MAX`] and [`limits::PAGE_IN_BATCH_BYTES_MAX`].

pub mod args;
pub mod dead_letter;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use prometheus::IntGauge;
use tokio::sync::mpsc;

use crate::connection::Outbound;
use crate::durable::QueueLog;
use crate::limits;
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

/// Deliveries a queue has put in a connection's mailbox that the
/// connection has not yet written: bounds memory when a client reads
/// slowly (no-ack consumers have no prefetch to stop them).
#[derive(Debug, Default)]
pub struct Backlog {
    /// Deliveries in the mailbox.
    pub pending: AtomicUsize,
    /// A queue held back a delivery because of the backlog; the
    /// connection re-dispatches its queues once it has drained.
    pub throttled: AtomicBool,
}

impl Backlog {
    fn has_room(&self) -> bool {
        if self.pending.load(Ordering::SeqCst) < limits::DELIVERY_BACKLOG_MAX {
            return true;
        }
        // Flag, then look again: the connection clears the flag after
        // draining, so either it sees the flag or we see the room.
        self.throttled.store(true, Ordering::SeqCst);
        self.pending.load(Ordering::SeqCst) < limits::DELIVERY_BACKLOG_MAX
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
    /// Its record in the store (persistent message in a durable queue).
    pub store_id: Option<crate::store::MessageId>,
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
    /// The connection's mailbox backlog.
    pub backlog: Arc<Backlog>,
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

/// Where a ready message's body is.
#[derive(Debug)]
enum Body {
    /// In memory.
    Loaded(Arc<Message>),
    /// Only in the store's log; read back before delivery.
    Paged {
        /// Body size in bytes.
        size: u64,
    },
}

/// A ready message: an [`Entry`] whose body may be paged out.
#[derive(Debug)]
struct Queued {
    seq: u64,
    body: Body,
    redelivered: bool,
    expires_at: Option<Instant>,
    store_id: Option<crate::store::MessageId>,
}

impl Queued {
    fn from_entry(entry: Entry) -> Queued {
        Queued {
            seq: entry.seq,
            body: Body::Loaded(entry.message),
            redelivered: entry.redelivered,
            expires_at: entry.expires_at,
            store_id: entry.store_id,
        }
    }

    fn size(&self) -> u64 {
        match &self.body {
            Body::Loaded(message) => message.body_size(),
            Body::Paged { size } => *size,
        }
    }
}

/// A persistent message found in a durable queue's log at startup; its body
/// stays on disk until it nears the head.
#[derive(Debug, Clone, Copy)]
pub struct Restored {
    /// Its record in the store.
    pub store_id: crate::store::MessageId,
    /// Body size in bytes.
    pub size: u64,
    /// Delivered before the restart.
    pub redelivered: bool,
    /// When TTL makes it expire.
    pub expires_at: Option<Instant>,
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
    /// Of those, bytes held in memory (the rest are paged out to the log).
    pub loaded_bytes: u64,
}

#[derive(Debug)]
struct State {
    ready: VecDeque<Queued>,
    ready_bytes: u64,
    /// Bytes of ready bodies in memory.
    loaded_bytes: u64,
    /// Leading entries of `ready` that are all loaded.
    head_len: usize,
    /// Their body bytes.
    head_bytes: u64,
    /// Entries after the head that paging out has visited (paged, or
    /// transient and loaded); the tail after them is all loaded.
    middle_len: usize,
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
    /// Housekeeping has work here: TTLs, `x-expires`, or a message that
    /// carried an `expiration`. Other queues are skipped by [`Queue::tick`].
    timed: AtomicBool,
    /// The store's log of a durable queue (set once, after creation).
    log: OnceLock<QueueLog>,
    /// Over budget with bodies not yet durable: housekeeping pages out.
    paging_pending: AtomicBool,
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
        let timed = args.message_ttl_ms.is_some() || args.expires_ms.is_some();
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
                loaded_bytes: 0,
                head_len: 0,
                head_bytes: 0,
                middle_len: 0,
                n_unacked: 0,
                consumers: Vec::new(),
                next_consumer: 0,
                next_seq: 0,
                last_used: Instant::now(),
                deleted: false,
                had_consumer: false,
            }),
            timed: AtomicBool::new(timed),
            log: OnceLock::new(),
            paging_pending: AtomicBool::new(false),
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
            loaded_bytes: state.loaded_bytes,
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
        self.publish_durable(message, now, dead, &mut Vec::new())
    }

    /// [`Queue::publish`] that also logs a persistent message of a durable
    /// queue, pushing the store ticket its confirm must wait for.
    pub fn publish_durable(
        self: &Arc<Self>,
        message: Arc<Message>,
        now: Instant,
        dead: &mut Vec<DeadLetter>,
        tickets: &mut Vec<crate::store::Ticket>,
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
        if message.expiration_ms().is_some() {
            self.timed.store(true, Ordering::Relaxed);
        }
        let ttl_ms = match (self.args.message_ttl_ms, message.expiration_ms()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let store_id = match self.log.get() {
            Some(log) if message.is_persistent() => log.persist(&message, ttl_ms, tickets),
            _ => None,
        };
        let seq = state.next_seq;
        state.next_seq += 1;
        state.ready_bytes += size;
        state.loaded_bytes += size;
        self.memory_bytes.fetch_add(size as i64, Ordering::Relaxed);
        state.ready.push_back(Queued {
            seq,
            body: Body::Loaded(message),
            redelivered: false,
            expires_at: ttl_ms.map(|ms| now + Duration::from_millis(ms)),
            store_id,
        });
        self.enforce_length(&mut state, dead);
        self.dispatch_locked(&mut state, now, dead);
        self.page_out(&mut state);
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
            self.forget(&entry);
            dead.extend(self.dead_letter(&entry.message, dead_letter::Reason::MaxLen));
        }
    }

    /// Takes the head message, reading it (and a batch after it) back from
    /// the log when it was paged out.
    fn pop_ready(&self, state: &mut State) -> Option<Entry> {
        loop {
            if state.head_len == 0 && state.middle_len > 0 {
                self.page_in(state);
            }
            let queued = state.ready.pop_front()?;
            let size = queued.size();
            state.ready_bytes -= size;
            if state.head_len > 0 {
                state.head_len -= 1;
                state.head_bytes -= size;
            } else if state.middle_len > 0 {
                state.middle_len -= 1;
            }
            let Body::Loaded(message) = queued.body else {
                // Only when the log could not give it back (logged by
                // page_in): the message is lost, drop its record.
                if let (Some(log), Some(id)) = (self.log.get(), queued.store_id) {
                    log.remove(id);
                }
                continue;
            };
            state.loaded_bytes -= size;
            self.memory_bytes.fetch_sub(size as i64, Ordering::Relaxed);
            return Some(Entry {
                seq: queued.seq,
                message,
                redelivered: queued.redelivered,
                expires_at: queued.expires_at,
                store_id: queued.store_id,
            });
        }
    }

    /// Reads paged bodies at the front of the middle back from the log and
    /// moves them into the head: at least one message, then up to a batch.
    fn page_in(&self, state: &mut State) {
        let Some(log) = self.log.get() else {
            // Without a log nothing was paged; the middle is all loaded.
            state.head_len += state.middle_len;
            state.head_bytes += state
                .ready
                .iter()
                .take(state.middle_len)
                .map(Queued::size)
                .sum::<u64>();
            state.middle_len = 0;
            return;
        };
        // A batch never takes more than half the budget, so paging in
        // cannot undo paging out.
        let batch_bytes_max = limits::PAGE_IN_BATCH_BYTES_MAX.min(log.memory_max_bytes() / 2);
        let mut n = 0;
        let mut bytes = 0u64;
        while state.middle_len > 0
            && n < limits::PAGE_IN_BATCH_MAX
            && (n == 0 || bytes + state.ready[state.head_len].size() <= batch_bytes_max)
        {
            let index = state.head_len;
            let queued = &mut state.ready[index];
            let size = queued.size();
            if let (Body::Paged { .. }, Some(id)) = (&queued.body, queued.store_id) {
                match log.read(id) {
                    Some(message) => {
                        queued.body = Body::Loaded(Arc::new(message));
                        state.loaded_bytes += size;
                        self.memory_bytes.fetch_add(size as i64, Ordering::Relaxed);
                    }
                    None => {
                        // Leave it paged at the very front: pop_ready drops it.
                        if n == 0 {
                            return;
                        }
                        break;
                    }
                }
            }
            state.head_len += 1;
            state.head_bytes += size;
            state.middle_len -= 1;
            n += 1;
            bytes += size;
        }
    }

    /// Pages persistent bodies out to the log while the queue holds more
    /// than its budget in memory. Stops at the first body not yet durable
    /// (the next publish or housekeeping tick tries again).
    fn page_out(&self, state: &mut State) {
        let Some(log) = self.log.get() else {
            return;
        };
        let budget = log.memory_max_bytes();
        if state.loaded_bytes <= budget {
            return;
        }
        // Keep half the budget at the head: the next deliveries need no read.
        if state.middle_len == 0 {
            while state.head_len < state.ready.len() {
                let size = state.ready[state.head_len].size();
                if state.head_bytes + size > budget / 2 {
                    break;
                }
                state.head_len += 1;
                state.head_bytes += size;
            }
        }
        self.paging_pending.store(false, Ordering::Relaxed);
        while state.loaded_bytes > budget {
            let index = state.head_len + state.middle_len;
            let Some(queued) = state.ready.get_mut(index) else {
                return;
            };
            if let (Body::Loaded(_), Some(id)) = (&queued.body, queued.store_id) {
                if !log.is_durable(id) {
                    self.paging_pending.store(true, Ordering::Relaxed);
                    return;
                }
                let size = queued.size();
                queued.body = Body::Paged { size };
                state.loaded_bytes -= size;
                self.memory_bytes.fetch_sub(size as i64, Ordering::Relaxed);
            }
            state.middle_len += 1;
        }
    }

    fn drop_expired_head(&self, state: &mut State, now: Instant, dead: &mut Vec<DeadLetter>) {
        while state
            .ready
            .front()
            .is_some_and(|e| e.expires_at.is_some_and(|at| at <= now))
        {
            if let Some(entry) = self.pop_ready(state) {
                self.forget(&entry);
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
                (c.no_ack || (c.credit.has_room() && c.channel_credit.has_room()))
                    && c.backlog.has_room()
            }) else {
                break;
            };
            state.next_consumer = (index + 1) % n;
            let Some(entry) = self.pop_ready(state) else {
                break;
            };
            let consumer = &state.consumers[index];
            let store_id = entry.store_id;
            // Marked before the send so that an ack's removal always follows it.
            if !consumer.no_ack {
                self.delivered(store_id, false);
            }
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
            consumer.backlog.pending.fetch_add(1, Ordering::SeqCst);
            match consumer.sender.send(Outbound::Deliver(delivery)) {
                Ok(()) => {
                    // A no-ack delivery is gone only once it is really handed over.
                    if consumer.no_ack {
                        self.delivered(store_id, true);
                    }
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
        state.loaded_bytes += size;
        self.memory_bytes.fetch_add(size as i64, Ordering::Relaxed);
        let at = state.ready.partition_point(|e| e.seq < entry.seq);
        // A loaded entry may sit in any region; it joins the one it lands in.
        if at <= state.head_len {
            state.head_len += 1;
            state.head_bytes += size;
        } else if at <= state.head_len + state.middle_len {
            state.middle_len += 1;
        }
        state.ready.insert(at, Queued::from_entry(entry));
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
        self.delivered(entry.store_id, no_ack);
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
        self.forget(entry);
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
        if let Some(log) = self.log.get() {
            for id in state.ready.iter().filter_map(|q| q.store_id) {
                log.remove(id);
            }
        }
        self.clear_ready(&mut state);
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
        if let Some(log) = self.log.get() {
            log.drop_all();
        }
        let n = state.ready.len() as u64;
        self.clear_ready(&mut state);
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

    /// Removes every consumer and keeps the messages: the queue's home
    /// moved to another node, which the consumers re-consume from. Returns
    /// them (to be told with `basic.cancel`).
    pub fn take_consumers(&self) -> Vec<Consumer> {
        let mut state = self.lock();
        let consumers = std::mem::take(&mut state.consumers);
        self.metrics.consumers.sub(consumers.len() as i64);
        state.next_consumer = 0;
        self.update_gauges(&state);
        consumers
    }

    fn clear_ready(&self, state: &mut State) {
        self.memory_bytes
            .fetch_sub(state.loaded_bytes as i64, Ordering::Relaxed);
        state.ready.clear();
        state.ready_bytes = 0;
        state.loaded_bytes = 0;
        state.head_len = 0;
        state.head_bytes = 0;
        state.middle_len = 0;
    }

    /// Periodic work: expires messages at the head; returns true when
    /// `x-expires` says the unused queue should now be deleted.
    pub fn tick(self: &Arc<Self>, now: Instant, dead: &mut Vec<DeadLetter>) -> bool {
        if self.paging_pending.load(Ordering::Relaxed) {
            // Bodies that were not yet durable at the last publish may be now.
            let mut state = self.lock();
            if !state.deleted {
                self.page_out(&mut state);
            }
        }
        if !self.timed.load(Ordering::Relaxed) {
            return false;
        }
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

    /// Gives a durable queue its log (once; later calls are ignored).
    pub fn attach_log(&self, log: QueueLog) {
        let _ = self.log.set(log);
    }

    /// The store's log, for a durable queue.
    pub fn log(&self) -> Option<&QueueLog> {
        self.log.get()
    }

    /// The entry left the queue for good: drop its record.
    pub fn forget(&self, entry: &Entry) {
        if let (Some(log), Some(id)) = (self.log.get(), entry.store_id) {
            log.remove(id);
        }
    }

    /// A delivery left for a consumer: no-ack ones are gone for good, the
    /// others come back redelivered after a restart.
    fn delivered(&self, store_id: Option<crate::store::MessageId>, no_ack: bool) {
        if let (Some(log), Some(id)) = (self.log.get(), store_id) {
            if no_ack {
                log.remove(id);
            } else {
                log.delivered(id);
            }
        }
    }

    /// Puts recovered messages back, in order, after whatever the queue
    /// holds, with their bodies paged out: they are read back from the log
    /// as they reach the head.
    pub fn restore(&self, entries: Vec<Restored>) {
        let mut state = self.lock();
        // Whatever the queue holds counts as visited, so the paged entries
        // join the middle behind it.
        state.middle_len = state.ready.len() - state.head_len;
        for restored in entries {
            if restored.expires_at.is_some() {
                self.timed.store(true, Ordering::Relaxed);
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            state.ready_bytes += restored.size;
            state.ready.push_back(Queued {
                seq,
                body: Body::Paged {
                    size: restored.size,
                },
                redelivered: restored.redelivered,
                expires_at: restored.expires_at,
                store_id: Some(restored.store_id),
            });
            state.middle_len += 1;
        }
        self.update_gauges(&state);
    }

    /// Records use for `x-expires` (declare, get, consume).
    pub fn touch(&self, now: Instant) {
        self.lock().last_used = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::FieldTable;
    use bytes::Bytes;

    fn queue(args: QueueArgs) -> Arc<Queue> {
        let def = QueueDef {
            name: "q".into(),
            durable: false,
            exclusive_owner: None,
            auto_delete: false,
            arguments: FieldTable::default(),
            home_node: "n".into(),
        };
        Queue::new("/", def, args, Metrics::new(), Arc::new(AtomicI64::new(0)))
    }

    fn message(body: &'static str) -> Arc<Message> {
        Arc::new(Message::with_properties(
            "".into(),
            "q".into(),
            &Default::default(),
            Bytes::from_static(body.as_bytes()),
        ))
    }

    fn consumer(
        prefetch: u32,
        no_ack: bool,
    ) -> (Consumer, mpsc::UnboundedReceiver<Outbound>, Arc<Backlog>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let backlog = Arc::new(Backlog::default());
        let consumer = Consumer {
            tag: Arc::from("c"),
            connection_id: 1,
            channel_id: 1,
            no_ack,
            exclusive: false,
            credit: Credit::new(prefetch),
            channel_credit: Credit::new(0),
            sender,
            backlog: backlog.clone(),
        };
        (consumer, receiver, backlog)
    }

    fn bodies(receiver: &mut mpsc::UnboundedReceiver<Outbound>) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        while let Ok(Outbound::Deliver(d)) = receiver.try_recv() {
            out.push((
                String::from_utf8_lossy(&d.entry.message.body).into_owned(),
                d.entry.redelivered,
            ));
        }
        out
    }

    #[test]
    fn prefetch_bounds_deliveries_and_requeue_keeps_order() {
        // Goal: prefetch 2 delivers two; requeued messages return first, flagged redelivered.
        let q = queue(QueueArgs::default());
        let now = Instant::now();
        let mut dead = Vec::new();
        for body in ["a", "b", "c"] {
            q.publish(message(body), now, &mut dead);
        }
        let (c, mut rx, _) = consumer(2, false);
        let credit = c.credit.clone();
        q.add_consumer(c, now, &mut dead).expect("consumer");
        let first: Vec<Entry> = std::iter::from_fn(|| match rx.try_recv() {
            Ok(Outbound::Deliver(d)) => Some(d.entry),
            _ => None,
        })
        .collect();
        assert_eq!(first.len(), 2);
        assert_eq!(q.counts().ready, 1);
        assert_eq!(q.counts().unacked, 2);
        credit.release(2);
        q.requeue(first, now, &mut dead);
        assert_eq!(
            bodies(&mut rx),
            [("a".to_string(), true), ("b".to_string(), true)]
        );
        assert!(dead.is_empty());
    }

    #[test]
    fn no_ack_consumers_are_bounded_by_the_connection_backlog() {
        // Goal: a connection that does not drain its mailbox holds at most DELIVERY_BACKLOG_MAX.
        let q = queue(QueueArgs::default());
        let now = Instant::now();
        let mut dead = Vec::new();
        let (c, mut rx, backlog) = consumer(0, true);
        q.add_consumer(c, now, &mut dead).expect("consumer");
        let total = limits::DELIVERY_BACKLOG_MAX + 100;
        for _ in 0..total {
            q.publish(message("m"), now, &mut dead);
        }
        assert_eq!(q.counts().ready, 100);
        assert!(backlog.throttled.load(Ordering::SeqCst));
        // The connection drains, then asks the queue to continue.
        let drained = bodies(&mut rx).len();
        backlog.pending.fetch_sub(drained, Ordering::SeqCst);
        q.dispatch(now, &mut dead);
        assert_eq!(q.counts().ready, 0);
        assert_eq!(bodies(&mut rx).len(), 100);
    }

    #[test]
    fn length_limits_drop_head_or_reject_publish() {
        // Goal: drop-head dead-letters the oldest; reject-publish refuses the newest.
        let dlx = QueueArgs {
            length_max: Some(2),
            dead_letter_exchange: Some("dlx".into()),
            ..QueueArgs::default()
        };
        let q = queue(dlx);
        let now = Instant::now();
        let mut dead = Vec::new();
        for body in ["1", "2", "3"] {
            assert_eq!(q.publish(message(body), now, &mut dead), Enqueued::Accepted);
        }
        assert_eq!(dead.len(), 1);
        assert_eq!(&dead[0].message.body[..], b"1");
        assert_eq!(dead[0].reason, dead_letter::Reason::MaxLen);
        let q = queue(QueueArgs {
            length_max: Some(1),
            overflow: Overflow::RejectPublish,
            ..QueueArgs::default()
        });
        assert_eq!(q.publish(message("a"), now, &mut dead), Enqueued::Accepted);
        assert_eq!(q.publish(message("b"), now, &mut dead), Enqueued::Rejected);
        assert_eq!(q.counts().ready, 1);
    }

    #[test]
    fn ttl_expires_at_the_head_during_housekeeping() {
        // Goal: x-message-ttl expires messages (dead-lettered as "expired") on tick.
        let q = queue(QueueArgs {
            message_ttl_ms: Some(10),
            dead_letter_exchange: Some("dlx".into()),
            ..QueueArgs::default()
        });
        let now = Instant::now();
        let mut dead = Vec::new();
        q.publish(message("old"), now, &mut dead);
        assert!(!q.tick(now, &mut dead));
        assert!(dead.is_empty());
        q.tick(now + Duration::from_millis(11), &mut dead);
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].reason, dead_letter::Reason::Expired);
        assert_eq!(q.counts().ready, 0);
    }
}
