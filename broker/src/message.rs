//! A published message: routing data, properties and a reference-counted
//! body. A message routed to ten queues is stored once, behind one `Arc`.

use amq_protocol::protocol::basic::AMQPProperties;
use bytes::Bytes;

/// An immutable message as the broker stores it.
#[derive(Debug, Clone)]
pub struct Message {
    /// Exchange it was published to.
    pub exchange: String,
    /// Routing key it was published with.
    pub routing_key: String,
    /// Decoded properties (for headers routing, expiration, dead-lettering).
    pub properties: AMQPProperties,
    /// Encoded properties, copied verbatim into deliveries.
    pub properties_raw: Bytes,
    /// Body: a zero-copy slice of the read buffer when it came in one frame.
    pub body: Bytes,
}

impl Message {
    /// Body size in bytes, as length limits count it.
    pub fn body_size(&self) -> u64 {
        self.body.len() as u64
    }

    /// Whether the publisher asked for persistence (`delivery_mode = 2`).
    pub fn is_persistent(&self) -> bool {
        *self.properties.delivery_mode() == Some(2)
    }

    /// Per-message TTL from the `expiration` property, in milliseconds.
    /// `None` when absent or not a non-negative integer (RabbitMQ rejects
    /// such messages at publish time; see `connection`).
    pub fn expiration_ms(&self) -> Option<u64> {
        self.properties
            .expiration()
            .as_ref()
            .and_then(|e| e.as_str().parse::<u64>().ok())
    }
}
