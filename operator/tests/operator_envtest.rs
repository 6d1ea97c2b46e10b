//! Integration tests of the operator against a real kube-apiserver (and
//! kube-controller-manager): the CRDs install and the API server enforces
//! their rules; a BrokerCluster becomes its objects and reports the status a
//! management API gives; topology is declared and deleted through that API.
//! The management API here is a recording stand-in on 127.0.0.1:0, and the
//! test plays kubelet by writing pod status, so no broker process is needed.
//!
//! Compiled only where `tests/support/` (the Kubernetes test environment) is
//! present; see `build.rs`.

// rustfmt resolves modules even where the cfg above compiles nothing; the
// support files are formatted through the test environment's own tests.
#[rustfmt::skip]
mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::routing::any;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use support::envtest::EnvTest;
use synod_operator::conditions;
use synod_operator::controller::{self, Settings};
use synod_operator::crd::broker_cluster::BrokerClusterSpec;
use synod_operator::crd::exchange::{ExchangeKind, ExchangeSpec};
use synod_operator::crd::queue::{DeletionPolicy, QueueSpec};
use synod_operator::crd::{self, BrokerCluster, ClusterRef, Exchange, Queue};
use synod_operator::metrics::Metrics;

const TIMEOUT: Duration = Duration::from_secs(90);
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Polls `check` until it returns `Some`, failing the test after `timeout`.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in crd::all() {
        crds.create(&PostParams::default(), &crd)
            .await
            .unwrap_or_else(|err| panic!("install {}: {err}", crd.name_any()));
    }
    for (_, crd) in crd::all() {
        let name = crd.name_any();
        wait_for(&format!("{name} established"), TIMEOUT, || {
            let crds = crds.clone();
            let name = name.clone();
            async move {
                let crd = crds.get(&name).await.ok()?;
                let established = crd
                    .status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                established.then_some(())
            }
        })
        .await;
    }
}

async fn create_namespace(client: &Client, name: &str) {
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create namespace");
}

/// What the stand-in management API knows and was asked.
#[derive(Default)]
struct BrokerState {
    members: Vec<String>,
    requests: Vec<String>,
}

/// A management API stand-in on 127.0.0.1:0: answers /api/cluster from its
/// member list, records every request, and accepts declarations.
async fn start_broker(members: &[&str]) -> (String, Arc<Mutex<BrokerState>>) {
    let state = Arc::new(Mutex::new(BrokerState {
        members: members.iter().map(|m| m.to_string()).collect(),
        requests: Vec::new(),
    }));
    async fn handle(
        State(state): State<Arc<Mutex<BrokerState>>>,
        method: Method,
        uri: Uri,
    ) -> (StatusCode, axum::Json<serde_json::Value>) {
        let path = uri.path().to_string();
        let mut state = state.lock().expect("lock");
        state.requests.push(format!("{method} {path}"));
        let ok = serde_json::json!({});
        match (method, path.as_str()) {
            (Method::GET, "/api/cluster") => {
                let members: Vec<_> = state
                    .members
                    .iter()
                    .map(|m| serde_json::json!({"name": m, "incarnation": "i", "role": "voter", "alive": true, "lag": 0}))
                    .collect();
                let leader = state.members.first().cloned();
                (
                    StatusCode::OK,
                    axum::Json(
                        serde_json::json!({"members": members, "leader": leader, "epoch": 1, "decided_index": 5}),
                    ),
                )
            }
            (Method::GET, "/api/queues") => (StatusCode::OK, axum::Json(serde_json::json!([]))),
            (Method::GET, p) if p.starts_with("/api/bindings/") => {
                (StatusCode::OK, axum::Json(serde_json::json!([])))
            }
            (Method::GET, "/api/cluster/ready") => (StatusCode::OK, axum::Json(ok)),
            (Method::DELETE, p) if p.starts_with("/api/cluster/members/") => {
                let node = p.rsplit('/').next().unwrap_or_default().to_string();
                state.members.retain(|m| *m != node);
                (StatusCode::NO_CONTENT, axum::Json(ok))
            }
            (Method::PUT | Method::POST | Method::DELETE, _) => {
                (StatusCode::CREATED, axum::Json(ok))
            }
            _ => (
                StatusCode::NOT_FOUND,
                axum::Json(serde_json::json!({"error": "not_found", "reason": path})),
            ),
        }
    }
    let router = Router::new()
        .fallback(any(handle))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    (format!("http://{addr}"), state)
}

fn requests(state: &Arc<Mutex<BrokerState>>) -> Vec<String> {
    state.lock().expect("lock").requests.clone()
}

/// Plays kubelet for `pod`: Running, an IP, Ready.
async fn mark_ready(pods: &Api<Pod>, name: &str) {
    let status = serde_json::json!({
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    });
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("patch pod status");
}

