//! TCP transport between cluster nodes: TLS (when cluster TLS is on),
//! frames, the mutual HMAC handshake, one outgoing connection per peer
//! (bounded queue, reconnect with backoff) and the listener. It moves
//! encoded messages; it knows no Paxos rules.
//!
//! With cluster TLS on, every connection is TLS 1.2/1.3 before any frame:
//! the listener requires a client certificate chaining to `--tls-ca`, the
//! dialer requires the server certificate to chain to it and to name the
//! dialed host (DNS name or IP address) in its subject alternative names.
//! The HMAC handshake then runs inside TLS: a peer needs both a certificate
//! and the secret. A plain peer meeting a TLS one (or the reverse) is
//! refused at once, and both log why.
//!
//! Frame: `magic "SY"`, `version: u8` (1), `kind: u8`, `len: u32 LE`, payload.
//! Kinds: 1 hello, 2 challenge, 3 proof, 4 Paxos message, 5 data link.
//! After the handshake the dialer's first frame declares the connection's
//! purpose. A Paxos connection (first frame a message) is one-way: the
//! dialing node sends, the listener reads. A data link (first frame kind 5,
//! payload: the vhost as a codec string) stops speaking this framing: from
//! then on both directions carry AMQP 0-9-1 frames, and the listener hands
//! the socket to the data-link handler (`cluster::forward`).
//!
//! Handshake (the secret never crosses the wire):
//! 1. dialer -> `hello`: its identity, advertised address, nonce `c`.
//! 2. listener -> `challenge`: nonce `s`, `HMAC(secret, "synod-listener" | c | s)`.
//! 3. dialer checks it (the listener knows the secret), then -> `proof`:
//!    `HMAC(secret, "synod-dialer" | s | c | name)`; the listener checks it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::codec::{Reader, Writer, decode_message, encode_message};
use super::limits::{
    CONNECT_TIMEOUT_MS, FRAME_BYTES_MAX, HANDSHAKE_TIMEOUT_MS, INBOUND_CONNECTIONS_MAX,
    OUTGOING_FRAMES_MAX, RECONNECT_BACKOFF_MAX_MS, RECONNECT_BACKOFF_MIN_MS,
};
use crate::paxos::{Message, NodeId};

const FRAME_MAGIC: &[u8; 2] = b"SY";
const FRAME_VERSION: u8 = 1;
const KIND_HELLO: u8 = 1;
const KIND_CHALLENGE: u8 = 2;
const KIND_PROOF: u8 = 3;
const KIND_MESSAGE: u8 = 4;
const KIND_DATA_LINK: u8 = 5;

/// First byte of a TLS handshake record: how a plain listener recognises a
/// TLS peer.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// A connection on the cluster port: TLS when cluster TLS is on.
pub type ClusterStream = tokio_util::either::Either<TcpStream, tokio_rustls::TlsStream<TcpStream>>;

/// Receives authenticated inbound data links: the peer's node name, the
/// vhost the link serves, the stream (AMQP from now on) and the peer's
/// socket address.
pub type DataLinkHandler = Arc<dyn Fn(String, String, ClusterStream, SocketAddr) + Send + Sync>;

