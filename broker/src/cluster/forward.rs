//! Data links to the home nodes of queues: the entry side of cross-node
//! queues. Must not interpret AMQP semantics beyond framing: what a reply
//! means for a client is decided by the connection that owns the channel.
//!
//! A data link is one TCP connection (TLS when cluster TLS is on) from this
//! (entry) node to a queue's home node for one vhost, opened on the cluster
//! port with the cluster handshake (`transport::Transport::dial_data_link`). After the handshake
//! it carries AMQP 0-9-1 frames: this node is the client, the home node runs
//! its ordinary connection handler as an internal, already-authenticated
//! connection (no SASL, full permissions in the vhost).
//!
//! Each client channel that touches the home node's queues gets its own
//! link channel ([`LinkChannel`]), in confirm mode. On it:
//! - publishes are `basic.publish` with `immediate = true`, which marks a
//!   *targeted* publish (refused with 540 on client connections): the body
//!   is prefixed with the list of target queues ([`encode_targets`]) and the
//!   home node enqueues on exactly those, without routing again;
//! - `basic.consume`, `basic.get`, `basic.ack`/`nack`/`reject`,
//!   `basic.cancel`, passive `queue.declare` and `queue.purge` pass through.
//!
//! Replies and deliveries come back to the owning connection's mailbox as
//! [`LinkEvent`]s. When the link fails (dial refused, socket closed, the
//! home node shutting down) every owner gets [`LinkEventKind::Down`] for each
//! of its channels; the home node requeues the unacked deliveries of the
//! link's channels as it does for any closed channel. For
//! `LINK_RETRY_DELAY_MS` after a failure, operations on that peer fail at
//! once instead of redialing for every message.
//!
//! Flow control: at most `LINK_PUBLISHES_IN_FLIGHT_MAX` forwarded publishes
//! per link await their home-node confirm; a connection whose publish finds
//! the link full stops reading its socket until there is room.
//!
//! What a client sees through a data link, and where that differs from a
//! queue homed on its own node:
//! - publisher confirms wait for every home node the message went to (and
//!   the local store); an unreachable home node makes the confirm a
//!   `basic.nack`, and a mandatory message that reached no queue at all a
//!   `basic.return` 312 naming the home node. Outside confirm mode a
//!   publish lost with a failing link is only counted
//!   (`synod_cluster_forward_failed_total`);
//! - a consumer's prefetch is enforced by the home node; a no-ack consumer
//!   or one without a limit gets `LINK_NO_ACK_PREFETCH` there (no-ack
//!   deliveries are acknowledged to the home node as they are written);
//!   a channel-wide (`global`) prefetch applies to local queues only;
//! - when the link fails, consumers get `basic.cancel`, pending requests
//!   and later ones fail with 405 RESOURCE_LOCKED, and the home node
//!   requeues what was unacked; settling those deliveries later is a no-op;
//! - not forwarded: dead letters routed to a queue homed elsewhere (dropped
//!   there, as unroutable), `queue.delete`'s if-unused/if-empty checks on a
//!   remote queue (the deletion is a metadata change), and the management
//!   API's queue counts (each node lists the queues homed on it).
//! - a link has no heartbeat: a home node that vanishes without closing
//!   its sockets is noticed only when TCP gives up;
//! - when a queue's home node is drained (`DELETE /api/cluster/members/{node}`,
//!   see `drain`), its consumers, relayed ones included, get `basic.cancel`
//!   once the move is decided and consume again from the new home; a
//!   publish that reaches the old home after the move (sent by a node that
//!   had not applied it yet) is forwarded by the old home to the new one,
//!   and its confirm waits for the new home's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic, channel as amqp_channel, confirm};
use amq_protocol::protocol::{connection as amqp_connection, queue as amqp_queue};
use bytes::{BufMut, Bytes, BytesMut};
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};

use super::limits::{
    LINK_CHANNELS_MAX, LINK_PUBLISHES_IN_FLIGHT_MAX, LINK_RETRY_DELAY_MS, LINK_WRITE_BATCH_MAX,
};
use super::transport::Transport;
use crate::connection::Outbound;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::protocol::{Encoder, Frame};

/// Read buffer of a data link: one per peer and vhost, busy by nature.
const LINK_READ_BUFFER_SIZE: usize = 64 * 1024;

