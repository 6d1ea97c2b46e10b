//! Pure builders of the Kubernetes objects a `BrokerCluster` becomes:
//! `&BrokerCluster -> Service`, `StatefulSet`, ... No I/O, no clock, no API
//! calls: the controller applies what these return, tests inspect it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::BrokerCluster;

mod config;
mod pdb;
mod secret;
mod service;
mod stateful_set;

pub use config::{CONFIG_FILE_KEY, TLS_CA_KEY, broker_config_toml, config_map};
pub use pdb::{majority, pod_disruption_budget};
pub use secret::{
    CLUSTER_SECRET_KEY, PASSWORD_KEY, SECRET_LENGTH, USERNAME_KEY, cluster_secret, credentials,
    default_user_secret, existing_cluster_secret, random_token,
};
pub use service::{client_service, nodes_service, service_account};
pub use stateful_set::{RESTART_HASH_ANNOTATION, restart_hash, stateful_set};

/// AMQP 0-9-1 port.
pub const AMQP_PORT: i32 = 5672;
/// AMQP over TLS port.
pub const AMQPS_PORT: i32 = 5671;
/// Management HTTP API port.
pub const MANAGEMENT_PORT: i32 = 15672;
/// Prometheus `/metrics` port.
pub const METRICS_PORT: i32 = 15692;
/// Cluster traffic port (Paxos, forwarding).
pub const CLUSTER_PORT: i32 = 25672;

/// `app.kubernetes.io/name` of everything the operator creates.
pub const APP_NAME: &str = "synod";
/// `app.kubernetes.io/managed-by` of everything the operator creates.
pub const MANAGED_BY: &str = "synod-operator";

/// Errors building objects from a spec the schema could not rule out.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object has no name, namespace or uid (it was not read from the API server).
    #[error("BrokerCluster lacks metadata.{0}")]
    MissingMetadata(&'static str),
    /// A `spec.config` value cannot be written as TOML.
    #[error("spec.config.{key}: {reason}")]
    InvalidConfig {
        /// The offending key.
        key: String,
        /// Why it cannot be written.
        reason: String,
    },
}

/// Names of the objects of cluster `X`, derived in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// `X`: client Service, ServiceAccount, StatefulSet, PodDisruptionBudget.
    pub cluster: String,
    /// Namespace of everything.
    pub namespace: String,
}

impl Names {
    /// Names of `cluster`'s objects; fails on objects not read from the API server.
    pub fn of(cluster: &BrokerCluster) -> Result<Names, Error> {
        let namespace = cluster
            .namespace()
            .ok_or(Error::MissingMetadata("namespace"))?;
        if cluster.metadata.name.is_none() {
            return Err(Error::MissingMetadata("name"));
        }
        Ok(Names {
            cluster: cluster.name_any(),
            namespace,
        })
    }

    /// `X-nodes`: the headless Service giving pods stable DNS names.
    pub fn nodes_service(&self) -> String {
        format!("{}-nodes", self.cluster)
    }

    /// `X-default-user`: credentials of the default (administrator) user.
    pub fn default_user_secret(&self) -> String {
        format!("{}-default-user", self.cluster)
    }

    /// `X-cluster-secret`: the secret every peer proves to the others.
    pub fn cluster_secret(&self) -> String {
        format!("{}-cluster-secret", self.cluster)
    }

    /// `X-config`: the broker's TOML configuration.
    pub fn config_map(&self) -> String {
        format!("{}-config", self.cluster)
    }

    /// `X-i`: pod (and broker node) of ordinal `i`.
    pub fn pod(&self, ordinal: i32) -> String {
        format!("{}-{ordinal}", self.cluster)
    }

    /// Stable DNS name of pod `X-i` through the headless Service.
    pub fn pod_host(&self, ordinal: i32) -> String {
        format!(
            "{}.{}.{}.svc",
            self.pod(ordinal),
            self.nodes_service(),
            self.namespace
        )
    }

    /// The seed list `X-0=X-0.X-nodes.<ns>.svc:25672,...` for `replicas` pods.
    pub fn peers(&self, replicas: i32) -> String {
        (0..replicas)
            .map(|i| format!("{}={}:{CLUSTER_PORT}", self.pod(i), self.pod_host(i)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Ordinal of a pod or node name `X-i` of this cluster.
    pub fn ordinal_of(&self, pod_or_node: &str) -> Option<i32> {
        pod_or_node
            .strip_prefix(&self.cluster)?
            .strip_prefix('-')?
            .parse()
            .ok()
            .filter(|ordinal: &i32| *ordinal >= 0)
    }
}

/// Labels selecting the broker pods of a cluster (stable: part of the StatefulSet selector).
pub fn selector_labels(cluster: &BrokerCluster) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), APP_NAME.to_string()),
        ("app.kubernetes.io/instance".to_string(), cluster.name_any()),
        (
            "app.kubernetes.io/component".to_string(),
            "broker".to_string(),
        ),
    ])
}

