//! TCP transport between cluster nodes: frames, the mutual HMAC handshake,
//! one outgoing connection per peer (bounded queue, reconnect with backoff)
//! and the listener. It moves encoded messages; it knows no Paxos rules.
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

/// Receives the sockets of authenticated inbound data links: the peer's
/// node name, the vhost the link serves, and the socket (AMQP from now on).
pub type DataLinkHandler = Arc<dyn Fn(String, String, TcpStream) + Send + Sync>;

/// Why a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The peer does not speak this protocol or version.
    #[error("protocol: {0}")]
    Protocol(&'static str),
    /// The peer failed the secret check.
    #[error("peer failed authentication")]
    Authentication,
    /// The handshake took too long.
    #[error("handshake timed out")]
    Timeout,
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
    /// A transport for `id`, announcing `advertise` and proving `secret`.
    pub fn new(
        id: NodeId,
        advertise: String,
        secret: Vec<u8>,
        seeds: BTreeMap<String, String>,
        shutdown: watch::Receiver<bool>,
    ) -> Transport {
        Transport {
            inner: Arc::new(Inner {
                id,
                advertise,
                secret,
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
    /// handshake and the purpose frame, the returned socket carries AMQP.
    pub async fn dial_data_link(&self, peer: &str, vhost: &str) -> Result<TcpStream, Error> {
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
                    if let Err(err) = serve_connection(inner, stream, inbox).await {
                        tracing::debug!(%peer, %err, "cluster connection closed");
                    }
                });
            }
        })
    }
}

async fn serve_connection(
    inner: Arc<Inner>,
    stream: TcpStream,
    inbox: mpsc::Sender<Message>,
) -> Result<(), Error> {
    stream.set_nodelay(true)?;
    let (mut read, mut write) = stream.into_split();
    let handshake = async {
        let (kind, payload) = read_frame(&mut read).await?;
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
        write_frame(&mut write, KIND_CHALLENGE, &w.buf).await?;
        let (kind, proof) = read_frame(&mut read).await?;
        let expected = hmac_sha256(
            &inner.secret,
            &[b"synod-dialer", &nonce, &nonce_dialer, peer.name.as_bytes()],
        );
        if kind != KIND_PROOF || !equal_in_constant_time(&proof, &expected) {
            return Err(Error::Authentication);
        }
        Ok((peer, advertise))
    };
    let (peer, advertise) =
        tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), handshake)
            .await
            .map_err(|_| Error::Timeout)??;
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
            frame = read_frame(&mut read) => frame?,
            _ = shutdown.changed() => return Ok(()),
        };
        if first && kind == KIND_DATA_LINK {
            let vhost = Reader::new(&payload)
                .str()
                .map_err(|_| Error::Protocol("malformed data link frame"))?;
            let handler = inner
                .data_links
                .lock()
                .expect("lock is not poisoned")
                .clone();
            let Some(handler) = handler else {
                return Err(Error::Protocol("this node takes no data links"));
            };
            let stream = read
                .reunite(write)
                .map_err(|_| Error::Protocol("socket halves do not match"))?;
            handler(peer.name.clone(), vhost, stream);
            return Ok(());
        }
        first = false;
        if kind != KIND_MESSAGE {
            return Err(Error::Protocol("expected a message frame"));
        }
        let msg = decode_message(&payload).map_err(|_| Error::Protocol("malformed message"))?;
        if inbox.send(msg).await.is_err() {
            return Ok(());
        }
    }
}

async fn dial(inner: &Inner, addr: &str) -> Result<TcpStream, Error> {
    let connect = TcpStream::connect(addr);
    let mut stream = tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connect)
        .await
        .map_err(|_| Error::Timeout)??;
    stream.set_nodelay(true)?;
    let handshake = async {
        let nonce: [u8; 32] = rand::random();
        let mut w = Writer::default();
        w.node_id(&inner.id);
        w.str(&inner.advertise);
        w.bytes(&nonce);
        write_frame(&mut stream, KIND_HELLO, &w.buf).await?;
        let (kind, payload) = read_frame(&mut stream).await?;
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
        Ok(())
    };
    tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), handshake)
        .await
        .map_err(|_| Error::Timeout)??;
    Ok(stream)
}

async fn peer_task(inner: Arc<Inner>, name: String, mut rx: mpsc::Receiver<Vec<u8>>) {
    let mut shutdown = inner.shutdown.clone();
    let mut backoff_ms = RECONNECT_BACKOFF_MIN_MS;
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
                    tracing::debug!(peer = %name, %addr, %err, "cluster dial failed");
                }),
            None => Err(()),
        };
        if let Ok(mut stream) = connected {
            backoff_ms = RECONNECT_BACKOFF_MIN_MS;
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