/// Why an operation on a remote queue cannot be forwarded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The broker runs without data links (not clustered).
    #[error("this node has no data links to other nodes")]
    NoLinks,
    /// The home node failed recently or cannot be reached.
    #[error("home node '{0}' is unreachable")]
    Unreachable(String),
    /// Every channel number of the link is in use.
    #[error("data link to '{0}' has no free channel")]
    NoChannel(String),
}

/// A reply, delivery or failure a data link reports to the connection that
/// owns the link channel.
#[derive(Debug)]
pub struct LinkEvent {
    /// The link channel it concerns.
    pub channel: Arc<LinkChannel>,
    /// What happened.
    pub kind: LinkEventKind,
}

/// What a [`LinkEvent`] reports.
#[derive(Debug)]
pub enum LinkEventKind {
    /// A method without content (`basic.ack`/`nack` confirms, `consume-ok`,
    /// `get-empty`, `declare-ok`, `purge-ok`, `basic.cancel`).
    Method(Box<AMQPClass>),
    /// A method with content (`basic.deliver`, `basic.get-ok`).
    Content(Box<AMQPClass>, Arc<Message>),
    /// The home node closed the channel with an error.
    Closed {
        /// Reply code.
        code: u16,
        /// Reply text.
        text: String,
    },
    /// The link failed: nothing more will come on this channel.
    Down,
}

/// The data links of this node, one per (home node, vhost), opened on first use.
pub struct Links {
    transport: Transport,
    metrics: Metrics,
    state: Mutex<LinksState>,
}

#[derive(Default)]
struct LinksState {
    links: HashMap<(String, String), Arc<Link>>,
    /// Peers whose link failed, and until when to fail fast.
    failed_until: HashMap<String, Instant>,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links").finish_non_exhaustive()
    }
}

