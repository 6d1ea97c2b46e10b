//! The cluster as the management API shows and changes it (`GET /api/cluster`,
//! `GET /api/cluster/ready`, `POST /api/cluster/members`,
//! `DELETE /api/cluster/members/{node}`): a translation of the cluster
//! member's status and errors; a broker without `--peers` is a one-node
//! cluster of itself. Must not: drive consensus or hold state of its own,
//! or move queues (a draining node does, see `drain`).
//!
//! Removing a member (`DELETE /api/cluster/members/{node}`), repeated by
//! the caller until it answers 204:
//! - a member that is the home of no queue is removed at once (204);
//! - a reachable member that is the home of queues is marked draining
//!   (once; later requests only report) and answers `202 Accepted` with
//!   `{"node", "draining": true, "queues_remaining"}`; the node moves its
//!   queues, metadata and messages, to other voters, then leaves;
//! - an unreachable member that is the home of queues: `409` naming how
//!   many, as their messages cannot be moved; with `?force=true` its queues
//!   are re-homed EMPTY on other voters (their messages are lost; exclusive
//!   ones are deleted) and it is removed (204);
//! - a node that is no longer a member after a drain: 204; a name never
//!   seen: 404; no majority: 503.

use std::time::Duration;

use crate::broker::Broker;
use crate::cluster;
use crate::meta::Command;
use crate::mgmt::Error;
use crate::mgmt::api::{
    ClusterMember, ClusterMemberView, ClusterStatus, ClusterView, MemberDrain, MemberRole,
};

/// The agreed configuration as this node sees it.
pub fn status(broker: &Broker) -> ClusterStatus {
    match broker.cluster() {
        Some(node) => from_cluster(&node.status()),
        None => single_node(broker),
    }
}

/// [`status`] as `GET /api/cluster` serves it, with each member's drain state.
pub fn view(broker: &Broker) -> ClusterView {
    with_draining(status(broker), &broker.draining_nodes())
}

/// `status` with the members named in `draining` marked draining.
pub fn with_draining(status: ClusterStatus, draining: &[String]) -> ClusterView {
    ClusterView {
        members: status
            .members
            .into_iter()
            .map(|member| ClusterMemberView {
                draining: draining.contains(&member.name),
                member,
            })
            .collect(),
        leader: status.leader,
        epoch: status.epoch,
        decided_index: status.decided_index,
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
    let index = node.add_member(name).await.map_err(from_error)?;
    // A drained node that is invited back may be a queue home again.
    if broker.is_draining(name) {
        broker
            .submit(Command::SetDraining {
                node: name.to_string(),
                draining: false,
            })
            .await?;
    }
    Ok(index)
}

/// What a removal request achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// The node is not a member (any more).
    Removed,
    /// The node is moving its queues away; ask again.
    Draining(MemberDrain),
}

/// Removes the member `name` from the agreed configuration, draining it
/// first when it is the home of queues (see the module documentation).
/// Any member takes the request.
pub async fn remove_member(broker: &Broker, name: &str, force: bool) -> Result<Removal, Error> {
    let node = broker.cluster().ok_or_else(single_node_error)?;
    let is_member = node.status().members.iter().any(|m| m.name == name);
    if !is_member {
        if broker.is_draining(name) {
            return Ok(Removal::Removed);
        }
        return Err(from_error(cluster::Error::UnknownMember(name.to_string())));
    }
    let homed = broker.queues_homed_on(name);
    if homed.is_empty() {
        return match node.remove_member(name).await {
            // Removed meanwhile (a drained node removes itself).
            Ok(_) | Err(cluster::Error::UnknownMember(_)) => Ok(Removal::Removed),
            // The drained node is removing itself right now.
            Err(cluster::Error::ChangeInProgress) if broker.is_draining(name) => {
                Ok(Removal::Draining(drain_report(name, 0)))
            }
            Err(err) => Err(from_error(err)),
        };
    }
    let remaining = homed.len() as u64;
    let reachable = name == broker.settings.node_name || probe(node, name).await;
    if !reachable {
        if !force {
            return Err(Error::Unreachable(format!(
                "node '{name}' is unreachable and is the home of {remaining} queue(s) whose \
                 messages cannot be moved; repeat with ?force=true to re-home them empty on \
                 other nodes (their messages are lost) and remove the node"
            )));
        }
        force_remove(broker, node, name, homed).await?;
        return Ok(Removal::Removed);
    }
    if !broker.is_draining(name) {
        broker
            .submit(Command::SetDraining {
                node: name.to_string(),
                draining: true,
            })
            .await?;
    }
    Ok(Removal::Draining(drain_report(name, remaining)))
}

fn drain_report(name: &str, queues_remaining: u64) -> MemberDrain {
    MemberDrain {
        node: name.to_string(),
        draining: true,
        queues_remaining,
    }
}

/// Whether `name`'s cluster port accepts and authenticates a data link.
async fn probe(node: &cluster::ClusterNode, name: &str) -> bool {
    let timeout = Duration::from_millis(crate::limits::DRAIN_PROBE_TIMEOUT_MS);
    matches!(
        tokio::time::timeout(timeout, node.transport().dial_data_link(name, "/")).await,
        Ok(Ok(_))
    )
}

/// Re-homes the queues of the dead member `name` empty on other voters
/// (exclusive ones are deleted), then removes it. Their messages are lost.
async fn force_remove(
    broker: &Broker,
    node: &cluster::ClusterNode,
    name: &str,
    homed: Vec<(String, crate::meta::QueueDef)>,
) -> Result<(), Error> {
    if !broker.is_draining(name) {
        broker
            .submit(Command::SetDraining {
                node: name.to_string(),
                draining: true,
            })
            .await?;
    }
    tracing::warn!(node = %name, queues = homed.len(),
        "removing an unreachable node by force: its queues are re-homed empty, their messages are lost");
    for (vhost, def) in homed {
        let command = if def.exclusive_owner.is_some() {
            Command::DeleteQueue {
                vhost,
                name: def.name,
            }
        } else {
            let home = broker.least_loaded_home(Some(name)).ok_or_else(|| {
                Error::Unavailable(format!(
                    "no voter other than '{name}' that is not draining can take its queues"
                ))
            })?;
            Command::MoveQueue {
                vhost,
                name: def.name,
                home,
            }
        };
        match broker.submit(command).await {
            Ok(_) | Err(crate::meta::MetaError::NotFound(_)) => {}
            Err(err) => return Err(err.into()),
        }
    }
    node.remove_member(name).await.map_err(from_error)?;
    Ok(())
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
        let shown = with_draining(view.clone(), &["c".to_string()]);
        let draining: Vec<bool> = shown.members.iter().map(|m| m.draining).collect();
        assert_eq!(draining, [false, false, true]);
        let json = serde_json::to_value(&shown).expect("serializes");
        assert_eq!(json["members"][2]["draining"], true);
        assert_eq!(json["members"][2]["name"], "c");
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
