//! Reconcile, cleanup and status shared by the topology kinds (`Exchange`,
//! `Queue`, `Binding`): declare through a broker's management API as the
//! cluster's default user, delete on the broker behind a finalizer. Each
//! kind only says how to declare and delete itself (the [`Topology`] trait).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, Patch};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    Context, Error, FINALIZER, apply_params, cluster_credentials, error_policy, event_type,
    log_controller_error, object_key, with_any_broker,
};
use crate::broker_client::{self, BrokerClient};
use crate::conditions::{self, READY, condition};
use crate::crd::{BrokerCluster, TopologyStatus};

/// Re-check interval while the referenced cluster does not exist.
pub const MISSING_CLUSTER_RECHECK: Duration = Duration::from_secs(60);

/// A topology kind: how it names its cluster and declares/deletes itself.
pub(crate) trait Topology:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + DeserializeOwned
    + Serialize
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// Kind label for metrics and logs.
    const KIND: &'static str;
    /// `apiVersion` written in status patches.
    const API_VERSION: &'static str = "synod.dev/v1alpha1";

    /// Name of the referenced `BrokerCluster`.
    fn cluster_name(&self) -> &str;
    /// The current status.
    fn topology_status(&self) -> Option<&TopologyStatus>;
    /// A short description for conditions and events, e.g. `exchange "x" in vhost "/"`.
    fn describe(&self) -> String;
    /// Declares the object on the broker (idempotent).
    fn declare(
        &self,
        client: BrokerClient,
    ) -> impl Future<Output = Result<(), broker_client::Error>> + Send;
    /// Deletes the object on the broker; absent counts as deleted.
    fn remove(
        &self,
        client: BrokerClient,
    ) -> impl Future<Output = Result<(), broker_client::Error>> + Send;
    /// Whether deleting the resource leaves the broker object in place.
    fn retain_on_delete(&self) -> bool {
        false
    }
}

/// Runs the controller of topology kind `K` until `shutdown` resolves.
pub(crate) async fn run<K: Topology>(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (objects, clusters): (Api<K>, Api<BrokerCluster>) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let controller = Controller::new(objects, watcher::Config::default());
    let store = controller.store();
    controller
        // A cluster becoming ready (or going away) re-checks the objects that
        // reference it at once instead of at their next backoff.
        .watches(clusters, watcher::Config::default(), move |cluster| {
            let namespace = cluster.namespace();
            let name = cluster.name_any();
            store
                .state()
                .into_iter()
                .filter(|object| object.namespace() == namespace && object.cluster_name() == name)
                .map(|object| ObjectRef::from_obj(object.as_ref()))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile::<K>, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                log_controller_error(K::KIND, &err);
            }
        })
        .await;
}

async fn reconcile<K: Topology>(object: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &object.namespace().unwrap_or_default());
    let result = finalizer(&api, FINALIZER, object.clone(), |event| async {
        match event {
            FinalizerEvent::Apply(object) => apply(object, &ctx).await,
            FinalizerEvent::Cleanup(object) => cleanup(object, &ctx).await,
        }
    })
    .await
    .map_err(|err| Error::Finalizer(Box::new(err)));
    let label = match &result {
        Ok(_) => "success",
        Err(err) => err.metric_label(),
    };
    ctx.metrics
        .observe(K::KIND, label, started.elapsed().as_secs_f64());
    result
}

/// Why a topology object is not declared, as its `Ready` condition says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClusterProblem {
    /// `clusterRef` names no `BrokerCluster`.
    NotFound,
    /// The cluster is being deleted.
    Deleting,
    /// The cluster exists but is not `Ready`.
    NotReady,
}

