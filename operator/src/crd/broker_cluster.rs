//! `BrokerCluster`: a Synod broker cluster (spec and status). Types and schema
//! rules only; the controller turns them into Kubernetes objects.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Image used when neither `spec.image` nor the operator's `--broker-image` is set:
/// the release image, which holds both `synod-broker` and `synod-operator`.
pub const DEFAULT_IMAGE: &str = "ghcr.io/synod-dev/synod:0.1.0";
/// Replicas used when `spec.replicas` is not set.
pub const DEFAULT_REPLICAS: i32 = 3;
/// Upper bound on `spec.replicas`: Paxos rounds cost grows with the number of voters.
pub const REPLICAS_MAX: i32 = 15;

/// Broker settings the operator writes itself; `spec.config` may not set them.
pub const OPERATOR_OWNED_CONFIG_KEYS: &[&str] = &[
    "node-name",
    "data-dir",
    "amqp-listen",
    "mgmt-listen",
    "metrics-listen",
    "cluster-listen",
    "peers",
    "cluster-secret-file",
    "tls-cert",
    "tls-key",
    "tls-ca",
    "amqps-listen",
    "config",
];

/// A cluster of `synod-broker` nodes run by a StatefulSet.
#[derive(CustomResource, KubeSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "synod.dev",
    version = "v1alpha1",
    kind = "BrokerCluster",
    namespaced,
    shortname = "bc",
    category = "synod",
    status = "BrokerClusterStatus",
    derive = "PartialEq",
    doc = "A cluster of Synod AMQP brokers whose replicas agree through Paxos.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Desired number of brokers"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Brokers that are caught-up members"
    ),
    printcolumn(
        name = "Members",
        type_ = "integer",
        json_path = ".status.memberCount",
        description = "Members of the agreed Paxos configuration"
    ),
    printcolumn(
        name = "Leader",
        type_ = "string",
        json_path = ".status.leader",
        description = "Current Paxos leader"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Ready condition"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BrokerClusterSpec {
    /// Number of broker nodes. An odd number tolerates the most failures per node.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 15))]
    pub replicas: i32,
    /// Container image with the `synod-broker` binary; the operator's
    /// `--broker-image` (its own release image by default) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,
    /// Image pull policy (`Always`, `IfNotPresent`, `Never`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// CPU and memory of each broker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Persistent volume of each broker. Immutable: a StatefulSet's volume claim template cannot change.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("storage is immutable"))]
    pub storage: StorageSpec,
    /// Additional broker settings: keys of the broker's TOML config file with
    /// integer or string values, e.g. `{"heartbeat": 30}`. Keys the operator
    /// sets itself are refused. A change restarts the brokers one at a time.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "super::config_schema")]
    #[x_kube(validation = Rule::new(
        "!self.exists(k, k in ['node-name', 'data-dir', 'amqp-listen', 'mgmt-listen', 'metrics-listen', 'cluster-listen', 'peers', 'cluster-secret-file', 'tls-cert', 'tls-key', 'tls-ca', 'amqps-listen', 'config'])"
    ).message("config may not set keys the operator manages (listen addresses, node-name, data-dir, peers, cluster-secret-file, tls-*)"))]
    pub config: BTreeMap<String, IntOrString>,
    /// TLS for AMQP (5671), the management API, metrics and cluster traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// The client Service `X`.
    #[serde(default)]
    pub service: ServiceSpec,
    /// Scheduling constraints of the broker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Taints the broker pods tolerate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Overrides merged into the broker pod template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodTemplateOverride>,
    /// What happens to the broker volumes when the `BrokerCluster` is deleted.
    #[serde(default)]
    pub persistent_volume_claim_retention: PvcRetention,
}

/// Image pull policy of the broker container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PullPolicy {
    /// Pull on every start.
    Always,
    /// Pull when the node does not have it.
    IfNotPresent,
    /// Never pull.
    Never,
}

impl PullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Volume of each broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Requested size of each broker's volume, e.g. `10Gi`.
    #[serde(default = "default_storage_size")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub size: String,
    /// StorageClass of the volumes; the cluster default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            size: default_storage_size(),
            storage_class_name: None,
        }
    }
}

/// TLS certificates of the brokers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Secret with `tls.crt`, `tls.key` and `ca.crt` (the CA brokers verify
    /// peers with; cert-manager writes all three), mounted at `/etc/synod/tls`.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

