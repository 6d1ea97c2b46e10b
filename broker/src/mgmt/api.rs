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
    /// Comma-separated tags (`administrator`, `monitoring`, ...); a JSON
    /// list of tags is accepted too, as RabbitMQ 3.9+ does.
    #[serde(default, deserialize_with = "tags_as_string")]
    pub tags: String,
}

/// An element of `GET /api/users[/{name}]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// User name.
    pub name: String,
    /// Tags (a comma-separated string, as older RabbitMQ versions send, is accepted).
    #[serde(default, deserialize_with = "tags_as_list")]
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

/// An element of `GET /api/user-limits[/{user}]`: `{"user": "guest",
/// "value": {"max-connections": 10}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserLimitsInfo {
    /// User name.
    pub user: String,
    /// Limit name (`max-connections`, `max-channels`) to its bound.
    pub value: BTreeMap<String, i64>,
}

/// An element of `GET /api/vhost-limits[/{vhost}]`: `{"vhost": "/",
/// "value": {"max-queues": 100}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostLimitsInfo {
    /// Virtual host.
    pub vhost: String,
    /// Limit name (`max-connections`, `max-queues`) to its bound.
    pub value: BTreeMap<String, i64>,
}

/// Body of `PUT /api/user-limits/{user}/{name}` and
/// `PUT /api/vhost-limits/{vhost}/{name}`: `{"value": 10}`; a negative
/// value removes the limit, 0 allows nothing (as RabbitMQ).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitValue {
    /// The bound.
    pub value: i64,
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

/// A member as `GET /api/cluster` shows it: [`ClusterMember`] plus its
/// drain state (kept apart so that clients built against the older shape
/// still construct and read `ClusterMember`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMemberView {
    /// The member.
    #[serde(flatten)]
    pub member: ClusterMember,
    /// Whether the member is moving its queues away before it leaves
    /// (`DELETE /api/cluster/members/{node}`).
    #[serde(default)]
    pub draining: bool,
}

/// `GET /api/cluster` as served: [`ClusterStatus`] with each member's
/// drain state. Reads as a [`ClusterStatus`] too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// Members of the current configuration.
    pub members: Vec<ClusterMemberView>,
    /// Name of the current Paxos leader, if one is known.
    #[serde(default)]
    pub leader: Option<String>,
    /// Configuration epoch: incremented by every decided membership change.
    pub epoch: u64,
    /// Index of the last decided log entry the answering node knows.
    pub decided_index: u64,
}

/// `DELETE /api/cluster/members/{node}` while the node's queues are moving
/// (202): repeat the request until it answers 204.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberDrain {
    /// Node name.
    pub node: String,
    /// Always true: the node is draining.
    pub draining: bool,
    /// Queues still homed on the node.
    pub queues_remaining: u64,
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

/// Tags as RabbitMQ writes them: a comma-separated string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum TagsWire {
    Text(String),
    List(Vec<String>),
}

impl TagsWire {
    fn into_list(self) -> Vec<String> {
        match self {
            TagsWire::Text(text) => split_tags(&text),
            TagsWire::List(list) => list.into_iter().filter(|t| !t.is_empty()).collect(),
        }
    }
}

/// Splits `"administrator, monitoring"` into tags, dropping empty ones.
pub fn split_tags(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

fn tags_as_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<TagsWire>::deserialize(d)?
        .map(TagsWire::into_list)
        .unwrap_or_default())
}

fn tags_as_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(tags_as_list(d)?.join(","))
}

/// An element of `GET /api/nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Always `disc`: every node keeps metadata on disk.
    #[serde(rename = "type")]
    pub kind: String,
    /// Whether the node is running (always true for the answering node).
    pub running: bool,
    /// Resident memory of the broker process, in bytes.
    #[serde(default)]
    pub mem_used: u64,
    /// Memory alarm threshold (ready message bytes), in bytes.
    #[serde(default)]
    pub mem_limit: u64,
    /// Whether the memory alarm is raised.
    #[serde(default)]
    pub mem_alarm: bool,
    /// Whether the disk alarm is raised.
    #[serde(default)]
    pub disk_free_alarm: bool,
    /// `--disk-free-limit` in force, in bytes.
    #[serde(default)]
    pub disk_free_limit: u64,
    /// Free bytes on the data directory's file system (0 when unreadable).
    #[serde(default)]
    pub disk_free: u64,
    /// Milliseconds since the node started.
    #[serde(default)]
    pub uptime: u64,
}

/// An element of `GET /api/connections`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// `client_ip:port -> server_ip:port`; the `{name}` of `DELETE /api/connections/{name}`.
    pub name: String,
    /// Node serving the connection.
    pub node: String,
    /// Authenticated user.
    pub user: String,
    /// Virtual host.
    pub vhost: String,
    /// Client address.
    pub peer_host: String,
    /// Client port.
    pub peer_port: u16,
    /// When the connection opened, milliseconds since the Unix epoch.
    pub connected_at: u64,
    /// Open channels.
    pub channels: u64,
    /// `running`.
    pub state: String,
    /// `AMQP 0-9-1`.
    pub protocol: String,
}

/// The connection a channel belongs to, in [`ChannelInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionDetails {
    /// Connection name.
    pub name: String,
    /// Client address.
    pub peer_host: String,
    /// Client port.
    pub peer_port: u16,
}

