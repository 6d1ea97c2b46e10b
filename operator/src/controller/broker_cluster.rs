//! Reconciles a `BrokerCluster`: applies its owned objects, scales down
//! safely (remove from Paxos, then shrink), rolls config changes one pod at
//! a time, and reports status. Object shapes come from `resources`; the
//! decisions (`plan_scale`, `pick_restart`, `compute_status`) are pure.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, Patch};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use synod_broker::mgmt::api::{ClusterStatus, MemberAdd, MemberRole};
use tracing::{info, warn};

use super::{
    BrokerPod, Context, Error, FINALIZER, apply_params, broker_pods, cluster_trust, error_policy,
    event_type, log_controller_error, object_key, with_any_broker,
};
use crate::conditions::{self, READY, condition};
use crate::crd::broker_cluster::Endpoints;
use crate::crd::{BrokerCluster, BrokerClusterStatus};
use crate::resources::{self, AMQP_PORT, AMQPS_PORT, MANAGEMENT_PORT, Names};

/// Kind label of this controller's metrics and logs.
pub const KIND: &str = "BrokerCluster";
/// Condition: every desired replica runs and is a caught-up member.
pub const ALL_REPLICAS_READY: &str = "AllReplicasReady";
/// Condition: the Paxos configuration is exactly the desired pods, all voters, with a leader.
pub const MEMBERSHIP_AGREED: &str = "MembershipAgreed";
/// Condition: the last reconcile applied everything without error.
pub const RECONCILE_SUCCESS: &str = "ReconcileSuccess";

/// Runs the `BrokerCluster` controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=synod-operator");
    let pods = watcher::Config::default()
        .labels("app.kubernetes.io/name=synod,app.kubernetes.io/component=broker");
    Controller::new(
        scoped::<BrokerCluster>(&client, &namespace),
        watcher::Config::default(),
    )
    .owns(scoped::<StatefulSet>(&client, &namespace), owned.clone())
    .owns(scoped::<Service>(&client, &namespace), owned.clone())
    .owns(scoped::<ConfigMap>(&client, &namespace), owned.clone())
    .owns(scoped::<PodDisruptionBudget>(&client, &namespace), owned)
    // Pods belong to the StatefulSet, not to the cluster: map them back
    // through their instance label so readiness changes trigger a reconcile.
    .watches(scoped::<Pod>(&client, &namespace), pods, |pod| {
        let instance = pod.labels().get("app.kubernetes.io/instance")?.clone();
        Some(ObjectRef::new(&instance).within(&pod.namespace()?))
    })
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|result| async move {
        if let Err(err) = result {
            log_controller_error(KIND, &err);
        }
    })
    .await;
}

fn scoped<K>(client: &kube::Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

async fn reconcile(cluster: Arc<BrokerCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let namespace = cluster.namespace().unwrap_or_default();
    let api: Api<BrokerCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, cluster.clone(), |event| async {
        match event {
            FinalizerEvent::Apply(cluster) => apply(cluster, &ctx).await,
            FinalizerEvent::Cleanup(cluster) => cleanup(cluster, &ctx).await,
        }
    })
    .await
    .map_err(|err| Error::Finalizer(Box::new(err)));
    let label = match &result {
        Ok(_) => "success",
        Err(err) => err.metric_label(),
    };
    ctx.metrics
        .observe(KIND, label, started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.reset_backoff(&object_key(cluster.as_ref()));
    }
    result
}

async fn cleanup(cluster: Arc<BrokerCluster>, ctx: &Context) -> Result<Action, Error> {
    // Owned objects go with the cluster through their owner references; the
    // StatefulSet's retention policy decides about the volumes.
    let note = format!(
        "deleting cluster; volumes are {}",
        match cluster.spec.persistent_volume_claim_retention {
            crate::crd::broker_cluster::PvcRetention::Retain => "retained",
            crate::crd::broker_cluster::PvcRetention::Delete => "deleted",
        }
    );
    ctx.publish(
        cluster.as_ref(),
        event_type(false),
        "Deleting",
        "Delete",
        note,
    )
    .await;
    Ok(Action::await_change())
}

async fn apply(cluster: Arc<BrokerCluster>, ctx: &Context) -> Result<Action, Error> {
    // Builders see the effective spec: the operator's broker image fills an absent spec.image.
    let mut effective = cluster.as_ref().clone();
    if effective.spec.image.is_none() {
        effective.spec.image = Some(ctx.settings.broker_image.clone());
    }
    match apply_inner(&effective, ctx).await {
        Ok(action) => Ok(action),
        Err(err) => {
            record_failure(&cluster, ctx, &err).await;
            Err(err)
        }
    }
}

/// Server-side applies `object` (named by its metadata) as `synod-operator`.
async fn apply_object<K>(ctx: &Context, namespace: &str, object: &K) -> Result<K, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let name = object.meta().name.clone().unwrap_or_default();
    Ok(api
        .patch(&name, &apply_params(), &Patch::Apply(object))
        .await?)
}

