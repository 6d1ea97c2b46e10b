//! `Queue`: an AMQP queue declared on a `BrokerCluster`. Types and schema
//! rules only; the controller declares it through the management API.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ClusterRef, TopologyStatus, default_true, default_vhost};

/// A queue on a Synod cluster.
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "synod.dev",
    version = "v1alpha1",
    kind = "Queue",
    namespaced,
    shortname = "q",
    category = "synod",
    status = "TopologyStatus",
    derive = "PartialEq",
    doc = "An AMQP queue declared on a Synod BrokerCluster.",
    printcolumn(
        name = "Cluster",
        type_ = "string",
        json_path = ".spec.clusterRef.name"
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
pub struct QueueSpec {
    /// The `BrokerCluster` to declare the queue on. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("clusterRef is immutable"))]
    pub cluster_ref: ClusterRef,
    /// Queue name on the broker. Immutable; `amq.` names are reserved.
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("name is immutable"))]
    #[x_kube(validation = Rule::new("!self.startsWith('amq.')").message("names starting with 'amq.' are reserved"))]
    pub name: String,
    /// Virtual host. Immutable.
    #[serde(default = "default_vhost")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("vhost is immutable"))]
    pub vhost: String,
    /// Survives broker restarts. Immutable.
    #[serde(default = "default_true")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("durable is immutable"))]
    pub durable: bool,
    /// Deleted by the broker when its last consumer goes. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("autoDelete is immutable"))]
    pub auto_delete: bool,
    /// Optional arguments (`x-message-ttl`, `x-max-length`, ...). Immutable.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "super::arguments_schema")]
    pub arguments: BTreeMap<String, serde_json::Value>,
    /// Whether deleting this resource deletes the queue (and its messages) on the broker.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// What deleting a `Queue` resource does on the broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeletionPolicy {
    /// Delete the queue and its messages.
    #[default]
    Delete,
    /// Leave the queue on the broker.
    Retain,
}