/// Why a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer does not speak this protocol or version.
    #[error("protocol: {0}")]
    Protocol(&'static str),
    /// The listening peer failed the secret check.
    #[error("the peer's challenge does not match this node's cluster secret")]
    Authentication,
    /// The handshake took too long.
    #[error("handshake timed out")]
    Timeout,
    /// The TLS handshake failed (untrusted or missing certificate, name
    /// mismatch, or a peer that does not speak TLS).
    #[error("TLS: {0}")]
    Tls(String),
    /// One side runs cluster TLS and the other does not.
    #[error("{0}")]
    TlsMismatch(&'static str),
    /// A dialing peer did not prove the cluster secret.
    #[error("{0}")]
    Secret(String),
}

impl Error {
    /// Whether the peer was refused for what it is (certificate, secret,
    /// protocol) rather than lost to the network: worth a warning.
    fn is_refusal(&self) -> bool {
        matches!(
            self,
            Error::Authentication
                | Error::Secret(_)
                | Error::Tls(_)
                | Error::TlsMismatch(_)
                | Error::Protocol(_)
        )
    }
}

/// HMAC-SHA256 (RFC 2104) over the concatenation of `parts`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    for part in parts {
        inner.update(part);
    }
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: u8,
    payload: &[u8],
) -> Result<(), Error> {
    let len = u32::try_from(payload.len()).map_err(|_| Error::Protocol("frame too large"))?;
    let mut header = [0u8; 8];
    header[..2].copy_from_slice(FRAME_MAGIC);
    header[2] = FRAME_VERSION;
    header[3] = kind;
    header[4..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&header).await?;
    w.write_all(payload).await?;
    Ok(())
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<(u8, Vec<u8>), Error> {
    let mut header = [0u8; 8];
    r.read_exact(&mut header).await?;
    if &header[..2] != FRAME_MAGIC {
        return Err(Error::Protocol("bad magic"));
    }
    if header[2] != FRAME_VERSION {
        return Err(Error::Protocol("unsupported version"));
    }
    let len = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if len > FRAME_BYTES_MAX {
        return Err(Error::Protocol("frame too large"));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    Ok((header[3], payload))
}

struct Inner {
    id: NodeId,
    advertise: String,
    secret: Vec<u8>,
    /// Cluster TLS, when on: configurations re-read at every connection so
    /// that a renewed certificate is used without a restart.
    tls: Option<Arc<crate::tls::Certificates>>,
    /// Where each node name listens: the seed list, plus what peers announce.
    addresses: Mutex<BTreeMap<String, String>>,
    outgoing: Mutex<BTreeMap<String, mpsc::Sender<Vec<u8>>>>,
    shutdown: watch::Receiver<bool>,
    /// Where inbound data links go; absent: they are refused.
    data_links: Mutex<Option<DataLinkHandler>>,
}

/// The cluster transport of one node.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

impl Transport {
    /// A transport for `id`, announcing `advertise` and proving `secret`,
    /// over TLS with `tls`'s certificates when given.
    pub fn new(
        id: NodeId,
        advertise: String,
        secret: Vec<u8>,
        seeds: BTreeMap<String, String>,
        tls: Option<Arc<crate::tls::Certificates>>,
        shutdown: watch::Receiver<bool>,
    ) -> Transport {
        Transport {
            inner: Arc::new(Inner {
                id,
                advertise,
                secret,
                tls,
                addresses: Mutex::new(seeds),
                outgoing: Mutex::new(BTreeMap::new()),
                shutdown,
                data_links: Mutex::new(None),
            }),
        }
    }

    /// Queues `msg` for its addressee; drops it when the peer's queue is full
    /// or its address is unknown (Paxos tolerates lost messages).
    pub fn send(&self, msg: &Message) {
        let name = msg.to.name.clone();
        if name == self.inner.id.name {
            return;
        }
        let frame = encode_message(msg);
        let mut outgoing = self.inner.outgoing.lock().expect("lock is not poisoned");
        let tx = outgoing.entry(name.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(OUTGOING_FRAMES_MAX);
            tokio::spawn(peer_task(self.inner.clone(), name.clone(), rx));
            tx
        });
        if tx.try_send(frame).is_err() {
            tracing::trace!(peer = %name, "outgoing queue full; message dropped");
        }
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.inner.id.name
    }

    /// A receiver that turns true when the transport shuts down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.clone()
    }

    /// Hands inbound data links to `handler` from now on.
    pub fn set_data_link_handler(&self, handler: DataLinkHandler) {
        *self.inner.data_links.lock().expect("lock is not poisoned") = Some(handler);
    }

    /// Opens an authenticated data link to `peer` for `vhost`: after the
    /// handshake and the purpose frame, the returned stream carries AMQP.
    pub async fn dial_data_link(&self, peer: &str, vhost: &str) -> Result<ClusterStream, Error> {
        let addr = self
            .inner
            .addresses
            .lock()
            .expect("lock is not poisoned")
            .get(peer)
            .cloned()
            .ok_or(Error::Protocol("no address known for the peer"))?;
        let mut stream = dial(&self.inner, &addr).await?;
        let mut w = Writer::default();
        w.str(vhost);
        write_frame(&mut stream, KIND_DATA_LINK, &w.buf).await?;
        Ok(stream)
    }

    /// Starts accepting connections on `listener`, delivering messages to `inbox`.
    pub fn listen(
        &self,
        listener: TcpListener,
        inbox: mpsc::Sender<Message>,
    ) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let permits = Arc::new(Semaphore::new(INBOUND_CONNECTIONS_MAX));
            let mut shutdown = inner.shutdown.clone();
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = shutdown.changed() => return,
                };
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(err) => {
                        tracing::warn!(%err, "cluster accept failed");
                        tokio::time::sleep(Duration::from_millis(RECONNECT_BACKOFF_MIN_MS)).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "too many cluster connections; refusing");
                    continue;
                };
                let inner = inner.clone();
                let inbox = inbox.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match serve_connection(inner, stream, peer, inbox).await {
                        Ok(()) => {}
                        Err(Ended::Refused(err)) => {
                            tracing::warn!(%peer, %err, "cluster connection refused");
                        }
                        Err(Ended::Closed(err)) => {
                            tracing::debug!(%peer, %err, "cluster connection closed");
                        }
                    }
                });
            }
        })
    }
}