async fn apply_inner(cluster: &BrokerCluster, ctx: &Context) -> Result<Action, Error> {
    let names = Names::of(cluster)?;
    let ns = names.namespace.clone();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);

    // Credentials are generated once; afterwards they are read back.
    let existing_user = secrets.get_opt(&names.default_user_secret()).await?;
    let credentials = resources::credentials(existing_user.as_ref()).unwrap_or_else(|| {
        (
            format!("synod-{}", resources::random_token(8).to_lowercase()),
            resources::random_token(resources::SECRET_LENGTH),
        )
    });
    apply_object(
        ctx,
        &ns,
        &resources::default_user_secret(cluster, &credentials.0, &credentials.1)?,
    )
    .await?;
    if existing_user.is_none() {
        ctx.publish(
            cluster,
            event_type(false),
            "DefaultUserCreated",
            "CreateSecret",
            format!(
                "generated credentials in Secret {}",
                names.default_user_secret()
            ),
        )
        .await;
    }
    let existing_secret = secrets.get_opt(&names.cluster_secret()).await?;
    let shared = resources::existing_cluster_secret(existing_secret.as_ref())
        .unwrap_or_else(|| resources::random_token(resources::SECRET_LENGTH));
    apply_object(ctx, &ns, &resources::cluster_secret(cluster, &shared)?).await?;

    apply_object(ctx, &ns, &resources::service_account(cluster)?).await?;
    apply_object(ctx, &ns, &resources::client_service(cluster)?).await?;
    apply_object(ctx, &ns, &resources::nodes_service(cluster)?).await?;
    apply_object(ctx, &ns, &resources::pod_disruption_budget(cluster)?).await?;

    let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let current_replicas = sts_api
        .get_opt(&names.cluster)
        .await?
        .and_then(|set| set.spec.and_then(|spec| spec.replicas));
    let pods = broker_pods(ctx, cluster).await?;

    let membership = with_any_broker(ctx, cluster, &credentials, |client| async move {
        client.cluster_status().await
    })
    .await;
    let (membership, membership_error) = match membership {
        Ok(status) => (Some(status), None),
        Err(err) => (None, Some(err.to_string())),
    };

    let desired = cluster.spec.replicas;
    let scaling_down = current_replicas.is_some_and(|current| desired < current);
    let homed_on_top = match (scaling_down, current_replicas) {
        (true, Some(current)) => {
            let top = names.pod(current - 1);
            with_any_broker(ctx, cluster, &credentials, |client| async move {
                client.queues().await
            })
            .await
            .ok()
            .map(|queues| queues.iter().filter(|q| q.node == top).count())
        }
        _ => None,
    };
    let (sts_replicas, step) = plan_scale(
        &names,
        desired,
        current_replicas,
        membership.as_ref(),
        homed_on_top,
    );

    apply_object(
        ctx,
        &ns,
        &resources::config_map(cluster, &names.peers(sts_replicas))?,
    )
    .await?;
    apply_object(ctx, &ns, &resources::stateful_set(cluster, sts_replicas)?).await?;

    let mut progress: Option<String> = None;
    match &step {
        ScaleStep::Steady => {}
        ScaleStep::ScaleUp { from, to } => {
            progress = Some(format!("scaling up from {from} to {to}"));
            ctx.publish(
                cluster,
                event_type(false),
                "ScalingUp",
                "Scale",
                format!("StatefulSet scaled from {from} to {to} replicas"),
            )
            .await;
        }
        ScaleStep::RemoveMember { node } => {
            let node_name = node.clone();
            with_any_broker(ctx, cluster, &credentials, |client| {
                let node = node_name.clone();
                async move { client.remove_member(&node).await }
            })
            .await?;
            progress = Some(format!("removing {node} from the Paxos configuration"));
            ctx.publish(
                cluster,
                event_type(false),
                "RemovingMember",
                "Scale",
                format!("asked the cluster to remove {node} (its queues move to other members)"),
            )
            .await;
        }
        ScaleStep::WaitForQueues { node, queues } => {
            progress = Some(format!("waiting for {queues} queue(s) to move off {node}"));
        }
        ScaleStep::Shrink { to } => {
            progress = Some(format!("scaled down to {to}"));
            ctx.publish(
                cluster,
                event_type(false),
                "ScaledDown",
                "Scale",
                format!("member {} left; StatefulSet shrunk to {to}", names.pod(*to)),
            )
            .await;
        }
        ScaleStep::Blocked { reason } => {
            progress = Some(format!("scale-down blocked: {reason}"));
            ctx.publish(
                cluster,
                event_type(true),
                "ScaleDownBlocked",
                "Scale",
                reason.clone(),
            )
            .await;
        }
    }

    // New pods join the agreed configuration (as learners first). The
    // broker may also join on its own through the seed list; asking twice is harmless.
    if let Some(status) = &membership {
        let members: BTreeSet<&str> = status.members.iter().map(|m| m.name.as_str()).collect();
        let joining: Vec<_> = pods
            .iter()
            .filter(|p| p.ordinal < sts_replicas && !p.terminating && p.url.is_some())
            .filter(|p| !members.contains(p.name.as_str()))
            .filter_map(|p| Some((p.name.clone(), p.peer_address.clone()?)))
            .collect();
        if !members.is_empty() {
            for (name, address) in joining {
                let request = MemberAdd { name, address };
                let result = with_any_broker(ctx, cluster, &credentials, |client| {
                    let request = request.clone();
                    async move { client.add_member(&request).await }
                })
                .await;
                match result {
                    Ok(()) => info!(node = %request.name, "asked the cluster to add a member"),
                    Err(err) => warn!(node = %request.name, error = %err, "member add refused"),
                }
            }
        }
    }

    // Brokers that answer /api/cluster/ready right now: readiness as the
    // broker sees it, also where no kubelet runs the probe.
    let mut broker_ready = BTreeSet::new();
    let trust = cluster_trust(ctx, cluster).await.ok().flatten();
    for pod in pods.iter().filter(|p| p.ordinal < sts_replicas) {
        if let Some(client) = ctx.brokers.client_for(pod, trust.as_ref(), &credentials)
            && matches!(client.is_ready().await, Ok(true))
        {
            broker_ready.insert(pod.ordinal);
        }
    }
    let ready_replicas = i32::try_from(broker_ready.len()).unwrap_or(i32::MAX);

    // Config changes: restart one outdated pod at a time, and only when every
    // pod is back as a caught-up member (so the previous restart rejoined).
    let desired_hash = resources::restart_hash(cluster)?;
    if matches!(step, ScaleStep::Steady) {
        let candidates = restart_candidates(&pods, sts_replicas, &broker_ready, &desired_hash);
        let leader = membership.as_ref().and_then(|m| m.leader.clone());
        match pick_restart(&candidates, sts_replicas, leader.as_deref()) {
            RestartDecision::Restart(name) => {
                Api::<Pod>::namespaced(ctx.client.clone(), &ns)
                    .delete(&name, &DeleteParams::default())
                    .await?;
                progress = Some(format!("restarting {name} for a configuration change"));
                ctx.publish(
                    cluster,
                    event_type(false),
                    "RestartingPod",
                    "RollingUpdate",
                    format!("restarting {name}: its configuration is outdated"),
                )
                .await;
            }
            RestartDecision::Wait(outdated) => {
                progress = Some(format!(
                    "{outdated} pod(s) await a restart once every member is ready"
                ));
            }
            RestartDecision::UpToDate => {}
        }
    }

    let observation = Observation {
        desired,
        sts_replicas,
        ready_replicas,
        membership,
        membership_error,
        progress,
    };
    let previous = cluster.status.clone().unwrap_or_default();
    let status = compute_status(
        cluster,
        &observation,
        &previous.conditions,
        &conditions::now(),
    );
    let was_ready = conditions::is_true(&previous.conditions, READY);
    let is_ready = conditions::is_true(&status.conditions, READY);
    patch_status(ctx, cluster, &status).await?;
    if is_ready && !was_ready {
        ctx.publish(
            cluster,
            event_type(false),
            "ClusterReady",
            "Reconcile",
            format!("{desired} member(s) agree, all ready"),
        )
        .await;
    }
    // Losing readiness is what an operator on call must see in `kubectl
    // describe`: the event carries the condition's reason (a broker that does
    // not answer, a member that fell behind, ...).
    if was_ready
        && !is_ready
        && let Some(ready) = conditions::find(&status.conditions, READY)
    {
        ctx.publish(
            cluster,
            event_type(true),
            &ready.reason,
            "Reconcile",
            format!("the cluster is not ready: {}", ready.message),
        )
        .await;
    }
    if conditions::is_true(&status.conditions, READY) && observation.progress.is_none() {
        Ok(Action::requeue(ctx.settings.resync_interval))
    } else {
        Ok(Action::requeue(ctx.settings.transition_interval))
    }
}

