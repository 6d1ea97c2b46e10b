//! One AMQP connection: socket bytes <-> frames, the handshake, heartbeats,
//! flow control, and the dispatch of channel methods. The only module that
//! touches socket bytes. One task per connection owns all its channels, so
//! channel state needs no locks; queues reach it through an mpsc mailbox.
//!
//! Writes are batched: frames are appended to one buffer and flushed once
//! per batch of input (a read, or a burst of deliveries).
//!
//! # Queues homed on other nodes
//!
//! A client connection reaches a queue whose `home_node` is another node
//! through a data link (`cluster::forward`): publishes are forwarded with
//! their target queues, and consume, get, ack/nack/reject, cancel, passive
//! declare and purge are relayed on a link channel owned by the client
//! channel. While a relayed request that answers synchronously (consume,
//! get, declare, purge) awaits the home node's answer, the connection
//! stops reading, so replies keep the order of requests. When the home node
//! cannot be reached (no link, dial refused, link lost), those requests
//! fail with a channel error `405 RESOURCE_LOCKED` ("home node ... is
//! unreachable"): the queue exists, so 404 would be wrong, and a hard
//! error such as 541 would close the client's unrelated channels too.
//!
//! The home node serves data links with this same handler
//! ([`serve_internal`]): an internal connection, already authenticated by
//! the cluster handshake, with full permissions in its vhost; only it may
//! send *targeted* publishes (`immediate = true`, body prefixed with the
//! target queues), which it enqueues on exactly those queues. A target on
//! the move (see `drain`) is staged on the node it is moving to, and
//! forwarded by the draining node it left to its new home; the confirm
//! then waits for that home too.
//!
//! While this node is draining it keeps serving clients: queues declared
//! here are homed on other nodes, and consumers of a queue that moved get
//! `basic.cancel` (consumer-cancel-notify) and consume again from its new
//! home; exclusive queues stay until their connections close, which the
//! drain asks for once everything else has moved.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use amq_protocol::protocol::{
    AMQPClass, basic, channel as amqp_channel, confirm, connection as amqp_connection, exchange,
    queue as amqp_queue, tx,
};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::auth;
use crate::broker::QueueAt;
use crate::broker::{Access, Broker, CompiledPermissions, ConnectionHandle};
use crate::channel::{
    BodyParts, Channel, ChannelConsumer, Confirms, ConsumerSource, Forwarded, Origin,
    PendingContent, RemoteChannel, TxOp, Unacked, WaitingConfirm,
};
use crate::cluster::forward::{self, Link, LinkChannel, LinkEvent, LinkEventKind};
use crate::exchange::{Binding, Destination, ExchangeKind};
use crate::limits;
use crate::message::Message;
use crate::meta::{Command, ExchangeDef, MetaError, Outcome, QueueDef};
use crate::protocol::{self, AmqpError, Encoder, Frame, reply};
use crate::queue::{Backlog, Consumer, Credit, Delivery, Entry, Queue};
use crate::replication::Decision;

/// What other tasks send to a connection.
#[derive(Debug)]
pub enum Outbound {
    /// A queue delivers a message to a consumer of this connection.
    Deliver(Delivery),
    /// The queue of a consumer was deleted (`basic.cancel` to the client).
    ConsumerCancelled {
        /// Channel number.
        channel_id: u16,
        /// Consumer tag.
        consumer_tag: Arc<str>,
    },
    /// Persistent publish `seq` of a channel is durable (`ok`) or not.
    Confirmed {
        /// The channel instance it was published on.
        channel: Arc<crate::broker::ChannelInfo>,
        /// Publish sequence number.
        seq: u64,
        /// Ack (true) or nack (false).
        ok: bool,
    },
    /// A data link reports a reply, delivery or failure for one of this
    /// connection's link channels.
    Link(LinkEvent),
    /// Close the connection (management API, shutdown).
    Close {
        /// Reply code.
        code: u16,
        /// Reply text.
        text: String,
    },
}

/// Why a connection ended badly (logged, never shown to other peers).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer did not finish the handshake in time or went silent.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The peer closed the socket mid-handshake.
    #[error("peer closed the connection")]
    Eof,
}

/// Who is at the other end of an accepted socket.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The client's address.
    pub addr: SocketAddr,
    /// Our address the client connected to.
    pub local: SocketAddr,
    /// The subject common name of the client certificate, when the socket
    /// is TLS and rustls verified the certificate against `--tls-ca`. Only
    /// then is SASL EXTERNAL offered, with this name as the user.
    pub certificate_name: Option<String>,
    /// The node's connection limit was reached when the socket was
    /// accepted: the handshake runs, and `connection.open` is answered with
    /// `connection.close 530 NOT_ALLOWED`, which clients report clearly.
    pub over_connection_limit: bool,
}

/// Serves one accepted socket (plain TCP or TLS) until it closes or
/// `shutdown` fires. The AMQP handshake must end by `handshake_deadline`
/// (which the caller also applied to the TLS handshake), or the socket is
/// closed without a word.
pub async fn serve<S>(
    broker: Arc<Broker>,
    socket: S,
    peer_info: PeerInfo,
    handshake_deadline: tokio::time::Instant,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let PeerInfo {
        addr: peer,
        local,
        certificate_name,
        over_connection_limit,
    } = peer_info;
    let name = format!("{peer} -> {local}");
    let (sender, receiver) = mpsc::unbounded_channel();
    let mut connection = Connection {
        id: broker.next_connection_id(),
        broker: broker.clone(),
        socket,
        peer,
        certificate_name,
        name,
        read_buf: BytesMut::with_capacity(limits::CONNECTION_BUFFER_SIZE_MIN),
        read_size: limits::CONNECTION_BUFFER_SIZE_MIN,
        write_buf: BytesMut::with_capacity(limits::CONNECTION_BUFFER_SIZE_MIN),
        encoder: Encoder::default(),
        // Until tune-ok, accept up to our maximum: some clients send large
        // client properties in start-ok.
        frame_max: limits::FRAME_SIZE_MAX,
        channel_max: broker.settings.channel_max,
        heartbeat_s: 0,
        over_connection_limit,
        vhost: String::new(),
        user: String::new(),
        permissions: None,
        channels: HashMap::new(),
        sender,
        backlog: Arc::new(Backlog::default()),
        route_scratch: Vec::new(),
        exclusive_queues: Vec::new(),
        client_blocked_capable: false,
        has_published: false,
        blocked: false,
        blocked_notified: false,
        handle: None,
        closing: false,
        last_read: Instant::now(),
        last_write: Instant::now(),
        confirm_waiter: None,
        deferred: None,
        current_method: (0, 0),
        internal: false,
        remote_scratch: Vec::new(),
        tx_tickets: None,
        remote_wait: None,
        link_full: None,
        resume_input: false,
    };
    let handshake = tokio::time::timeout_at(handshake_deadline, connection.handshake()).await;
    match handshake {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => return Ok(()),
        Ok(Err(err)) => return Err(err),
        Err(_) => return Err(Error::Timeout("handshake")),
    }
    broker.metrics.connections.inc();
    let result = connection.run(receiver, &mut shutdown).await;
    connection.cleanup();
    broker.metrics.connections.dec();
    result
}

/// Serves an inbound data link from `peer_node` (socket address `peer`) as
/// an internal connection on `vhost`: no AMQP handshake (the cluster handshake authenticated the
/// peer), full permissions, targeted publishes allowed. Ends when the link
/// closes or `shutdown` fires.
pub async fn serve_internal<S>(
    broker: Arc<Broker>,
    socket: S,
    peer: SocketAddr,
    peer_node: &str,
    vhost: String,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    if !broker.has_vhost(&vhost) {
        return Ok(());
    }
    let everything = crate::meta::Permissions {
        configure: ".*".into(),
        write: ".*".into(),
        read: ".*".into(),
    };
    let (sender, receiver) = mpsc::unbounded_channel();
    let mut connection = Connection {
        id: broker.next_connection_id(),
        broker: broker.clone(),
        socket,
        peer,
        certificate_name: None,
        name: format!("data link from {peer_node} ({peer})"),
        read_buf: BytesMut::with_capacity(limits::CONNECTION_BUFFER_SIZE_MIN),
        read_size: limits::CONNECTION_BUFFER_SIZE_MIN,
        write_buf: BytesMut::with_capacity(limits::CONNECTION_BUFFER_SIZE_MIN),
        encoder: Encoder::default(),
        frame_max: limits::FRAME_SIZE_MAX,
        channel_max: u16::MAX,
        heartbeat_s: 0,
        over_connection_limit: false,
        vhost,
        user: format!("cluster:{peer_node}"),
        permissions: CompiledPermissions::compile(&everything).map(Arc::new),
        channels: HashMap::new(),
        sender,
        backlog: Arc::new(Backlog::default()),
        route_scratch: Vec::new(),
        exclusive_queues: Vec::new(),
        client_blocked_capable: false,
        has_published: false,
        blocked: false,
        blocked_notified: false,
        handle: None,
        closing: false,
        last_read: Instant::now(),
        last_write: Instant::now(),
        confirm_waiter: None,
        deferred: None,
        current_method: (0, 0),
        internal: true,
        remote_scratch: Vec::new(),
        tx_tickets: None,
        remote_wait: None,
        link_full: None,
        resume_input: false,
    };
    let result = connection.run(receiver, &mut shutdown).await;
    connection.cleanup();
    result
}

/// A relayed request whose answer the connection waits for before it
/// reads further client frames.
struct RemoteWait {
    link: Arc<LinkChannel>,
    channel_id: u16,
    kind: WaitKind,
}

enum WaitKind {
    Consume {
        tag: Arc<str>,
        no_ack: bool,
        nowait: bool,
    },
    Get {
        no_ack: bool,
    },
    Declare {
        name: String,
    },
    Purge {
        nowait: bool,
    },
}

struct Connection<S> {
    id: u64,
    broker: Arc<Broker>,
    socket: S,
    peer: SocketAddr,
    /// Verified client-certificate name (TLS with `--tls-ca` only).
    certificate_name: Option<String>,
    name: String,
    read_buf: BytesMut,
    /// Room each read asks for: doubles when a read fills it, up to a
    /// frame; back to the minimum after an idle spell.
    read_size: usize,
    write_buf: BytesMut,
    encoder: Encoder,
    frame_max: u32,
    channel_max: u16,
    heartbeat_s: u16,
    /// Refuse at `connection.open`: the node's connection limit is reached.
    over_connection_limit: bool,
    vhost: String,
    user: String,
    permissions: Option<Arc<CompiledPermissions>>,
    channels: HashMap<u16, Channel>,
    sender: mpsc::UnboundedSender<Outbound>,
    backlog: Arc<Backlog>,
    /// Reused for each publish's list of target queues.
    route_scratch: Vec<Arc<Queue>>,
    exclusive_queues: Vec<String>,
    client_blocked_capable: bool,
    has_published: bool,
    /// A resource alarm is raised.
    blocked: bool,
    /// `connection.blocked` was sent and `unblocked` is owed. As RabbitMQ,
    /// only a connection that publishes is told (and then not read): many
    /// clients stop sending everything while blocked, which would stall
    /// consumers that need to open channels or ack.
    blocked_notified: bool,
    handle: Option<Arc<ConnectionHandle>>,
    /// We sent `connection.close` and await `close-ok`.
    closing: bool,
    last_read: Instant,
    last_write: Instant,
    /// Turns store tickets into confirms (started at the first persistent publish).
    confirm_waiter: Option<crate::durable::ConfirmWaiter>,
    /// A metadata change waiting for the cluster's decision. No further
    /// frame of this connection is handled until it resolves, so replies
    /// and effects keep the order the client sent its methods in.
    deferred: Option<Deferred<S>>,
    /// Class and method ids of the method being handled (for the errors of
    /// its deferred continuation).
    current_method: (u16, u16),
    /// A data link from another node (see [`serve_internal`]).
    internal: bool,
    /// Reused for each publish's list of (home node, queue) remote targets.
    remote_scratch: Vec<(String, String)>,
    /// While a `tx.commit` publishes its messages: the store tickets of the
    /// persistent ones, which `commit-ok` waits for.
    tx_tickets: Option<Vec<crate::store::Ticket>>,
    /// A relayed request awaiting its answer; input is paused meanwhile.
    remote_wait: Option<RemoteWait>,
    /// A data link this connection's publishes filled; input is paused
    /// until it has room.
    link_full: Option<Arc<Link>>,
    /// Input was paused and may go on: handle the frames already buffered.
    resume_input: bool,
}

/// What to do with a metadata change's outcome once it is decided.
type Continuation<S> =
    Box<dyn FnOnce(&mut Connection<S>, Result<Outcome, MetaError>) -> Result<(), AmqpError> + Send>;

/// A metadata change proposed to the cluster and its continuation.
struct Deferred<S> {
    channel_id: u16,
    class_id: u16,
    method_id: u16,
    decision: tokio::sync::oneshot::Receiver<Result<Outcome, MetaError>>,
    then: Continuation<S>,
}

/// Resolves with the deferred change's outcome (never, when there is none).
async fn deferred_outcome<S>(deferred: &mut Option<Deferred<S>>) -> Result<Outcome, MetaError> {
    match deferred {
        Some(d) => (&mut d.decision).await.unwrap_or_else(|_| {
            Err(MetaError::Unavailable(
                "the cluster member stopped before the change was decided".into(),
            ))
        }),
        None => std::future::pending().await,
    }
}