/// How an inbound connection ended badly: refused during the handshake
/// (logged as a warning: a misconfigured or hostile peer), or closed
/// after it (a peer going away).
enum Ended {
    Refused(Error),
    Closed(Error),
}

/// Completes TLS on an accepted socket when cluster TLS is on; otherwise
/// checks that the peer is not trying to speak TLS to a plain node.
async fn accept_stream(inner: &Inner, stream: TcpStream) -> Result<ClusterStream, Error> {
    let mut first = [0u8; 1];
    let n = stream.peek(&mut first).await?;
    if n == 0 {
        return Err(Error::Protocol("closed before the handshake"));
    }
    let Some(tls) = &inner.tls else {
        if first[0] == TLS_HANDSHAKE_RECORD {
            return Err(Error::TlsMismatch(
                "the peer speaks TLS but cluster TLS is off on this node \
                 (give every node --tls-cert, --tls-key and --tls-ca, or --cluster-tls off)",
            ));
        }
        return Ok(tokio_util::either::Either::Left(stream));
    };
    if first[0] == FRAME_MAGIC[0] {
        return Err(Error::TlsMismatch(
            "the peer dialed without TLS but this node requires cluster TLS \
             (give every node --tls-cert, --tls-key and --tls-ca, or --cluster-tls off)",
        ));
    }
    let Some(configs) = tls.cluster() else {
        return Err(Error::Tls("no cluster TLS configuration".into()));
    };
    let stream = TlsAcceptor::from(configs.server)
        .accept(stream)
        .await
        .map_err(|err| Error::Tls(err.to_string()))?;
    Ok(tokio_util::either::Either::Right(
        tokio_rustls::TlsStream::Server(stream),
    ))
}