async fn patch_status(
    ctx: &Context,
    cluster: &BrokerCluster,
    status: &BrokerClusterStatus,
) -> Result<(), Error> {
    let api: Api<BrokerCluster> =
        Api::namespaced(ctx.client.clone(), &cluster.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": "synod.dev/v1alpha1",
        "kind": "BrokerCluster",
        "status": status,
    });
    api.patch_status(&cluster.name_any(), &apply_params(), &Patch::Apply(&patch))
        .await?;
    Ok(())
}

/// Writes `ReconcileSuccess=False` and `Ready=False` with the error, and a
/// Warning event. Best effort: the reconcile error itself is what is retried.
async fn record_failure(cluster: &BrokerCluster, ctx: &Context, err: &Error) {
    let previous = cluster.status.clone().unwrap_or_default();
    let status = failure_status(cluster, &previous, err, &conditions::now());
    if let Err(patch_err) = patch_status(ctx, cluster, &status).await {
        warn!(error = %patch_err, "could not record the failure in status");
    }
    ctx.publish(
        cluster,
        event_type(true),
        "ReconcileFailed",
        "Reconcile",
        err.to_string(),
    )
    .await;
}

/// What the next reconcile does about the replica count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScaleStep {
    /// The StatefulSet has the desired size.
    Steady,
    /// The StatefulSet grows; new pods join as learners.
    ScaleUp {
        /// Current size.
        from: i32,
        /// Desired size.
        to: i32,
    },
    /// The highest pod is still a member: remove it from Paxos first.
    RemoveMember {
        /// Node to remove.
        node: String,
    },
    /// The highest pod left Paxos but queues are still homed on it.
    WaitForQueues {
        /// The leaving node.
        node: String,
        /// Queues still homed there.
        queues: usize,
    },
    /// The highest pod left Paxos and holds no queue: the StatefulSet shrinks by one.
    Shrink {
        /// New size.
        to: i32,
    },
    /// Scaling down cannot proceed safely now.
    Blocked {
        /// Why.
        reason: String,
    },
}

