//! The cluster as the management API shows it (`GET /api/cluster`,
//! `GET /api/cluster/ready`). Today a single node: one voting member, itself,
//! leading. The cluster module replaces these two functions' bodies when
//! it runs Paxos; the routes stay as they are.
//! Must not: drive consensus or hold state of its own.

use crate::broker::Broker;
use crate::mgmt::api::{ClusterMember, ClusterStatus, MemberRole};

/// The agreed configuration as this node sees it.
pub fn status(broker: &Broker) -> ClusterStatus {
    let node = broker.settings.node_name.clone();
    let metrics = &broker.metrics;
    ClusterStatus {
        members: vec![ClusterMember {
            name: node.clone(),
            incarnation: String::new(),
            role: MemberRole::Voter,
            alive: true,
            lag: 0,
        }],
        leader: Some(node),
        epoch: u64::try_from(metrics.paxos_epoch.get()).unwrap_or(0),
        decided_index: u64::try_from(metrics.paxos_decided_index.get()).unwrap_or(0),
    }
}

/// Whether this node is a caught-up member of the agreed configuration.
/// A single node is its own configuration, so it is ready once it serves.
pub fn is_ready(_broker: &Broker) -> bool {
    true
}