impl Links {
    /// Data links that dial through `transport`.
    pub fn new(transport: Transport, metrics: Metrics) -> Arc<Links> {
        Arc::new(Links {
            transport,
            metrics,
            state: Mutex::new(LinksState::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinksState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a channel on the link to `peer` for `vhost` (dialing it if
    /// needed) on behalf of `client_channel` of the connection whose mailbox
    /// is `owner`. The channel is in confirm mode.
    pub fn open_channel(
        self: &Arc<Self>,
        peer: &str,
        vhost: &str,
        owner: mpsc::UnboundedSender<Outbound>,
        client_channel: u16,
    ) -> Result<Arc<LinkChannel>, Error> {
        let link = {
            let mut state = self.lock();
            if let Some(until) = state.failed_until.get(peer) {
                if Instant::now() < *until {
                    return Err(Error::Unreachable(peer.to_string()));
                }
                state.failed_until.remove(peer);
            }
            let key = (peer.to_string(), vhost.to_string());
            match state.links.get(&key) {
                Some(link) if !link.is_down() => link.clone(),
                _ => {
                    let link = self.start_link(peer, vhost);
                    state.links.insert(key, link.clone());
                    link
                }
            }
        };
        link.open_channel(owner, client_channel)
    }

    fn start_link(self: &Arc<Self>, peer: &str, vhost: &str) -> Arc<Link> {
        let (frames, receiver) = mpsc::unbounded_channel();
        let labels = [peer];
        let link = Arc::new(Link {
            peer: peer.to_string(),
            vhost: vhost.to_string(),
            frames,
            table: Mutex::new(Table {
                down: false,
                next_id: 1,
                channels: HashMap::new(),
            }),
            in_flight: AtomicUsize::new(0),
            room: Notify::new(),
            forwarded: self
                .metrics
                .cluster_forwarded_messages_total
                .with_label_values(&labels),
            in_flight_gauge: self
                .metrics
                .cluster_forward_in_flight
                .with_label_values(&labels),
        });
        tokio::spawn(run_link(self.clone(), link.clone(), receiver));
        link
    }

    fn link_failed(&self, link: &Arc<Link>) {
        let mut state = self.lock();
        let key = (link.peer.clone(), link.vhost.clone());
        if state.links.get(&key).is_some_and(|l| Arc::ptr_eq(l, link)) {
            state.links.remove(&key);
        }
        state.failed_until.insert(
            link.peer.clone(),
            Instant::now() + Duration::from_millis(LINK_RETRY_DELAY_MS),
        );
    }
}

/// One data link to a home node.
pub struct Link {
    peer: String,
    vhost: String,
    frames: mpsc::UnboundedSender<Bytes>,
    table: Mutex<Table>,
    in_flight: AtomicUsize,
    room: Notify,
    forwarded: IntCounter,
    in_flight_gauge: IntGauge,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.peer)
            .field("vhost", &self.vhost)
            .finish_non_exhaustive()
    }
}

struct Table {
    down: bool,
    next_id: u16,
    channels: HashMap<u16, Slot>,
}

struct Slot {
    channel: Arc<LinkChannel>,
    owner: mpsc::UnboundedSender<Outbound>,
    /// The owner closed it; waiting for `close-ok`, events are dropped.
    closed: bool,
    /// Content being assembled: the method, then header and body.
    content: Option<Assembling>,
}

struct Assembling {
    method: Box<AMQPClass>,
    header: Option<(u64, Box<basic::AMQPProperties>, Bytes)>,
    body: crate::channel::BodyParts,
}

impl Link {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_down(&self) -> bool {
        self.lock().down
    }

    /// The home node's name.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    fn open_channel(
        self: &Arc<Self>,
        owner: mpsc::UnboundedSender<Outbound>,
        client_channel: u16,
    ) -> Result<Arc<LinkChannel>, Error> {
        let mut table = self.lock();
        if table.down {
            return Err(Error::Unreachable(self.peer.clone()));
        }
        let mut id = table.next_id;
        for _ in 0..LINK_CHANNELS_MAX {
            if id != 0 && !table.channels.contains_key(&id) {
                break;
            }
            id = id.wrapping_add(1);
        }
        if id == 0 || table.channels.contains_key(&id) {
            return Err(Error::NoChannel(self.peer.clone()));
        }
        table.next_id = id.wrapping_add(1);
        let channel = Arc::new(LinkChannel {
            link: self.clone(),
            id,
            client_channel,
        });
        table.channels.insert(
            id,
            Slot {
                channel: channel.clone(),
                owner,
                closed: false,
                content: None,
            },
        );
        drop(table);
        let mut out = BytesMut::new();
        let mut encoder = Encoder::default();
        encoder.method(
            &mut out,
            id,
            &AMQPClass::Channel(amqp_channel::AMQPMethod::Open(amqp_channel::Open {})),
        );
        encoder.method(
            &mut out,
            id,
            &AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                nowait: false,
            })),
        );
        let _ = self.frames.send(out.freeze());
        Ok(channel)
    }

    /// Marks the link down and tells every owner; returns nothing to retry.
    fn fail(&self) {
        let slots: Vec<Slot> = {
            let mut table = self.lock();
            table.down = true;
            table.channels.drain().map(|(_, slot)| slot).collect()
        };
        for slot in slots {
            if !slot.closed {
                let _ = slot.owner.send(Outbound::Link(LinkEvent {
                    channel: slot.channel.clone(),
                    kind: LinkEventKind::Down,
                }));
            }
        }
        self.in_flight_gauge.set(0);
        self.in_flight.store(0, Ordering::SeqCst);
        self.room.notify_waiters();
    }

    /// Whether another forwarded publish fits under the in-flight bound.
    pub fn has_room(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) < LINK_PUBLISHES_IN_FLIGHT_MAX
    }

    /// Resolves once the link has room for publishes again (or is down).
    pub async fn wait_for_room(&self) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.has_room() || self.is_down() {
                return;
            }
            notified.await;
        }
    }

    /// `n` forwarded publishes were confirmed (or given up on).
    pub fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self
            .in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(v.saturating_sub(n))
            })
            .unwrap_or(0);
        self.in_flight_gauge.sub(n.min(before) as i64);
        if before >= LINK_PUBLISHES_IN_FLIGHT_MAX && before - n < LINK_PUBLISHES_IN_FLIGHT_MAX {
            self.room.notify_waiters();
        }
    }

    fn dispatch(&self, frame: Frame) -> Result<(), &'static str> {
        let (channel_id, event) = match frame {
            Frame::Heartbeat(_) => return Ok(()),
            Frame::Method(0, method) => {
                return match *method {
                    AMQPClass::Connection(amqp_connection::AMQPMethod::Close(_)) => {
                        self.send_method(
                            0,
                            &AMQPClass::Connection(amqp_connection::AMQPMethod::CloseOk(
                                amqp_connection::CloseOk {},
                            )),
                        );
                        Err("the home node closed the link")
                    }
                    _ => Ok(()),
                };
            }
            Frame::Method(channel_id, method) => match *method {
                AMQPClass::Channel(amqp_channel::AMQPMethod::OpenOk(_))
                | AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_))
                | AMQPClass::Basic(basic::AMQPMethod::QosOk(_))
                | AMQPClass::Basic(basic::AMQPMethod::CancelOk(_)) => return Ok(()),
                AMQPClass::Channel(amqp_channel::AMQPMethod::CloseOk(_)) => {
                    self.lock().channels.remove(&channel_id);
                    return Ok(());
                }
                AMQPClass::Channel(amqp_channel::AMQPMethod::Close(close)) => {
                    self.send_method(
                        channel_id,
                        &AMQPClass::Channel(amqp_channel::AMQPMethod::CloseOk(
                            amqp_channel::CloseOk {},
                        )),
                    );
                    let Some(slot) = self.lock().channels.remove(&channel_id) else {
                        return Ok(());
                    };
                    if slot.closed {
                        return Ok(());
                    }
                    let event = LinkEventKind::Closed {
                        code: close.reply_code,
                        text: close.reply_text.to_string(),
                    };
                    let _ = slot.owner.send(Outbound::Link(LinkEvent {
                        channel: slot.channel,
                        kind: event,
                    }));
                    return Ok(());
                }
                method @ AMQPClass::Basic(
                    basic::AMQPMethod::Deliver(_)
                    | basic::AMQPMethod::GetOk(_)
                    | basic::AMQPMethod::Return(_),
                ) => {
                    let mut table = self.lock();
                    if let Some(slot) = table.channels.get_mut(&channel_id) {
                        slot.content = Some(Assembling {
                            method: Box::new(method),
                            header: None,
                            body: Default::default(),
                        });
                    }
                    return Ok(());
                }
                method => (channel_id, LinkEventKind::Method(Box::new(method))),
            },
            Frame::Header {
                channel,
                body_size,
                properties,
                properties_raw,
                ..
            } => {
                let mut table = self.lock();
                let Some(slot) = table.channels.get_mut(&channel) else {
                    return Ok(());
                };
                let Some(content) = slot.content.as_mut() else {
                    return Err("content header without a method");
                };
                content.header = Some((body_size, properties, properties_raw));
                if body_size > 0 {
                    return Ok(());
                }
                let Some(event) = finish_content(slot) else {
                    return Ok(());
                };
                (channel, event)
            }
            Frame::Body(channel, bytes) => {
                let mut table = self.lock();
                let Some(slot) = table.channels.get_mut(&channel) else {
                    return Ok(());
                };
                let Some(content) = slot.content.as_mut() else {
                    return Err("content body without a method");
                };
                let Some((size, _, _)) = &content.header else {
                    return Err("content body before its header");
                };
                let size = *size;
                content.body.push(bytes);
                if (content.body.len() as u64) < size {
                    return Ok(());
                }
                let Some(event) = finish_content(slot) else {
                    return Ok(());
                };
                (channel, event)
            }
        };
        let table = self.lock();
        if let Some(slot) = table.channels.get(&channel_id)
            && !slot.closed
        {
            let _ = slot.owner.send(Outbound::Link(LinkEvent {
                channel: slot.channel.clone(),
                kind: event,
            }));
        }
        Ok(())
    }

    fn send_method(&self, channel_id: u16, method: &AMQPClass) {
        let mut out = BytesMut::new();
        Encoder::default().method(&mut out, channel_id, method);
        let _ = self.frames.send(out.freeze());
    }
}

