//! The operator against real brokers: a real control plane, the node
//! simulator running `synod-broker` processes for the StatefulSet's pods,
//! and the operator's controllers in this process. Exchanges, queues and
//! bindings declared as resources are checked on the running broker through
//! its management API and with a third-party AMQP client; deletion honours
//! `deletionPolicy`; a broker that stops answering turns the cluster and its
//! topology `Ready=False` with a reason and a Warning event, and they recover
//! when it answers again. Nothing here fakes a broker or the API server.

// The support files are formatted through the test environment's own tests.
#[rustfmt::skip]
mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use reqwest::StatusCode;
use support::envtest::EnvTest;
use support::kubelet::Kubelet;
use synod_operator::conditions;
use synod_operator::controller::{self, Settings};
use synod_operator::crd::broker_cluster::BrokerClusterSpec;
use synod_operator::crd::{self, Binding, BrokerCluster, Exchange, Queue};
use synod_operator::metrics::Metrics;

/// Bound on each wait; the whole test stays well under a minute when healthy.
const TIMEOUT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(200);
const NAMESPACE: &str = "real";
const CLUSTER: &str = "rabbit";

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

fn spawn_operator(client: Client) -> tokio::sync::watch::Sender<bool> {
    spawn_operator_in(client, NAMESPACE)
}

fn spawn_operator_in(client: Client, namespace: &str) -> tokio::sync::watch::Sender<bool> {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let shutdown = futures::FutureExt::shared(Box::pin(async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    })
        as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>);
    let settings = Settings {
        // Pods have loopback addresses and there is no cluster DNS: reach
        // management APIs and announce joining pods by pod IP.
        peer_address_template: "{pod_ip}:{port}".to_string(),
        resync_interval: Duration::from_secs(300),
        transition_interval: Duration::from_secs(1),
        ..Settings::default()
    };
    tokio::spawn(controller::run(
        client,
        Metrics::new(),
        settings,
        Some("real-brokers-test".into()),
        Some(namespace.to_string()),
        shutdown,
    ));
    stop_tx
}

/// The topology resources of this test, as a user would write them.
fn topology<K: serde::de::DeserializeOwned>(kind: &str, name: &str, spec: serde_json::Value) -> K {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "synod.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }))
    .unwrap_or_else(|err| panic!("{kind} {name}: {err}"))
}

/// The `Ready` condition's (status, reason) of a topology resource.
fn ready_of(status: Option<&crd::TopologyStatus>) -> Option<(String, String)> {
    let ready = conditions::find(&status?.conditions, "Ready")?;
    Some((ready.status.clone(), ready.reason.clone()))
}

async fn wait_topology_ready<K>(
    api: &Api<K>,
    name: &str,
    status: fn(&K) -> Option<&crd::TopologyStatus>,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    wait_for(&format!("{name} Ready=True"), TIMEOUT, || {
        let api = api.clone();
        async move {
            let object = api.get(name).await.ok()?;
            let (ready, _) = ready_of(status(&object))?;
            (ready == "True").then_some(())
        }
    })
    .await;
}

/// The management API of the broker pod, as the default user.
struct Management {
    http: reqwest::Client,
    base: String,
    user: String,
    password: String,
}

impl Management {
    async fn status(&self, path: &str) -> StatusCode {
        self.http
            .get(format!("{}{path}", self.base))
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .unwrap_or_else(|err| panic!("GET {path}: {err}"))
            .status()
    }

    async fn json(&self, path: &str) -> serde_json::Value {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .unwrap_or_else(|err| panic!("GET {path}: {err}"));
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        response.json().await.expect("JSON answer")
    }
}