/// Decides the StatefulSet size for this reconcile and the scaling step.
///
/// Scale-down goes one pod at a time from the highest ordinal: first the
/// member is removed from the Paxos configuration (the broker moves its
/// queues), then, once it is gone and homes no queue, the StatefulSet
/// shrinks. A removal that would leave fewer live members than a majority of
/// the new configuration is refused.
pub fn plan_scale(
    names: &Names,
    desired: i32,
    current: Option<i32>,
    membership: Option<&ClusterStatus>,
    homed_on_top: Option<usize>,
) -> (i32, ScaleStep) {
    let Some(current) = current else {
        return (desired, ScaleStep::Steady);
    };
    if desired > current {
        return (
            desired,
            ScaleStep::ScaleUp {
                from: current,
                to: desired,
            },
        );
    }
    if desired == current {
        return (desired, ScaleStep::Steady);
    }
    let Some(membership) = membership else {
        return (
            current,
            ScaleStep::Blocked {
                reason: "no broker answered GET /api/cluster".to_string(),
            },
        );
    };
    let top = names.pod(current - 1);
    if membership.members.iter().any(|m| m.name == top) {
        let remaining: Vec<_> = membership
            .members
            .iter()
            .filter(|m| m.name != top)
            .collect();
        let voters = remaining
            .iter()
            .filter(|m| m.role == MemberRole::Voter)
            .count();
        let alive_voters = remaining
            .iter()
            .filter(|m| m.role == MemberRole::Voter && m.alive)
            .count();
        let needed = usize::try_from(resources::majority(
            i32::try_from(voters).unwrap_or(i32::MAX),
        ))
        .unwrap_or(usize::MAX);
        if voters == 0 || alive_voters < needed {
            return (
                current,
                ScaleStep::Blocked {
                    reason: format!(
                        "removing {top} would leave {alive_voters} live voter(s) of {voters}, fewer than a majority ({needed})"
                    ),
                },
            );
        }
        return (current, ScaleStep::RemoveMember { node: top });
    }
    match homed_on_top {
        Some(0) => (current - 1, ScaleStep::Shrink { to: current - 1 }),
        Some(queues) => (current, ScaleStep::WaitForQueues { node: top, queues }),
        None => (
            current,
            ScaleStep::Blocked {
                reason: format!("cannot list queues to check that none is homed on {top}"),
            },
        ),
    }
}

/// A pod considered for a configuration restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartCandidate {
    /// Pod name.
    pub name: String,
    /// Ordinal.
    pub ordinal: i32,
    /// The broker answers `/api/cluster/ready`, Kubernetes reports the pod
    /// Ready, and it is not terminating.
    pub ready: bool,
    /// Its restart hash differs from the desired one.
    pub outdated: bool,
}

/// The pods below `replicas` as restart candidates. A pod counts as ready
/// only when its broker answers `/api/cluster/ready` (it rejoined) AND
/// Kubernetes reports it Ready: the kubelet's probe lags the broker by up to
/// a probe period, and until it passes, Services and the disruption budget
/// count the pod as down, so restarting the next one would take two away.
pub fn restart_candidates(
    pods: &[BrokerPod],
    replicas: i32,
    broker_ready: &BTreeSet<i32>,
    desired_hash: &str,
) -> Vec<RestartCandidate> {
    pods.iter()
        .filter(|p| p.ordinal < replicas)
        .map(|p| RestartCandidate {
            name: p.name.clone(),
            ordinal: p.ordinal,
            ready: broker_ready.contains(&p.ordinal) && p.ready && !p.terminating,
            outdated: p.restart_hash.as_deref() != Some(desired_hash),
        })
        .collect()
}