/// Outcome of one frame for the main loop.
enum Flow {
    Continue,
    /// The connection is done (close-ok exchanged or sent).
    Stop,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Connection<S> {
    async fn flush(&mut self) -> Result<(), Error> {
        if !self.write_buf.is_empty() {
            self.socket.write_all(&self.write_buf).await?;
            self.write_buf.clear();
            self.last_write = Instant::now();
        }
        Ok(())
    }

    fn send_method(&mut self, channel: u16, method: AMQPClass) {
        self.encoder.method(&mut self.write_buf, channel, &method);
    }

    /// Reads until one frame is available (handshake only).
    async fn read_frame(&mut self) -> Result<Result<Frame, protocol::Error>, Error> {
        loop {
            match Frame::parse(&mut self.read_buf, self.frame_max) {
                Ok(Some(frame)) => return Ok(Ok(frame)),
                Ok(None) => {}
                Err(err) => return Ok(Err(err)),
            }
            if self.socket.read_buf(&mut self.read_buf).await? == 0 {
                return Err(Error::Eof);
            }
        }
    }

    /// Runs the handshake. Ok(false) when it ended without an open connection.
    async fn handshake(&mut self) -> Result<bool, Error> {
        while self.read_buf.len() < 8 {
            if self.socket.read_buf(&mut self.read_buf).await? == 0 {
                return Err(Error::Eof);
            }
        }
        if &self.read_buf[..8] != protocol::PROTOCOL_HEADER {
            self.socket.write_all(protocol::PROTOCOL_HEADER).await?;
            return Ok(false);
        }
        self.read_buf.advance(8);
        self.send_method(
            0,
            AMQPClass::Connection(amqp_connection::AMQPMethod::Start(amqp_connection::Start {
                version_major: 0,
                version_minor: 9,
                server_properties: server_properties(&self.broker.settings.cluster_name),
                mechanisms: if self.certificate_name.is_some() {
                    auth::MECHANISMS_WITH_EXTERNAL.into()
                } else {
                    auth::MECHANISMS.into()
                },
                locales: "en_US".into(),
            })),
        );
        self.flush().await?;
        let start_ok = match self
            .expect_method("connection.start-ok", |method| match method {
                amqp_connection::AMQPMethod::StartOk(start_ok) => Some(start_ok),
                _ => None,
            })
            .await?
        {
            Ok(start_ok) => start_ok,
            Err(refused) => return Ok(refused),
        };
        if let Some(AMQPValue::FieldTable(capabilities)) =
            start_ok.client_properties.inner().get("capabilities")
        {
            self.client_blocked_capable = matches!(
                capabilities.inner().get("connection.blocked"),
                Some(AMQPValue::Boolean(true))
            );
        }
        let mechanism = start_ok.mechanism.as_str();
        // An address that keeps failing waits for every answer, right or
        // wrong, so guessing is slow; other addresses are not affected.
        let delay = self
            .broker
            .login_throttle
            .delay_for(self.peer.ip(), Instant::now());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let from_loopback = self.peer.ip().is_loopback();
        let authenticated = match (mechanism, &self.certificate_name) {
            ("EXTERNAL", Some(name)) => self
                .broker
                .authenticate_external(name, from_loopback)
                .map_err(|reason| (name.clone(), reason)),
            _ => match auth::decode_response(mechanism, start_ok.response.as_bytes()) {
                Some(credentials) => self
                    .broker
                    .authenticate(&credentials.username, &credentials.password, from_loopback)
                    .map_err(|reason| (credentials.username, reason)),
                None => {
                    self.broker.metrics.auth_failures_total.inc();
                    Err((
                        String::new(),
                        format!("mechanism {mechanism:?} not offered or its response is malformed"),
                    ))
                }
            },
        };
        match authenticated {
            Ok(user) => self.user = user.name,
            Err((user, reason)) => {
                let failures = self
                    .broker
                    .login_throttle
                    .record_failure(self.peer.ip(), Instant::now());
                tracing::warn!(peer = %self.peer, %user, %mechanism, %reason, failures, "AMQP authentication failed");
                return self
                    .refuse(reply::ACCESS_REFUSED, &login_refused_text(mechanism))
                    .await;
            }
        }
        self.send_method(
            0,
            AMQPClass::Connection(amqp_connection::AMQPMethod::Tune(amqp_connection::Tune {
                channel_max: self.broker.settings.channel_max,
                frame_max: limits::FRAME_SIZE_MAX,
                heartbeat: limits::HEARTBEAT_INTERVAL_DEFAULT_S,
            })),
        );
        self.flush().await?;
        let tune_ok = match self
            .expect_method("connection.tune-ok", |method| match method {
                amqp_connection::AMQPMethod::TuneOk(tune_ok) => Some(tune_ok),
                _ => None,
            })
            .await?
        {
            Ok(tune_ok) => tune_ok,
            Err(refused) => return Ok(refused),
        };
        if tune_ok.frame_max != 0 && tune_ok.frame_max < limits::FRAME_SIZE_MIN {
            return self
                .refuse(
                    reply::NOT_ALLOWED,
                    &format!(
                        "NOT_ALLOWED - frame_max {} below minimum {}",
                        tune_ok.frame_max,
                        limits::FRAME_SIZE_MIN
                    ),
                )
                .await;
        }
        self.frame_max = match tune_ok.frame_max {
            0 => limits::FRAME_SIZE_MAX,
            n => n.min(limits::FRAME_SIZE_MAX),
        };
        self.channel_max = match tune_ok.channel_max {
            0 => self.broker.settings.channel_max,
            n => n.min(self.broker.settings.channel_max),
        };
        self.heartbeat_s = tune_ok.heartbeat;
        let open = match self
            .expect_method("connection.open", |method| match method {
                amqp_connection::AMQPMethod::Open(open) => Some(open),
                _ => None,
            })
            .await?
        {
            Ok(open) => open,
            Err(refused) => return Ok(refused),
        };
        let vhost = open.virtual_host.as_str().to_string();
        let permissions = if self.broker.has_vhost(&vhost) {
            self.broker.permissions(&vhost, &self.user)
        } else {
            None
        };
        let Some(permissions) = permissions else {
            let text = format!(
                "NOT_ALLOWED - access to vhost '{vhost}' refused for user '{}'",
                self.user
            );
            return self.refuse(reply::NOT_ALLOWED, &text).await;
        };
        // Refused only now, after open, as RabbitMQ refuses its per-user and
        // per-vhost limits: every client reports a close here with its code
        // and text, where a bare TCP close reads as a network fault.
        if self.over_connection_limit {
            let text = format!(
                "NOT_ALLOWED - access to vhost '{vhost}' refused for user '{}': node connection limit ({}) is reached",
                self.user, self.broker.settings.connections_max
            );
            tracing::warn!(peer = %self.peer, user = %self.user, "connection limit reached; refused");
            return self.refuse(reply::NOT_ALLOWED, &text).await;
        }
        self.vhost = vhost;
        self.permissions = Some(permissions);
        let handle = Arc::new(ConnectionHandle {
            id: self.id,
            name: self.name.clone(),
            peer: self.peer,
            user: self.user.clone(),
            vhost: self.vhost.clone(),
            connected_at_s: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            channels: Default::default(),
            sender: self.sender.clone(),
        });
        // The per-user and per-vhost limits are checked and the connection
        // counted in one step, so racing connections cannot both pass.
        if let Err(text) = self.broker.try_register_connection(handle.clone()) {
            tracing::warn!(peer = %self.peer, user = %self.user, %text, "connection refused by a limit");
            return self.refuse(reply::NOT_ALLOWED, &text).await;
        }
        self.handle = Some(handle);
        // Written by `run`, whose cleanup unregisters the connection: no
        // await between registering and leaving the (time-bounded) handshake.
        self.send_method(
            0,
            AMQPClass::Connection(amqp_connection::AMQPMethod::OpenOk(
                amqp_connection::OpenOk {},
            )),
        );
        Ok(true)
    }

    /// Sends connection.close during the handshake and waits briefly for close-ok.
    /// Reads the next handshake frame, which must be the connection method
    /// `pick` accepts, on channel 0. Anything else refuses the connection
    /// (`Err` carries what [`Connection::refuse`] returned).
    async fn expect_method<T>(
        &mut self,
        expected: &str,
        pick: impl FnOnce(amqp_connection::AMQPMethod) -> Option<T>,
    ) -> Result<Result<T, bool>, Error> {
        match self.read_frame().await? {
            Ok(Frame::Method(0, method)) => {
                if let AMQPClass::Connection(method) = *method
                    && let Some(wanted) = pick(method)
                {
                    return Ok(Ok(wanted));
                }
            }
            Ok(_) => {}
            Err(err) => return Ok(Err(self.refuse(err.reply_code(), &err.to_string()).await?)),
        }
        let text = format!("expected {expected}");
        Ok(Err(self.refuse(reply::COMMAND_INVALID, &text).await?))
    }

    async fn refuse(&mut self, code: u16, text: &str) -> Result<bool, Error> {
        self.send_close(code, text, 0, 0);
        self.flush().await?;
        let _ = tokio::time::timeout(Duration::from_millis(limits::CLOSE_OK_WAIT_MS), async {
            loop {
                match self.read_frame().await {
                    Ok(Ok(Frame::Method(_, method)))
                        if matches!(
                            *method,
                            AMQPClass::Connection(amqp_connection::AMQPMethod::CloseOk(_))
                        ) =>
                    {
                        return;
                    }
                    Ok(Ok(_)) => {}
                    _ => return,
                }
            }
        })
        .await;
        Ok(false)
    }

    fn send_close(&mut self, code: u16, text: &str, class_id: u16, method_id: u16) {
        self.send_method(
            0,
            AMQPClass::Connection(amqp_connection::AMQPMethod::Close(amqp_connection::Close {
                reply_code: code,
                reply_text: short(text).into(),
                class_id,
                method_id,
            })),
        );
    }

    async fn run(
        &mut self,
        mut receiver: mpsc::UnboundedReceiver<Outbound>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let heartbeat =
            (self.heartbeat_s > 0).then(|| Duration::from_secs(u64::from(self.heartbeat_s)));
        // The ticker also releases grown buffers of idle connections.
        let buffer_idle = Duration::from_millis(limits::CONNECTION_BUFFER_IDLE_MS);
        let mut ticker = tokio::time::interval(
            heartbeat
                .map(|h| (h / 2).min(buffer_idle))
                .unwrap_or(buffer_idle),
        );
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut alarm = self.broker.memory_alarm();
        // An alarm raised before this connection opened blocks it too.
        if *alarm.borrow_and_update() {
            self.set_blocked(true);
        }
        let mut closing_deadline: Option<Instant> = None;
        // Frames left in the buffer after the handshake (pipelining clients).
        if let Flow::Stop = self.process_input() {
            self.flush().await?;
            return Ok(());
        }
        self.flush().await?;
        loop {
            let read_paused = self.input_paused() && !self.closing;
            let link_full = self.link_full.clone();
            // Large bodies stay zero-copy slices that keep their block
            // alive; reserve then takes a fresh block rather than letting
            // reads shrink to the little room left behind them.
            if self.read_buf.capacity() - self.read_buf.len() < self.read_size / 2 {
                self.read_buf.reserve(self.read_size);
            }
            let room = self.read_buf.capacity() - self.read_buf.len();
            tokio::select! {
                read = self.socket.read_buf(&mut self.read_buf), if !read_paused => {
                    let n = read?;
                    if n == 0 {
                        return Ok(());
                    }
                    if n >= room {
                        // The peer had more to send than we had room for.
                        let frame_size_max = self.frame_max as usize + protocol::FRAME_OVERHEAD;
                        self.read_size = (self.read_size * 2).min(frame_size_max.max(self.read_size));
                    }
                    self.last_read = Instant::now();
                    if let Flow::Stop = self.process_input() {
                        self.flush().await?;
                        return Ok(());
                    }
                }
                outbound = receiver.recv() => {
                    let Some(outbound) = outbound else { return Ok(()) };
                    self.handle_outbound(outbound);
                    // Drain a burst so one flush carries many deliveries. When
                    // the burst is short, yield once first: publishers on
                    // other tasks get to add to it, and we save a write
                    // syscall (and a wake-up) per message.
                    if self.drain_outbound(&mut receiver) < limits::OUTBOUND_BATCH_MAX / 4 {
                        tokio::task::yield_now().await;
                        self.drain_outbound(&mut receiver);
                    }
                    self.flush_confirms();
                }
                _ = ticker.tick() => {
                    if read_paused {
                        // We are not reading, so silence proves nothing.
                        self.last_read = Instant::now();
                    }
                    if let Some(interval) = heartbeat {
                        if self.last_read.elapsed() > interval * 2 {
                            tracing::info!(connection = %self.name, "missed heartbeats; closing");
                            return Err(Error::Timeout("heartbeat"));
                        }
                        if self.last_write.elapsed() >= interval / 2 {
                            self.encoder.heartbeat(&mut self.write_buf);
                        }
                    }
                    if closing_deadline.is_some_and(|d| Instant::now() > d) {
                        return Ok(());
                    }
                    self.release_idle_buffers(buffer_idle);
                }
                changed = alarm.changed() => {
                    if changed.is_ok() {
                        let on = *alarm.borrow_and_update();
                        self.set_blocked(on);
                        // Frames read before the block are still buffered.
                        if !on && let Flow::Stop = self.process_input() {
                            self.flush().await?;
                            return Ok(());
                        }
                    }
                }
                outcome = deferred_outcome(&mut self.deferred), if self.deferred.is_some() => {
                    self.resume(outcome);
                    if let Flow::Stop = self.process_input() {
                        self.flush().await?;
                        return Ok(());
                    }
                }
                changed = shutdown.changed(), if !self.closing => {
                    let _ = changed;
                    self.begin_close(reply::CONNECTION_FORCED, "CONNECTION_FORCED - broker shutdown", 0, 0);
                }
                _ = async { if let Some(link) = &link_full { link.wait_for_room().await } }, if link_full.is_some() => {
                    self.link_full = None;
                    self.resume_input = true;
                }
            }
            if std::mem::take(&mut self.resume_input)
                && !self.input_paused()
                && let Flow::Stop = self.process_input()
            {
                self.flush().await?;
                return Ok(());
            }
            if self.backlog.throttled.swap(false, Ordering::SeqCst) {
                let ids: Vec<u16> = self.channels.keys().copied().collect();
                for id in ids {
                    self.redispatch(id);
                }
            }
            if self.closing && closing_deadline.is_none() {
                closing_deadline =
                    Some(Instant::now() + Duration::from_millis(limits::CLOSE_OK_WAIT_MS));
                ticker = tokio::time::interval(Duration::from_millis(100));
            }
            self.flush().await?;
        }
    }

    /// Replaces buffers that grew during a burst with minimum-size ones once
    /// the connection has been quiet for `idle`: a thousand idle
    /// connections should not each hold a frame-sized block.
    fn release_idle_buffers(&mut self, idle: Duration) {
        let size_min = limits::CONNECTION_BUFFER_SIZE_MIN;
        if self.read_buf.is_empty()
            && self.read_buf.capacity() > size_min
            && self.last_read.elapsed() >= idle
        {
            self.read_buf = BytesMut::with_capacity(size_min);
            self.read_size = size_min;
        }
        if self.write_buf.is_empty()
            && self.write_buf.capacity() > size_min
            && self.last_write.elapsed() >= idle
        {
            self.write_buf = BytesMut::with_capacity(size_min);
        }
    }

    /// Handles up to `OUTBOUND_BATCH_MAX` queued outbound events; returns how many.
    fn drain_outbound(&mut self, receiver: &mut mpsc::UnboundedReceiver<Outbound>) -> usize {
        for n in 0..limits::OUTBOUND_BATCH_MAX {
            match receiver.try_recv() {
                Ok(outbound) => self.handle_outbound(outbound),
                Err(_) => return n,
            }
        }
        limits::OUTBOUND_BATCH_MAX
    }

    fn set_blocked(&mut self, on: bool) {
        self.blocked = on;
        self.notify_blocked();
    }

    /// Sends `connection.blocked` to a publishing connection under an
    /// alarm, and `connection.unblocked` once the alarm that it was told of
    /// clears.
    fn notify_blocked(&mut self) {
        let blocked = self.blocked && self.has_published;
        if blocked == self.blocked_notified {
            return;
        }
        self.blocked_notified = blocked;
        if !self.client_blocked_capable {
            return;
        }
        let method = if blocked {
            let reason = self.broker.alarms().reason();
            amqp_connection::AMQPMethod::Blocked(amqp_connection::Blocked {
                reason: if reason.is_empty() {
                    "low on memory".into()
                } else {
                    reason.as_str().into()
                },
            })
        } else {
            amqp_connection::AMQPMethod::Unblocked(amqp_connection::Unblocked {})
        };
        self.send_method(0, AMQPClass::Connection(method));
    }

    /// Parses and handles every complete frame in the read buffer.
    fn process_input(&mut self) -> Flow {
        loop {
            if self.deferred.is_some() {
                break;
            }
            let frame = match Frame::parse(&mut self.read_buf, self.frame_max) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(err) => {
                    tracing::info!(connection = %self.name, %err, "bad frame; closing");
                    let text = format!("{} - {err}", reply::name(err.reply_code()));
                    self.send_close(err.reply_code(), &text, 0, 0);
                    self.read_buf.clear();
                    // A framing error leaves the stream unreadable: close now.
                    return Flow::Stop;
                }
            };
            match self.handle_frame(frame) {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => return Flow::Stop,
                Err(err) => {
                    tracing::info!(connection = %self.name, %err, "connection error");
                    self.begin_close(err.code, &err.text, err.class_id, err.method_id);
                }
            }
            if self.input_paused() {
                break;
            }
        }
        self.flush_confirms();
        Flow::Continue
    }