/// Standard labels of an object of `component` belonging to `cluster`.
pub fn labels(cluster: &BrokerCluster, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), APP_NAME.to_string()),
        ("app.kubernetes.io/instance".to_string(), cluster.name_any()),
        (
            "app.kubernetes.io/component".to_string(),
            component.to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGED_BY.to_string(),
        ),
    ])
}

/// The controller owner reference that ties an object's life to `cluster`.
pub fn owner_reference(cluster: &BrokerCluster) -> Result<OwnerReference, Error> {
    cluster
        .controller_owner_ref(&())
        .ok_or(Error::MissingMetadata("uid"))
}

/// Metadata of an owned object: name, namespace, standard labels, owner reference.
pub(crate) fn owned_metadata(
    cluster: &BrokerCluster,
    name: String,
    component: &str,
) -> Result<ObjectMeta, Error> {
    let names = Names::of(cluster)?;
    Ok(ObjectMeta {
        name: Some(name),
        namespace: Some(names.namespace),
        labels: Some(labels(cluster, component)),
        owner_references: Some(vec![owner_reference(cluster)?]),
        ..ObjectMeta::default()
    })
}

#[cfg(test)]
pub(crate) mod test_support {
    //! A `BrokerCluster` as the API server would return it.

    use crate::crd::{BrokerCluster, BrokerClusterSpec};

    /// Cluster `rabbit` in namespace `prod` with every default and a uid.
    pub fn cluster() -> BrokerCluster {
        cluster_with(BrokerClusterSpec::with_defaults())
    }

    /// Cluster `rabbit` in namespace `prod` with `spec` and a uid.
    pub fn cluster_with(spec: BrokerClusterSpec) -> BrokerCluster {
        let mut cluster = BrokerCluster::new("rabbit", spec);
        cluster.metadata.namespace = Some("prod".into());
        cluster.metadata.uid = Some("0b7c6a8e-uid".into());
        cluster.metadata.generation = Some(4);
        cluster
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::cluster;
    use super::*;

    #[test]
    fn names_follow_the_design_contract() {
        // Goal: every derived name and the peer list match DESIGN.md's `X-...` names.
        let names = Names::of(&cluster()).expect("complete metadata");
        assert_eq!(names.nodes_service(), "rabbit-nodes");
        assert_eq!(names.default_user_secret(), "rabbit-default-user");
        assert_eq!(names.config_map(), "rabbit-config");
        assert_eq!(names.pod(2), "rabbit-2");
        assert_eq!(
            names.peers(2),
            "rabbit-0=rabbit-0.rabbit-nodes.prod.svc:25672,rabbit-1=rabbit-1.rabbit-nodes.prod.svc:25672"
        );
        assert_eq!(names.ordinal_of("rabbit-12"), Some(12));
        assert_eq!(names.ordinal_of("rabbitmq-1"), None);
        assert_eq!(names.ordinal_of("rabbit-x"), None);
    }

    #[test]
    fn owned_metadata_has_labels_and_a_controller_owner_reference() {
        // Goal: owned objects carry the four standard labels and a controller owner ref.
        let meta = owned_metadata(&cluster(), "rabbit".into(), "broker").expect("builds");
        let labels = meta.labels.expect("labels");
        assert_eq!(labels["app.kubernetes.io/name"], "synod");
        assert_eq!(labels["app.kubernetes.io/instance"], "rabbit");
        assert_eq!(labels["app.kubernetes.io/component"], "broker");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "synod-operator");
        let owner = &meta.owner_references.expect("owner refs")[0];
        assert_eq!(owner.kind, "BrokerCluster");
        assert_eq!(owner.api_version, "synod.dev/v1alpha1");
        assert_eq!(owner.uid, "0b7c6a8e-uid");
        assert_eq!(owner.controller, Some(true));
    }

    #[test]
    fn objects_not_from_the_api_server_are_refused() {
        // Goal: without a uid there is no owner reference, so builders fail instead of orphaning.
        let mut cluster = cluster();
        cluster.metadata.uid = None;
        assert!(matches!(
            owner_reference(&cluster),
            Err(Error::MissingMetadata("uid"))
        ));
    }
}
