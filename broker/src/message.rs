//! A published message: routing data, its properties as encoded bytes and a
//! reference-counted body. A message routed to ten queues is stored once,
//! behind one `Arc`. Must not hold decoded property structs: a queue of a
//! million messages pays for every byte kept here.
//!
//! Properties stay in their wire encoding (the content-header payload after
//! class, weight and body size), copied verbatim into deliveries. The few
//! fields the broker acts on for every message (persistence, expiration)
//! are decoded once when the message is built; the rest (headers for the
//! headers exchange and dead-lettering) are decoded on demand.

use std::sync::Arc;

use amq_protocol::protocol::basic::{AMQPProperties, parse_properties};
use amq_protocol::types::FieldTable;
use bytes::Bytes;

use crate::limits;

/// Property flag of `headers` in the first (big-endian) flags word.
const FLAG_HEADERS: u16 = 1 << 13;

/// An immutable message as the broker stores it.
#[derive(Debug, Clone)]
pub struct Message {
    /// Exchange it was published to (shared between messages of a publisher).
    pub exchange: Arc<str>,
    /// Routing key it was published with (shared between messages of a publisher).
    pub routing_key: Arc<str>,
    /// Encoded properties, copied verbatim into deliveries.
    pub properties_raw: Bytes,
    /// Body: a zero-copy slice of the read buffer when large, an exact-size
    /// copy when small (see [`limits::BODY_COPY_SIZE_MAX`]).
    pub body: Bytes,
    expiration_ms: Option<u64>,
    persistent: bool,
}

impl Message {
    /// A message from properties the caller already decoded (the content
    /// header on publish). `properties_raw` must be their encoding.
    pub fn new(
        exchange: Arc<str>,
        routing_key: Arc<str>,
        properties: &AMQPProperties,
        properties_raw: &[u8],
        body: Bytes,
    ) -> Message {
        Message {
            exchange,
            routing_key,
            properties_raw: compact_properties(properties_raw),
            body: compact_body(body),
            expiration_ms: expiration_ms(properties),
            persistent: *properties.delivery_mode() == Some(2),
        }
    }

    /// A message from decoded properties, encoding them (dead letters, tests).
    pub fn with_properties(
        exchange: Arc<str>,
        routing_key: Arc<str>,
        properties: &AMQPProperties,
        body: Bytes,
    ) -> Message {
        let raw = crate::protocol::encode_properties(properties);
        Message::new(exchange, routing_key, properties, &raw, body)
    }

    /// A message from encoded properties (read back from the store).
    /// `None` when they do not decode.
    pub fn decode(
        exchange: Arc<str>,
        routing_key: Arc<str>,
        properties_raw: &[u8],
        body: Bytes,
    ) -> Option<Message> {
        let properties = decode_properties(properties_raw)?;
        Some(Message::new(
            exchange,
            routing_key,
            &properties,
            properties_raw,
            body,
        ))
    }

    /// Body size in bytes, as length limits count it.
    pub fn body_size(&self) -> u64 {
        self.body.len() as u64
    }

    /// Whether the publisher asked for persistence (`delivery_mode = 2`).
    pub fn is_persistent(&self) -> bool {
        self.persistent
    }

    /// Per-message TTL from the `expiration` property, in milliseconds.
    /// `None` when absent or not a non-negative integer (RabbitMQ rejects
    /// such messages at publish time; see `connection`).
    pub fn expiration_ms(&self) -> Option<u64> {
        self.expiration_ms
    }

    /// The decoded properties. Decodes on every call: for dead-lettering
    /// and other rare paths, not per delivery.
    pub fn properties(&self) -> AMQPProperties {
        decode_properties(&self.properties_raw).unwrap_or_default()
    }

    /// The `headers` property, decoded only when the message has one
    /// (headers-exchange routing and dead-letter cycle checks).
    pub fn headers(&self) -> Option<FieldTable> {
        let flags =
            u16::from_be_bytes([*self.properties_raw.first()?, *self.properties_raw.get(1)?]);
        if flags & FLAG_HEADERS == 0 {
            return None;
        }
        self.properties().headers().clone()
    }
}

fn decode_properties(raw: &[u8]) -> Option<AMQPProperties> {
    match parse_properties(raw) {
        Ok((_, properties)) => Some(properties),
        Err(_) => None,
    }
}

fn expiration_ms(properties: &AMQPProperties) -> Option<u64> {
    properties
        .expiration()
        .as_ref()
        .and_then(|e| e.as_str().parse::<u64>().ok())
}

