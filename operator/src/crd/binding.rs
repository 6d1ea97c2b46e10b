//! `Binding`: a binding from an exchange to a queue or exchange on a
//! `BrokerCluster`. Types and schema rules only.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use synod_broker::mgmt::api::DestinationType;

use super::{ClusterRef, TopologyStatus, default_vhost};

/// A binding on a Synod cluster. Every field is immutable: a binding is its identity.
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "synod.dev",
    version = "v1alpha1",
    kind = "Binding",
    namespaced,
    category = "synod",
    status = "TopologyStatus",
    derive = "PartialEq",
    doc = "A binding from an exchange to a queue or exchange on a Synod BrokerCluster.",
    printcolumn(
        name = "Cluster",
        type_ = "string",
        json_path = ".spec.clusterRef.name"
    ),
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.source"),
    printcolumn(
        name = "Destination",
        type_ = "string",
        json_path = ".spec.destination"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "has(self.arguments) == has(oldSelf.arguments) && (!has(self.arguments) || self.arguments == oldSelf.arguments)"
).message("arguments are immutable"))]
#[serde(rename_all = "camelCase")]
pub struct BindingSpec {
    /// The `BrokerCluster` to declare the binding on. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("clusterRef is immutable"))]
    pub cluster_ref: ClusterRef,
    /// Virtual host. Immutable.
    #[serde(default = "default_vhost")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("vhost is immutable"))]
    pub vhost: String,
    /// Source exchange. Immutable.
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("source is immutable"))]
    pub source: String,
    /// Destination queue or exchange. Immutable.
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("destination is immutable"))]
    pub destination: String,
    /// Whether `destination` is a `queue` or an `exchange`. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("destinationType is immutable"))]
    pub destination_type: BindingDestinationType,
    /// Routing key (may be empty). Immutable.
    #[serde(default)]
    #[schemars(length(max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("routingKey is immutable"))]
    pub routing_key: String,
    /// Optional arguments (headers-exchange match rules, ...). Immutable.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "super::arguments_schema")]
    pub arguments: BTreeMap<String, serde_json::Value>,
}

/// Destination kind, as the resource spells it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BindingDestinationType {
    /// A queue.
    #[default]
    Queue,
    /// An exchange (exchange-to-exchange binding).
    Exchange,
}

impl From<BindingDestinationType> for DestinationType {
    fn from(kind: BindingDestinationType) -> DestinationType {
        match kind {
            BindingDestinationType::Queue => DestinationType::Queue,
            BindingDestinationType::Exchange => DestinationType::Exchange,
        }
    }
}