/// What the rolling restart does now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartDecision {
    /// Nothing is outdated.
    UpToDate,
    /// Delete this pod now.
    Restart(String),
    /// This many pods are outdated, but not every member is ready yet.
    Wait(usize),
}

/// Picks the next pod to restart: only when all `replicas` pods exist and
/// are ready (the previous restart rejoined), highest ordinal first, the
/// Paxos leader last (one election instead of several).
pub fn pick_restart(
    candidates: &[RestartCandidate],
    replicas: i32,
    leader: Option<&str>,
) -> RestartDecision {
    let outdated: Vec<&RestartCandidate> = candidates.iter().filter(|c| c.outdated).collect();
    if outdated.is_empty() {
        return RestartDecision::UpToDate;
    }
    let all_present = usize::try_from(replicas).is_ok_and(|n| candidates.len() == n);
    if !all_present || candidates.iter().any(|c| !c.ready) {
        return RestartDecision::Wait(outdated.len());
    }
    let next = outdated
        .iter()
        .max_by_key(|c| (Some(c.name.as_str()) != leader, c.ordinal))
        .expect("outdated is not empty");
    RestartDecision::Restart(next.name.clone())
}

/// What one reconcile saw, for [`compute_status`].
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// `spec.replicas`.
    pub desired: i32,
    /// Size the StatefulSet was given.
    pub sts_replicas: i32,
    /// Pods whose broker answers `/api/cluster/ready`.
    pub ready_replicas: i32,
    /// `GET /api/cluster`, when a broker answered.
    pub membership: Option<ClusterStatus>,
    /// Why no broker answered.
    pub membership_error: Option<String>,
    /// Scaling or rolling in progress.
    pub progress: Option<String>,
}

/// The status a reconcile reports, conditions merged with `previous`.
pub fn compute_status(
    cluster: &BrokerCluster,
    observation: &Observation,
    previous: &[Condition],
    now: &Time,
) -> BrokerClusterStatus {
    let generation = cluster.metadata.generation;
    let names = Names::of(cluster).ok();
    let expected: BTreeSet<String> = names
        .as_ref()
        .map(|n| (0..observation.desired).map(|i| n.pod(i)).collect())
        .unwrap_or_default();

    let replicas_ready = observation.ready_replicas >= observation.desired
        && observation.sts_replicas == observation.desired;
    let all_ready = condition(
        ALL_REPLICAS_READY,
        replicas_ready,
        if replicas_ready {
            "AllReplicasReady"
        } else {
            "ReplicasNotReady"
        },
        format!(
            "{}/{} broker(s) are caught-up members",
            observation.ready_replicas, observation.desired
        ),
        generation,
        now,
    );

    let membership_condition = match &observation.membership {
        None => condition(
            MEMBERSHIP_AGREED,
            false,
            "BrokerUnreachable",
            observation
                .membership_error
                .clone()
                .unwrap_or_else(|| "no broker answered GET /api/cluster".to_string()),
            generation,
            now,
        ),
        Some(status) => {
            let actual: BTreeSet<String> = status.members.iter().map(|m| m.name.clone()).collect();
            let missing: Vec<_> = expected.difference(&actual).cloned().collect();
            let extra: Vec<_> = actual.difference(&expected).cloned().collect();
            let learners: Vec<_> = status
                .members
                .iter()
                .filter(|m| m.role == MemberRole::Learner)
                .map(|m| m.name.clone())
                .collect();
            let agreed = missing.is_empty()
                && extra.is_empty()
                && learners.is_empty()
                && status.leader.is_some();
            let message = if agreed {
                format!(
                    "{} voter(s) agree at epoch {}, leader {}",
                    actual.len(),
                    status.epoch,
                    status.leader.as_deref().unwrap_or_default()
                )
            } else {
                let mut parts = Vec::new();
                if !missing.is_empty() {
                    parts.push(format!("to join: {}", missing.join(", ")));
                }
                if !extra.is_empty() {
                    parts.push(format!("to leave: {}", extra.join(", ")));
                }
                if !learners.is_empty() {
                    parts.push(format!("catching up: {}", learners.join(", ")));
                }
                if status.leader.is_none() {
                    parts.push("no leader".to_string());
                }
                parts.join("; ")
            };
            condition(
                MEMBERSHIP_AGREED,
                agreed,
                if agreed {
                    "MembersMatchReplicas"
                } else {
                    "MembershipPending"
                },
                message,
                generation,
                now,
            )
        }
    };

    let reconcile = condition(
        RECONCILE_SUCCESS,
        true,
        "ReconcileSucceeded",
        observation
            .progress
            .clone()
            .unwrap_or_else(|| "all objects applied".to_string()),
        generation,
        now,
    );

    let failing = [&all_ready, &membership_condition]
        .into_iter()
        .find(|c| c.status != "True");
    let ready = match failing {
        None => condition(
            READY,
            true,
            "ClusterReady",
            "the cluster serves clients",
            generation,
            now,
        ),
        Some(cause) => condition(
            READY,
            false,
            &cause.reason,
            cause.message.clone(),
            generation,
            now,
        ),
    };

    let (members, leader, epoch) = match &observation.membership {
        Some(status) => (
            status.members.iter().map(|m| m.name.clone()).collect(),
            status.leader.clone(),
            Some(i64::try_from(status.epoch).unwrap_or(i64::MAX)),
        ),
        None => (Vec::new(), None, None),
    };
    BrokerClusterStatus {
        conditions: conditions::merge(
            previous,
            vec![ready, all_ready, membership_condition, reconcile],
        ),
        observed_generation: generation,
        replicas: observation.sts_replicas,
        ready_replicas: observation.ready_replicas,
        member_count: i32::try_from(members.len()).unwrap_or(i32::MAX),
        members,
        leader,
        epoch,
        default_user_secret: names.as_ref().map(|n| n.default_user_secret()),
        endpoints: names.as_ref().map(|n| endpoints(cluster, n)),
    }
}

