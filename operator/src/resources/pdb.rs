//! Builder of the PodDisruptionBudget `X`: voluntary disruptions (drains,
//! evictions) may never take away the Paxos majority. Pure: no API calls.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{Error, Names, owned_metadata, selector_labels};
use crate::crd::BrokerCluster;

/// Size of a majority of `voters`: `floor(n/2) + 1`.
pub fn majority(voters: i32) -> i32 {
    voters / 2 + 1
}

/// PodDisruptionBudget `X`: at least a majority of the replicas stay available.
pub fn pod_disruption_budget(cluster: &BrokerCluster) -> Result<PodDisruptionBudget, Error> {
    let names = Names::of(cluster)?;
    Ok(PodDisruptionBudget {
        metadata: owned_metadata(cluster, names.cluster, "broker")?,
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(majority(cluster.spec.replicas))),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(cluster)),
                match_expressions: None,
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::test_support::{cluster, cluster_with};

    #[test]
    fn majority_table() {
        // Goal: floor(n/2)+1 for the sizes that matter.
        for (voters, expected) in [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (7, 4)] {
            assert_eq!(majority(voters), expected, "n = {voters}");
        }
    }

    #[test]
    fn pdb_keeps_a_majority_of_the_replicas() {
        // Goal: minAvailable is the majority of spec.replicas and the selector picks the brokers.
        let mut spec = cluster().spec;
        spec.replicas = 5;
        let pdb = pod_disruption_budget(&cluster_with(spec)).expect("builds");
        let spec = pdb.spec.expect("spec");
        assert_eq!(spec.min_available, Some(IntOrString::Int(3)));
        assert_eq!(spec.max_unavailable, None);
        assert_eq!(
            spec.selector.and_then(|s| s.match_labels),
            Some(selector_labels(&cluster()))
        );
        assert!(pdb.metadata.owner_references.is_some());
    }
}