async fn serve_connection(
    inner: Arc<Inner>,
    stream: TcpStream,
    peer_addr: SocketAddr,
    inbox: mpsc::Sender<Message>,
) -> Result<(), Ended> {
    stream
        .set_nodelay(true)
        .map_err(|err| Ended::Closed(err.into()))?;
    let handshake = async {
        let mut stream = accept_stream(&inner, stream).await?;
        let (kind, payload) = read_frame(&mut stream).await?;
        if kind != KIND_HELLO {
            return Err(Error::Protocol("expected hello"));
        }
        let mut r = Reader::new(&payload);
        let (peer, advertise, nonce_dialer) =
            (|| Ok::<_, super::codec::DecodeError>((r.node_id()?, r.str()?, r.bytes()?)))()
                .map_err(|_| Error::Protocol("malformed hello"))?;
        let nonce: [u8; 32] = rand::random();
        let mac = hmac_sha256(&inner.secret, &[b"synod-listener", &nonce_dialer, &nonce]);
        let mut w = Writer::default();
        w.bytes(&nonce);
        w.bytes(&mac);
        write_frame(&mut stream, KIND_CHALLENGE, &w.buf).await?;
        stream.flush().await?;
        let (kind, proof) = match read_frame(&mut stream).await {
            Ok(frame) => frame,
            // The dialer checks our challenge first and hangs up when it
            // does not match its secret.
            Err(Error::Io(err)) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(Error::Secret(format!(
                    "node {} hung up after the challenge: it does not hold this node's cluster secret",
                    peer.name
                )));
            }
            Err(err) => return Err(err),
        };
        let expected = hmac_sha256(
            &inner.secret,
            &[b"synod-dialer", &nonce, &nonce_dialer, peer.name.as_bytes()],
        );
        if kind != KIND_PROOF || !equal_in_constant_time(&proof, &expected) {
            return Err(Error::Secret(format!(
                "node {}'s proof does not match this node's cluster secret",
                peer.name
            )));
        }
        Ok((stream, peer, advertise))
    };
    let (mut stream, peer, advertise) =
        tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), handshake)
            .await
            .map_err(|_| Ended::Refused(Error::Timeout))?
            .map_err(|err| match err.is_refusal() {
                true => Ended::Refused(err),
                false => Ended::Closed(err),
            })?;
    tracing::debug!(%peer, %advertise, "cluster peer connected");
    if !advertise.is_empty() {
        inner
            .addresses
            .lock()
            .expect("lock is not poisoned")
            .insert(peer.name.clone(), advertise);
    }
    let mut shutdown = inner.shutdown.clone();
    let mut first = true;
    loop {
        let (kind, payload) = tokio::select! {
            frame = read_frame(&mut stream) => frame.map_err(Ended::Closed)?,
            _ = shutdown.changed() => return Ok(()),
        };
        if first && kind == KIND_DATA_LINK {
            let vhost = Reader::new(&payload)
                .str()
                .map_err(|_| Ended::Closed(Error::Protocol("malformed data link frame")))?;
            let handler = inner
                .data_links
                .lock()
                .expect("lock is not poisoned")
                .clone();
            let Some(handler) = handler else {
                return Err(Ended::Closed(Error::Protocol(
                    "this node takes no data links",
                )));
            };
            handler(peer.name.clone(), vhost, stream, peer_addr);
            return Ok(());
        }
        first = false;
        if kind != KIND_MESSAGE {
            return Err(Ended::Closed(Error::Protocol("expected a message frame")));
        }
        let msg = decode_message(&payload)
            .map_err(|_| Ended::Closed(Error::Protocol("malformed message")))?;
        if inbox.send(msg).await.is_err() {
            return Ok(());
        }
    }
}

/// The host part of `host:port` (brackets of an IPv6 literal removed): the
/// name the peer's certificate must carry.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

async fn dial(inner: &Inner, addr: &str) -> Result<ClusterStream, Error> {
    let connect = TcpStream::connect(addr);
    let stream = tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connect)
        .await
        .map_err(|_| Error::Timeout)??;
    stream.set_nodelay(true)?;
    let handshake = async {
        let mut stream = match &inner.tls {
            None => tokio_util::either::Either::Left(stream),
            Some(tls) => {
                let configs = tls
                    .cluster()
                    .ok_or_else(|| Error::Tls("no cluster TLS configuration".into()))?;
                let name = rustls::pki_types::ServerName::try_from(host_of(addr).to_string())
                    .map_err(|err| Error::Tls(format!("{addr}: {err}")))?;
                let stream = TlsConnector::from(configs.client)
                    .connect(name, stream)
                    .await
                    .map_err(|err| match err.kind() {
                        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                            Error::TlsMismatch(
                                "the peer hung up during the TLS handshake: it does not run \
                             cluster TLS, or refused this node's certificate",
                            )
                        }
                        _ => Error::Tls(err.to_string()),
                    })?;
                tokio_util::either::Either::Right(tokio_rustls::TlsStream::Client(stream))
            }
        };
        let nonce: [u8; 32] = rand::random();
        let mut w = Writer::default();
        w.node_id(&inner.id);
        w.str(&inner.advertise);
        w.bytes(&nonce);
        write_frame(&mut stream, KIND_HELLO, &w.buf).await?;
        stream.flush().await?;
        let (kind, payload) = match read_frame(&mut stream).await {
            Ok(frame) => frame,
            Err(Error::Io(err))
                if inner.tls.is_none()
                    && matches!(
                        err.kind(),
                        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                    ) =>
            {
                // A TLS listener hangs up at once on a plain hello; so
                // would one over its connection bound, hence "likely".
                return Err(Error::TlsMismatch(
                    "the peer hung up on the hello: it likely requires cluster TLS, \
                     which is off on this node",
                ));
            }
            // With TLS 1.3 the server checks our certificate after our side
            // of the handshake is done: its refusal arrives here, as an
            // alert or as the connection ending.
            Err(Error::Io(err)) if inner.tls.is_some() => {
                return Err(Error::Tls(match err.kind() {
                    std::io::ErrorKind::InvalidData => err.to_string(),
                    _ => format!(
                        "the peer ended the connection ({err}): it refused this node's certificate"
                    ),
                }));
            }
            Err(err) => return Err(err),
        };
        if kind != KIND_CHALLENGE {
            return Err(Error::Protocol("expected challenge"));
        }
        let mut r = Reader::new(&payload);
        let (nonce_listener, mac) =
            (|| Ok::<_, super::codec::DecodeError>((r.bytes()?, r.bytes()?)))()
                .map_err(|_| Error::Protocol("malformed challenge"))?;
        let expected = hmac_sha256(&inner.secret, &[b"synod-listener", &nonce, &nonce_listener]);
        if !equal_in_constant_time(&mac, &expected) {
            return Err(Error::Authentication);
        }
        let proof = hmac_sha256(
            &inner.secret,
            &[
                b"synod-dialer",
                &nonce_listener,
                &nonce,
                inner.id.name.as_bytes(),
            ],
        );
        write_frame(&mut stream, KIND_PROOF, &proof).await?;
        stream.flush().await?;
        Ok(stream)
    };
    tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), handshake)
        .await
        .map_err(|_| Error::Timeout)?
}