fn spawn_operator(
    client: Client,
    namespace: &str,
    broker_url: &str,
) -> tokio::sync::watch::Sender<bool> {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = futures::FutureExt::shared(Box::pin(async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    })
        as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>);
    let settings = Settings {
        broker_url_template: broker_url.to_string(),
        resync_interval: Duration::from_secs(300),
        transition_interval: Duration::from_secs(1),
        ..Settings::default()
    };
    tokio::spawn(controller::run(
        client,
        Metrics::new(),
        settings,
        Some("test".into()),
        Some(namespace.to_string()),
        shutdown,
    ));
    stop_tx
}

fn exchange(name: &str, cluster: &str) -> Exchange {
    Exchange::new(
        name,
        ExchangeSpec {
            cluster_ref: ClusterRef {
                name: cluster.into(),
            },
            name: name.into(),
            vhost: "/".into(),
            kind: ExchangeKind::Topic,
            durable: true,
            auto_delete: false,
            arguments: BTreeMap::new(),
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_enforces_the_crd_rules() {
    // Goal: immutable fields, reserved names, managed config keys and ranges are refused by the API server.
    synod_operator::install_crypto_provider();
    let env = EnvTest::start().await.unwrap_or_else(|err| panic!("{err}"));
    let client = env.client();
    install_crds(&client).await;
    create_namespace(&client, "rules").await;

    let exchanges: Api<Exchange> = Api::namespaced(client.clone(), "rules");
    exchanges
        .create(&PostParams::default(), &exchange("orders", "rabbit"))
        .await
        .expect("a valid exchange is accepted");
    for (patch, message) in [
        (
            serde_json::json!({"spec": {"name": "renamed"}}),
            "name is immutable",
        ),
        (
            serde_json::json!({"spec": {"type": "fanout"}}),
            "type is immutable",
        ),
        (
            serde_json::json!({"spec": {"vhost": "other"}}),
            "vhost is immutable",
        ),
        (
            serde_json::json!({"spec": {"arguments": {"alternate-exchange": "ae"}}}),
            "arguments are immutable",
        ),
    ] {
        let err = exchanges
            .patch("orders", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect_err("immutable field change must be refused");
        assert!(err.to_string().contains(message), "{patch}: {err}");
    }
    let err = exchanges
        .create(&PostParams::default(), &exchange("amq.mine", "rabbit"))
        .await
        .expect_err("reserved name");
    assert!(err.to_string().contains("reserved"), "{err}");

    let clusters: Api<BrokerCluster> = Api::namespaced(client.clone(), "rules");
    let mut spec = BrokerClusterSpec::with_defaults();
    spec.config
        .insert("peers".into(), IntOrString::String("x=y:1".into()));
    let err = clusters
        .create(&PostParams::default(), &BrokerCluster::new("bad", spec))
        .await
        .expect_err("managed config key");
    assert!(err.to_string().contains("config may not set"), "{err}");
    let mut spec = BrokerClusterSpec::with_defaults();
    spec.replicas = 0;
    assert!(
        clusters
            .create(&PostParams::default(), &BrokerCluster::new("zero", spec))
            .await
            .is_err()
    );
    clusters
        .create(
            &PostParams::default(),
            &BrokerCluster::new("ok", BrokerClusterSpec::with_defaults()),
        )
        .await
        .expect("defaults are valid");
    let err = clusters
        .patch(
            "ok",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"storage": {"size": "5Gi"}}})),
        )
        .await
        .expect_err("storage is immutable");
    assert!(err.to_string().contains("storage is immutable"), "{err}");
    clusters
        .patch(
            "ok",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 5}})),
        )
        .await
        .expect("replicas may change");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_becomes_its_objects_reports_status_and_serves_topology() {
    // Goal: objects, status from /api/cluster, topology declare/delete and safe scale-down, end to end.
    synod_operator::install_crypto_provider();
    let env = EnvTest::start().await.unwrap_or_else(|err| panic!("{err}"));
    assert!(
        env.has_controller_manager(),
        "kube-controller-manager is needed (scripts/setup-k8s.sh builds it)"
    );
    let client = env.client();
    install_crds(&client).await;
    let ns = "synod";
    create_namespace(&client, ns).await;
    let (broker_url, broker) = start_broker(&["rabbit-0", "rabbit-1", "rabbit-2"]).await;
    let stop = spawn_operator(client.clone(), ns, &broker_url);

    let clusters: Api<BrokerCluster> = Api::namespaced(client.clone(), ns);
    clusters
        .create(
            &PostParams::default(),
            &BrokerCluster::new("rabbit", BrokerClusterSpec::with_defaults()),
        )
        .await
        .expect("create cluster");

    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let set = wait_for("StatefulSet rabbit", TIMEOUT, || {
        let sets = sets.clone();
        async move { sets.get_opt("rabbit").await.ok().flatten() }
    })
    .await;
    assert_eq!(set.spec.as_ref().and_then(|s| s.replicas), Some(3));
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    assert!(services.get_opt("rabbit").await.expect("get").is_some());
    assert!(
        services
            .get_opt("rabbit-nodes")
            .await
            .expect("get")
            .is_some()
    );
    let pdb = Api::<PodDisruptionBudget>::namespaced(client.clone(), ns)
        .get("rabbit")
        .await
        .expect("PDB");
    assert_eq!(
        pdb.spec.and_then(|s| s.min_available),
        Some(IntOrString::Int(2))
    );
    assert!(
        Api::<ConfigMap>::namespaced(client.clone(), ns)
            .get_opt("rabbit-config")
            .await
            .expect("get")
            .is_some()
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let password = |secret: Secret| secret.data.and_then(|d| d.get("password").cloned());
    let first_password = password(secrets.get("rabbit-default-user").await.expect("secret"));
    assert!(first_password.is_some());

    // Play kubelet: the StatefulSet controller creates the pods; report them ready.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    {
        for i in 0..3 {
            let name = format!("rabbit-{i}");
            wait_for(&format!("pod {name}"), TIMEOUT, || {
                let pods = pods.clone();
                let name = name.clone();
                async move { pods.get_opt(&name).await.ok().flatten() }
            })
            .await;
            mark_ready(&pods, &name).await;
        }
        let status = wait_for("cluster Ready", TIMEOUT, || {
            let clusters = clusters.clone();
            async move {
                let status = clusters.get("rabbit").await.ok()?.status?;
                conditions::is_true(&status.conditions, "Ready").then_some(status)
            }
        })
        .await;
        assert_eq!(status.members, vec!["rabbit-0", "rabbit-1", "rabbit-2"]);
        assert_eq!(status.leader.as_deref(), Some("rabbit-0"));
        assert_eq!(status.ready_replicas, 3);
        assert_eq!(
            status.default_user_secret.as_deref(),
            Some("rabbit-default-user")
        );
    }

    // Topology through the management API.
    let exchanges: Api<Exchange> = Api::namespaced(client.clone(), ns);
    exchanges
        .create(&PostParams::default(), &exchange("orders", "rabbit"))
        .await
        .expect("create exchange");
    exchanges
        .create(&PostParams::default(), &exchange("lost", "no-such-cluster"))
        .await
        .expect("create exchange");
    let queues: Api<Queue> = Api::namespaced(client.clone(), ns);
    let queue = Queue::new(
        "jobs",
        QueueSpec {
            cluster_ref: ClusterRef {
                name: "rabbit".into(),
            },
            name: "jobs".into(),
            vhost: "/".into(),
            durable: true,
            auto_delete: false,
            arguments: BTreeMap::new(),
            deletion_policy: DeletionPolicy::Delete,
        },
    );
    queues
        .create(&PostParams::default(), &queue)
        .await
        .expect("create queue");
    let not_found = wait_for("exchange lost: ClusterNotFound", TIMEOUT, || {
        let exchanges = exchanges.clone();
        async move {
            let status = exchanges.get("lost").await.ok()?.status?;
            let ready = conditions::find(&status.conditions, "Ready")?.clone();
            (ready.reason == "ClusterNotFound").then_some(ready)
        }
    })
    .await;
    assert_eq!(not_found.status, "False");
    {
        wait_for("exchange and queue Ready", TIMEOUT, || {
            let (exchanges, queues) = (exchanges.clone(), queues.clone());
            async move {
                let ex = exchanges.get("orders").await.ok()?.status?;
                let q = queues.get("jobs").await.ok()?.status?;
                (conditions::is_true(&ex.conditions, "Ready")
                    && conditions::is_true(&q.conditions, "Ready"))
                .then_some(())
            }
        })
        .await;
        let seen = requests(&broker);
        assert!(
            seen.contains(&"PUT /api/exchanges/%2F/orders".to_string()),
            "{seen:?}"
        );
        assert!(
            seen.contains(&"PUT /api/queues/%2F/jobs".to_string()),
            "{seen:?}"
        );

        queues
            .delete("jobs", &DeleteParams::default())
            .await
            .expect("delete queue");
        wait_for("queue gone after cleanup", TIMEOUT, || {
            let queues = queues.clone();
            async move { queues.get_opt("jobs").await.ok()?.is_none().then_some(()) }
        })
        .await;
        assert!(requests(&broker).contains(&"DELETE /api/queues/%2F/jobs".to_string()));

        // Scale down 3 -> 2: rabbit-2 leaves Paxos before the StatefulSet shrinks.
        clusters
            .patch(
                "rabbit",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"replicas": 2}})),
            )
            .await
            .expect("scale down");
        wait_for("StatefulSet shrunk to 2", TIMEOUT, || {
            let sets = sets.clone();
            async move {
                let replicas = sets.get("rabbit").await.ok()?.spec?.replicas?;
                (replicas == 2).then_some(())
            }
        })
        .await;
        let seen = requests(&broker);
        let removed = seen
            .iter()
            .position(|r| r == "DELETE /api/cluster/members/rabbit-2")
            .expect("member removed through the API");
        assert!(removed > 0);
        let password_after = password(secrets.get("rabbit-default-user").await.expect("secret"));
        assert_eq!(
            password_after, first_password,
            "credentials are never regenerated"
        );
    }
    let _ = stop.send(true);
}
