//! Custom resource types of `synod.dev/v1alpha1`: specs, statuses, schema
//! rules. Types only: nothing here talks to the API server or to brokers.

// Several `printcolumn(...)` entries repeat `type_ = "string"`; clippy reads
// the repeated key-value pairs inside `#[kube(...)]` as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub mod binding;
pub mod broker_cluster;
pub mod exchange;
pub mod queue;

pub use binding::{Binding, BindingSpec};
pub use broker_cluster::{BrokerCluster, BrokerClusterSpec, BrokerClusterStatus};
pub use exchange::{Exchange, ExchangeSpec};
pub use queue::{Queue, QueueSpec};

/// API group of every Synod resource.
pub const GROUP: &str = "synod.dev";
/// API version of every Synod resource.
pub const VERSION: &str = "v1alpha1";
/// Category: `kubectl get synod` lists every Synod resource.
pub const CATEGORY: &str = "synod";

/// Every CRD this operator serves, as `(file stem, definition)`.
pub fn all() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("brokercluster", BrokerCluster::crd()),
        ("exchange", Exchange::crd()),
        ("queue", Queue::crd()),
        ("binding", Binding::crd()),
    ]
}

/// Names the `BrokerCluster` (in the same namespace) that topology belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterRef {
    /// Name of the `BrokerCluster` in the same namespace.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
}

/// Status shared by `Exchange`, `Queue` and `Binding`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopologyStatus {
    /// `Ready`: the object is declared on the broker as specified.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Default virtual host of topology objects.
pub(crate) fn default_vhost() -> String {
    "/".to_string()
}

pub(crate) fn default_true() -> bool {
    true
}

/// Upper bound on the keys of `arguments` and `config` maps; it also bounds
/// the cost the API server estimates for their CEL rules.
pub const ARGUMENTS_MAX: u32 = 64;

/// Schema of AMQP arguments: an object of any JSON values, kept as given
/// (RabbitMQ arguments may be strings, numbers, booleans or tables). The API
/// server can compare such objects as wholes in CEL, which is all the
/// immutability rules need.
pub(crate) fn arguments_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": ARGUMENTS_MAX,
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Schema of broker settings: a map of integer-or-string values. Typed
/// values, unlike free-form ones, give the API server a CEL map type, so a
/// rule can refuse the keys the operator manages.
pub(crate) fn config_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": ARGUMENTS_MAX,
        "additionalProperties": { "x-kubernetes-int-or-string": true },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_crds_match_the_types() {
        // Goal: crds/*.yaml is exactly what crdgen writes now (the same check as scripts/test).
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
        for (stem, crd) in all() {
            let path = dir.join(format!("{stem}.yaml"));
            let committed = std::fs::read_to_string(&path).expect("committed CRD file");
            let generated = serde_yaml::to_string(&crd).expect("serializes");
            assert!(
                committed == generated,
                "{} is stale: run `cargo run -p synod-operator --bin crdgen`",
                path.display()
            );
        }
    }

    #[test]
    fn every_kind_is_namespaced_in_the_synod_group_and_category() {
        // Goal: the four CRDs share group, version, scope and category, and have a status subresource.
        let crds = all();
        assert_eq!(crds.len(), 4);
        for (stem, crd) in crds {
            assert_eq!(crd.spec.group, GROUP, "{stem}");
            assert_eq!(crd.spec.scope, "Namespaced", "{stem}");
            assert_eq!(crd.spec.names.kind.to_lowercase(), stem);
            let categories = crd.spec.names.categories.clone().unwrap_or_default();
            assert_eq!(categories, vec![CATEGORY.to_string()], "{stem}");
            let version = &crd.spec.versions[0];
            assert_eq!(version.name, VERSION);
            assert!(
                version
                    .subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some(),
                "{stem} has a status subresource"
            );
            let columns: Vec<_> = version
                .additional_printer_columns
                .iter()
                .flatten()
                .map(|c| c.name.clone())
                .collect();
            assert!(
                columns.contains(&"Ready".to_string()),
                "{stem}: {columns:?}"
            );
            assert!(columns.contains(&"Age".to_string()), "{stem}: {columns:?}");
        }
    }
}
