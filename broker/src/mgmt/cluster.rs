//! The cluster as the management API shows and changes it (`GET /api/cluster`,
//! `GET /api/cluster/ready`, `POST /api/cluster/members`,
//! `DELETE /api/cluster/members/{node}`): a translation of the cluster
//! member's status and errors; a broker without `--peers` is a one-node
//! cluster of itself. Must not: drive consensus or hold state of its own.

use crate::broker::Broker;
use crate::cluster;
use crate::mgmt::Error;
use crate::mgmt::api::{ClusterMember, ClusterStatus, MemberRole};

/// The agreed configuration as this node sees it.
pub fn status(broker: &Broker) -> ClusterStatus {
    match broker.cluster() {
        Some(node) => from_cluster(&node.status()),
        None => single_node(broker),
    }
}

fn single_node(broker: &Broker) -> ClusterStatus {
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

/// The API's shape of the cluster member's status.
pub fn from_cluster(status: &cluster::ClusterStatus) -> ClusterStatus {
    let members = status
        .members
        .iter()
        .map(|member| ClusterMember {
            name: member.name.clone(),
            incarnation: member.incarnation.clone(),
            role: if member.role == "voter" {
                MemberRole::Voter
            } else {
                MemberRole::Learner
            },
            // A follower hears only from the leader, so it cannot know
            // about the others; it reports what it does know: itself and
            // the leader it follows.
            alive: member.alive.unwrap_or_else(|| {
                member.name == status.node || Some(&member.name) == status.leader.as_ref()
            }),
            lag: member.lag.unwrap_or(0),
        })
        .collect();
    ClusterStatus {
        members,
        leader: status.leader.clone(),
        epoch: status.epoch,
        decided_index: status.decided_index,
    }
}

/// Whether this node is a caught-up member of the agreed configuration.
/// A single node is its own configuration, so it is ready once it serves.
pub fn is_ready(broker: &Broker) -> bool {
    broker.cluster().is_none_or(|node| node.status().ready)
}

/// Adds the node `name` (running, with this cluster in its seed list);
/// resolves once it votes. Any member takes the request; a follower passes
/// it to the leader.
pub async fn add_member(broker: &Broker, name: &str) -> Result<u64, Error> {
    let node = broker.cluster().ok_or_else(single_node_error)?;
    node.add_member(name).await.map_err(from_error)
}

/// Removes the member `name` from the agreed configuration; any member
/// takes the request.
pub async fn remove_member(broker: &Broker, name: &str) -> Result<u64, Error> {
    let node = broker.cluster().ok_or_else(single_node_error)?;
    node.remove_member(name).await.map_err(from_error)
}

fn single_node_error() -> Error {
    Error::Conflict("this node runs without --peers: it is a cluster of one".into())
}

/// The HTTP meaning of a cluster error.
fn from_error(err: cluster::Error) -> Error {
    use cluster::Error as C;
    let reason = err.to_string();
    match err {
        C::UnknownMember(_) => Error::NotFound(reason),
        C::InvalidChange(_) => Error::BadRequest(reason),
        C::ChangeInProgress => Error::InProgress(reason),
        // No leader reachable, timeouts, a full queue or a stopped node:
        // try again later.
        _ => Error::Unavailable(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follower_view_maps_roles_and_unknown_liveness() {
        // Goal: a follower's unknown liveness shows itself and the leader alive, others not; roles map.
        let member = |name: &str, role: &str| cluster::MemberInfo {
            name: name.into(),
            incarnation: "00".into(),
            role: role.into(),
            alive: None,
            lag: None,
        };
        let status = cluster::ClusterStatus {
            node: "b".into(),
            incarnation: "00".into(),
            role: "follower".into(),
            leader: Some("a".into()),
            epoch: 3,
            decided_index: 7,
            ballot: 2,
            ready: true,
            members: vec![
                member("a", "voter"),
                member("b", "voter"),
                member("c", "learner"),
            ],
        };
        let view = from_cluster(&status);
        let alive: Vec<bool> = view.members.iter().map(|m| m.alive).collect();
        assert_eq!(alive, [true, true, false]);
        assert_eq!(view.members[2].role, MemberRole::Learner);
        assert_eq!((view.epoch, view.decided_index), (3, 7));
        assert_eq!(view.leader.as_deref(), Some("a"));
    }

    #[test]
    fn cluster_errors_get_http_statuses() {
        // Goal: membership errors map to 404/400/503 as a client can act on them.
        assert_eq!(
            from_error(cluster::Error::UnknownMember("x".into())).status(),
            axum::http::StatusCode::NOT_FOUND
        );
        assert_eq!(
            from_error(cluster::Error::NotLeader { leader: None }).status(),
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            from_error(cluster::Error::InvalidChange("no".into())).status(),
            axum::http::StatusCode::BAD_REQUEST
        );
        assert_eq!(
            from_error(cluster::Error::ChangeInProgress).status(),
            axum::http::StatusCode::CONFLICT
        );
        assert_eq!(
            from_error(cluster::Error::NoQuorum).status(),
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