/// The client Service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service type.
    #[serde(default, rename = "type")]
    pub kind: ServiceType,
    /// Annotations of the Service (load-balancer settings, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Type of the client Service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    #[default]
    ClusterIP,
    /// Also on a port of every node.
    NodePort,
    /// Also through a cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Pod-template settings merged over what the operator generates.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateOverride {
    /// Extra pod labels (the operator's own labels win on conflict).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra pod annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Node labels the pods must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Priority class of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// How the pods spread over failure domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// Secrets for pulling the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Grace period for the drain on shutdown (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub termination_grace_period_seconds: Option<i64>,
}

/// Whether broker volumes outlive their `BrokerCluster`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PvcRetention {
    /// Keep the volumes (and the data) when the cluster is deleted.
    #[default]
    Retain,
    /// Delete the volumes with the cluster.
    Delete,
}

impl PvcRetention {
    /// The StatefulSet `persistentVolumeClaimRetentionPolicy` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            PvcRetention::Retain => "Retain",
            PvcRetention::Delete => "Delete",
        }
    }
}

/// Observed state of a `BrokerCluster`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerClusterStatus {
    /// `Ready`, `AllReplicasReady`, `MembershipAgreed`, `ReconcileSuccess`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pods of the StatefulSet.
    #[serde(default)]
    pub replicas: i32,
    /// Pods that are caught-up members (readiness `/api/cluster/ready`).
    #[serde(default)]
    pub ready_replicas: i32,
    /// Members of the configuration agreed through Paxos.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// Number of `members` (for `kubectl get`).
    #[serde(default)]
    pub member_count: i32,
    /// Current Paxos leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// Configuration epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<i64>,
    /// Secret holding the default user's `username` and `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_user_secret: Option<String>,
    /// Where clients connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Endpoints>,
}

/// Client endpoints of a cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    /// `amqp://X.<ns>.svc:5672` (or `amqps://...:5671` with TLS).
    pub amqp: String,
    /// `http://X.<ns>.svc:15672` (or `https://` with TLS).
    pub management: String,
}

fn default_replicas() -> i32 {
    DEFAULT_REPLICAS
}

fn default_storage_size() -> String {
    "1Gi".to_string()
}

impl BrokerClusterSpec {
    /// A spec with every schema default, as the API server would fill it in.
    pub fn with_defaults() -> BrokerClusterSpec {
        BrokerClusterSpec {
            replicas: DEFAULT_REPLICAS,
            image: None,
            image_pull_policy: None,
            resources: None,
            storage: StorageSpec::default(),
            config: BTreeMap::new(),
            tls: None,
            service: ServiceSpec::default(),
            affinity: None,
            tolerations: None,
            pod_template: None,
            persistent_volume_claim_retention: PvcRetention::Retain,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn schema_has_defaults_ranges_and_immutable_storage() {
        // Goal: the generated schema carries replicas' default and range and storage's CEL rule.
        let crd = serde_json::to_value(BrokerCluster::crd()).expect("serializes");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let replicas = &spec["properties"]["replicas"];
        assert_eq!(replicas["default"], 3);
        assert_eq!(replicas["minimum"].as_f64(), Some(1.0));
        assert_eq!(replicas["maximum"].as_f64(), Some(f64::from(REPLICAS_MAX)));
        let storage = &spec["properties"]["storage"];
        assert_eq!(
            storage["x-kubernetes-validations"][0]["rule"],
            "self == oldSelf"
        );
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "bc");
    }

    #[test]
    fn empty_spec_deserializes_to_the_defaults() {
        // Goal: `spec: {}` means three replicas of the default image with retained volumes.
        let spec: BrokerClusterSpec = serde_json::from_str("{}").expect("parses");
        assert_eq!(spec, BrokerClusterSpec::with_defaults());
    }

    #[test]
    fn operator_owned_keys_match_the_cel_rule() {
        // Goal: the Rust list and the CEL rule name the same keys, so neither drifts.
        let crd = serde_json::to_string(&BrokerCluster::crd()).expect("serializes");
        for key in OPERATOR_OWNED_CONFIG_KEYS {
            assert!(
                crd.contains(&format!("'{key}'")),
                "{key} missing from CEL rule"
            );
        }
    }
}