    /// Whether client frames must wait: a resource alarm blocks publishers,
    /// a relayed request awaits its answer, or a data link is full.
    fn input_paused(&self) -> bool {
        (self.blocked && self.has_published)
            || self.remote_wait.is_some()
            || self.link_full.is_some()
            || self.deferred.is_some()
    }

    fn begin_close(&mut self, code: u16, text: &str, class_id: u16, method_id: u16) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.send_close(code, text, class_id, method_id);
        // Release resources now; frames after close are ignored.
        self.release_channels();
    }

    /// Makes a metadata change, then runs `then` with its outcome: at once
    /// on a single node, once decided on a cluster member (the connection
    /// reads nothing more meanwhile). Errors `then` returns close the
    /// channel (soft) or the connection (hard), as a method's errors do.
    fn execute_then(
        &mut self,
        channel_id: u16,
        command: Command,
        then: impl FnOnce(&mut Connection<S>, Result<Outcome, MetaError>) -> Result<(), AmqpError>
        + Send
        + 'static,
    ) -> Result<(), AmqpError> {
        match self.broker.replicate(command) {
            Decision::Now(result) => then(self, result),
            Decision::Later(decision) => {
                self.defer(channel_id, decision, then);
                Ok(())
            }
        }
    }

    /// Parks the connection's input until `decision` resolves, then runs
    /// `then` with it as the reply to the current method.
    fn defer(
        &mut self,
        channel_id: u16,
        decision: tokio::sync::oneshot::Receiver<Result<Outcome, MetaError>>,
        then: impl FnOnce(&mut Connection<S>, Result<Outcome, MetaError>) -> Result<(), AmqpError>
        + Send
        + 'static,
    ) {
        self.deferred = Some(Deferred {
            channel_id,
            class_id: self.current_method.0,
            method_id: self.current_method.1,
            decision,
            then: Box::new(then),
        });
    }

    /// [`Connection::execute_then`] for the common case: once the change
    /// applied, answer with `reply` unless the client asked for `nowait`.
    fn execute_then_reply(
        &mut self,
        channel_id: u16,
        command: Command,
        nowait: bool,
        reply: AMQPClass,
    ) -> Result<(), AmqpError> {
        self.execute_then(channel_id, command, move |conn, result| {
            result.map_err(meta_error)?;
            if !nowait {
                conn.send_method(channel_id, reply);
            }
            Ok(())
        })
    }

    /// Finishes the deferred change with its outcome.
    fn resume(&mut self, outcome: Result<Outcome, MetaError>) {
        let Some(deferred) = self.deferred.take() else {
            return;
        };
        if self.closing {
            return;
        }
        if let Err(err) = (deferred.then)(self, outcome) {
            let err = err.on_method(deferred.class_id, deferred.method_id);
            if err.is_hard() {
                tracing::info!(connection = %self.name, %err, "connection error");
                self.begin_close(err.code, &err.text, err.class_id, err.method_id);
            } else {
                self.close_channel(deferred.channel_id, err);
            }
        }
        self.flush_confirms();
    }

    fn handle_frame(&mut self, frame: Frame) -> Result<Flow, AmqpError> {
        if self.closing {
            // After sending close, only close / close-ok matter.
            if let Frame::Method(0, method) = &frame {
                match **method {
                    AMQPClass::Connection(amqp_connection::AMQPMethod::CloseOk(_)) => {
                        return Ok(Flow::Stop);
                    }
                    AMQPClass::Connection(amqp_connection::AMQPMethod::Close(_)) => {
                        self.send_method(
                            0,
                            AMQPClass::Connection(amqp_connection::AMQPMethod::CloseOk(
                                amqp_connection::CloseOk {},
                            )),
                        );
                        return Ok(Flow::Stop);
                    }
                    _ => {}
                }
            }
            return Ok(Flow::Continue);
        }
        match frame {
            Frame::Heartbeat(0) => Ok(Flow::Continue),
            Frame::Heartbeat(_) => Err(AmqpError::new(
                reply::COMMAND_INVALID,
                "heartbeat frame on a non-zero channel",
            )),
            Frame::Method(0, method) => self.handle_connection_method(*method),
            Frame::Method(channel_id, method) => {
                let class_id = method.get_amqp_class_id();
                let method_id = method.get_amqp_method_id();
                self.handle_channel_method(channel_id, *method)
                    .map(|()| Flow::Continue)
                    .map_err(|e| e.on_method(class_id, method_id))
            }
            Frame::Header {
                channel,
                class_id,
                body_size,
                properties,
                properties_raw,
            } => {
                self.handle_header(channel, class_id, body_size, *properties, properties_raw)?;
                Ok(Flow::Continue)
            }
            Frame::Body(channel, bytes) => {
                self.handle_body(channel, bytes)?;
                Ok(Flow::Continue)
            }
        }
    }

    fn handle_connection_method(&mut self, method: AMQPClass) -> Result<Flow, AmqpError> {
        match method {
            AMQPClass::Connection(amqp_connection::AMQPMethod::Close(_)) => {
                self.send_method(
                    0,
                    AMQPClass::Connection(amqp_connection::AMQPMethod::CloseOk(
                        amqp_connection::CloseOk {},
                    )),
                );
                Ok(Flow::Stop)
            }
            AMQPClass::Connection(amqp_connection::AMQPMethod::CloseOk(_)) => Ok(Flow::Stop),
            AMQPClass::Connection(amqp_connection::AMQPMethod::UpdateSecret(_)) => {
                self.send_method(
                    0,
                    AMQPClass::Connection(amqp_connection::AMQPMethod::UpdateSecretOk(
                        amqp_connection::UpdateSecretOk {},
                    )),
                );
                Ok(Flow::Continue)
            }
            other => Err(
                AmqpError::new(reply::COMMAND_INVALID, "unexpected method on channel 0")
                    .on_method(other.get_amqp_class_id(), other.get_amqp_method_id()),
            ),
        }
    }

    fn perms(&self) -> &CompiledPermissions {
        self.permissions
            .as_deref()
            .expect("permissions are set before the connection leaves the handshake")
    }

    fn check(&self, access: Access, kind: &str, name: &str) -> Result<(), AmqpError> {
        let resource = if kind == "exchange" && name.is_empty() {
            "amq.default"
        } else {
            name
        };
        if self.perms().allows(access, resource) {
            Ok(())
        } else {
            let what = match access {
                Access::Configure => "configure",
                Access::Write => "write",
                Access::Read => "read",
            };
            tracing::debug!(user = %self.user, %what, %kind, %name, "permission denied");
            Err(AmqpError::new(
                reply::ACCESS_REFUSED,
                format!(
                    "{what} access to {kind} '{resource}' in vhost '{}' refused for user '{}'",
                    self.vhost, self.user
                ),
            ))
        }
    }

    fn channel_mut(&mut self, id: u16) -> Result<&mut Channel, AmqpError> {
        self.channels.get_mut(&id).ok_or_else(|| {
            AmqpError::new(
                reply::CHANNEL_ERROR,
                format!("expected 'channel.open' on channel {id}"),
            )
        })
    }

    fn handle_channel_method(
        &mut self,
        channel_id: u16,
        method: AMQPClass,
    ) -> Result<(), AmqpError> {
        if let AMQPClass::Channel(amqp_channel::AMQPMethod::Open(_)) = method {
            if channel_id > self.channel_max {
                return Err(AmqpError::new(
                    reply::CHANNEL_ERROR,
                    format!(
                        "channel {channel_id} above channel_max {}",
                        self.channel_max
                    ),
                ));
            }
            if self.channels.contains_key(&channel_id) {
                return Err(AmqpError::new(
                    reply::CHANNEL_ERROR,
                    format!("second 'channel.open' seen on channel {channel_id}"),
                ));
            }
            if let Some(max) = self.broker.user_channel_limit_reached(&self.user) {
                // A connection error, as RabbitMQ closes it for this limit.
                return Err(AmqpError::new(
                    reply::NOT_ALLOWED,
                    format!(
                        "number of channels opened for user '{}' has reached the maximum allowed user limit of ({max})",
                        self.user
                    ),
                ));
            }
            let channel = Channel::new(channel_id);
            if let Some(handle) = &self.handle {
                handle
                    .channels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(channel_id, channel.info.clone());
            }
            self.channels.insert(channel_id, channel);
            self.broker.metrics.channels.inc();
            self.send_method(
                channel_id,
                AMQPClass::Channel(amqp_channel::AMQPMethod::OpenOk(amqp_channel::OpenOk {})),
            );
            return Ok(());
        }
        if let AMQPClass::Connection(_) = method {
            return Err(AmqpError::new(
                reply::COMMAND_INVALID,
                format!("connection method on channel {channel_id}"),
            ));
        }
        let channel = self.channel_mut(channel_id)?;
        if channel.closing {
            match method {
                AMQPClass::Channel(amqp_channel::AMQPMethod::CloseOk(_)) => {
                    self.drop_channel(channel_id);
                }
                AMQPClass::Channel(amqp_channel::AMQPMethod::Close(_)) => {
                    self.send_method(
                        channel_id,
                        AMQPClass::Channel(amqp_channel::AMQPMethod::CloseOk(
                            amqp_channel::CloseOk {},
                        )),
                    );
                }
                _ => {}
            }
            return Ok(());
        }
        if channel.pending.is_some() {
            return Err(AmqpError::new(
                reply::UNEXPECTED_FRAME,
                format!(
                    "expected content header for class 60, got a method on channel {channel_id}"
                ),
            ));
        }
        let class_id = method.get_amqp_class_id();
        let method_id = method.get_amqp_method_id();
        self.current_method = (class_id, method_id);
        match self.handle_method(channel_id, method) {
            Ok(()) => Ok(()),
            Err(err) if err.is_hard() => Err(err),
            Err(err) => {
                let err = err.on_method(class_id, method_id);
                self.close_channel(channel_id, err);
                Ok(())
            }
        }
    }

    /// Soft error: close the channel with the code and release its resources.
    fn close_channel(&mut self, channel_id: u16, err: AmqpError) {
        tracing::debug!(connection = %self.name, channel = channel_id, %err, "channel error");
        self.release_channel(channel_id);
        if let Some(channel) = self.channels.get_mut(&channel_id) {
            channel.closing = true;
            channel.pending = None;
        }
        self.send_method(
            channel_id,
            AMQPClass::Channel(amqp_channel::AMQPMethod::Close(amqp_channel::Close {
                reply_code: err.code,
                reply_text: short(&err.text).into(),
                class_id: err.class_id,
                method_id: err.method_id,
            })),
        );
    }

    fn drop_channel(&mut self, channel_id: u16) {
        self.release_channel(channel_id);
        if self.channels.remove(&channel_id).is_some() {
            self.broker.metrics.channels.dec();
            if let Some(handle) = &self.handle {
                handle
                    .channels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&channel_id);
            }
        }
    }

    /// Cancels consumers and requeues unacked deliveries of a channel.
    fn release_channel(&mut self, channel_id: u16) {
        let Some(channel) = self.channels.get_mut(&channel_id) else {
            return;
        };
        let consumers: Vec<(Arc<str>, ChannelConsumer)> = channel.consumers.drain().collect();
        channel.info.consumers.store(0, Ordering::Relaxed);
        let unacked = channel.take_all_unacked();
        channel.tx = None;
        // Closing a link channel cancels its consumers and requeues its
        // unacked deliveries on the home node; its confirms will not come.
        for remote in channel.remotes.drain(..) {
            remote.link.close();
            remote.link.link().release(remote.unconfirmed.len());
        }
        if self
            .remote_wait
            .as_ref()
            .is_some_and(|w| w.channel_id == channel_id)
        {
            self.remote_wait = None;
            self.resume_input = true;
        }
        let now = Instant::now();
        let mut auto_delete = Vec::new();
        for (tag, consumer) in consumers {
            if let ConsumerSource::Local(queue) = &consumer.source
                && queue.remove_consumer(self.id, channel_id, &tag, now)
            {
                auto_delete.push(queue.clone());
            }
        }
        let local: Vec<Unacked> = unacked
            .into_iter()
            .filter(|u| matches!(u.origin, Origin::Local { .. }))
            .collect();
        self.requeue(local);
        for queue in auto_delete {
            self.broker.submit_detached(Command::DeleteQueue {
                vhost: queue.vhost.clone(),
                name: queue.name().to_string(),
            });
        }
    }

    fn release_channels(&mut self) {
        let ids: Vec<u16> = self.channels.keys().copied().collect();
        for id in ids {
            self.release_channel(id);
        }
    }

    fn requeue(&self, unacked: Vec<Unacked>) {
        let now = Instant::now();
        let mut dead = Vec::new();
        let (local, remote) = split_origins(unacked);
        for (queue, entries) in group_by_queue(local) {
            queue.requeue(entries, now, &mut dead);
        }
        self.broker.dead_letter(dead);
        settle_remote(remote, true, Settle::Requeue);
    }

    fn cleanup(&mut self) {
        self.release_channels();
        let ids: Vec<u16> = self.channels.keys().copied().collect();
        for id in ids {
            self.drop_channel(id);
        }
        for name in std::mem::take(&mut self.exclusive_queues) {
            self.broker.submit_detached(Command::DeleteQueue {
                vhost: self.vhost.clone(),
                name,
            });
        }
        self.broker.unregister_connection(self.id);
    }

    fn handle_outbound(&mut self, outbound: Outbound) {
        match outbound {
            Outbound::Deliver(delivery) => {
                self.backlog.pending.fetch_sub(1, Ordering::SeqCst);
                self.deliver(delivery)
            }
            Outbound::ConsumerCancelled {
                channel_id,
                consumer_tag,
            } => {
                let Some(channel) = self.channels.get_mut(&channel_id) else {
                    return;
                };
                if channel.consumers.remove(&consumer_tag).is_none() || channel.closing {
                    return;
                }
                channel
                    .info
                    .consumers
                    .store(channel.consumers.len() as u32, Ordering::Relaxed);
                self.send_method(
                    channel_id,
                    AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                        consumer_tag: consumer_tag.as_ref().into(),
                        nowait: true,
                    })),
                );
            }
            Outbound::Close { code, text } => {
                self.begin_close(code, &text, 0, 0);
            }
            Outbound::Link(event) => self.link_event(event),
            Outbound::Confirmed { channel, seq, ok } => self.durable_confirmed(&channel, seq, ok),
        }
    }

    fn deliver(&mut self, delivery: Delivery) {
        let Delivery {
            channel_id,
            consumer_tag,
            queue,
            entry,
            no_ack,
        } = delivery;
        let closing = self.closing;
        let found = self
            .channels
            .get_mut(&channel_id)
            .filter(|c| !c.closing && !closing)
            .and_then(|c| {
                let credit = c.consumers.get(&consumer_tag)?.credit.clone();
                Some((c, credit))
            });
        let Some((channel, credit)) = found else {
            // Raced with a cancel or close: give the message back.
            if !no_ack {
                if let Some(channel) = self.channels.get(&channel_id) {
                    channel.credit.release(1);
                }
                let mut dead = Vec::new();
                queue.requeue(vec![entry], Instant::now(), &mut dead);
                self.broker.dead_letter(dead);
            }
            return;
        };
        let frame_max = self.frame_max;
        let message = entry.message.clone();
        let redelivered = entry.redelivered;
        let tag = if no_ack {
            channel.delivery_tag += 1;
            channel.delivery_tag
        } else {
            channel.track(Origin::Local { queue, entry }, Some(credit))
        };
        self.encoder.deliver(
            &mut self.write_buf,
            channel_id,
            &consumer_tag,
            tag,
            redelivered,
            &message.exchange,
            &message.routing_key,
        );
        self.encoder.content(
            &mut self.write_buf,
            channel_id,
            &message.properties_raw,
            &message.body,
            frame_max,
        );
    }

    fn handle_header(
        &mut self,
        channel_id: u16,
        class_id: u16,
        body_size: u64,
        properties: amq_protocol::protocol::basic::AMQPProperties,
        properties_raw: bytes::Bytes,
    ) -> Result<(), AmqpError> {
        let message_size_max = self.broker.settings.message_size_max;
        let channel = self.channel_mut(channel_id)?;
        if channel.closing {
            return Ok(());
        }
        let Some(pending) = channel.pending.as_mut() else {
            return Err(AmqpError::new(
                reply::UNEXPECTED_FRAME,
                format!("content header on channel {channel_id} without basic.publish"),
            ));
        };
        if pending.header.is_some() || class_id != protocol::CLASS_BASIC {
            return Err(AmqpError::new(
                reply::UNEXPECTED_FRAME,
                format!("unexpected content header on channel {channel_id}"),
            ));
        }
        if body_size > message_size_max {
            let err = AmqpError::new(
                reply::PRECONDITION_FAILED,
                format!(
                    "message size {body_size} is larger than configured max size {message_size_max}"
                ),
            )
            .on_method(60, 40);
            self.close_channel(channel_id, err);
            return Ok(());
        }
        pending.header = Some((body_size, properties, properties_raw));
        if body_size == 0 {
            self.complete_publish(channel_id);
        }
        Ok(())
    }

    fn handle_body(&mut self, channel_id: u16, bytes: bytes::Bytes) -> Result<(), AmqpError> {
        let channel = self.channel_mut(channel_id)?;
        if channel.closing {
            return Ok(());
        }
        let Some(pending) = channel.pending.as_mut() else {
            return Err(AmqpError::new(
                reply::UNEXPECTED_FRAME,
                format!("content body on channel {channel_id} without basic.publish"),
            ));
        };
        let Some((size, _, _)) = &pending.header else {
            return Err(AmqpError::new(
                reply::UNEXPECTED_FRAME,
                format!("content body on channel {channel_id} before its header"),
            ));
        };
        let size = *size;
        if pending.body.len() as u64 + bytes.len() as u64 > size {
            return Err(AmqpError::new(
                reply::FRAME_ERROR,
                format!(
                    "content body on channel {channel_id} longer than the {size} bytes announced"
                ),
            ));
        }
        pending.body.push(bytes);
        if pending.body.len() as u64 == size {
            self.complete_publish(channel_id);
        }
        Ok(())
    }

    fn complete_publish(&mut self, channel_id: u16) {
        let Some(channel) = self.channels.get_mut(&channel_id) else {
            return;
        };
        let Some(pending) = channel.pending.take() else {
            return;
        };
        let PendingContent {
            exchange,
            routing_key,
            mandatory,
            header,
            body,
        } = pending;
        let Some((_, properties, properties_raw)) = header else {
            return;
        };
        if self.internal {
            // A targeted publish forwarded by the entry node, which counted
            // it and checked it; `immediate` marks it (see `cluster::forward`).
            let Some((targets, body)) = forward::decode_targets(&body.finish()) else {
                let err = AmqpError::new(reply::SYNTAX_ERROR, "malformed targeted publish");
                self.begin_close(err.code, &err.text, 60, 40);
                return;
            };
            let message = Arc::new(Message::new(
                exchange,
                routing_key,
                &properties,
                &properties_raw,
                body,
            ));
            self.publish_targeted(channel_id, message, &targets);
            return;
        }
        self.broker.metrics.messages_published_total.inc();
        if let Some(expiration) = properties.expiration()
            && expiration.as_str().parse::<u64>().is_err()
        {
            let err = AmqpError::new(
                reply::PRECONDITION_FAILED,
                format!("invalid expiration '{}'", expiration.as_str()),
            )
            .on_method(60, 40);
            self.close_channel(channel_id, err);
            return;
        }
        // As RabbitMQ does: a publisher may not claim to be someone else.
        if let Some(user_id) = properties.user_id()
            && user_id.as_str() != self.user
        {
            let err = AmqpError::new(
                reply::PRECONDITION_FAILED,
                format!(
                    "user_id property set to '{}' but authenticated user was '{}'",
                    user_id.as_str(),
                    self.user
                ),
            )
            .on_method(60, 40);
            self.close_channel(channel_id, err);
            return;
        }
        let message = Arc::new(Message::new(
            exchange,
            routing_key,
            &properties,
            &properties_raw,
            body.finish(),
        ));
        if let Some(ops) = channel.tx.as_mut() {
            ops.push(TxOp::Publish { message, mandatory });
            return;
        }
        if let Err(err) = self.route_publish(channel_id, message, mandatory) {
            self.close_channel(channel_id, err.on_method(60, 40));
        }
    }

    /// Publishes and settles what a transaction buffered, in order.
    fn apply_tx(&mut self, channel_id: u16, ops: Vec<TxOp>) -> Result<(), AmqpError> {
        for op in ops {
            match op {
                TxOp::Publish { message, mandatory } => {
                    self.route_publish(channel_id, message, mandatory)?
                }
                TxOp::Ack { tag, multiple } => self.settle_ack(channel_id, tag, multiple)?,
                TxOp::Nack {
                    tag,
                    multiple,
                    requeue,
                } => self.settle_nack(channel_id, tag, multiple, requeue)?,
            }
        }
        Ok(())
    }

    fn route_publish(
        &mut self,
        channel_id: u16,
        message: Arc<Message>,
        mandatory: bool,
    ) -> Result<(), AmqpError> {
        if !self.has_published {
            self.has_published = true;
            if self.blocked {
                self.notify_blocked();
            }
        }
        let mut tickets = Vec::new();
        let mut remote = std::mem::take(&mut self.remote_scratch);
        let published = self.broker.publish_routed(
            &self.vhost,
            message.clone(),
            &mut self.route_scratch,
            &mut remote,
            &mut tickets,
        );
        let published = match published {
            Ok(published) => published,
            Err(err) => {
                self.remote_scratch = remote;
                return Err(err);
            }
        };
        let seq = self
            .channels
            .get_mut(&channel_id)
            .and_then(|c| c.confirms.as_mut())
            .map_or(0, |confirms| {
                confirms.published += 1;
                confirms.published
            });
        let (n_homes, unreachable) = if remote.is_empty() {
            (0, None)
        } else {
            let mandatory_here = mandatory && published.n_queues == 0;
            self.forward(channel_id, &message, &mut remote, seq, mandatory_here)
        };
        self.remote_scratch = remote;
        if published.n_queues == 0 && n_homes == 0 && !published.rejected {
            if mandatory {
                let reply_text = match &unreachable {
                    Some(home) => unreachable_text(home),
                    None => "NO_ROUTE".to_string(),
                };
                self.send_return(channel_id, &message, &reply_text);
            } else {
                self.broker.metrics.messages_unroutable_dropped_total.inc();
            }
        }
        if seq == 0 {
            if let Some(tx_tickets) = self.tx_tickets.as_mut() {
                tx_tickets.append(&mut tickets);
            }
            return Ok(());
        }
        let durable_wait = !tickets.is_empty();
        let waiting = WaitingConfirm {
            seq,
            waits: n_homes + u32::from(durable_wait),
            ok: !published.rejected && unreachable.is_none(),
        };
        let Some(channel) = self.channels.get_mut(&channel_id) else {
            return Ok(());
        };
        let Some(confirms) = channel.confirms.as_mut() else {
            return Ok(());
        };
        if waiting.waits == 0 && confirms.waiting.is_empty() {
            self.confirm_one(channel_id, seq, waiting.ok);
            return Ok(());
        }
        confirms.waiting.push_back(waiting);
        if durable_wait {
            let info = channel.info.clone();
            let waiter = self.confirm_waiter.get_or_insert_with(|| {
                crate::durable::ConfirmWaiter::start(
                    self.broker.durable().cloned(),
                    self.sender.clone(),
                )
            });
            waiter.submit(info, seq, tickets, false);
        }
        Ok(())
    }

    /// `basic.return` 312 with the message.
    fn send_return(&mut self, channel_id: u16, message: &Message, reply_text: &str) {
        self.broker.metrics.messages_unroutable_returned_total.inc();
        self.send_method(
            channel_id,
            AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                reply_code: reply::NO_ROUTE,
                reply_text: short(reply_text).into(),
                exchange: (*message.exchange).into(),
                routing_key: (*message.routing_key).into(),
            })),
        );
        let frame_max = self.frame_max;
        self.encoder.content(
            &mut self.write_buf,
            channel_id,
            &message.properties_raw,
            &message.body,
            frame_max,
        );
    }

    /// Forwards a publish to the home nodes of its remote targets (sorted
    /// here by home node). Returns how many home nodes it was sent to, and
    /// a home node that could not be reached, if any. `mandatory_here`: the
    /// message is mandatory and no local queue took it.
    fn forward(
        &mut self,
        channel_id: u16,
        message: &Arc<Message>,
        remote: &mut [(String, String)],
        seq: u64,
        mandatory_here: bool,
    ) -> (u32, Option<String>) {
        remote.sort_unstable();
        let single_home = remote.iter().all(|(home, _)| *home == remote[0].0);
        let returnable = (mandatory_here && single_home).then(|| message.clone());
        let mut n_homes = 0;
        let mut unreachable = None;
        let mut start = 0;
        while start < remote.len() {
            let home = remote[start].0.as_str();
            let end = start
                + remote[start..]
                    .iter()
                    .take_while(|(h, _)| h == home)
                    .count();
            let names: Vec<&str> = remote[start..end].iter().map(|(_, q)| q.as_str()).collect();
            match self.remote_link(channel_id, home) {
                Ok(link) => {
                    if !link.publish(message, &names) {
                        self.link_full = Some(link.link().clone());
                    }
                    if let Some(remote) = self
                        .channels
                        .get_mut(&channel_id)
                        .and_then(|c| c.remote_of(&link))
                    {
                        remote.published += 1;
                        remote.unconfirmed.push_back(Forwarded {
                            link_seq: remote.published,
                            seq,
                            returnable: returnable.clone(),
                        });
                    }
                    n_homes += 1;
                }
                Err(err) => {
                    tracing::debug!(connection = %self.name, %err, "publish not forwarded");
                    self.broker
                        .metrics
                        .cluster_forward_failed_total
                        .with_label_values(&[home])
                        .inc();
                    unreachable = Some(home.to_string());
                }
            }
            start = end;
        }
        (n_homes, unreachable)
    }

    /// This client channel's link channel to `home`, opened on first use.
    fn remote_link(
        &mut self,
        channel_id: u16,
        home: &str,
    ) -> Result<Arc<LinkChannel>, forward::Error> {
        let links = self.broker.links().cloned();
        let sender = self.sender.clone();
        let vhost = self.vhost.clone();
        let channel = self
            .channels
            .get_mut(&channel_id)
            .ok_or_else(|| forward::Error::Unreachable(home.to_string()))?;
        if let Some(remote) = channel.remote(home) {
            return Ok(remote.link.clone());
        }
        let links = links.ok_or(forward::Error::NoLinks)?;
        // Failed link channels hear nothing more; deliveries still unacked
        // from them hold their own reference.
        channel.remotes.retain(|r| !r.down);
        let link = links.open_channel(home, &vhost, sender, channel_id)?;
        channel.remotes.push(RemoteChannel {
            link: link.clone(),
            down: false,
            published: 0,
            unconfirmed: Default::default(),
        });
        Ok(link)
    }

    /// Home side: enqueues a targeted publish and confirms it. A target
    /// that moved away from this draining node is forwarded to its new
    /// home, and the confirm waits for that home's too.
    fn publish_targeted(&mut self, channel_id: u16, message: Arc<Message>, targets: &[String]) {
        let mut tickets = Vec::new();
        let mut remote = Vec::new();
        let published = self.broker.publish_to_queues(
            &self.vhost,
            message.clone(),
            targets,
            &mut remote,
            &mut tickets,
        );
        let Some(seq) = self
            .channels
            .get_mut(&channel_id)
            .and_then(|c| c.confirms.as_mut())
            .map(|confirms| {
                confirms.published += 1;
                confirms.published
            })
        else {
            return;
        };
        let (n_homes, unreachable) = if remote.is_empty() {
            (0, None)
        } else {
            self.forward(channel_id, &message, &mut remote, seq, false)
        };
        let Some(channel) = self.channels.get_mut(&channel_id) else {
            return;
        };
        let Some(confirms) = channel.confirms.as_mut() else {
            return;
        };
        let ok = !published.rejected && unreachable.is_none();
        let waits = n_homes + u32::from(!tickets.is_empty());
        if waits == 0 && confirms.waiting.is_empty() {
            self.confirm_one(channel_id, seq, ok);
            return;
        }
        confirms
            .waiting
            .push_back(WaitingConfirm { seq, waits, ok });
        if !tickets.is_empty() {
            let info = channel.info.clone();
            let waiter = self.confirm_waiter.get_or_insert_with(|| {
                crate::durable::ConfirmWaiter::start(
                    self.broker.durable().cloned(),
                    self.sender.clone(),
                )
            });
            waiter.submit(info, seq, tickets, false);
        }
    }

    /// Publish `seq` is settled: an ack joins the batch of acks; a nack
    /// goes out now, after the acks before it.
    fn confirm_one(&mut self, channel_id: u16, seq: u64, ok: bool) {
        let Some(confirms) = self
            .channels
            .get_mut(&channel_id)
            .and_then(|c| c.confirms.as_mut())
        else {
            return;
        };
        if ok {
            confirms.acked_through = seq;
            return;
        }
        let pending_acks = std::mem::take(&mut confirms.acked_through);
        let sent = confirms.sent_through;
        confirms.sent_through = seq;
        if pending_acks > sent {
            self.broker
                .metrics
                .messages_confirmed_total
                .inc_by(pending_acks - sent);
            self.send_ack_confirm(channel_id, pending_acks, pending_acks - sent > 1);
        }
        self.send_method(
            channel_id,
            AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag: seq,
                multiple: false,
                requeue: false,
            })),
        );
    }

    /// Sends the confirms whose answers are all in, in publish order.
    fn drain_confirms(&mut self, channel_id: u16) {
        let Some(confirms) = self
            .channels
            .get_mut(&channel_id)
            .and_then(|c| c.confirms.as_mut())
        else {
            return;
        };
        for done in confirms.take_answered() {
            self.confirm_one(channel_id, done.seq, done.ok);
        }
    }

    /// A confirm the durable waiter reported, in publish order.
    fn durable_confirmed(&mut self, info: &Arc<crate::broker::ChannelInfo>, seq: u64, ok: bool) {
        let channel_id = info.number;
        let Some(confirms) = self
            .channels
            .get_mut(&channel_id)
            .filter(|c| Arc::ptr_eq(&c.info, info) && !c.closing)
            .and_then(|c| c.confirms.as_mut())
        else {
            return;
        };
        confirms.answer(seq, ok);
        self.drain_confirms(channel_id);
    }

    fn send_ack_confirm(&mut self, channel_id: u16, tag: u64, multiple: bool) {
        self.send_method(
            channel_id,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: tag,
                multiple,
            })),
        );
    }

    /// Sends one (possibly multiple) ack per channel for the confirms
    /// gathered during this batch.
    fn flush_confirms(&mut self) {
        let mut acks = Vec::new();
        for (id, channel) in &mut self.channels {
            if let Some(confirms) = channel.confirms.as_mut()
                && confirms.acked_through > confirms.sent_through
            {
                let n = confirms.acked_through - confirms.sent_through;
                acks.push((*id, confirms.acked_through, n > 1, n));
                confirms.sent_through = confirms.acked_through;
            }
        }
        for (id, tag, multiple, n) in acks {
            self.broker.metrics.messages_confirmed_total.inc_by(n);
            self.send_ack_confirm(id, tag, multiple);
        }
    }

    fn handle_method(&mut self, channel_id: u16, method: AMQPClass) -> Result<(), AmqpError> {
        match method {
            AMQPClass::Basic(basic::AMQPMethod::Publish(publish)) if self.internal => {
                if !publish.immediate {
                    return Err(AmqpError::new(
                        reply::COMMAND_INVALID,
                        "a data link carries targeted publishes only",
                    ));
                }
                let channel = self.channel_mut(channel_id)?;
                channel.pending = Some(PendingContent {
                    exchange: channel.names.exchange(publish.exchange.as_str()),
                    routing_key: channel.names.routing_key(publish.routing_key.as_str()),
                    mandatory: false,
                    header: None,
                    body: BodyParts::Empty,
                });
                Ok(())
            }
            AMQPClass::Basic(basic::AMQPMethod::Publish(publish)) => {
                // `immediate` also marks the targeted publishes of data
                // links, which only internal connections may send.
                if publish.immediate {
                    return Err(AmqpError::new(reply::NOT_IMPLEMENTED, "immediate=true"));
                }
                let exchange = publish.exchange.as_str();
                self.check(Access::Write, "exchange", exchange)?;
                if let Some(internal) = self.broker.exchange_is_internal(&self.vhost, exchange) {
                    if internal {
                        return Err(AmqpError::new(
                            reply::ACCESS_REFUSED,
                            format!(
                                "cannot publish to internal exchange '{exchange}' in vhost '{}'",
                                self.vhost
                            ),
                        ));
                    }
                } else {
                    return Err(AmqpError::new(
                        reply::NOT_FOUND,
                        format!("no exchange '{exchange}' in vhost '{}'", self.vhost),
                    ));
                }
                let channel = self.channel_mut(channel_id)?;
                channel.pending = Some(PendingContent {
                    exchange: channel.names.exchange(publish.exchange.as_str()),
                    routing_key: channel.names.routing_key(publish.routing_key.as_str()),
                    mandatory: publish.mandatory,
                    header: None,
                    body: BodyParts::Empty,
                });
                Ok(())
            }
            AMQPClass::Basic(basic::AMQPMethod::Ack(ack)) => {
                let channel = self.channel_mut(channel_id)?;
                if let Some(ops) = channel.tx.as_mut() {
                    ops.push(TxOp::Ack {
                        tag: ack.delivery_tag,
                        multiple: ack.multiple,
                    });
                    return Ok(());
                }
                self.settle_ack(channel_id, ack.delivery_tag, ack.multiple)
            }
            AMQPClass::Basic(basic::AMQPMethod::Nack(nack)) => {
                let channel = self.channel_mut(channel_id)?;
                if let Some(ops) = channel.tx.as_mut() {
                    ops.push(TxOp::Nack {
                        tag: nack.delivery_tag,
                        multiple: nack.multiple,
                        requeue: nack.requeue,
                    });
                    return Ok(());
                }
                self.settle_nack(channel_id, nack.delivery_tag, nack.multiple, nack.requeue)
            }
            AMQPClass::Basic(basic::AMQPMethod::Reject(reject)) => {
                let channel = self.channel_mut(channel_id)?;
                if let Some(ops) = channel.tx.as_mut() {
                    ops.push(TxOp::Nack {
                        tag: reject.delivery_tag,
                        multiple: false,
                        requeue: reject.requeue,
                    });
                    return Ok(());
                }
                self.settle_nack(channel_id, reject.delivery_tag, false, reject.requeue)
            }
            AMQPClass::Basic(basic::AMQPMethod::Qos(qos)) => {
                let channel = self.channel_mut(channel_id)?;
                let prefetch = u32::from(qos.prefetch_count);
                if qos.global {
                    channel.credit.prefetch.store(prefetch, Ordering::Relaxed);
                    channel
                        .info
                        .global_prefetch
                        .store(prefetch, Ordering::Relaxed);
                } else {
                    channel.consumer_prefetch = prefetch;
                    channel.info.prefetch.store(prefetch, Ordering::Relaxed);
                }
                self.send_method(
                    channel_id,
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                );
                // A raised global limit may let queues deliver again.
                self.redispatch(channel_id);
                Ok(())
            }
            AMQPClass::Basic(basic::AMQPMethod::Consume(consume)) => {
                self.consume(channel_id, consume)
            }
            AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel)) => {
                let channel = self.channel_mut(channel_id)?;
                let tag: Arc<str> = Arc::from(cancel.consumer_tag.as_str());
                if let Some(consumer) = channel.consumers.remove(&tag) {
                    channel
                        .info
                        .consumers
                        .store(channel.consumers.len() as u32, Ordering::Relaxed);
                    match &consumer.source {
                        ConsumerSource::Local(queue) => {
                            if queue.remove_consumer(self.id, channel_id, &tag, Instant::now()) {
                                self.broker.submit_detached(Command::DeleteQueue {
                                    vhost: queue.vhost.clone(),
                                    name: queue.name().to_string(),
                                });
                            }
                        }
                        ConsumerSource::Remote(link) => {
                            // Deliveries already on their way find no
                            // consumer and are given back (see `link_event`).
                            link.send(&AMQPClass::Basic(basic::AMQPMethod::Cancel(
                                basic::Cancel {
                                    consumer_tag: tag.as_ref().into(),
                                    nowait: true,
                                },
                            )));
                        }
                    }
                }
                if !cancel.nowait {
                    self.send_method(
                        channel_id,
                        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                            consumer_tag: cancel.consumer_tag,
                        })),
                    );
                }
                Ok(())
            }
            AMQPClass::Basic(basic::AMQPMethod::Get(get)) => self.get(channel_id, get),
            AMQPClass::Basic(basic::AMQPMethod::Recover(_)) => {
                let unacked = self.channel_mut(channel_id)?.take_all_unacked();
                self.requeue(unacked);
                self.send_method(
                    channel_id,
                    AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                );
                Ok(())
            }
            AMQPClass::Basic(basic::AMQPMethod::RecoverAsync(_)) => {
                let unacked = self.channel_mut(channel_id)?.take_all_unacked();
                self.requeue(unacked);
                Ok(())
            }
            AMQPClass::Channel(amqp_channel::AMQPMethod::Close(_)) => {
                self.drop_channel(channel_id);
                self.send_method(
                    channel_id,
                    AMQPClass::Channel(amqp_channel::AMQPMethod::CloseOk(amqp_channel::CloseOk {})),
                );
                Ok(())
            }
            AMQPClass::Channel(amqp_channel::AMQPMethod::CloseOk(_)) => Ok(()),
            AMQPClass::Channel(amqp_channel::AMQPMethod::Flow(flow)) => {
                let channel = self.channel_mut(channel_id)?;
                channel.credit.paused.store(!flow.active, Ordering::Relaxed);
                self.send_method(
                    channel_id,
                    AMQPClass::Channel(amqp_channel::AMQPMethod::FlowOk(amqp_channel::FlowOk {
                        active: flow.active,
                    })),
                );
                if flow.active {
                    self.redispatch(channel_id);
                }
                Ok(())
            }
            AMQPClass::Channel(amqp_channel::AMQPMethod::FlowOk(_)) => Ok(()),
            AMQPClass::Access(_) => {
                self.send_method(
                    channel_id,
                    AMQPClass::Access(amq_protocol::protocol::access::AMQPMethod::RequestOk(
                        amq_protocol::protocol::access::RequestOk {},
                    )),
                );
                Ok(())
            }
            AMQPClass::Exchange(method) => self.exchange_method(channel_id, method),
            AMQPClass::Queue(method) => self.queue_method(channel_id, method),
            AMQPClass::Confirm(confirm::AMQPMethod::Select(select)) => {
                let channel = self.channel_mut(channel_id)?;
                if channel.tx.is_some() {
                    return Err(AmqpError::new(
                        reply::PRECONDITION_FAILED,
                        "cannot switch from tx to confirm mode",
                    ));
                }
                if channel.confirms.is_none() {
                    channel.confirms = Some(Confirms::default());
                    channel.info.confirm.store(1, Ordering::Relaxed);
                }
                if !select.nowait {
                    self.send_method(
                        channel_id,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
                Ok(())
            }
            AMQPClass::Tx(tx::AMQPMethod::Select(_)) => {
                let channel = self.channel_mut(channel_id)?;
                if channel.confirms.is_some() {
                    return Err(AmqpError::new(
                        reply::PRECONDITION_FAILED,
                        "cannot switch from confirm to tx mode",
                    ));
                }
                if channel.tx.is_none() {
                    channel.tx = Some(Vec::new());
                    channel.info.transactional.store(1, Ordering::Relaxed);
                }
                self.send_method(
                    channel_id,
                    AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})),
                );
                Ok(())
            }
            AMQPClass::Tx(tx::AMQPMethod::Commit(_)) => {
                let channel = self.channel_mut(channel_id)?;
                let Some(ops) = channel.tx.replace(Vec::new()) else {
                    return Err(AmqpError::new(
                        reply::PRECONDITION_FAILED,
                        "channel is not transactional",
                    ));
                };
                self.tx_tickets = Some(Vec::new());
                let applied = self.apply_tx(channel_id, ops);
                let tickets = self.tx_tickets.take().unwrap_or_default();
                applied?;
                if tickets.is_empty() {
                    self.send_method(
                        channel_id,
                        AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})),
                    );
                    return Ok(());
                }
                // commit-ok promises the persistent messages are on disk, as a
                // confirm does: answer once the store has synced them, reading
                // nothing more from this connection meanwhile.
                let (done, decision) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    let mut result = Ok(Outcome::default());
                    for ticket in tickets {
                        if let Err(err) = ticket.await {
                            result = Err(MetaError::Unavailable(format!(
                                "the transaction's persistent messages could not be stored: {err}"
                            )));
                        }
                    }
                    let _ = done.send(result);
                });
                self.defer(channel_id, decision, move |conn, result| {
                    result.map_err(meta_error)?;
                    conn.send_method(
                        channel_id,
                        AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})),
                    );
                    Ok(())
                });
                Ok(())
            }
            AMQPClass::Tx(tx::AMQPMethod::Rollback(_)) => {
                let channel = self.channel_mut(channel_id)?;
                if channel.tx.replace(Vec::new()).is_none() {
                    return Err(AmqpError::new(
                        reply::PRECONDITION_FAILED,
                        "channel is not transactional",
                    ));
                }
                self.send_method(
                    channel_id,
                    AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
                );
                Ok(())
            }
            other => Err(AmqpError::new(
                reply::COMMAND_INVALID,
                format!(
                    "method {}/{} not valid from a client",
                    other.get_amqp_class_id(),
                    other.get_amqp_method_id()
                ),
            )),
        }
    }

    fn redispatch(&mut self, channel_id: u16) {
        let Some(channel) = self.channels.get(&channel_id) else {
            return;
        };
        let now = Instant::now();
        let mut dead = Vec::new();
        for queue in channel.consumed_queues() {
            queue.dispatch(now, &mut dead);
        }
        self.broker.dead_letter(dead);
    }

    fn settle_ack(&mut self, channel_id: u16, tag: u64, multiple: bool) -> Result<(), AmqpError> {
        let taken = self.channel_mut(channel_id)?.take_unacked(tag, multiple)?;
        self.broker
            .metrics
            .messages_acknowledged_total
            .inc_by(taken.len() as u64);
        let (local, remote) = split_origins(taken);
        for (queue, entries) in group_by_queue(local) {
            queue.ack(entries.len() as u64);
            entries.iter().for_each(|entry| queue.forget(entry));
        }
        settle_remote(remote, multiple, Settle::Ack);
        self.redispatch(channel_id);
        Ok(())
    }

    fn settle_nack(
        &mut self,
        channel_id: u16,
        tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), AmqpError> {
        let taken = self.channel_mut(channel_id)?.take_unacked(tag, multiple)?;
        let (local, remote) = split_origins(taken);
        if requeue {
            let now = Instant::now();
            let mut dead = Vec::new();
            for (queue, entries) in group_by_queue(local) {
                queue.requeue(entries, now, &mut dead);
            }
            self.broker.dead_letter(dead);
            settle_remote(remote, multiple, Settle::Requeue);
        } else {
            let mut dead = Vec::new();
            for (queue, entry) in local {
                queue.reject(&entry, &mut dead);
            }
            self.broker.dead_letter(dead);
            settle_remote(remote, multiple, Settle::Reject);
        }
        self.redispatch(channel_id);
        Ok(())
    }

    /// Looks up a queue for a client operation: 404 when missing, 405 when
    /// exclusive to another connection.
    fn lookup_queue(&self, name: &str) -> Result<QueueAt, AmqpError> {
        let queue = self.broker.locate_queue(&self.vhost, name).ok_or_else(|| {
            AmqpError::new(
                reply::NOT_FOUND,
                format!("no queue '{name}' in vhost '{}'", self.vhost),
            )
        })?;
        match &queue {
            QueueAt::Local(local) => self.check_exclusive(&local.def)?,
            // A data link reaches the queues homed here, never further.
            QueueAt::Remote(def) if self.internal => {
                return Err(AmqpError::new(
                    reply::RESOURCE_LOCKED,
                    format!(
                        "queue '{name}' in vhost '{}' is homed on '{}', not here",
                        self.vhost, def.home_node
                    ),
                ));
            }
            QueueAt::Remote(def) => self.check_exclusive(def)?,
        }
        Ok(queue)
    }

    /// The definition of a queue wherever its home node is (404 when there
    /// is no such queue).
    fn lookup_queue_def(&self, name: &str) -> Result<QueueDef, AmqpError> {
        self.broker.queue_def(&self.vhost, name).ok_or_else(|| {
            AmqpError::new(
                reply::NOT_FOUND,
                format!("no queue '{name}' in vhost '{}'", self.vhost),
            )
        })
    }

    fn check_exclusive(&self, queue: &QueueDef) -> Result<(), AmqpError> {
        match &queue.exclusive_owner {
            Some(owner) if owner != &self.name => Err(AmqpError::new(
                reply::RESOURCE_LOCKED,
                format!(
                    "cannot obtain exclusive access to locked queue '{}' in vhost '{}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
                    queue.name, self.vhost
                ),
            )),
            _ => Ok(()),
        }
    }

    fn consume(&mut self, channel_id: u16, consume: basic::Consume) -> Result<(), AmqpError> {
        let queue_name = consume.queue.as_str();
        self.check(Access::Read, "queue", queue_name)?;
        // Data links carry every remote consumer of a node: not bounded here.
        if let Some(max) = self.broker.settings.consumers_per_channel_max
            && !self.internal
            && self.channel_mut(channel_id)?.consumers.len() >= max as usize
        {
            return Err(AmqpError::new(
                reply::PRECONDITION_FAILED,
                format!("reached maximum ({max}) of consumers per channel"),
            ));
        }
        let queue = match self.lookup_queue(queue_name)? {
            QueueAt::Local(queue) => queue,
            QueueAt::Remote(def) => return self.consume_remote(channel_id, consume, &def),
        };
        let connection_id = self.id;
        let sender = self.sender.clone();
        let backlog = self.backlog.clone();
        let channel = self.channel_mut(channel_id)?;
        let tag: Arc<str> = if consume.consumer_tag.as_str().is_empty() {
            Arc::from(Broker::generate_name("amq.ctag-"))
        } else {
            Arc::from(consume.consumer_tag.as_str())
        };
        if channel.consumers.contains_key(&tag) {
            return Err(AmqpError::new(
                reply::NOT_ALLOWED,
                format!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
        let credit = Credit::new(channel.consumer_prefetch);
        let consumer = Consumer {
            tag: tag.clone(),
            connection_id,
            channel_id,
            no_ack: consume.no_ack,
            exclusive: consume.exclusive,
            credit: credit.clone(),
            channel_credit: channel.credit.clone(),
            sender,
            backlog,
        };
        channel.consumers.insert(
            tag.clone(),
            ChannelConsumer {
                source: ConsumerSource::Local(queue.clone()),
                no_ack: consume.no_ack,
                credit,
            },
        );
        // Deliveries the queue makes now pass through the mailbox, which is
        // read only after this frame is handled: consume-ok goes out first.
        let mut dead = Vec::new();
        let added = queue.add_consumer(consumer, Instant::now(), &mut dead);
        self.broker.dead_letter(dead);
        let channel = self.channel_mut(channel_id)?;
        if let Err(err) = added {
            channel.consumers.remove(&tag);
            return Err(err);
        }
        channel
            .info
            .consumers
            .store(channel.consumers.len() as u32, Ordering::Relaxed);
        if !consume.nowait {
            self.send_method(
                channel_id,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: tag.as_ref().into(),
                })),
            );
        }
        Ok(())
    }

    fn get(&mut self, channel_id: u16, get: basic::Get) -> Result<(), AmqpError> {
        let queue_name = get.queue.as_str();
        self.check(Access::Read, "queue", queue_name)?;
        let queue = match self.lookup_queue(queue_name)? {
            QueueAt::Local(queue) => queue,
            QueueAt::Remote(def) => {
                let link = self.remote_for_queue(channel_id, &def)?;
                link.send(&AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
                    queue: get.queue.clone(),
                    no_ack: get.no_ack,
                })));
                self.remote_wait = Some(RemoteWait {
                    link,
                    channel_id,
                    kind: WaitKind::Get { no_ack: get.no_ack },
                });
                return Ok(());
            }
        };
        let mut dead = Vec::new();
        let got = queue.get(get.no_ack, Instant::now(), &mut dead);
        self.broker.dead_letter(dead);
        let Some((entry, remaining)) = got else {
            self.send_method(
                channel_id,
                AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
            );
            return Ok(());
        };
        let frame_max = self.frame_max;
        let channel = self.channel_mut(channel_id)?;
        let message = entry.message.clone();
        let redelivered = entry.redelivered;
        let tag = if get.no_ack {
            channel.delivery_tag += 1;
            channel.delivery_tag
        } else {
            channel.track(Origin::Local { queue, entry }, None)
        };
        self.send_method(
            channel_id,
            AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                delivery_tag: tag,
                redelivered,
                exchange: (*message.exchange).into(),
                routing_key: (*message.routing_key).into(),
                message_count: remaining,
            })),
        );
        self.encoder.content(
            &mut self.write_buf,
            channel_id,
            &message.properties_raw,
            &message.body,
            frame_max,
        );
        Ok(())
    }

    fn exchange_method(
        &mut self,
        channel_id: u16,
        method: exchange::AMQPMethod,
    ) -> Result<(), AmqpError> {
        match method {
            exchange::AMQPMethod::Declare(declare) => {
                let name = declare.exchange.as_str();
                if declare.passive {
                    if self.broker.exchange(&self.vhost, name).is_none() {
                        return Err(AmqpError::new(
                            reply::NOT_FOUND,
                            format!("no exchange '{name}' in vhost '{}'", self.vhost),
                        ));
                    }
                } else {
                    let Some(kind) = ExchangeKind::parse(declare.kind.as_str()) else {
                        return Err(AmqpError::new(
                            reply::COMMAND_INVALID,
                            format!("unknown exchange type '{}'", declare.kind.as_str()),
                        ));
                    };
                    if name.is_empty() || name.starts_with("amq.") {
                        return Err(AmqpError::new(
                            reply::ACCESS_REFUSED,
                            format!("exchange name '{name}' contains reserved prefix 'amq.*'"),
                        ));
                    }
                    self.check(Access::Configure, "exchange", name)?;
                    let command = Command::DeclareExchange {
                        vhost: self.vhost.clone(),
                        exchange: ExchangeDef {
                            name: name.to_string(),
                            kind,
                            durable: declare.durable,
                            auto_delete: declare.auto_delete,
                            internal: declare.internal,
                            arguments: declare.arguments,
                        },
                    };
                    return self.execute_then_reply(
                        channel_id,
                        command,
                        declare.nowait,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(
                            exchange::DeclareOk {},
                        )),
                    );
                }
                if !declare.nowait {
                    self.send_method(
                        channel_id,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(
                            exchange::DeclareOk {},
                        )),
                    );
                }
                Ok(())
            }
            exchange::AMQPMethod::Delete(delete) => {
                let name = delete.exchange.as_str();
                if name.is_empty() || name.starts_with("amq.") {
                    return Err(AmqpError::new(
                        reply::ACCESS_REFUSED,
                        format!("operation not permitted on exchange '{name}'"),
                    ));
                }
                self.check(Access::Configure, "exchange", name)?;
                if self.broker.exchange(&self.vhost, name).is_none() {
                    // Deleting a missing exchange succeeds, as in RabbitMQ.
                    if !delete.nowait {
                        self.send_method(
                            channel_id,
                            AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(
                                exchange::DeleteOk {},
                            )),
                        );
                    }
                    return Ok(());
                }
                let command = Command::DeleteExchange {
                    vhost: self.vhost.clone(),
                    name: name.to_string(),
                    if_unused: delete.if_unused,
                };
                let nowait = delete.nowait;
                self.execute_then(channel_id, command, move |conn, result| {
                    match result {
                        // Deleting a missing exchange succeeds, as in RabbitMQ.
                        Ok(_) | Err(MetaError::NotFound(_)) => {}
                        Err(err) => return Err(meta_error(err)),
                    }
                    if !nowait {
                        conn.send_method(
                            channel_id,
                            AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(
                                exchange::DeleteOk {},
                            )),
                        );
                    }
                    Ok(())
                })
            }
            exchange::AMQPMethod::Bind(bind) => {
                let command = self.exchange_binding(
                    &bind.source,
                    &bind.destination,
                    &bind.routing_key,
                    bind.arguments,
                    true,
                )?;
                self.execute_then_reply(
                    channel_id,
                    command,
                    bind.nowait,
                    AMQPClass::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})),
                )
            }
            exchange::AMQPMethod::Unbind(unbind) => {
                let command = self.exchange_binding(
                    &unbind.source,
                    &unbind.destination,
                    &unbind.routing_key,
                    unbind.arguments,
                    false,
                )?;
                self.execute_then_reply(
                    channel_id,
                    command,
                    unbind.nowait,
                    AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})),
                )
            }
            _ => Err(AmqpError::new(
                reply::COMMAND_INVALID,
                "unexpected exchange method",
            )),
        }
    }

    /// The (un)binding command of `exchange.bind`/`unbind`, after the
    /// permission checks.
    fn exchange_binding(
        &mut self,
        source: &amq_protocol::types::ShortString,
        destination: &amq_protocol::types::ShortString,
        routing_key: &amq_protocol::types::ShortString,
        arguments: FieldTable,
        bind: bool,
    ) -> Result<Command, AmqpError> {
        self.check(Access::Write, "exchange", destination.as_str())?;
        self.check(Access::Read, "exchange", source.as_str())?;
        let binding = Binding {
            destination: Destination::Exchange(destination.as_str().to_string()),
            routing_key: routing_key.as_str().to_string(),
            arguments,
        };
        let vhost = self.vhost.clone();
        let source = source.as_str().to_string();
        let command = if bind {
            Command::Bind {
                vhost,
                source,
                binding,
            }
        } else {
            Command::Unbind {
                vhost,
                source,
                binding,
            }
        };
        Ok(command)
    }

    fn queue_method(
        &mut self,
        channel_id: u16,
        method: amqp_queue::AMQPMethod,
    ) -> Result<(), AmqpError> {
        match method {
            amqp_queue::AMQPMethod::Declare(declare) => self.declare_queue(channel_id, declare),
            amqp_queue::AMQPMethod::Bind(bind) => {
                let queue = bind.queue.as_str();
                self.check(Access::Write, "queue", queue)?;
                self.check(Access::Read, "exchange", bind.exchange.as_str())?;
                self.lookup_queue_def(queue)?;
                let command = Command::Bind {
                    vhost: self.vhost.clone(),
                    source: bind.exchange.as_str().to_string(),
                    binding: Binding {
                        destination: Destination::Queue(queue.to_string()),
                        routing_key: bind.routing_key.as_str().to_string(),
                        arguments: bind.arguments,
                    },
                };
                self.execute_then_reply(
                    channel_id,
                    command,
                    bind.nowait,
                    AMQPClass::Queue(amqp_queue::AMQPMethod::BindOk(amqp_queue::BindOk {})),
                )
            }
            amqp_queue::AMQPMethod::Unbind(unbind) => {
                let queue = unbind.queue.as_str();
                self.check(Access::Write, "queue", queue)?;
                self.check(Access::Read, "exchange", unbind.exchange.as_str())?;
                self.lookup_queue_def(queue)?;
                let command = Command::Unbind {
                    vhost: self.vhost.clone(),
                    source: unbind.exchange.as_str().to_string(),
                    binding: Binding {
                        destination: Destination::Queue(queue.to_string()),
                        routing_key: unbind.routing_key.as_str().to_string(),
                        arguments: unbind.arguments,
                    },
                };
                self.execute_then_reply(
                    channel_id,
                    command,
                    false,
                    AMQPClass::Queue(amqp_queue::AMQPMethod::UnbindOk(amqp_queue::UnbindOk {})),
                )
            }
            amqp_queue::AMQPMethod::Purge(purge) => {
                let name = purge.queue.as_str();
                self.check(Access::Read, "queue", name)?;
                let queue = match self.lookup_queue(name)? {
                    QueueAt::Local(queue) => queue,
                    QueueAt::Remote(def) => {
                        let link = self.remote_for_queue(channel_id, &def)?;
                        link.send(&AMQPClass::Queue(amqp_queue::AMQPMethod::Purge(
                            amqp_queue::Purge {
                                queue: purge.queue.clone(),
                                nowait: false,
                            },
                        )));
                        self.remote_wait = Some(RemoteWait {
                            link,
                            channel_id,
                            kind: WaitKind::Purge {
                                nowait: purge.nowait,
                            },
                        });
                        return Ok(());
                    }
                };
                let n = queue.purge();
                if !purge.nowait {
                    self.send_method(
                        channel_id,
                        AMQPClass::Queue(amqp_queue::AMQPMethod::PurgeOk(amqp_queue::PurgeOk {
                            message_count: n as u32,
                        })),
                    );
                }
                Ok(())
            }
            amqp_queue::AMQPMethod::Delete(delete) => {
                let name = delete.queue.as_str();
                self.check(Access::Configure, "queue", name)?;
                match self.broker.locate_queue(&self.vhost, name) {
                    Some(QueueAt::Local(queue)) => self.check_exclusive(&queue.def)?,
                    // The home node drops the messages when it applies the
                    // deletion; its counts are not known here, so if-unused
                    // and if-empty are not checked and 0 is reported.
                    Some(QueueAt::Remote(def)) => self.check_exclusive(&def)?,
                    None => {}
                }
                let nowait = delete.nowait;
                let reply = move |conn: &mut Connection<S>, n: u64| {
                    if !nowait {
                        conn.send_method(
                            channel_id,
                            AMQPClass::Queue(amqp_queue::AMQPMethod::DeleteOk(
                                amqp_queue::DeleteOk {
                                    message_count: n as u32,
                                },
                            )),
                        );
                    }
                };
                let checked = self
                    .broker
                    .check_delete_queue(&self.vhost, name, delete.if_unused, delete.if_empty)
                    .map_err(meta_error)?;
                // Deleting a missing queue succeeds, as in RabbitMQ.
                let Some(n) = checked else {
                    reply(self, 0);
                    return Ok(());
                };
                self.exclusive_queues.retain(|q| q != name);
                let command = Command::DeleteQueue {
                    vhost: self.vhost.clone(),
                    name: name.to_string(),
                };
                self.execute_then(channel_id, command, move |conn, result| {
                    match result {
                        Ok(_) | Err(MetaError::NotFound(_)) => {}
                        Err(err) => return Err(meta_error(err)),
                    }
                    reply(conn, n);
                    Ok(())
                })
            }
            _ => Err(AmqpError::new(
                reply::COMMAND_INVALID,
                "unexpected queue method",
            )),
        }
    }

    fn declare_queue(
        &mut self,
        channel_id: u16,
        declare: amqp_queue::Declare,
    ) -> Result<(), AmqpError> {
        let mut name = declare.queue.as_str().to_string();
        if declare.passive {
            let queue = self.lookup_queue(&name)?;
            return self.declare_ok(channel_id, &declare, &name, queue);
        }
        if name.is_empty() {
            name = Broker::generate_name("amq.gen-");
        } else if name.starts_with("amq.") {
            return Err(AmqpError::new(
                reply::ACCESS_REFUSED,
                format!("queue name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        self.check(Access::Configure, "queue", &name)?;
        match self.broker.locate_queue(&self.vhost, &name) {
            Some(QueueAt::Local(existing)) => self.check_exclusive(&existing.def)?,
            Some(QueueAt::Remote(def)) => self.check_exclusive(&def)?,
            None => {}
        }
        let command = Command::DeclareQueue {
            vhost: self.vhost.clone(),
            queue: QueueDef {
                name: name.clone(),
                durable: declare.durable,
                exclusive_owner: declare.exclusive.then(|| self.name.clone()),
                auto_delete: declare.auto_delete,
                arguments: declare.arguments.clone(),
                home_node: self.broker.home_for(&declare.arguments),
            },
        };
        self.execute_then(channel_id, command, move |conn, result| {
            let outcome = result.map_err(meta_error)?;
            if outcome.created && declare.exclusive {
                conn.exclusive_queues.push(name.clone());
            }
            if outcome.created {
                // Just created: empty and unconsumed wherever its home is,
                // and a remote home may not have applied it yet to ask.
                conn.send_declare_ok(channel_id, &declare, &name, 0, 0);
                return Ok(());
            }
            let queue = conn.lookup_queue(&name)?;
            conn.declare_ok(channel_id, &declare, &name, queue)
        })
    }

    /// Answers a declare with the queue's counts: at once for a local
    /// queue, after asking the home node for a remote one.
    fn declare_ok(
        &mut self,
        channel_id: u16,
        declare: &amqp_queue::Declare,
        name: &str,
        queue: QueueAt,
    ) -> Result<(), AmqpError> {
        match queue {
            QueueAt::Local(queue) => {
                queue.touch(Instant::now());
                let counts = queue.counts();
                self.send_declare_ok(channel_id, declare, name, counts.ready, counts.consumers);
            }
            // The client does not want the counts: existence is known here.
            QueueAt::Remote(_) if declare.nowait => {}
            QueueAt::Remote(def) => {
                let link = self.remote_for_queue(channel_id, &def)?;
                link.declare_passive(name);
                self.remote_wait = Some(RemoteWait {
                    link,
                    channel_id,
                    kind: WaitKind::Declare {
                        name: name.to_string(),
                    },
                });
            }
        }
        Ok(())
    }

    /// The link channel to a remote queue's home node, or the channel
    /// error for an unreachable home.
    fn remote_for_queue(
        &mut self,
        channel_id: u16,
        def: &QueueDef,
    ) -> Result<Arc<LinkChannel>, AmqpError> {
        let vhost = self.vhost.clone();
        self.remote_link(channel_id, &def.home_node)
            .map_err(|err| unreachable_home(err, &def.name, &vhost))
    }

    fn consume_remote(
        &mut self,
        channel_id: u16,
        consume: basic::Consume,
        def: &QueueDef,
    ) -> Result<(), AmqpError> {
        let tag: Arc<str> = if consume.consumer_tag.as_str().is_empty() {
            Arc::from(Broker::generate_name("amq.ctag-"))
        } else {
            Arc::from(consume.consumer_tag.as_str())
        };
        let channel = self.channel_mut(channel_id)?;
        if channel.consumers.contains_key(&tag) {
            return Err(AmqpError::new(
                reply::NOT_ALLOWED,
                format!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
        // The home node enforces the prefetch. A no-ack consumer, or one
        // without a limit, still gets a bounded one: this node acks no-ack
        // deliveries as it writes them, so the home node never runs ahead.
        let prefetch = match channel.consumer_prefetch {
            0 => crate::cluster::limits::LINK_NO_ACK_PREFETCH,
            _ if consume.no_ack => crate::cluster::limits::LINK_NO_ACK_PREFETCH,
            n => u16::try_from(n).unwrap_or(u16::MAX),
        };
        let link = self.remote_for_queue(channel_id, def)?;
        link.send(&AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: prefetch,
            global: false,
        })));
        link.send(&AMQPClass::Basic(basic::AMQPMethod::Consume(
            basic::Consume {
                queue: consume.queue.clone(),
                consumer_tag: tag.as_ref().into(),
                no_local: consume.no_local,
                no_ack: false,
                exclusive: consume.exclusive,
                nowait: false,
                arguments: consume.arguments.clone(),
            },
        )));
        self.remote_wait = Some(RemoteWait {
            link,
            channel_id,
            kind: WaitKind::Consume {
                tag,
                no_ack: consume.no_ack,
                nowait: consume.nowait,
            },
        });
        Ok(())
    }

    /// Handles what a data link reports for one of this connection's link
    /// channels.
    fn link_event(&mut self, event: LinkEvent) {
        let LinkEvent {
            channel: link,
            kind,
        } = event;
        let channel_id = link.client_channel;
        let Some(channel) = self.channels.get_mut(&channel_id) else {
            return;
        };
        if channel.remote_of(&link).is_none() {
            // Left behind by a closed channel; the home node requeues.
            return;
        }
        let waiting_here = self
            .remote_wait
            .as_ref()
            .is_some_and(|w| Arc::ptr_eq(&w.link, &link));
        match kind {
            LinkEventKind::Method(method) => match *method {
                AMQPClass::Basic(basic::AMQPMethod::Ack(ack)) => {
                    self.remote_confirmed(channel_id, &link, ack.delivery_tag, ack.multiple, true)
                }
                AMQPClass::Basic(basic::AMQPMethod::Nack(nack)) => self.remote_confirmed(
                    channel_id,
                    &link,
                    nack.delivery_tag,
                    nack.multiple,
                    false,
                ),
                AMQPClass::Basic(basic::AMQPMethod::Cancel(cancel)) => {
                    let tag: Arc<str> = Arc::from(cancel.consumer_tag.as_str());
                    self.cancel_remote_consumer(channel_id, &tag);
                }
                method if waiting_here => self.remote_answer(method, None),
                _ => {}
            },
            LinkEventKind::Content(method, message) => match *method {
                AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver)) => {
                    self.remote_deliver(&link, deliver, message)
                }
                method if waiting_here => self.remote_answer(method, Some(message)),
                _ => {}
            },
            LinkEventKind::Closed { code, text } => {
                self.remote_down(channel_id, &link);
                self.close_channel(
                    channel_id,
                    AmqpError {
                        code,
                        text,
                        class_id: 0,
                        method_id: 0,
                    },
                );
            }
            LinkEventKind::Down => {
                let failed_request = waiting_here;
                self.remote_down(channel_id, &link);
                if failed_request {
                    let err = AmqpError::new(
                        reply::RESOURCE_LOCKED,
                        format!("home node '{}' is unreachable", link.peer()),
                    );
                    self.close_channel(channel_id, err);
                }
            }
        }
    }

    /// The home node confirmed forwarded publishes up to `tag` on `link`
    /// (it confirms in order, so everything before `tag` was answered).
    fn remote_confirmed(
        &mut self,
        channel_id: u16,
        link: &Arc<LinkChannel>,
        tag: u64,
        multiple: bool,
        ok: bool,
    ) {
        let Some(channel) = self.channels.get_mut(&channel_id) else {
            return;
        };
        let Some(remote) = channel.remote_of(link) else {
            return;
        };
        let mut answered = Vec::new();
        while let Some(&Forwarded { link_seq, seq, .. }) = remote.unconfirmed.front() {
            if link_seq > tag {
                break;
            }
            remote.unconfirmed.pop_front();
            // Without `multiple`, only `tag` itself carries this answer.
            answered.push((seq, ok || (!multiple && link_seq != tag)));
        }
        link.link().release(answered.len());
        if let Some(confirms) = channel.confirms.as_mut() {
            for (seq, ok) in answered {
                if seq != 0 {
                    confirms.answer(seq, ok);
                }
            }
            self.drain_confirms(channel_id);
        }
    }

    /// The link channel is gone: its forwarded publishes are nacked, its
    /// consumers cancelled (`basic.cancel`), a request awaiting it dropped.
    fn remote_down(&mut self, channel_id: u16, link: &Arc<LinkChannel>) {
        if self
            .remote_wait
            .as_ref()
            .is_some_and(|w| Arc::ptr_eq(&w.link, link))
        {
            self.remote_wait = None;
            self.resume_input = true;
        }
        let Some(channel) = self.channels.get_mut(&channel_id) else {
            return;
        };
        let Some(remote) = channel.remote_of(link) else {
            return;
        };
        remote.down = true;
        let unconfirmed: Vec<Forwarded> = remote.unconfirmed.drain(..).collect();
        link.link().release(unconfirmed.len());
        if let Some(confirms) = channel.confirms.as_mut() {
            for forwarded in &unconfirmed {
                if forwarded.seq != 0 {
                    confirms.answer(forwarded.seq, false);
                }
            }
        }

        let cancelled: Vec<Arc<str>> = channel
            .consumers
            .iter()
            .filter(|(_, c)| matches!(&c.source, ConsumerSource::Remote(l) if Arc::ptr_eq(l, link)))
            .map(|(tag, _)| tag.clone())
            .collect();
        // Returns go out before the nacks of the same publishes.
        let text = unreachable_text(link.peer());
        for forwarded in unconfirmed {
            if let Some(message) = forwarded.returnable {
                self.send_return(channel_id, &message, &text);
            }
        }
        self.drain_confirms(channel_id);
        for tag in cancelled {
            self.cancel_remote_consumer(channel_id, &tag);
        }
    }

    /// Forgets a remote consumer and tells the client (consumer_cancel_notify).
    fn cancel_remote_consumer(&mut self, channel_id: u16, tag: &Arc<str>) {
        let Some(channel) = self.channels.get_mut(&channel_id) else {
            return;
        };
        if channel.closing || channel.consumers.remove(tag).is_none() {
            return;
        }
        channel
            .info
            .consumers
            .store(channel.consumers.len() as u32, Ordering::Relaxed);
        self.send_method(
            channel_id,
            AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                consumer_tag: tag.as_ref().into(),
                nowait: true,
            })),
        );
    }

    /// Relays a delivery from a home node to the client consumer.
    fn remote_deliver(
        &mut self,
        link: &Arc<LinkChannel>,
        deliver: basic::Deliver,
        message: Arc<Message>,
    ) {
        let channel_id = link.client_channel;
        let closing = self.closing;
        let tag: Arc<str> = Arc::from(deliver.consumer_tag.as_str());
        let Some(channel) = self.channels.get_mut(&channel_id).filter(|c| !c.closing) else {
            return;
        };
        let no_ack = match channel.consumers.get(&tag) {
            Some(consumer)
                if !closing
                    && matches!(&consumer.source, ConsumerSource::Remote(l) if Arc::ptr_eq(l, link)) =>
            {
                consumer.no_ack
            }
            _ => {
                // Cancelled meanwhile: give it back to the home node.
                settle_remote(
                    vec![(link.clone(), deliver.delivery_tag)],
                    false,
                    Settle::Requeue,
                );
                return;
            }
        };
        let client_tag = if no_ack {
            channel.delivery_tag += 1;
            settle_remote(
                vec![(link.clone(), deliver.delivery_tag)],
                false,
                Settle::Ack,
            );
            channel.delivery_tag
        } else {
            channel.track(
                Origin::Remote {
                    link: link.clone(),
                    tag: deliver.delivery_tag,
                },
                None,
            )
        };
        self.broker
            .metrics
            .cluster_remote_deliveries_total
            .with_label_values(&[link.peer()])
            .inc();
        self.encoder.deliver(
            &mut self.write_buf,
            channel_id,
            &tag,
            client_tag,
            deliver.redelivered,
            &message.exchange,
            &message.routing_key,
        );
        let frame_max = self.frame_max;
        self.encoder.content(
            &mut self.write_buf,
            channel_id,
            &message.properties_raw,
            &message.body,
            frame_max,
        );
    }

    /// The home node answered the relayed request the connection waits on.
    fn remote_answer(&mut self, method: AMQPClass, message: Option<Arc<Message>>) {
        let Some(RemoteWait {
            link,
            channel_id,
            kind,
        }) = self.remote_wait.take()
        else {
            return;
        };
        self.resume_input = true;
        match (kind, method) {
            (
                WaitKind::Consume {
                    tag,
                    no_ack,
                    nowait,
                },
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_)),
            ) => {
                let Some(channel) = self.channels.get_mut(&channel_id) else {
                    return;
                };
                channel.consumers.insert(
                    tag.clone(),
                    ChannelConsumer {
                        source: ConsumerSource::Remote(link),
                        no_ack,
                        credit: Credit::new(0),
                    },
                );
                channel
                    .info
                    .consumers
                    .store(channel.consumers.len() as u32, Ordering::Relaxed);
                if !nowait {
                    self.send_method(
                        channel_id,
                        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                            consumer_tag: tag.as_ref().into(),
                        })),
                    );
                }
            }
            (WaitKind::Get { .. }, AMQPClass::Basic(basic::AMQPMethod::GetEmpty(_))) => {
                self.send_method(
                    channel_id,
                    AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
                );
            }
            (WaitKind::Get { no_ack }, AMQPClass::Basic(basic::AMQPMethod::GetOk(get_ok))) => {
                let Some(message) = message else {
                    return;
                };
                let Some(channel) = self.channels.get_mut(&channel_id) else {
                    return;
                };
                let tag = if no_ack {
                    channel.delivery_tag += 1;
                    channel.delivery_tag
                } else {
                    channel.track(
                        Origin::Remote {
                            link,
                            tag: get_ok.delivery_tag,
                        },
                        None,
                    )
                };
                self.send_method(
                    channel_id,
                    AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                        delivery_tag: tag,
                        ..get_ok
                    })),
                );
                let frame_max = self.frame_max;
                self.encoder.content(
                    &mut self.write_buf,
                    channel_id,
                    &message.properties_raw,
                    &message.body,
                    frame_max,
                );
            }
            (
                WaitKind::Declare { name },
                AMQPClass::Queue(amqp_queue::AMQPMethod::DeclareOk(ok)),
            ) => {
                self.send_method(
                    channel_id,
                    AMQPClass::Queue(amqp_queue::AMQPMethod::DeclareOk(amqp_queue::DeclareOk {
                        queue: name.as_str().into(),
                        ..ok
                    })),
                );
            }
            (WaitKind::Purge { nowait }, AMQPClass::Queue(amqp_queue::AMQPMethod::PurgeOk(ok))) => {
                if !nowait {
                    self.send_method(
                        channel_id,
                        AMQPClass::Queue(amqp_queue::AMQPMethod::PurgeOk(ok)),
                    );
                }
            }
            (_, other) => {
                tracing::debug!(connection = %self.name, ?other, "unexpected answer from a home node");
            }
        }
    }

    fn send_declare_ok(
        &mut self,
        channel_id: u16,
        declare: &amqp_queue::Declare,
        name: &str,
        ready: u64,
        consumers: u64,
    ) {
        if declare.nowait {
            return;
        }
        self.send_method(
            channel_id,
            AMQPClass::Queue(amqp_queue::AMQPMethod::DeclareOk(amqp_queue::DeclareOk {
                queue: name.into(),
                message_count: ready as u32,
                consumer_count: consumers as u32,
            })),
        );
    }
}

