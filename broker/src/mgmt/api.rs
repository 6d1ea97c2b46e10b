//! Request and response types of the management API, shared by the broker
//! (server side) and the operator (client side). Defined once, never twice.
//!
//! The JSON shapes follow RabbitMQ's management API (snake_case keys, the same
//! field names) so that existing tools keep working. This module holds data
//! only: no routing, no validation beyond what serde does, no broker logic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Optional arguments of an exchange, queue or binding (`x-message-ttl`, ...).
///
/// A sorted map so that equal argument sets serialize identically.
pub type Arguments = BTreeMap<String, serde_json::Value>;

/// The body of every error response: `{"error": ..., "reason": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// A short machine-readable kind, e.g. `not_found`, `bad_request`.
    pub error: String,
    /// A human-readable explanation.
    pub reason: String,
}

/// The exchange types the broker routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeType {
    /// Routes on exact routing-key equality.
    Direct,
    /// Routes to every bound destination.
    Fanout,
    /// Routes on dotted routing-key patterns (`*`, `#`).
    Topic,
    /// Routes on message headers (`x-match`).
    Headers,
}

impl ExchangeType {
    /// The name used on the wire and in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeType::Direct => "direct",
            ExchangeType::Fanout => "fanout",
            ExchangeType::Topic => "topic",
            ExchangeType::Headers => "headers",
        }
    }
}

/// `PUT /api/exchanges/{vhost}/{name}`: declares an exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExchangeDeclare {
    /// Routing type.
    #[serde(rename = "type")]
    pub kind: ExchangeType,
    /// Survives a broker restart.
    #[serde(default)]
    pub durable: bool,
    /// Deleted when its last binding goes.
    #[serde(default)]
    pub auto_delete: bool,
    /// Cannot be published to directly, only through exchange-to-exchange bindings.
    #[serde(default)]
    pub internal: bool,
    /// Optional arguments (`alternate-exchange`, ...).
    #[serde(default)]
    pub arguments: Arguments,
}

/// An element of `GET /api/exchanges[/{vhost}[/{name}]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExchangeInfo {
    /// Exchange name (empty for the default exchange).
    pub name: String,
    /// Virtual host.
    pub vhost: String,
    /// Routing type.
    #[serde(rename = "type")]
    pub kind: ExchangeType,
    /// Survives a broker restart.
    pub durable: bool,
    /// Deleted when its last binding goes.
    pub auto_delete: bool,
    /// Cannot be published to directly.
    #[serde(default)]
    pub internal: bool,
    /// Optional arguments.
    #[serde(default)]
    pub arguments: Arguments,
}

/// `PUT /api/queues/{vhost}/{name}`: declares a queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueDeclare {
    /// Survives a broker restart.
    #[serde(default)]
    pub durable: bool,
    /// Deleted when its last consumer goes.
    #[serde(default)]
    pub auto_delete: bool,
    /// Optional arguments (`x-message-ttl`, `x-max-length`, ...).
    #[serde(default)]
    pub arguments: Arguments,
    /// Preferred home node; the broker picks one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// An element of `GET /api/queues[/{vhost}[/{name}]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueInfo {
    /// Queue name.
    pub name: String,
    /// Virtual host.
    pub vhost: String,
    /// Survives a broker restart.
    pub durable: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Owned by one connection.
    #[serde(default)]
    pub exclusive: bool,
    /// Optional arguments.
    #[serde(default)]
    pub arguments: Arguments,
    /// The home node: the member that stores the queue's messages.
    pub node: String,
    /// Messages ready plus unacknowledged.
    #[serde(default)]
    pub messages: u64,
    /// Messages ready for delivery.
    #[serde(default)]
    pub messages_ready: u64,
    /// Messages delivered and not yet acknowledged.
    #[serde(default)]
    pub messages_unacknowledged: u64,
    /// Number of consumers.
    #[serde(default)]
    pub consumers: u64,
    /// `running`, or another state the broker reports.
    #[serde(default)]
    pub state: String,
}

/// Whether a binding's destination is a queue or an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DestinationType {
    /// A queue (`q` in binding paths).
    Queue,
    /// An exchange (`e` in binding paths; exchange-to-exchange binding).
    Exchange,
}