/// An element of `GET /api/channels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelInfo {
    /// `connection name (number)`.
    pub name: String,
    /// Node serving the channel.
    pub node: String,
    /// Channel number.
    pub number: u16,
    /// User of the connection.
    pub user: String,
    /// Virtual host.
    pub vhost: String,
    /// Consumers on the channel.
    pub consumer_count: u64,
    /// Deliveries not yet acknowledged.
    pub messages_unacknowledged: u64,
    /// Per-consumer prefetch limit.
    pub prefetch_count: u64,
    /// Publisher confirms enabled.
    pub confirm: bool,
    /// Transactional mode.
    pub transactional: bool,
    /// `running`.
    pub state: String,
    /// The owning connection.
    pub connection_details: ConnectionDetails,
}

/// `GET /api/health/checks/alarms` (200 `ok`, 503 `failed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// `ok` or `failed`.
    pub status: String,
    /// Why the check failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Raised alarms, e.g. `memory`, `disk`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alarms: Vec<String>,
}

/// A user in a definitions document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefinitionsUser {
    /// User name.
    pub name: String,
    /// Base64 salted hash (empty: no password login).
    #[serde(default)]
    pub password_hash: String,
    /// Hash algorithm; absent means `rabbit_password_hashing_sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashing_algorithm: Option<String>,
    /// Tags (a list, or a comma-separated string in older exports).
    #[serde(default, deserialize_with = "tags_as_list")]
    pub tags: Vec<String>,
    /// The user's limits (`max-connections`, `max-channels`), as RabbitMQ
    /// exports them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, i64>,
}

/// A runtime parameter in a definitions document. Synod imports and
/// exports only component `vhost-limits` (name `limits`), where RabbitMQ
/// keeps vhost limits: `{"vhost": "/", "component": "vhost-limits",
/// "name": "limits", "value": {"max-queues": 10}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefinitionsParameter {
    /// Virtual host.
    pub vhost: String,
    /// Plugin or feature the parameter belongs to.
    pub component: String,
    /// Parameter name.
    pub name: String,
    /// Parameter value.
    pub value: serde_json::Value,
}

/// A vhost in a definitions document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefinitionsVhost {
    /// Vhost name.
    pub name: String,
}

/// A queue in a definitions document (no runtime counts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefinitionsQueue {
    /// Queue name.
    pub name: String,
    /// Virtual host.
    pub vhost: String,
    /// Survives a restart.
    #[serde(default)]
    pub durable: bool,
    /// Deleted when its last consumer goes.
    #[serde(default)]
    pub auto_delete: bool,
    /// Optional arguments.
    #[serde(default)]
    pub arguments: Arguments,
}

/// A binding in a definitions document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefinitionsBinding {
    /// Source exchange.
    pub source: String,
    /// Virtual host.
    pub vhost: String,
    /// Destination queue or exchange.
    pub destination: String,
    /// Whether the destination is a queue or an exchange.
    pub destination_type: DestinationType,
    /// Routing key.
    #[serde(default)]
    pub routing_key: String,
    /// Optional arguments.
    #[serde(default)]
    pub arguments: Arguments,
}

/// `GET|POST /api/definitions`: RabbitMQ's definitions export format.
///
/// Sections Synod does not implement (`policies`, `parameters`,
/// `global_parameters`, `topic_permissions`, ...) are kept in `other` so
/// that an import can say which ones it ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Definitions {
    /// Version of the exporting broker (RabbitMQ 3.x key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbit_version: Option<String>,
    /// Version of the exporting broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq_version: Option<String>,
    /// Product that exported the document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_name: Option<String>,
    /// Version of that product.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_version: Option<String>,
    /// Users.
    #[serde(default)]
    pub users: Vec<DefinitionsUser>,
    /// Virtual hosts.
    #[serde(default)]
    pub vhosts: Vec<DefinitionsVhost>,
    /// Permissions.
    #[serde(default)]
    pub permissions: Vec<PermissionInfo>,
    /// Exchanges.
    #[serde(default)]
    pub exchanges: Vec<ExchangeInfo>,
    /// Queues.
    #[serde(default)]
    pub queues: Vec<DefinitionsQueue>,
    /// Bindings.
    #[serde(default)]
    pub bindings: Vec<DefinitionsBinding>,
    /// Runtime parameters; only vhost limits are imported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parameters: Vec<DefinitionsParameter>,
    /// Every other top-level key, not imported.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// The answer to `POST /api/definitions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefinitionsImported {
    /// Objects created or confirmed, by section (`users`, `queues`, ...).
    pub imported: BTreeMap<String, u64>,
    /// Non-empty sections that were not imported, with a note why.
    #[serde(default)]
    pub ignored: Vec<String>,
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
    fn tags_are_accepted_as_string_or_list() {
        // Goal: both tag encodings RabbitMQ has used decode to the same tags.
        let a: UserDeclare =
            serde_json::from_str(r#"{"password":"p","tags":["administrator","monitoring"]}"#)
                .expect("list");
        let b: UserDeclare =
            serde_json::from_str(r#"{"password":"p","tags":"administrator, monitoring"}"#)
                .expect("string");
        assert_eq!(a.tags, "administrator,monitoring");
        assert_eq!(b.tags, a.tags);
        let user: DefinitionsUser =
            serde_json::from_str(r#"{"name":"u","password_hash":"","tags":"management"}"#)
                .expect("old export");
        assert_eq!(user.tags, ["management"]);
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
