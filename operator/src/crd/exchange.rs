//! `Exchange`: an AMQP exchange declared on a `BrokerCluster`. Types and
//! schema rules only; the controller declares it through the management API.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use synod_broker::mgmt::api::ExchangeType;

use super::{ClusterRef, TopologyStatus, default_true, default_vhost};

/// An exchange on a Synod cluster.
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "synod.dev",
    version = "v1alpha1",
    kind = "Exchange",
    namespaced,
    shortname = "ex",
    category = "synod",
    status = "TopologyStatus",
    derive = "PartialEq",
    doc = "An AMQP exchange declared on a Synod BrokerCluster.",
    printcolumn(
        name = "Cluster",
        type_ = "string",
        json_path = ".spec.clusterRef.name"
    ),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
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
pub struct ExchangeSpec {
    /// The `BrokerCluster` to declare the exchange on. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("clusterRef is immutable"))]
    pub cluster_ref: ClusterRef,
    /// Exchange name on the broker. Immutable; `amq.` names are reserved.
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("name is immutable"))]
    #[x_kube(validation = Rule::new("!self.startsWith('amq.')").message("names starting with 'amq.' are reserved"))]
    pub name: String,
    /// Virtual host. Immutable.
    #[serde(default = "default_vhost")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("vhost is immutable"))]
    pub vhost: String,
    /// Routing type: `direct`, `fanout`, `topic` or `headers`. Immutable.
    #[serde(rename = "type")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("type is immutable"))]
    pub kind: ExchangeKind,
    /// Survives broker restarts. Immutable.
    #[serde(default = "default_true")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("durable is immutable"))]
    pub durable: bool,
    /// Deleted by the broker when its last binding goes. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("autoDelete is immutable"))]
    pub auto_delete: bool,
    /// Optional arguments (`alternate-exchange`, ...). Immutable.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "super::arguments_schema")]
    pub arguments: BTreeMap<String, serde_json::Value>,
}

/// Exchange routing type, as the resource spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// Exact routing-key match.
    Direct,
    /// Every bound destination.
    Fanout,
    /// Dotted patterns with `*` and `#`.
    Topic,
    /// Header matching.
    Headers,
}

impl From<ExchangeKind> for ExchangeType {
    fn from(kind: ExchangeKind) -> ExchangeType {
        match kind {
            ExchangeKind::Direct => ExchangeType::Direct,
            ExchangeKind::Fanout => ExchangeType::Fanout,
            ExchangeKind::Topic => ExchangeType::Topic,
            ExchangeKind::Headers => ExchangeType::Headers,
        }
    }
}