impl DestinationType {
    /// The path segment RabbitMQ uses: `q` or `e`.
    pub fn path_segment(self) -> &'static str {
        match self {
            DestinationType::Queue => "q",
            DestinationType::Exchange => "e",
        }
    }
}

/// `POST /api/bindings/{vhost}/e/{source}/{q|e}/{destination}`: creates a binding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BindingDeclare {
    /// Routing key (may be empty).
    #[serde(default)]
    pub routing_key: String,
    /// Optional arguments (headers exchange match rules, ...).
    #[serde(default)]
    pub arguments: Arguments,
}

/// An element of `GET /api/bindings[...]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BindingInfo {
    /// Source exchange.
    pub source: String,
    /// Virtual host.
    pub vhost: String,
    /// Destination queue or exchange.
    pub destination: String,
    /// Whether the destination is a queue or an exchange.
    pub destination_type: DestinationType,
    /// Routing key (may be empty).
    #[serde(default)]
    pub routing_key: String,
    /// Optional arguments.
    #[serde(default)]
    pub arguments: Arguments,
    /// The `{props}` path segment that identifies this binding for `DELETE`.
    pub properties_key: String,
}

/// `PUT /api/vhosts/{name}`: creates a virtual host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostDeclare {
    /// Free-form description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Comma-separated tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<String>,
}

/// An element of `GET /api/vhosts[/{name}]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostInfo {
    /// Virtual host name.
    pub name: String,
    /// Free-form description.
    #[serde(default)]
    pub description: String,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// `PUT /api/users/{name}`: creates or updates a user.
///
/// Exactly one of `password` and `password_hash` is given; an empty
/// `password_hash` creates a user that cannot log in with a password.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDeclare {
    /// Clear-text password; the broker stores only its hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Base64 salted hash, as RabbitMQ exports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// Hash algorithm of `password_hash`, e.g. `rabbit_password_hashing_sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashing_algorithm: Option<String>,
    /// Comma-separated tags (`administrator`, `monitoring`, ...).
    #[serde(default)]
    pub tags: String,
}

/// An element of `GET /api/users[/{name}]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// User name.
    pub name: String,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Base64 salted hash.
    #[serde(default)]
    pub password_hash: String,
    /// Hash algorithm of `password_hash`.
    #[serde(default)]
    pub hashing_algorithm: String,
}

/// `PUT /api/permissions/{vhost}/{user}`: grants permissions (regexes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermissionDeclare {
    /// Resources the user may declare and delete.
    pub configure: String,
    /// Resources the user may publish to / bind from.
    pub write: String,
    /// Resources the user may consume from / bind to.
    pub read: String,
}

/// An element of `GET /api/permissions[/{vhost}/{user}]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermissionInfo {
    /// User name.
    pub user: String,
    /// Virtual host.
    pub vhost: String,
    /// Configure regex.
    pub configure: String,
    /// Write regex.
    pub write: String,
    /// Read regex.
    pub read: String,
}

/// Object counts in [`Overview`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectTotals {
    /// Open client connections.
    pub connections: u64,
    /// Open channels.
    pub channels: u64,
    /// Exchanges, in all vhosts.
    pub exchanges: u64,
    /// Queues, in all vhosts.
    pub queues: u64,
    /// Consumers.
    pub consumers: u64,
}

/// Message counts over all queues in [`Overview`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueTotals {
    /// Ready plus unacknowledged.
    pub messages: u64,
    /// Ready for delivery.
    pub messages_ready: u64,
    /// Delivered, not yet acknowledged.
    pub messages_unacknowledged: u64,
}

/// Message counters since start in [`Overview`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageStats {
    /// Messages published.
    #[serde(default)]
    pub publish: u64,
    /// Publisher confirms sent.
    #[serde(default)]
    pub confirm: u64,
    /// Messages delivered to consumers or fetched.
    #[serde(default)]
    pub deliver_get: u64,
    /// Acknowledgements received.
    #[serde(default)]
    pub ack: u64,
    /// Redeliveries.
    #[serde(default)]
    pub redeliver: u64,
    /// Unroutable messages returned to publishers.
    #[serde(default)]
    pub return_unroutable: u64,
    /// Unroutable messages dropped.
    #[serde(default)]
    pub drop_unroutable: u64,
}