fn meta_error(err: MetaError) -> AmqpError {
    AmqpError::new(err.reply_code(), err)
}

fn group_by_queue(local: Vec<(Arc<Queue>, Entry)>) -> Vec<(Arc<Queue>, Vec<Entry>)> {
    let mut groups: Vec<(Arc<Queue>, Vec<Entry>)> = Vec::new();
    for (queue, entry) in local {
        match groups.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &queue)) {
            Some((_, list)) => list.push(entry),
            None => groups.push((queue, vec![entry])),
        }
    }
    groups
}

type RemoteTags = Vec<(Arc<LinkChannel>, u64)>;

/// Splits settled deliveries into local (queue, entry) pairs and remote
/// (link channel, link delivery tag) pairs.
fn split_origins(unacked: Vec<Unacked>) -> (Vec<(Arc<Queue>, Entry)>, RemoteTags) {
    let mut local = Vec::new();
    let mut remote = Vec::new();
    for u in unacked {
        match u.origin {
            Origin::Local { queue, entry } => local.push((queue, entry)),
            Origin::Remote { link, tag } => remote.push((link, tag)),
        }
    }
    (local, remote)
}

/// How remote deliveries are settled on their home node.
#[derive(Clone, Copy)]
enum Settle {
    Ack,
    Requeue,
    Reject,
}