/// Whether a Warning event about `name` with `reason` was published.
async fn has_warning(events: &Api<Event>, name: &str, reason: &str) -> bool {
    events
        .list(&ListParams::default())
        .await
        .map(|list| {
            list.items.iter().any(|event| {
                event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                    && event.reason.as_deref() == Some(reason)
                    && event.type_.as_deref() == Some("Warning")
            })
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_reaches_a_real_broker_and_an_unresponsive_broker_is_reported() {
    // Goal: Exchange/Queue/Binding resources exist on a running broker (management API and AMQP), deletion honours deletionPolicy, and a stopped broker gives Ready=False with a reason and a Warning event until it answers again.
    synod_operator::install_crypto_provider();
    let env = EnvTest::start().await.unwrap_or_else(|err| panic!("{err}"));
    assert!(
        env.has_controller_manager(),
        "kube-controller-manager is needed (scripts/setup-k8s.sh builds it)"
    );
    let client = env.client();
    install_crds(&client).await;
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(NAMESPACE.into()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await
        .expect("create namespace");
    let kubelet = Kubelet::start(&env).await.expect("start node simulator");
    let stop = spawn_operator(client.clone());
    let started = Instant::now();

    // One replica: a one-member Paxos configuration is the quickest real
    // cluster; membership across pods is the broker's own tests' subject.
    let clusters: Api<BrokerCluster> = Api::namespaced(client.clone(), NAMESPACE);
    let mut spec = BrokerClusterSpec::with_defaults();
    spec.replicas = 1;
    clusters
        .create(&PostParams::default(), &BrokerCluster::new(CLUSTER, spec))
        .await
        .expect("create cluster");
    let cluster_ready = |want: bool| {
        let clusters = clusters.clone();
        move || {
            let clusters = clusters.clone();
            async move {
                let status = clusters.get(CLUSTER).await.ok()?.status?;
                let ready = conditions::find(&status.conditions, "Ready")?.clone();
                ((ready.status == "True") == want).then_some(ready)
            }
        }
    };
    wait_for("cluster Ready", TIMEOUT, cluster_ready(true)).await;
    eprintln!("cluster ready after {:?}", started.elapsed());

    let secret = Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .get(&format!("{CLUSTER}-default-user"))
        .await
        .expect("default user Secret");
    let (user, password) =
        synod_operator::resources::credentials(Some(&secret)).expect("complete credentials");
    let pod_ip = kubelet.pod_ip(NAMESPACE, &format!("{CLUSTER}-0"));
    let management = Management {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .no_proxy()
            .build()
            .expect("HTTP client"),
        base: format!("http://{pod_ip}:15672"),
        user: user.clone(),
        password: password.clone(),
    };
    // The broker runs with the Secret's user instead of guest.
    assert_eq!(management.status("/api/whoami").await, StatusCode::OK);
    let guest = reqwest::Client::new()
        .get(format!("{}/api/overview", management.base))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .expect("management API answers");
    assert_eq!(
        guest.status(),
        StatusCode::UNAUTHORIZED,
        "guest is not created"
    );

    let exchanges: Api<Exchange> = Api::namespaced(client.clone(), NAMESPACE);
    let queues: Api<Queue> = Api::namespaced(client.clone(), NAMESPACE);
    let bindings: Api<Binding> = Api::namespaced(client.clone(), NAMESPACE);
    let cluster_ref = serde_json::json!({"name": CLUSTER});
    exchanges
        .create(
            &PostParams::default(),
            &topology(
                "Exchange",
                "orders",
                serde_json::json!({"clusterRef": cluster_ref, "name": "orders", "type": "topic", "durable": true}),
            ),
        )
        .await
        .expect("create exchange");
    for (name, policy) in [("jobs", "delete"), ("audit", "retain")] {
        queues
            .create(
                &PostParams::default(),
                &topology(
                    "Queue",
                    name,
                    serde_json::json!({"clusterRef": cluster_ref, "name": name, "durable": true, "deletionPolicy": policy}),
                ),
            )
            .await
            .expect("create queue");
    }
    for (name, queue) in [("orders-to-jobs", "jobs"), ("orders-to-audit", "audit")] {
        bindings
            .create(
                &PostParams::default(),
                &topology(
                    "Binding",
                    name,
                    serde_json::json!({"clusterRef": cluster_ref, "source": "orders", "destination": queue, "destinationType": "queue", "routingKey": "order.*"}),
                ),
            )
            .await
            .expect("create binding");
    }
    wait_topology_ready(&exchanges, "orders", |o| o.status.as_ref()).await;
    for name in ["jobs", "audit"] {
        wait_topology_ready(&queues, name, |o| o.status.as_ref()).await;
    }
    for name in ["orders-to-jobs", "orders-to-audit"] {
        wait_topology_ready(&bindings, name, |o| o.status.as_ref()).await;
    }
    eprintln!("topology ready after {:?}", started.elapsed());

    let exchange = management.json("/api/exchanges/%2F/orders").await;
    assert_eq!(exchange["type"], "topic");
    assert_eq!(exchange["durable"], true);
    let queue = management.json("/api/queues/%2F/jobs").await;
    assert_eq!(queue["durable"], true);
    let bound = management.json("/api/bindings/%2F/e/orders/q/jobs").await;
    let keys: Vec<&str> = bound
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|b| b["routing_key"].as_str())
        .collect();
    assert_eq!(keys, ["order.*"]);

    // A real client sees the declared topology route messages.
    let connection = Connection::connect(
        &format!("amqp://{user}:{password}@{pod_ip}:5672/%2f"),
        ConnectionProperties::default(),
    )
    .await
    .expect("AMQP login as the default user");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    channel
        .basic_publish(
            "orders".into(),
            "order.created".into(),
            BasicPublishOptions::default(),
            b"order 42",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirmed");
    for queue in ["jobs", "audit"] {
        let message = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
            .unwrap_or_else(|| panic!("{queue} received the routed message"));
        assert_eq!(message.delivery.data, b"order 42");
    }
    connection.close(200, "done".into()).await.expect("close");

    // Deletion: a binding and a `delete` queue go from the broker, a `retain` queue stays.
    bindings
        .delete("orders-to-jobs", &DeleteParams::default())
        .await
        .expect("delete binding");
    queues
        .delete("jobs", &DeleteParams::default())
        .await
        .expect("delete queue jobs");
    queues
        .delete("audit", &DeleteParams::default())
        .await
        .expect("delete queue audit");
    for name in ["jobs", "audit"] {
        wait_for(&format!("Queue {name} removed"), TIMEOUT, || {
            let queues = queues.clone();
            async move { queues.get_opt(name).await.ok()?.is_none().then_some(()) }
        })
        .await;
    }
    wait_for("Binding orders-to-jobs removed", TIMEOUT, || {
        let bindings = bindings.clone();
        async move {
            bindings
                .get_opt("orders-to-jobs")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
    assert_eq!(
        management.status("/api/queues/%2F/jobs").await,
        StatusCode::NOT_FOUND,
        "deletionPolicy: delete removes the queue"
    );
    assert_eq!(
        management.status("/api/queues/%2F/audit").await,
        StatusCode::OK,
        "deletionPolicy: retain keeps the queue"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), NAMESPACE);

    // The broker stops answering (SIGSTOP: no crash, no restart).
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let pod = pods.get(&format!("{CLUSTER}-0")).await.expect("broker pod");
    assert!(
        kubelet.signal_container(&pod, "broker", libc::SIGSTOP),
        "the pod's broker process is the simulator's"
    );
    let down = wait_for("cluster Ready=False", TIMEOUT, cluster_ready(false)).await;
    eprintln!(
        "cluster not ready ({}: {}) after {:?}",
        down.reason,
        down.message,
        started.elapsed()
    );
    assert!(!down.reason.is_empty() && down.reason != "ClusterReady");
    let reason = down.reason.clone();
    wait_for("Warning event about the cluster", TIMEOUT, || {
        let (events, reason) = (events.clone(), reason.clone());
        async move { has_warning(&events, CLUSTER, &reason).await.then_some(()) }
    })
    .await;
    let (_, exchange_reason) = wait_for("exchange Ready=False", TIMEOUT, || {
        let exchanges = exchanges.clone();
        async move {
            let exchange = exchanges.get("orders").await.ok()?;
            let (ready, reason) = ready_of(exchange.status.as_ref())?;
            (ready == "False").then_some((ready, reason))
        }
    })
    .await;
    assert!(
        ["ClusterNotReady", "BrokerUnreachable"].contains(&exchange_reason.as_str()),
        "{exchange_reason}"
    );
    wait_for("Warning event about the exchange", TIMEOUT, || {
        let (events, reason) = (events.clone(), exchange_reason.clone());
        async move { has_warning(&events, "orders", &reason).await.then_some(()) }
    })
    .await;
    // A queue declared meanwhile waits for the broker instead of failing for good.
    queues
        .create(
            &PostParams::default(),
            &topology(
                "Queue",
                "late",
                serde_json::json!({"clusterRef": cluster_ref, "name": "late", "durable": true}),
            ),
        )
        .await
        .expect("create queue late");
    wait_for("queue late Ready=False", TIMEOUT, || {
        let queues = queues.clone();
        async move {
            let queue = queues.get("late").await.ok()?;
            let (ready, _) = ready_of(queue.status.as_ref())?;
            (ready == "False").then_some(())
        }
    })
    .await;

    // It answers again: everything recovers without anyone touching the resources.
    let pod = pods.get(&format!("{CLUSTER}-0")).await.expect("broker pod");
    assert!(kubelet.signal_container(&pod, "broker", libc::SIGCONT));
    wait_for("cluster Ready again", TIMEOUT, cluster_ready(true)).await;
    wait_topology_ready(&exchanges, "orders", |o| o.status.as_ref()).await;
    wait_topology_ready(&queues, "late", |o| o.status.as_ref()).await;
    assert_eq!(
        management.status("/api/queues/%2F/late").await,
        StatusCode::OK
    );
    eprintln!("recovered after {:?}", started.elapsed());

    let _ = stop.send(true);
    kubelet.stop().await;
}

/// A CA and a broker certificate for every pod of `cluster` in `namespace`
/// (the wildcard DNS name a cert-manager Certificate would hold), as the
/// `tls.crt`, `tls.key` and `ca.crt` of a TLS Secret.
fn cluster_certificates(cluster: &str, namespace: &str) -> [(String, String); 3] {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "synod-operator-test-ca");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = ca_params
        .self_signed(&ca_key)
        .expect("CA certificate")
        .pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("broker key");
    let mut params = CertificateParams::new(vec![
        format!("*.{cluster}-nodes.{namespace}.svc"),
        format!("{cluster}.{namespace}.svc"),
    ])
    .expect("broker params");
    params.distinguished_name.push(DnType::CommonName, cluster);
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &issuer).expect("broker certificate");
    [
        ("tls.crt".into(), cert.pem()),
        ("tls.key".into(), key.serialize_pem()),
        ("ca.crt".into(), ca_pem),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_is_managed_over_verified_https() {
    // Goal: with spec.tls the operator reaches the brokers over HTTPS, trusting only the Secret's CA and checking the pod's DNS name, so the cluster and its topology become Ready.
    const TLS_NAMESPACE: &str = "secure";
    synod_operator::install_crypto_provider();
    let env = EnvTest::start().await.unwrap_or_else(|err| panic!("{err}"));
    let client = env.client();
    install_crds(&client).await;
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(TLS_NAMESPACE.into()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await
        .expect("create namespace");
    let certificates = cluster_certificates(CLUSTER, TLS_NAMESPACE);
    let ca_pem = certificates[2].1.clone();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "rabbit-tls", "namespace": TLS_NAMESPACE},
        "type": "kubernetes.io/tls",
        "stringData": certificates.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
    }))
    .expect("TLS Secret");
    Api::<Secret>::namespaced(client.clone(), TLS_NAMESPACE)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create TLS Secret");
    let kubelet = Kubelet::start(&env).await.expect("start node simulator");
    let stop = spawn_operator_in(client.clone(), TLS_NAMESPACE);
    let started = Instant::now();

    let clusters: Api<BrokerCluster> = Api::namespaced(client.clone(), TLS_NAMESPACE);
    let mut spec = BrokerClusterSpec::with_defaults();
    spec.replicas = 1;
    spec.tls = Some(synod_operator::crd::broker_cluster::TlsSpec {
        secret_name: "rabbit-tls".into(),
    });
    clusters
        .create(&PostParams::default(), &BrokerCluster::new(CLUSTER, spec))
        .await
        .expect("create cluster");
    let ready = wait_for("TLS cluster Ready", TIMEOUT, || {
        let clusters = clusters.clone();
        async move {
            let status = clusters.get(CLUSTER).await.ok()?.status?;
            let ready = conditions::find(&status.conditions, "Ready")?.clone();
            (ready.status == "True").then_some(status)
        }
    })
    .await;
    assert_eq!(ready.members.len(), 1, "membership read over HTTPS");
    eprintln!("TLS cluster ready after {:?}", started.elapsed());

    let queues: Api<Queue> = Api::namespaced(client.clone(), TLS_NAMESPACE);
    queues
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "synod.dev/v1alpha1",
                "kind": "Queue",
                "metadata": {"name": "payments", "namespace": TLS_NAMESPACE},
                "spec": {"clusterRef": {"name": CLUSTER}, "name": "payments", "durable": true},
            }))
            .expect("Queue"),
        )
        .await
        .expect("create queue");
    wait_topology_ready(&queues, "payments", |o| o.status.as_ref()).await;

    // The queue is on the broker, seen the way the operator sees it: the
    // pod's DNS name, verified against the cluster CA, at the pod's address.
    let secret = Api::<Secret>::namespaced(client.clone(), TLS_NAMESPACE)
        .get(&format!("{CLUSTER}-default-user"))
        .await
        .expect("default user Secret");
    let (user, password) =
        synod_operator::resources::credentials(Some(&secret)).expect("complete credentials");
    let pod_ip = kubelet.pod_ip(TLS_NAMESPACE, &format!("{CLUSTER}-0"));
    let host = format!("{CLUSTER}-0.{CLUSTER}-nodes.{TLS_NAMESPACE}.svc");
    let verified = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).expect("CA"))
        .resolve(&host, format!("{pod_ip}:15672").parse().expect("address"))
        .build()
        .expect("HTTPS client");
    let queue = verified
        .get(format!("https://{host}:15672/api/queues/%2F/payments"))
        .basic_auth(&user, Some(&password))
        .send()
        .await
        .expect("HTTPS with the cluster CA");
    assert_eq!(queue.status(), StatusCode::OK);
    // Plain HTTP is not served next to HTTPS.
    assert!(
        reqwest::Client::new()
            .get(format!("http://{pod_ip}:15672/api/overview"))
            .send()
            .await
            .map(|r| !r.status().is_success())
            .unwrap_or(true),
        "no plain management API"
    );

    let _ = stop.send(true);
    kubelet.stop().await;
}