/// The encoded properties as a buffer of their own, so that they never pin
/// the connection's read buffer. The encodings most publishers send (no
/// properties; only a delivery mode) are shared static bytes.
fn compact_properties(raw: &[u8]) -> Bytes {
    const NONE: &[u8] = &[0x00, 0x00];
    const TRANSIENT: &[u8] = &[0x10, 0x00, 0x01];
    const PERSISTENT: &[u8] = &[0x10, 0x00, 0x02];
    match raw {
        NONE => Bytes::from_static(NONE),
        TRANSIENT => Bytes::from_static(TRANSIENT),
        PERSISTENT => Bytes::from_static(PERSISTENT),
        _ => Bytes::copy_from_slice(raw),
    }
}

/// A small body copied out of whatever buffer it slices (a 16-byte body must
/// not keep a 64 KiB read buffer alive while it waits in a queue); a large
/// one kept as is (zero-copy; it pins at most a few times its own size).
fn compact_body(body: Bytes) -> Bytes {
    if body.is_empty() {
        Bytes::new()
    } else if body.len() <= limits::BODY_COPY_SIZE_MAX {
        Bytes::copy_from_slice(&body)
    } else {
        body
    }
}

/// Shares equal exchange names and routing keys between consecutive
/// publishes of one channel: most publishers repeat them, and a queued
/// message then costs one reference instead of two heap strings.
#[derive(Debug, Default)]
pub struct NameCache {
    exchange: Option<Arc<str>>,
    routing_key: Option<Arc<str>>,
}

impl NameCache {
    /// The shared exchange name equal to `name`.
    pub fn exchange(&mut self, name: &str) -> Arc<str> {
        share(&mut self.exchange, name)
    }

    /// The shared routing key equal to `key`.
    pub fn routing_key(&mut self, key: &str) -> Arc<str> {
        share(&mut self.routing_key, key)
    }
}

fn share(slot: &mut Option<Arc<str>>, text: &str) -> Arc<str> {
    match slot {
        Some(shared) if &**shared == text => shared.clone(),
        _ => {
            let shared: Arc<str> = Arc::from(text);
            *slot = Some(shared.clone());
            shared
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::AMQPValue;

    #[test]
    fn cached_fields_and_lazy_headers_match_the_decoded_properties() {
        // Goal: persistence, expiration and headers read from the encoded bytes equal what was published.
        let mut headers = FieldTable::default();
        headers.insert("k".into(), AMQPValue::LongString("v".into()));
        let properties = AMQPProperties::default()
            .with_delivery_mode(2)
            .with_expiration("1500".into())
            .with_headers(headers.clone())
            .with_content_type("text/plain".into());
        let message = Message::with_properties(
            "ex".into(),
            "rk".into(),
            &properties,
            Bytes::from_static(b"x"),
        );
        assert!(message.is_persistent());
        assert_eq!(message.expiration_ms(), Some(1500));
        assert_eq!(message.headers(), Some(headers));
        assert_eq!(message.properties(), properties);
        let plain = Message::with_properties(
            "".into(),
            "q".into(),
            &AMQPProperties::default().with_expiration("soon".into()),
            Bytes::new(),
        );
        assert!(!plain.is_persistent());
        assert_eq!(plain.expiration_ms(), None);
        assert_eq!(plain.headers(), None);
    }

    #[test]
    fn small_bodies_stop_pinning_the_buffer_they_came_from() {
        // Goal: a small body is copied out of its read buffer; a large one stays a zero-copy slice.
        let buffer = Bytes::from(vec![7u8; 4 * limits::BODY_COPY_SIZE_MAX]);
        let small = buffer.slice(0..16);
        let message = Message::new(
            "".into(),
            "q".into(),
            &AMQPProperties::default(),
            &[0, 0],
            small,
        );
        let inside = |b: &Bytes| {
            let range = buffer.as_ptr_range();
            range.contains(&b.as_ptr())
        };
        assert!(!inside(&message.body), "a small body is copied");
        assert_eq!(&message.body[..], &[7u8; 16]);
        let large = buffer.slice(0..limits::BODY_COPY_SIZE_MAX + 1);
        let message = Message::new(
            "".into(),
            "q".into(),
            &AMQPProperties::default(),
            &[0, 0],
            large,
        );
        assert!(inside(&message.body), "a large body stays zero-copy");
    }

    #[test]
    fn the_name_cache_shares_repeated_names_only() {
        // Goal: equal consecutive names share one allocation; a different name gets its own.
        let mut cache = NameCache::default();
        let a = cache.routing_key("q.1");
        let b = cache.routing_key("q.1");
        assert!(Arc::ptr_eq(&a, &b));
        let c = cache.routing_key("q.2");
        assert_eq!(&*c, "q.2");
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(&*cache.exchange("amq.direct"), "amq.direct");
    }
}