async fn peer_task(inner: Arc<Inner>, name: String, mut rx: mpsc::Receiver<Vec<u8>>) {
    let mut shutdown = inner.shutdown.clone();
    let mut backoff_ms = RECONNECT_BACKOFF_MIN_MS;
    // A refusal is logged as a warning once, not at every redial.
    let mut last_refusal = String::new();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let addr = inner
            .addresses
            .lock()
            .expect("lock is not poisoned")
            .get(&name)
            .cloned();
        let connected = match addr {
            Some(addr) => dial(&inner, &addr)
                .await
                .map(BufWriter::new)
                .map_err(|err| {
                    let text = err.to_string();
                    if err.is_refusal() && text != last_refusal {
                        tracing::warn!(peer = %name, %addr, %err, "cluster peer refused");
                    } else {
                        tracing::debug!(peer = %name, %addr, %err, "cluster dial failed");
                    }
                    last_refusal = if err.is_refusal() {
                        text
                    } else {
                        String::new()
                    };
                }),
            None => Err(()),
        };
        if let Ok(mut stream) = connected {
            backoff_ms = RECONNECT_BACKOFF_MIN_MS;
            last_refusal.clear();
            loop {
                let frame = tokio::select! {
                    frame = rx.recv() => frame,
                    _ = shutdown.changed() => return,
                };
                let Some(frame) = frame else {
                    return;
                };
                let mut result = write_frame(&mut stream, KIND_MESSAGE, &frame).await;
                // Batch whatever else is queued into the same flush.
                while result.is_ok()
                    && let Ok(frame) = rx.try_recv()
                {
                    result = write_frame(&mut stream, KIND_MESSAGE, &frame).await;
                }
                if let Err(err) = result {
                    tracing::debug!(peer = %name, %err, "cluster send failed");
                    break;
                }
                if let Err(err) = stream.flush().await {
                    tracing::debug!(peer = %name, %err, "cluster send failed");
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
            _ = shutdown.changed() => return,
        }
        backoff_ms = (backoff_ms * 2).min(RECONNECT_BACKOFF_MAX_MS);
    }
}

/// The address a listener bound to `addr` should announce when nothing better is known.
pub fn default_advertise(addr: SocketAddr) -> String {
    addr.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_checked_against_a_peer_certificate_is_the_dialed_host() {
        // Goal: host names, IPv4 and bracketed IPv6 addresses lose their port (and brackets).
        assert_eq!(
            host_of("synod-0.synod-nodes.ns.svc:25672"),
            "synod-0.synod-nodes.ns.svc"
        );
        assert_eq!(host_of("127.0.0.1:25672"), "127.0.0.1");
        assert_eq!(host_of("[::1]:25672"), "::1");
    }

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        // Goal: the hand-written HMAC-SHA256 agrees with the RFC 4231 test vector.
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