/// Relays a settlement to home nodes: one method per link channel. With
/// `multiple`, the highest tag covers the rest, because a link channel's
/// tags arrive in the same order as this channel's and a multiple settle
/// takes every unacked delivery up to a tag.
fn settle_remote(remote: RemoteTags, multiple: bool, settle: Settle) {
    let mut groups: Vec<(Arc<LinkChannel>, Vec<u64>)> = Vec::new();
    for (link, tag) in remote {
        match groups.iter_mut().find(|(l, _)| Arc::ptr_eq(l, &link)) {
            Some((_, tags)) => tags.push(tag),
            None => groups.push((link, vec![tag])),
        }
    }
    for (link, tags) in groups {
        let batches: Vec<(u64, bool)> = if multiple || tags.len() > 1 {
            vec![(tags.iter().copied().max().unwrap_or(0), true)]
        } else {
            tags.iter().map(|t| (*t, false)).collect()
        };
        for (tag, multiple) in batches {
            let method = match settle {
                Settle::Ack => basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag: tag,
                    multiple,
                }),
                Settle::Requeue | Settle::Reject => basic::AMQPMethod::Nack(basic::Nack {
                    delivery_tag: tag,
                    multiple,
                    requeue: matches!(settle, Settle::Requeue),
                }),
            };
            link.send(&AMQPClass::Basic(method));
        }
    }
}