fn finish_content(slot: &mut Slot) -> Option<LinkEventKind> {
    let content = slot.content.take()?;
    let (_, properties, properties_raw) = content.header?;
    let (exchange, routing_key) = match &*content.method {
        AMQPClass::Basic(basic::AMQPMethod::Deliver(d)) => (&d.exchange, &d.routing_key),
        AMQPClass::Basic(basic::AMQPMethod::GetOk(g)) => (&g.exchange, &g.routing_key),
        AMQPClass::Basic(basic::AMQPMethod::Return(r)) => (&r.exchange, &r.routing_key),
        _ => return None,
    };
    let message = Message::new(
        exchange.as_str().into(),
        routing_key.as_str().into(),
        &properties,
        &properties_raw,
        content.body.finish(),
    );
    Some(LinkEventKind::Content(content.method, Arc::new(message)))
}

/// One channel of a data link, owned by one client channel of this node.
pub struct LinkChannel {
    link: Arc<Link>,
    /// Channel number on the link.
    pub id: u16,
    /// The owning client channel's number.
    pub client_channel: u16,
}

impl std::fmt::Debug for LinkChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkChannel")
            .field("peer", &self.link.peer)
            .field("id", &self.id)
            .finish()
    }
}

impl LinkChannel {
    /// The link it belongs to.
    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }

    /// The home node's name.
    pub fn peer(&self) -> &str {
        &self.link.peer
    }

    /// Sends a method without content.
    pub fn send(&self, method: &AMQPClass) {
        self.link.send_method(self.id, method);
    }

    /// Forwards a publish to exactly `targets` on the home node. Returns
    /// false when the link is now full: the caller should stop reading
    /// until [`Link::wait_for_room`] resolves.
    pub fn publish(&self, message: &Message, targets: &[&str]) -> bool {
        let mut body = BytesMut::with_capacity(message.body.len() + 64);
        encode_targets(&mut body, targets);
        body.extend_from_slice(&message.body);
        let mut out = BytesMut::with_capacity(body.len() + 256);
        let mut encoder = Encoder::default();
        encoder.method(
            &mut out,
            self.id,
            &AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: (*message.exchange).into(),
                routing_key: (*message.routing_key).into(),
                mandatory: false,
                immediate: true,
            })),
        );
        encoder.content(
            &mut out,
            self.id,
            &message.properties_raw,
            &body,
            crate::limits::FRAME_SIZE_MAX,
        );
        let _ = self.link.frames.send(out.freeze());
        self.link.forwarded.inc();
        self.link.in_flight_gauge.inc();
        self.link.in_flight.fetch_add(1, Ordering::SeqCst) + 1 < LINK_PUBLISHES_IN_FLIGHT_MAX
    }

    /// Closes the channel on the home node (which requeues its unacked
    /// deliveries); later events for it are dropped.
    pub fn close(&self) {
        {
            let mut table = self.link.lock();
            match table.channels.get_mut(&self.id) {
                Some(slot) if !slot.closed => slot.closed = true,
                _ => return,
            }
        }
        self.send(&AMQPClass::Channel(amqp_channel::AMQPMethod::Close(
            amqp_channel::Close {
                reply_code: crate::protocol::reply::REPLY_SUCCESS,
                reply_text: "".into(),
                class_id: 0,
                method_id: 0,
            },
        )));
    }

    /// Asks the home node for a passive declare of `queue` (counts).
    pub fn declare_passive(&self, queue: &str) {
        self.send(&AMQPClass::Queue(amqp_queue::AMQPMethod::Declare(
            amqp_queue::Declare {
                queue: queue.into(),
                passive: true,
                durable: false,
                exclusive: false,
                auto_delete: false,
                nowait: false,
                arguments: Default::default(),
            },
        )));
    }
}