/// The previous status with `ReconcileSuccess` and `Ready` set to False for `err`.
pub fn failure_status(
    cluster: &BrokerCluster,
    previous: &BrokerClusterStatus,
    err: &Error,
    now: &Time,
) -> BrokerClusterStatus {
    let generation = cluster.metadata.generation;
    let reason = reason_of(err);
    let mut next: Vec<Condition> = previous
        .conditions
        .iter()
        .filter(|c| c.type_ != READY && c.type_ != RECONCILE_SUCCESS)
        .cloned()
        .collect();
    next.insert(
        0,
        condition(READY, false, reason, err.to_string(), generation, now),
    );
    next.push(condition(
        RECONCILE_SUCCESS,
        false,
        reason,
        err.to_string(),
        generation,
        now,
    ));
    BrokerClusterStatus {
        conditions: conditions::merge(&previous.conditions, next),
        ..previous.clone()
    }
}

/// A CamelCase condition reason for `err`.
pub fn reason_of(err: &Error) -> &'static str {
    match err.metric_label() {
        "kube_error" => "KubernetesApiError",
        "invalid_spec" => "InvalidSpec",
        "broker_error" => "BrokerError",
        "broker_unreachable" => "BrokerUnreachable",
        "missing_credentials" => "MissingCredentials",
        _ => "ReconcileFailed",
    }
}