/// Checks the referenced cluster; `Ok(cluster)` when declarations can proceed.
pub(crate) fn check_cluster(
    cluster: Option<BrokerCluster>,
) -> Result<BrokerCluster, (ClusterProblem, String)> {
    let Some(cluster) = cluster else {
        return Err((
            ClusterProblem::NotFound,
            "the referenced BrokerCluster does not exist".to_string(),
        ));
    };
    if cluster.metadata.deletion_timestamp.is_some() {
        return Err((
            ClusterProblem::Deleting,
            format!("BrokerCluster {} is being deleted", cluster.name_any()),
        ));
    }
    let conditions = cluster
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    if !conditions::is_true(conditions, READY) {
        let why = conditions::find(conditions, READY)
            .map(|c| format!("{}: {}", c.reason, c.message))
            .unwrap_or_else(|| "no status yet".to_string());
        return Err((
            ClusterProblem::NotReady,
            format!("BrokerCluster {} is not ready ({why})", cluster.name_any()),
        ));
    }
    Ok(cluster)
}

impl ClusterProblem {
    fn reason(&self) -> &'static str {
        match self {
            ClusterProblem::NotFound => "ClusterNotFound",
            ClusterProblem::Deleting => "ClusterDeleting",
            ClusterProblem::NotReady => "ClusterNotReady",
        }
    }
}

async fn apply<K: Topology>(object: Arc<K>, ctx: &Context) -> Result<Action, Error> {
    let namespace = object.namespace().unwrap_or_default();
    let clusters: Api<BrokerCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    let key = object_key(object.as_ref());
    let cluster = match check_cluster(clusters.get_opt(object.cluster_name()).await?) {
        Ok(cluster) => cluster,
        Err((not_ready, message)) => {
            set_ready(ctx, object.as_ref(), false, not_ready.reason(), &message).await?;
            // Waiting is not a failure of ours, but it must not spin: a missing
            // cluster is re-checked slowly, a not-ready one with backoff (its
            // watch also wakes us as soon as it changes).
            let delay = match not_ready {
                ClusterProblem::NotFound | ClusterProblem::Deleting => MISSING_CLUSTER_RECHECK,
                ClusterProblem::NotReady => ctx.next_backoff(&key),
            };
            return Ok(Action::requeue(delay));
        }
    };
    let credentials = cluster_credentials(ctx, &cluster).await?;
    let declared = with_any_broker(ctx, &cluster, &credentials, |client| {
        let object = object.clone();
        async move { object.declare(client).await }
    })
    .await;
    match declared {
        Ok(()) => {
            set_ready(ctx, object.as_ref(), true, "Declared", &object.describe()).await?;
            ctx.reset_backoff(&key);
            Ok(Action::requeue(ctx.settings.resync_interval))
        }
        Err(err) => {
            let reason = match &err {
                Error::Broker(broker)
                    if broker.status().is_some_and(|s| (400..500).contains(&s)) =>
                {
                    "DeclarationRejected"
                }
                Error::Broker(_) => "BrokerError",
                _ => "BrokerUnreachable",
            };
            set_ready(ctx, object.as_ref(), false, reason, &err.to_string()).await?;
            Err(err)
        }
    }
}

async fn cleanup<K: Topology>(object: Arc<K>, ctx: &Context) -> Result<Action, Error> {
    if object.retain_on_delete() {
        ctx.publish(
            object.as_ref(),
            event_type(false),
            "Retained",
            "Delete",
            format!(
                "{} is kept on the broker (deletionPolicy: retain)",
                object.describe()
            ),
        )
        .await;
        return Ok(Action::await_change());
    }
    let namespace = object.namespace().unwrap_or_default();
    let clusters: Api<BrokerCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    let cluster = match clusters.get_opt(object.cluster_name()).await? {
        // With the cluster gone (or going) its brokers and their topology go too.
        Some(cluster) if cluster.metadata.deletion_timestamp.is_none() => cluster,
        _ => return Ok(Action::await_change()),
    };
    let credentials = cluster_credentials(ctx, &cluster).await?;
    with_any_broker(ctx, &cluster, &credentials, |client| {
        let object = object.clone();
        async move { object.remove(client).await }
    })
    .await?;
    ctx.publish(
        object.as_ref(),
        event_type(false),
        "Deleted",
        "Delete",
        format!("deleted {} on the broker", object.describe()),
    )
    .await;
    Ok(Action::await_change())
}