/// Writes the target-queue prefix of a targeted publish's body: a `u16`
/// count, then each name as a short string.
pub fn encode_targets(out: &mut BytesMut, targets: &[&str]) {
    out.put_u16(targets.len() as u16);
    for name in targets {
        let len = name.len().min(255);
        out.put_u8(len as u8);
        out.extend_from_slice(&name.as_bytes()[..len]);
    }
}

/// Splits a targeted publish's body into its target queues and the message
/// body (a zero-copy slice). `None` when the prefix is malformed.
pub fn decode_targets(body: &Bytes) -> Option<(Vec<String>, Bytes)> {
    let count = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let mut at = 2;
    let mut targets = Vec::with_capacity(count);
    for _ in 0..count {
        let len = *body.get(at)? as usize;
        let name = body.get(at + 1..at + 1 + len)?;
        targets.push(String::from_utf8(name.to_vec()).ok()?);
        at += 1 + len;
    }
    Some((targets, body.slice(at..)))
}

async fn run_link(links: Arc<Links>, link: Arc<Link>, mut frames: mpsc::UnboundedReceiver<Bytes>) {
    let mut shutdown = links.transport.shutdown_signal();
    let stream = tokio::select! {
        dialed = links.transport.dial_data_link(&link.peer, &link.vhost) => dialed,
        _ = shutdown.changed() => {
            links.link_failed(&link);
            link.fail();
            return;
        }
    };
    let stream = match stream {
        Ok(stream) => stream,
        Err(err) => {
            tracing::info!(peer = %link.peer, %err, "data link dial failed");
            links.link_failed(&link);
            link.fail();
            return;
        }
    };
    tracing::debug!(peer = %link.peer, vhost = %link.vhost, "data link open");
    // Either half of a TLS stream needs the whole session: a shared split.
    let (mut read, mut write) = tokio::io::split(stream);
    // Writing has its own task so that a home node busy writing to us
    // (deliveries) never waits on us writing to it (publishes).
    let writer = tokio::spawn(async move {
        let mut batch = BytesMut::new();
        while let Some(first) = frames.recv().await {
            batch.extend_from_slice(&first);
            for _ in 0..LINK_WRITE_BATCH_MAX {
                match frames.try_recv() {
                    Ok(more) => batch.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            if write.write_all(&batch).await.is_err() {
                return;
            }
            batch.clear();
        }
    });
    let mut read_buf = BytesMut::with_capacity(LINK_READ_BUFFER_SIZE);
    let reason = loop {
        if read_buf.capacity() - read_buf.len() < LINK_READ_BUFFER_SIZE / 4 {
            read_buf.reserve(LINK_READ_BUFFER_SIZE);
        }
        let read = tokio::select! {
            read = read.read_buf(&mut read_buf) => read,
            _ = shutdown.changed() => break "this node is stopping",
        };
        match read {
            Ok(0) => break "the home node closed the socket",
            Err(_) => break "socket error",
            Ok(_) => {}
        }
        let mut failed = None;
        loop {
            match Frame::parse(&mut read_buf, crate::limits::FRAME_SIZE_MAX) {
                Ok(Some(frame)) => {
                    if let Err(reason) = link.dispatch(frame) {
                        failed = Some(reason);
                        break;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    failed = Some("bad frame from the home node");
                    break;
                }
            }
        }
        if let Some(reason) = failed {
            break reason;
        }
    };
    tracing::info!(peer = %link.peer, %reason, "data link down");
    links.link_failed(&link);
    link.fail();
    // Give the writer one turn to send a pending close-ok, then stop it.
    tokio::task::yield_now().await;
    writer.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detached_link() -> (Arc<Link>, mpsc::UnboundedReceiver<Bytes>) {
        let (frames, receiver) = mpsc::unbounded_channel();
        let metrics = Metrics::new();
        let link = Arc::new(Link {
            peer: "home".into(),
            vhost: "/".into(),
            frames,
            table: Mutex::new(Table {
                down: false,
                next_id: 1,
                channels: HashMap::new(),
            }),
            in_flight: AtomicUsize::new(0),
            room: Notify::new(),
            forwarded: metrics
                .cluster_forwarded_messages_total
                .with_label_values(&["home"]),
            in_flight_gauge: metrics
                .cluster_forward_in_flight
                .with_label_values(&["home"]),
        });
        (link, receiver)
    }

    #[tokio::test]
    async fn a_full_link_reports_it_and_wakes_waiters_when_confirms_free_room() {
        // Goal: the in-flight bound is reached exactly at LINK_PUBLISHES_IN_FLIGHT_MAX, and a release wakes the waiting publisher.
        let (link, mut frames) = detached_link();
        let (owner, _events) = mpsc::unbounded_channel();
        let channel = link.open_channel(owner, 1).expect("a channel");
        let message = Message::new(
            "".into(),
            "q".into(),
            &Default::default(),
            &[0, 0],
            Bytes::from_static(b"x"),
        );
        for _ in 0..LINK_PUBLISHES_IN_FLIGHT_MAX - 1 {
            assert!(channel.publish(&message, &["q"]));
        }
        assert!(!channel.publish(&message, &["q"]), "the last one fills it");
        assert!(!link.has_room());
        let waiter = tokio::spawn({
            let link = link.clone();
            async move { link.wait_for_room().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        link.release(1);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken in time")
            .expect("waiter");
        // channel.open + confirm.select, then one frame batch per publish.
        let mut n_frames = 0;
        while frames.try_recv().is_ok() {
            n_frames += 1;
        }
        assert_eq!(n_frames, 1 + LINK_PUBLISHES_IN_FLIGHT_MAX);
    }

    #[test]
    fn target_prefix_round_trips_and_rejects_truncation() {
        // Goal: the targeted-publish prefix decodes to the same names and body; a cut prefix is refused.
        let mut out = BytesMut::new();
        encode_targets(&mut out, &["orders", "audit.log"]);
        out.extend_from_slice(b"payload");
        let body = out.freeze();
        let (targets, rest) = decode_targets(&body).expect("well formed");
        assert_eq!(targets, ["orders", "audit.log"]);
        assert_eq!(&rest[..], b"payload");
        assert!(decode_targets(&body.slice(..5)).is_none());
        assert!(decode_targets(&Bytes::from_static(&[0])).is_none());
    }
}