fn endpoints(cluster: &BrokerCluster, names: &Names) -> Endpoints {
    let host = format!("{}.{}.svc", names.cluster, names.namespace);
    if cluster.spec.tls.is_some() {
        Endpoints {
            amqp: format!("amqps://{host}:{AMQPS_PORT}"),
            management: format!("https://{host}:{MANAGEMENT_PORT}"),
        }
    } else {
        Endpoints {
            amqp: format!("amqp://{host}:{AMQP_PORT}"),
            management: format!("http://{host}:{MANAGEMENT_PORT}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::test_support::cluster;
    use synod_broker::mgmt::api::ClusterMember;

    fn names() -> Names {
        Names::of(&cluster()).expect("names")
    }

    fn member(name: &str, role: MemberRole, alive: bool) -> ClusterMember {
        ClusterMember {
            name: name.to_string(),
            incarnation: "i".to_string(),
            role,
            alive,
            lag: 0,
        }
    }

    fn membership(members: &[(&str, bool)], leader: Option<&str>) -> ClusterStatus {
        ClusterStatus {
            members: members
                .iter()
                .map(|(name, alive)| member(name, MemberRole::Voter, *alive))
                .collect(),
            leader: leader.map(str::to_string),
            epoch: 3,
            decided_index: 40,
        }
    }

    fn at(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(seconds).expect("valid"))
    }

    #[test]
    fn scale_up_and_steady_need_no_broker() {
        // Goal: creation, growth and a steady size never wait on the brokers.
        assert_eq!(
            plan_scale(&names(), 3, None, None, None),
            (3, ScaleStep::Steady)
        );
        assert_eq!(
            plan_scale(&names(), 3, Some(3), None, None),
            (3, ScaleStep::Steady)
        );
        assert_eq!(
            plan_scale(&names(), 5, Some(3), None, None),
            (5, ScaleStep::ScaleUp { from: 3, to: 5 })
        );
    }

    #[test]
    fn scale_down_removes_the_member_before_shrinking() {
        // Goal: 5 -> 3 first removes rabbit-4 from Paxos, then waits for queues, then shrinks.
        let five = membership(
            &[
                ("rabbit-0", true),
                ("rabbit-1", true),
                ("rabbit-2", true),
                ("rabbit-3", true),
                ("rabbit-4", true),
            ],
            Some("rabbit-0"),
        );
        assert_eq!(
            plan_scale(&names(), 3, Some(5), Some(&five), None),
            (
                5,
                ScaleStep::RemoveMember {
                    node: "rabbit-4".into()
                }
            )
        );
        let four = membership(
            &[
                ("rabbit-0", true),
                ("rabbit-1", true),
                ("rabbit-2", true),
                ("rabbit-3", true),
            ],
            Some("rabbit-0"),
        );
        assert_eq!(
            plan_scale(&names(), 3, Some(5), Some(&four), Some(2)),
            (
                5,
                ScaleStep::WaitForQueues {
                    node: "rabbit-4".into(),
                    queues: 2
                }
            )
        );
        assert_eq!(
            plan_scale(&names(), 3, Some(5), Some(&four), Some(0)),
            (4, ScaleStep::Shrink { to: 4 })
        );
        // The next round handles rabbit-3 the same way.
        assert_eq!(
            plan_scale(&names(), 3, Some(4), Some(&four), Some(0)),
            (
                4,
                ScaleStep::RemoveMember {
                    node: "rabbit-3".into()
                }
            )
        );
    }

    #[test]
    fn scale_down_never_breaks_the_majority() {
        // Goal: with too few live voters left, or no broker answering, nothing is removed or shrunk.
        let degraded = membership(
            &[
                ("rabbit-0", true),
                ("rabbit-1", false),
                ("rabbit-2", false),
                ("rabbit-3", true),
                ("rabbit-4", true),
            ],
            Some("rabbit-0"),
        );
        let (size, step) = plan_scale(&names(), 3, Some(5), Some(&degraded), Some(0));
        assert_eq!(size, 5);
        assert!(matches!(step, ScaleStep::Blocked { .. }), "{step:?}");
        let (size, step) = plan_scale(&names(), 1, Some(3), None, Some(0));
        assert_eq!(size, 3);
        assert!(matches!(step, ScaleStep::Blocked { .. }), "{step:?}");
        let four = membership(
            &[
                ("rabbit-0", true),
                ("rabbit-1", true),
                ("rabbit-2", true),
                ("rabbit-3", true),
            ],
            Some("rabbit-0"),
        );
        let (size, step) = plan_scale(&names(), 3, Some(5), Some(&four), None);
        assert_eq!(size, 5, "unknown queue homes block the shrink");
        assert!(matches!(step, ScaleStep::Blocked { .. }), "{step:?}");
    }

    fn candidate(ordinal: i32, ready: bool, outdated: bool) -> RestartCandidate {
        RestartCandidate {
            name: format!("rabbit-{ordinal}"),
            ordinal,
            ready,
            outdated,
        }
    }

    #[test]
    fn rolling_restart_goes_one_pod_at_a_time_leader_last() {
        // Goal: only with every pod ready is one pod restarted: highest ordinal first, leader last.
        let all_outdated = [
            candidate(0, true, true),
            candidate(1, true, true),
            candidate(2, true, true),
        ];
        assert_eq!(
            pick_restart(&all_outdated, 3, Some("rabbit-2")),
            RestartDecision::Restart("rabbit-1".into())
        );
        assert_eq!(
            pick_restart(&all_outdated, 3, Some("rabbit-0")),
            RestartDecision::Restart("rabbit-2".into())
        );
        let only_leader = [
            candidate(0, true, true),
            candidate(1, true, false),
            candidate(2, true, false),
        ];
        assert_eq!(
            pick_restart(&only_leader, 3, Some("rabbit-0")),
            RestartDecision::Restart("rabbit-0".into())
        );
        let one_rejoining = [
            candidate(0, true, true),
            candidate(1, true, true),
            candidate(2, false, false),
        ];
        assert_eq!(
            pick_restart(&one_rejoining, 3, None),
            RestartDecision::Wait(2)
        );
        let one_missing = [candidate(0, true, true), candidate(1, true, false)];
        assert_eq!(
            pick_restart(&one_missing, 3, None),
            RestartDecision::Wait(1)
        );
        let current = [candidate(0, true, false), candidate(1, false, false)];
        assert_eq!(pick_restart(&current, 2, None), RestartDecision::UpToDate);
    }

    fn broker_pod(ordinal: i32, pod_ready: bool, hash: &str) -> BrokerPod {
        BrokerPod {
            name: format!("rabbit-{ordinal}"),
            ordinal,
            ready: pod_ready,
            restart_hash: Some(hash.to_string()),
            terminating: false,
            url: Some(format!("http://127.0.0.{}:15672", ordinal + 2)),
            address: None,
            peer_address: None,
        }
    }

    #[test]
    fn a_restarted_pod_counts_only_once_kubernetes_sees_it_ready() {
        // Goal: a broker that rejoined but whose pod is not Ready yet holds the roll back.
        let pods = [
            broker_pod(0, true, "old"),
            broker_pod(1, true, "old"),
            broker_pod(2, false, "new"),
        ];
        let broker_ready = BTreeSet::from([0, 1, 2]);
        let candidates = restart_candidates(&pods, 3, &broker_ready, "new");
        assert_eq!(
            pick_restart(&candidates, 3, Some("rabbit-0")),
            RestartDecision::Wait(2)
        );
        let pods = [
            broker_pod(0, true, "old"),
            broker_pod(1, true, "old"),
            broker_pod(2, true, "new"),
        ];
        let candidates = restart_candidates(&pods, 3, &broker_ready, "new");
        assert_eq!(
            pick_restart(&candidates, 3, Some("rabbit-0")),
            RestartDecision::Restart("rabbit-1".into())
        );
        // And a Ready pod whose broker does not answer is not ready either.
        let candidates = restart_candidates(&pods, 3, &BTreeSet::from([0, 2]), "new");
        assert_eq!(
            pick_restart(&candidates, 3, Some("rabbit-0")),
            RestartDecision::Wait(2)
        );
    }

    #[test]
    fn status_of_a_healthy_cluster_is_ready() {
        // Goal: desired members agreeing with a leader and all ready gives four True conditions.
        let observation = Observation {
            desired: 3,
            sts_replicas: 3,
            ready_replicas: 3,
            membership: Some(membership(
                &[("rabbit-0", true), ("rabbit-1", true), ("rabbit-2", true)],
                Some("rabbit-1"),
            )),
            membership_error: None,
            progress: None,
        };
        let status = compute_status(&cluster(), &observation, &[], &at(10));
        for type_ in [
            READY,
            ALL_REPLICAS_READY,
            MEMBERSHIP_AGREED,
            RECONCILE_SUCCESS,
        ] {
            assert!(
                conditions::is_true(&status.conditions, type_),
                "{type_}: {status:?}"
            );
        }
        assert_eq!(status.members, vec!["rabbit-0", "rabbit-1", "rabbit-2"]);
        assert_eq!(status.member_count, 3);
        assert_eq!(status.leader.as_deref(), Some("rabbit-1"));
        assert_eq!(status.epoch, Some(3));
        assert_eq!(status.observed_generation, Some(4));
        assert_eq!(
            status.default_user_secret.as_deref(),
            Some("rabbit-default-user")
        );
        assert_eq!(
            status.endpoints.map(|e| e.amqp).as_deref(),
            Some("amqp://rabbit.prod.svc:5672")
        );
    }

    #[test]
    fn status_explains_what_is_missing() {
        // Goal: a joining learner and an unready pod make Ready False with the membership reason.
        let mut agreed = membership(&[("rabbit-0", true), ("rabbit-1", true)], Some("rabbit-0"));
        agreed
            .members
            .push(member("rabbit-2", MemberRole::Learner, true));
        let observation = Observation {
            desired: 3,
            sts_replicas: 3,
            ready_replicas: 3,
            membership: Some(agreed),
            membership_error: None,
            progress: None,
        };
        let status = compute_status(&cluster(), &observation, &[], &at(10));
        let ready = conditions::find(&status.conditions, READY).expect("Ready");
        assert_eq!(ready.status, "False");
        assert_eq!(ready.reason, "MembershipPending");
        assert!(
            ready.message.contains("catching up: rabbit-2"),
            "{}",
            ready.message
        );

        let unreachable = Observation {
            desired: 3,
            sts_replicas: 3,
            ready_replicas: 1,
            membership: None,
            membership_error: Some("no broker of rabbit is reachable".into()),
            progress: None,
        };
        let status = compute_status(&cluster(), &unreachable, &[], &at(10));
        let ready = conditions::find(&status.conditions, READY).expect("Ready");
        assert_eq!(ready.reason, "ReplicasNotReady");
        let membership = conditions::find(&status.conditions, MEMBERSHIP_AGREED).expect("cond");
        assert_eq!(membership.reason, "BrokerUnreachable");
        assert!(status.members.is_empty());
    }

    #[test]
    fn failures_keep_other_conditions_and_flip_ready() {
        // Goal: a failed reconcile sets Ready and ReconcileSuccess False with a CamelCase reason.
        let healthy = compute_status(
            &cluster(),
            &Observation {
                desired: 1,
                sts_replicas: 1,
                ready_replicas: 1,
                membership: Some(membership(&[("rabbit-0", true)], Some("rabbit-0"))),
                ..Observation::default()
            },
            &[],
            &at(10),
        );
        let err = Error::NoBrokerReachable("rabbit".into());
        let failed = failure_status(&cluster(), &healthy, &err, &at(20));
        let ready = conditions::find(&failed.conditions, READY).expect("Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "BrokerUnreachable")
        );
        assert_eq!(ready.last_transition_time, at(20));
        let agreed = conditions::find(&failed.conditions, MEMBERSHIP_AGREED).expect("kept");
        assert_eq!(agreed.last_transition_time, at(10));
        assert!(!conditions::is_true(&failed.conditions, RECONCILE_SUCCESS));
        assert_eq!(failed.members, healthy.members);
    }
}