/// `GET /api/overview`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overview {
    /// Version of the management API.
    pub management_version: String,
    /// Product name (`Synod`).
    pub product_name: String,
    /// Product version.
    pub product_version: String,
    /// Name of the cluster.
    pub cluster_name: String,
    /// Name of the node that answered.
    pub node: String,
    /// Object counts.
    pub object_totals: ObjectTotals,
    /// Message counts over all queues.
    pub queue_totals: QueueTotals,
    /// Message counters since start.
    #[serde(default)]
    pub message_stats: MessageStats,
}

/// A member's role in the agreed configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberRole {
    /// Votes in Paxos.
    Voter,
    /// Catches up on the decided log; does not vote yet.
    Learner,
}

/// One member in [`ClusterStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMember {
    /// Node name.
    pub name: String,
    /// Disk incarnation id: a node that lost its disk comes back with a new one.
    pub incarnation: String,
    /// Voter or learner.
    pub role: MemberRole,
    /// Whether the answering node currently hears from this member.
    pub alive: bool,
    /// How many decided entries this member is behind the answering node.
    pub lag: u64,
}

/// `GET /api/cluster`: the agreed configuration as seen by the answering node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Members of the current configuration.
    pub members: Vec<ClusterMember>,
    /// Name of the current Paxos leader, if one is known.
    #[serde(default)]
    pub leader: Option<String>,
    /// Configuration epoch: incremented by every decided membership change.
    pub epoch: u64,
    /// Index of the last decided log entry the answering node knows.
    pub decided_index: u64,
}

/// `POST /api/cluster/members`: asks the cluster to add a node (as a learner first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberAdd {
    /// Node name.
    pub name: String,
    /// Cluster address `host:port` of the node.
    pub address: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_declare_uses_rabbitmq_keys() {
        // Goal: the declare body has RabbitMQ's `type` and `auto_delete` keys.
        let body = ExchangeDeclare {
            kind: ExchangeType::Topic,
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: Arguments::new(),
        };
        let json = serde_json::to_value(&body).expect("serializes");
        assert_eq!(json["type"], "topic");
        assert_eq!(json["auto_delete"], false);
        assert_eq!(json["durable"], true);
    }

    #[test]
    fn rabbitmq_queue_listing_parses() {
        // Goal: an element of RabbitMQ's GET /api/queues decodes, extra keys ignored.
        let text = r#"{"name":"q1","vhost":"/","durable":true,"auto_delete":false,
            "exclusive":false,"arguments":{"x-max-length":10},"node":"rabbit@a",
            "messages":3,"messages_ready":2,"messages_unacknowledged":1,
            "consumers":0,"state":"running","policy":null}"#;
        let queue: QueueInfo = serde_json::from_str(text).expect("parses");
        assert_eq!(queue.node, "rabbit@a");
        assert_eq!(queue.arguments["x-max-length"], 10);
        assert_eq!(queue.messages_ready, 2);
    }

    #[test]
    fn cluster_status_round_trips() {
        // Goal: ClusterStatus keeps every field through JSON, roles in lowercase.
        let status = ClusterStatus {
            members: vec![ClusterMember {
                name: "x-0".into(),
                incarnation: "abc".into(),
                role: MemberRole::Learner,
                alive: true,
                lag: 4,
            }],
            leader: Some("x-0".into()),
            epoch: 2,
            decided_index: 17,
        };
        let json = serde_json::to_string(&status).expect("serializes");
        assert!(json.contains("\"role\":\"learner\""), "{json}");
        let back: ClusterStatus = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, status);
    }

    #[test]
    fn binding_paths_use_q_and_e() {
        // Goal: destination types map to RabbitMQ's path segments.
        assert_eq!(DestinationType::Queue.path_segment(), "q");
        assert_eq!(DestinationType::Exchange.path_segment(), "e");
        let info: BindingInfo = serde_json::from_str(
            r#"{"source":"s","vhost":"/","destination":"d","destination_type":"exchange",
                "routing_key":"k","arguments":{},"properties_key":"k"}"#,
        )
        .expect("parses");
        assert_eq!(info.destination_type, DestinationType::Exchange);
    }
}