/// Writes the `Ready` condition (and observedGeneration) through server-side
/// apply, with an event when its status flips.
async fn set_ready<K: Topology>(
    ctx: &Context,
    object: &K,
    ready: bool,
    reason: &str,
    message: &str,
) -> Result<(), Error> {
    let previous = object
        .topology_status()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let generation = object.meta().generation;
    let status = next_status(
        &previous,
        generation,
        ready,
        reason,
        message,
        &conditions::now(),
    );
    let flipped = conditions::find(&previous, READY).is_none_or(|c| {
        c.status
            != conditions::find(&status.conditions, READY)
                .map(|n| n.status.clone())
                .unwrap_or_default()
            || c.reason != reason
    });
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &object.namespace().unwrap_or_default());
    let patch = serde_json::json!({
        "apiVersion": K::API_VERSION,
        "kind": K::KIND,
        "status": status,
    });
    api.patch_status(&object.name_any(), &apply_params(), &Patch::Apply(&patch))
        .await?;
    if flipped {
        ctx.publish(
            object,
            event_type(!ready),
            reason,
            if ready { "Declare" } else { "Wait" },
            message.to_string(),
        )
        .await;
    }
    Ok(())
}

/// The status after a reconcile that found the object `ready` (or not, for `reason`).
pub(crate) fn next_status(
    previous: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    generation: Option<i64>,
    ready: bool,
    reason: &str,
    message: &str,
    now: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> TopologyStatus {
    TopologyStatus {
        conditions: conditions::merge(
            previous,
            vec![condition(READY, ready, reason, message, generation, now)],
        ),
        observed_generation: generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::test_support::cluster;

    fn ready_cluster(ready: bool) -> BrokerCluster {
        let mut cluster = cluster();
        cluster.status = Some(crate::crd::BrokerClusterStatus {
            conditions: vec![condition(
                READY,
                ready,
                if ready {
                    "ClusterReady"
                } else {
                    "MembershipPending"
                },
                "to join: rabbit-2",
                Some(1),
                &conditions::now(),
            )],
            ..Default::default()
        });
        cluster
    }

    #[test]
    fn missing_deleting_and_unready_clusters_stop_declarations() {
        // Goal: each cluster state maps to its Ready=False reason; only a Ready cluster passes.
        let (missing, _) = check_cluster(None).expect_err("missing");
        assert_eq!(missing.reason(), "ClusterNotFound");
        let mut deleting = ready_cluster(true);
        deleting.metadata.deletion_timestamp = Some(conditions::now());
        assert_eq!(
            check_cluster(Some(deleting))
                .expect_err("deleting")
                .0
                .reason(),
            "ClusterDeleting"
        );
        let (not_ready, message) =
            check_cluster(Some(ready_cluster(false))).expect_err("not ready");
        assert_eq!(not_ready.reason(), "ClusterNotReady");
        assert!(
            message.contains("MembershipPending: to join: rabbit-2"),
            "{message}"
        );
        let (no_status, _) = check_cluster(Some(cluster())).expect_err("no status");
        assert_eq!(no_status.reason(), "ClusterNotReady");
        assert!(check_cluster(Some(ready_cluster(true))).is_ok());
    }

    #[test]
    fn topology_status_records_generation_and_reason() {
        // Goal: the status carries observedGeneration and one Ready condition with the reason.
        let status = next_status(
            &[],
            Some(7),
            false,
            "ClusterNotFound",
            "no cluster",
            &conditions::now(),
        );
        assert_eq!(status.observed_generation, Some(7));
        assert_eq!(status.conditions.len(), 1);
        assert_eq!(status.conditions[0].reason, "ClusterNotFound");
        assert_eq!(status.conditions[0].observed_generation, Some(7));
    }
}