/// The `basic.return` text for a message whose queue's home is unreachable.
fn unreachable_text(home: &str) -> String {
    format!("NO_ROUTE - home node '{home}' of the queue is unreachable")
}

/// The channel error for a queue whose home node cannot be reached.
fn unreachable_home(err: forward::Error, queue: &str, vhost: &str) -> AmqpError {
    AmqpError::new(
        reply::RESOURCE_LOCKED,
        format!("queue '{queue}' in vhost '{vhost}': {err}"),
    )
}

/// Truncates a reply text to a short string's 255 bytes.
fn short(text: &str) -> &str {
    if text.len() <= 255 {
        return text;
    }
    let mut end = 255;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `connection.start` server properties, announcing only what is implemented.
fn server_properties(cluster_name: &str) -> FieldTable {
    let mut capabilities = FieldTable::default();
    for capability in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
        "per_consumer_qos",
    ] {
        capabilities.insert(capability.into(), AMQPValue::Boolean(true));
    }
    let mut properties = FieldTable::default();
    properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    properties.insert("product".into(), text("Synod"));
    properties.insert("version".into(), text(env!("CARGO_PKG_VERSION")));
    properties.insert("platform".into(), text("Rust"));
    properties.insert("cluster_name".into(), text(cluster_name));
    properties.insert(
        "information".into(),
        text("An AMQP 0-9-1 broker whose replicas agree through Paxos"),
    );
    properties
}

/// The close text of a refused login, word for word as RabbitMQ sends it.
fn login_refused_text(mechanism: &str) -> String {
    format!(
        "ACCESS_REFUSED - Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
    )
}
