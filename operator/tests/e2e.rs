//! The path a user takes, end to end: a real control plane, the CRDs and the
//! chart's RBAC applied with kubectl, the `synod-operator` binary as its own
//! process under a ServiceAccount bound to that role (not cluster-admin), the
//! node simulator running one `synod-broker` process per pod, and a
//! three-replica `BrokerCluster` taken through topology, scaling, a
//! configuration roll, a lost pod, deletion and invalid input. Clients are
//! kubectl and lapin; nothing here fakes a broker or the API server, and
//! nothing calls the operator's library except to read a Secret's layout.

// The support files are formatted through the test environment's own tests.
#[rustfmt::skip]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use lapin::Confirmation;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use reqwest::StatusCode;
use support::envtest::EnvTest;
use support::kubelet::Kubelet;
use synod_operator::conditions;
use synod_operator::crd::{Binding, BrokerCluster, Exchange, Queue, TopologyStatus};

/// Bound on each wait for the cluster to converge (formation, scaling, rolls).
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on quicker waits (topology, deletion, a single message batch).
const TIMEOUT: Duration = Duration::from_secs(60);
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How long one AMQP connect, publish confirm or management call may take.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Namespace of the operator, as the chart's install names it.
const OPERATOR_NAMESPACE: &str = "synod-system";
/// Namespace of the broker cluster and its topology.
const NAMESPACE: &str = "e2e";
/// The example cluster's name (charts/synod/examples/broker-cluster.yaml).
const CLUSTER: &str = "hello";
/// Messages published through the fanout exchange in step 3.
const FANOUT_MESSAGES: usize = 50;
/// Persistent messages parked on the top pod before a scale-down.
const PARKED_MESSAGES: usize = 200;
/// Least number of confirmed publishes expected across a configuration roll
/// (a publisher that stalled for the whole roll would prove nothing).
const ROLL_CONFIRMED_MIN: usize = 20;
/// Pause between publishes of the roll's publisher: paces it to a few
/// hundred messages per second so the backlog stays small.
const ROLL_PUBLISH_PACE: Duration = Duration::from_millis(5);
/// How often the node simulator runs probes: slower than the broker becomes
/// ready, so Kubernetes' view of readiness lags the broker's as it does with
/// a kubelet (whose readiness probe period here is 5 s).
const READINESS_PROBE_INTERVAL: Duration = Duration::from_millis(1500);
/// How often pod readiness is sampled during the roll.
const READINESS_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// Pod label selector of the cluster's brokers.
const BROKER_PODS: &str = "app.kubernetes.io/name=synod,app.kubernetes.io/instance=hello,app.kubernetes.io/component=broker";

/// Whether a scale-down keeps the messages of queues homed on the removed
/// pods (the broker moves them to the remaining members while the operator
/// waits). Turn on once `DELETE /api/cluster/members/{node}` drains the node;
/// until then a queue homed on a leaving pod blocks the scale-down forever.
const SCALE_DOWN_MOVES_QUEUES: bool = true;

/// Lines of the operator's log printed when the test fails.
const LOG_TAIL_LINES: usize = 60;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the operator crate sits in the workspace root")
        .to_path_buf()
}

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

/// Runs kubectl as the admin with `args` (and `stdin`): `Ok(stdout)` or `Err(stderr)`.
fn kubectl(env: &EnvTest, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut command = env.kubectl().expect("kubectl built");
    command
        .args(args)
        .current_dir(repo_root())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    run_with_stdin(command, stdin)
}

fn run_with_stdin(mut command: Command, stdin: Option<&str>) -> Result<String, String> {
    use std::io::Write as _;
    let mut child = command.spawn().map_err(|err| format!("spawn: {err}"))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes())
            .map_err(|err| format!("writing stdin: {err}"))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|err| format!("wait: {err}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{}\n{stderr}", output.status))
    }
}

/// kubectl that must succeed.
fn kubectl_ok(env: &EnvTest, args: &[&str], stdin: Option<&str>) -> String {
    kubectl(env, args, stdin).unwrap_or_else(|err| panic!("kubectl {args:?} failed: {err}"))
}

/// The `synod-operator` binary running as a separate process; killed (with
/// its process group) when dropped, printing the end of its log if the test
/// is failing.
struct OperatorProcess {
    child: Child,
    log: PathBuf,
}

impl OperatorProcess {
    fn start(kubeconfig: &Path, log: PathBuf) -> OperatorProcess {
        let log_file = std::fs::File::create(&log).expect("operator log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_synod-operator"));
        command
            .args([
                "--metrics-listen",
                "127.0.0.1:0",
                "--lease-namespace",
                OPERATOR_NAMESPACE,
                "--identity",
                "synod-operator-e2e",
                // Pods have loopback addresses and there is no cluster DNS:
                // announce joining pods by pod IP.
                "--peer-address-template",
                "{pod_ip}:{port}",
                // Re-check transitions every second instead of every five.
                "--transition-seconds",
                "1",
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file handle"))
            .stderr(log_file);
        support::process::isolate(&mut command);
        let child = command.spawn().expect("start synod-operator");
        OperatorProcess { child, log }
    }

    /// Fails the test if the operator has exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "synod-operator exited ({status}):\n{}",
                log_tail(&self.log, LOG_TAIL_LINES)
            );
        }
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        support::process::stop_group(&mut self.child, Duration::from_secs(5));
        if std::thread::panicking() {
            eprintln!(
                "synod-operator log ({}), last lines:\n{}",
                self.log.display(),
                log_tail(&self.log, LOG_TAIL_LINES)
            );
        }
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Wall time of each step, printed as the test goes and at the end.
struct Steps {
    started: Instant,
    last: Instant,
    times: Vec<(String, Duration)>,
}

impl Steps {
    fn new() -> Steps {
        let now = Instant::now();
        Steps {
            started: now,
            last: now,
            times: Vec::new(),
        }
    }

    fn done(&mut self, step: &str) {
        let now = Instant::now();
        let took = now - self.last;
        self.last = now;
        eprintln!("e2e: {step}: {took:.1?}");
        self.times.push((step.to_string(), took));
    }

    fn summary(&self) {
        eprintln!("e2e: wall time per step:");
        for (step, took) in &self.times {
            eprintln!("e2e:   {took:>8.1?}  {step}");
        }
        eprintln!("e2e:   {:>8.1?}  total", self.started.elapsed());
    }
}

/// The cluster's `Ready` condition is True for its current generation.
fn cluster_ready(cluster: &BrokerCluster) -> bool {
    let Some(status) = &cluster.status else {
        return false;
    };
    status.observed_generation == cluster.metadata.generation
        && conditions::find(&status.conditions, conditions::READY).is_some_and(|c| {
            c.status == "True" && c.observed_generation == cluster.metadata.generation
        })
}

/// Waits until the cluster is Ready with exactly `replicas` agreed members
/// (`hello-0` ... ) and a leader; returns its status.
async fn wait_cluster_converged(clusters: &Api<BrokerCluster>, replicas: usize) -> BrokerCluster {
    let expected: Vec<String> = (0..replicas).map(|i| format!("{CLUSTER}-{i}")).collect();
    wait_for(
        &format!("cluster Ready with members {expected:?}"),
        CONVERGE_TIMEOUT,
        || {
            let clusters = clusters.clone();
            let expected = expected.clone();
            async move {
                let cluster = clusters.get(CLUSTER).await.ok()?;
                let status = cluster.status.as_ref()?;
                let mut members = status.members.clone();
                members.sort();
                (cluster_ready(&cluster)
                    && members == expected
                    && status.leader.is_some()
                    && status.ready_replicas == i32::try_from(replicas).ok()?)
                .then_some(cluster)
            }
        },
    )
    .await
}

/// The `Ready` condition's (status, reason) of a topology resource.
fn topology_ready(status: Option<&TopologyStatus>) -> Option<(String, String)> {
    let ready = conditions::find(&status?.conditions, conditions::READY)?;
    Some((ready.status.clone(), ready.reason.clone()))
}

async fn wait_topology<K>(
    api: &Api<K>,
    name: &str,
    status: fn(&K) -> Option<&TopologyStatus>,
    want: (&str, &str),
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    wait_for(&format!("{name} Ready={want:?}"), TIMEOUT, || {
        let api = api.clone();
        async move {
            let object = api.get(name).await.ok()?;
            let (ready, reason) = topology_ready(status(&object))?;
            (ready == want.0 && (want.1.is_empty() || reason == want.1)).then_some(())
        }
    })
    .await;
}

/// The management API of one pod, as the default user.
#[derive(Clone)]
struct Management {
    http: reqwest::Client,
    base: String,
    user: String,
    password: String,
}

impl Management {
    fn of(ip: Ipv4Addr, credentials: &(String, String)) -> Management {
        Management {
            http: reqwest::Client::builder()
                .timeout(CLIENT_TIMEOUT)
                .no_proxy()
                .build()
                .expect("HTTP client"),
            base: format!("http://{ip}:15672"),
            user: credentials.0.clone(),
            password: credentials.1.clone(),
        }
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (StatusCode, serde_json::Value) {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .basic_auth(&self.user, Some(&self.password));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|err| panic!("{method} {path}: {err}"));
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> (StatusCode, serde_json::Value) {
        self.request(reqwest::Method::GET, path, None).await
    }
}

fn amqp_url(ip: Ipv4Addr, credentials: &(String, String)) -> String {
    format!("amqp://{}:{}@{ip}:5672/%2f", credentials.0, credentials.1)
}

async fn connect(ip: Ipv4Addr, credentials: &(String, String)) -> Result<Connection, String> {
    match tokio::time::timeout(
        CLIENT_TIMEOUT,
        Connection::connect(&amqp_url(ip, credentials), ConnectionProperties::default()),
    )
    .await
    {
        Ok(result) => result.map_err(|err| format!("connect to {ip}: {err}")),
        Err(_) => Err(format!(
            "connect to {ip}: no answer within {CLIENT_TIMEOUT:?}"
        )),
    }
}

/// Consumes from `queue` until every body in `expected` arrived (extra
/// bodies, e.g. unconfirmed publishes that made it, are allowed); returns
/// how many deliveries there were. Fails after `timeout` naming what is missing.
async fn consume_expecting(
    channel: &Channel,
    queue: &str,
    expected: &BTreeSet<String>,
    timeout: Duration,
) -> usize {
    channel
        .basic_qos(500, BasicQosOptions::default())
        .await
        .expect("basic.qos");
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            format!("e2e-{queue}").as_str().into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|err| panic!("basic.consume {queue}: {err}"));
    let mut missing = expected.clone();
    let mut deliveries = 0;
    let deadline = tokio::time::Instant::now() + timeout;
    while !missing.is_empty() {
        match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                deliveries += 1;
                missing.remove(String::from_utf8_lossy(&delivery.data).as_ref());
            }
            Ok(Some(Err(err))) => panic!("consuming {queue}: {err}"),
            Ok(None) => panic!("consumer of {queue} ended"),
            Err(_) => panic!(
                "{queue}: {} of {} expected messages missing after {timeout:?} (e.g. {:?})",
                missing.len(),
                expected.len(),
                missing.iter().take(5).collect::<Vec<_>>()
            ),
        }
    }
    deliveries
}

/// Publishes each body to `exchange` with `routing_key`, persistent, and
/// waits for every confirm.
async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    bodies: &[String],
) {
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    for body in bodies {
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(
            matches!(confirm, Confirmation::Ack(None)),
            "{body}: {confirm:?}"
        );
    }
}

/// Whether the pod is Ready and not being deleted.
fn pod_serving(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The cluster's pods by name.
async fn broker_pods(pods: &Api<Pod>) -> BTreeMap<String, Pod> {
    pods.list(&ListParams::default().labels(BROKER_PODS))
        .await
        .map(|list| list.items.into_iter().map(|p| (p.name_any(), p)).collect())
        .unwrap_or_default()
}

/// Ordinals among `0..replicas` whose pod is Ready and not terminating.
async fn serving_ordinals(pods: &Api<Pod>, replicas: usize) -> Vec<usize> {
    let current = broker_pods(pods).await;
    (0..replicas)
        .filter(|i| {
            current
                .get(&format!("{CLUSTER}-{i}"))
                .is_some_and(pod_serving)
        })
        .collect()
}

/// What the roll's publisher did.
#[derive(Debug, Default)]
struct PublishReport {
    /// Bodies the broker confirmed.
    confirmed: BTreeSet<String>,
    /// Publishes sent.
    sent: usize,
    /// Publishes the broker refused (basic.nack).
    nacked: usize,
    /// Connections opened (the first one included).
    connections: usize,
}

/// Publishes persistent messages to `queue` with confirms, one at a time,
/// through any Ready pod, moving to another on a lost connection or an
/// unanswered publish, until `stop` turns true.
async fn publish_until_stopped(
    pods: Api<Pod>,
    addresses: Vec<Ipv4Addr>,
    credentials: (String, String),
    queue: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> PublishReport {
    let mut report = PublishReport::default();
    let mut next_ordinal = 0;
    'connections: while !*stop.borrow() {
        let serving = serving_ordinals(&pods, addresses.len()).await;
        let Some(&ordinal) = serving
            .iter()
            .find(|&&o| o >= next_ordinal)
            .or(serving.first())
        else {
            tokio::time::sleep(POLL_INTERVAL).await;
            continue;
        };
        next_ordinal = (ordinal + 1) % addresses.len();
        let Ok(connection) = connect(addresses[ordinal], &credentials).await else {
            continue;
        };
        report.connections += 1;
        let Ok(channel) = connection.create_channel().await else {
            continue;
        };
        if channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .is_err()
        {
            continue;
        }
        loop {
            if *stop.borrow() {
                let _ = connection.close(200, "done".into()).await;
                break 'connections;
            }
            let body = format!("roll {}", report.sent);
            report.sent += 1;
            let published = tokio::time::timeout(CLIENT_TIMEOUT, async {
                channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await?
                    .await
            })
            .await;
            match published {
                Ok(Ok(Confirmation::Ack(_))) => {
                    report.confirmed.insert(body);
                }
                Ok(Ok(_)) => report.nacked += 1,
                // Connection lost or no answer: try another pod.
                Ok(Err(_)) | Err(_) => continue 'connections,
            }
            tokio::select! {
                _ = tokio::time::sleep(ROLL_PUBLISH_PACE) => {}
                _ = stop.changed() => {}
            }
        }
    }
    report
}

/// Samples pod readiness until `stop`: the largest number of the first
/// `replicas` pods seen not Ready (missing, terminating or unready) at once.
async fn max_not_ready(
    pods: Api<Pod>,
    replicas: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> usize {
    let mut worst = 0;
    while !*stop.borrow() {
        let not_ready = replicas - serving_ordinals(&pods, replicas).await.len();
        if not_ready > worst {
            eprintln!("e2e: {not_ready} pod(s) not Ready at once");
            worst = not_ready;
        }
        tokio::select! {
            _ = tokio::time::sleep(READINESS_SAMPLE_INTERVAL) => {}
            _ = stop.changed() => {}
        }
    }
    worst
}

/// Declares durable queue `parked` homed on the top pod `node` through the
/// management API and publishes confirmed persistent messages to it.
async fn park_messages(
    management: &Management,
    node: &str,
    ip: Ipv4Addr,
    credentials: &(String, String),
) -> BTreeSet<String> {
    let (code, body) = management
        .request(
            reqwest::Method::PUT,
            "/api/queues/%2F/parked",
            Some(serde_json::json!({"durable": true, "node": node})),
        )
        .await;
    assert!(code.is_success(), "PUT parked: {code} {body}");
    let (code, queue) = management.get("/api/queues/%2F/parked").await;
    assert_eq!(
        (code, queue["node"].as_str()),
        (StatusCode::OK, Some(node)),
        "{queue}"
    );
    let connection = connect(ip, credentials).await.expect("AMQP to the top pod");
    let channel = connection.create_channel().await.expect("channel");
    let bodies: Vec<String> = (0..PARKED_MESSAGES)
        .map(|i| format!("parked {i}"))
        .collect();
    publish_confirmed(&channel, "", "parked", &bodies).await;
    connection.close(200, "done".into()).await.expect("close");
    bodies.into_iter().collect()
}

/// Waits until `name` of kind `K` no longer exists.
async fn wait_gone<K>(api: &Api<K>, kind: &str, name: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    wait_for(&format!("{kind} {name} gone"), TIMEOUT, || {
        let api = api.clone();
        async move { api.get_opt(name).await.ok()?.is_none().then_some(()) }
    })
    .await;
}

/// How many events with `reason` the operator published about the cluster.
async fn cluster_events(events: &Api<Event>, reason: &str) -> usize {
    events
        .list(&ListParams::default())
        .await
        .map(|list| {
            list.items
                .iter()
                .filter(|event| {
                    event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(CLUSTER)
                        && event.reason.as_deref() == Some(reason)
                        && event.reporting_controller.as_deref() == Some("synod-operator")
                })
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_runs_a_three_node_cluster_through_its_life() {
    // Goal: with the operator binary under its chart RBAC, a 3-replica cluster forms, serves declared topology to real clients, scales, rolls a config change one pod at a time without losing confirmed messages, recovers a deleted pod, cleans up after deletion, and invalid resources are refused with clear messages.
    synod_operator::install_crypto_provider();
    let mut steps = Steps::new();

    // Setup: the control plane and the node simulator.
    let env = EnvTest::start().await.unwrap_or_else(|err| panic!("{err}"));
    assert!(
        env.has_controller_manager(),
        "kube-controller-manager is needed (scripts/setup-k8s.sh builds it)"
    );
    let client = env.client();
    // Probes run at most every READINESS_PROBE_INTERVAL, so a restarted
    // broker's pod turns Ready a while after the broker could answer, as
    // with a real kubelet's probe period.
    let kubelet = Kubelet::start_with(
        &env,
        support::kubelet::Options {
            probe_interval: READINESS_PROBE_INTERVAL,
            ..support::kubelet::Options::default()
        },
    )
    .await
    .expect("start node simulator");
    steps.done("setup: control plane and node simulator");

    // Step 1: CRDs and RBAC as a user installs them, the operator as its own process.
    kubectl_ok(&env, &["apply", "--server-side", "-f", "crds/"], None);
    kubectl_ok(
        &env,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "--all",
        ],
        None,
    );
    for name in [OPERATOR_NAMESPACE, NAMESPACE] {
        let namespace = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    pod-security.kubernetes.io/enforce: restricted\n"
        );
        kubectl_ok(
            &env,
            &["apply", "--server-side", "-f", "-"],
            Some(&namespace),
        );
    }
    // The chart's own ServiceAccount, ClusterRole and binding, rendered by helm.
    let mut helm = env.helm().expect("helm built");
    helm.args([
        "template",
        "synod",
        "charts/synod",
        "--namespace",
        OPERATOR_NAMESPACE,
        "--show-only",
        "templates/serviceaccount.yaml",
        "--show-only",
        "templates/rbac.yaml",
    ])
    .current_dir(repo_root())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let rbac = run_with_stdin(helm, None).unwrap_or_else(|err| panic!("helm template: {err}"));
    assert!(rbac.contains("kind: ClusterRole\n"), "{rbac}");
    kubectl_ok(
        &env,
        &[
            "apply",
            "--server-side",
            "--namespace",
            OPERATOR_NAMESPACE,
            "-f",
            "-",
        ],
        Some(&rbac),
    );
    let service_accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let account = service_accounts
        .get("synod")
        .await
        .expect("the chart's ServiceAccount synod");
    let identity = env
        .service_account_identity(OPERATOR_NAMESPACE, &account.name_any())
        .await
        .expect("a token for the operator's ServiceAccount");
    // The identity is restricted: it may not read Secrets everywhere or act as admin.
    let can_list_secrets = kubectl(
        &env,
        &[
            "auth",
            "can-i",
            "list",
            "secrets",
            "--as",
            &identity.user,
            "-A",
        ],
        None,
    );
    assert!(
        can_list_secrets.is_err(),
        "the operator's role must not list Secrets: {can_list_secrets:?}"
    );
    let mut operator =
        OperatorProcess::start(&identity.kubeconfig, env.dir().join("synod-operator.log"));
    // Leader election works under the chart's role: the Lease names this process.
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    wait_for("the operator holds its Lease", TIMEOUT, || {
        let leases = leases.clone();
        async move {
            let lease = leases.get_opt("synod-operator").await.ok()??;
            (lease.spec?.holder_identity.as_deref() == Some("synod-operator-e2e")).then_some(())
        }
    })
    .await;
    operator.assert_running();
    steps.done("step 1: CRDs, RBAC, operator process");

    // Step 2: the example BrokerCluster (3 replicas).
    let example =
        std::fs::read_to_string(repo_root().join("charts/synod/examples/broker-cluster.yaml"))
            .expect("the example BrokerCluster");
    assert!(example.contains(&format!("name: {CLUSTER}")) && example.contains("replicas: 3"));
    kubectl_ok(
        &env,
        &["apply", "--namespace", NAMESPACE, "-f", "-"],
        Some(&example),
    );
    let clusters: Api<BrokerCluster> = Api::namespaced(client.clone(), NAMESPACE);
    let cluster = wait_cluster_converged(&clusters, 3).await;
    operator.assert_running();
    let status = cluster.status.clone().expect("status");
    eprintln!(
        "e2e: cluster Ready: members {:?}, leader {:?}, epoch {:?}",
        status.members, status.leader, status.epoch
    );
    let secret = Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .get(&format!("{CLUSTER}-default-user"))
        .await
        .expect("default user Secret");
    let credentials =
        synod_operator::resources::credentials(Some(&secret)).expect("complete credentials");
    let pod_ip = |ordinal: usize| kubelet.pod_ip(NAMESPACE, &format!("{CLUSTER}-{ordinal}"));
    // Every pod's broker agrees on the same three voters.
    for ordinal in 0..3 {
        let (code, body) = Management::of(pod_ip(ordinal), &credentials)
            .get("/api/cluster")
            .await;
        assert_eq!(code, StatusCode::OK, "{body}");
        let mut names: Vec<&str> = body["members"]
            .as_array()
            .expect("members")
            .iter()
            .filter_map(|m| m["name"].as_str())
            .collect();
        names.sort_unstable();
        assert_eq!(names, ["hello-0", "hello-1", "hello-2"], "{body}");
    }
    steps.done("step 2: BrokerCluster with 3 replicas Ready");

    // Step 3: the example topology (fanout exchange, two queues, two bindings).
    let topology = std::fs::read_to_string(repo_root().join("charts/synod/examples/topology.yaml"))
        .expect("the example topology");
    kubectl_ok(
        &env,
        &["apply", "--namespace", NAMESPACE, "-f", "-"],
        Some(&topology),
    );
    let exchanges: Api<Exchange> = Api::namespaced(client.clone(), NAMESPACE);
    let queues: Api<Queue> = Api::namespaced(client.clone(), NAMESPACE);
    let bindings: Api<Binding> = Api::namespaced(client.clone(), NAMESPACE);
    wait_topology(&exchanges, "logs", |o| o.status.as_ref(), ("True", "")).await;
    for name in ["logs-archive", "logs-alerts"] {
        wait_topology(&queues, name, |o| o.status.as_ref(), ("True", "")).await;
    }
    for name in ["logs-to-archive", "logs-to-alerts"] {
        wait_topology(&bindings, name, |o| o.status.as_ref(), ("True", "")).await;
    }
    let management = Management::of(pod_ip(0), &credentials);
    let (code, exchange) = management.get("/api/exchanges/%2F/logs").await;
    assert_eq!(
        (code, exchange["type"].as_str()),
        (StatusCode::OK, Some("fanout"))
    );

    let publisher = connect(pod_ip(0), &credentials)
        .await
        .expect("AMQP to hello-0");
    let channel = publisher.create_channel().await.expect("channel");
    let bodies: Vec<String> = (0..FANOUT_MESSAGES).map(|i| format!("log {i}")).collect();
    publish_confirmed(&channel, "logs", "", &bodies).await;
    publisher.close(200, "done".into()).await.expect("close");
    let expected: BTreeSet<String> = bodies.iter().cloned().collect();
    for (ordinal, queue) in [(1, "logs.archive"), (2, "logs.alerts")] {
        let consumer = connect(pod_ip(ordinal), &credentials)
            .await
            .unwrap_or_else(|err| panic!("AMQP to hello-{ordinal}: {err}"));
        let channel = consumer.create_channel().await.expect("channel");
        let deliveries = consume_expecting(&channel, queue, &expected, TIMEOUT).await;
        assert_eq!(
            deliveries, FANOUT_MESSAGES,
            "{queue}: each message exactly once"
        );
        consumer.close(200, "done".into()).await.expect("close");
    }
    steps.done("step 3: topology Ready, fanout through hello-0 to hello-1 and hello-2");

    // Step 4: scale to 5 and back to 3; membership follows.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    kubectl_ok(
        &env,
        &[
            "scale",
            "--namespace",
            NAMESPACE,
            "brokercluster/hello",
            "--replicas=5",
        ],
        None,
    );
    wait_cluster_converged(&clusters, 5).await;
    steps.done("step 4: scaled up to 5 members");
    let parked = if SCALE_DOWN_MOVES_QUEUES {
        Some(park_messages(&management, "hello-4", pod_ip(4), &credentials).await)
    } else {
        None
    };
    kubectl_ok(
        &env,
        &[
            "scale",
            "--namespace",
            NAMESPACE,
            "brokercluster/hello",
            "--replicas=3",
        ],
        None,
    );
    wait_cluster_converged(&clusters, 3).await;
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), NAMESPACE);
    wait_for(
        "StatefulSet shrunk to 3 and pods hello-3, hello-4 gone",
        TIMEOUT,
        || {
            let (statefulsets, pods) = (statefulsets.clone(), pods.clone());
            async move {
                let replicas = statefulsets.get(CLUSTER).await.ok()?.spec?.replicas;
                let current = broker_pods(&pods).await;
                (replicas == Some(3) && current.len() == 3).then_some(())
            }
        },
    )
    .await;
    if let Some(parked) = parked {
        let (code, queue) = management.get("/api/queues/%2F/parked").await;
        assert_eq!(code, StatusCode::OK, "{queue}");
        let node = queue["node"].as_str().unwrap_or_default();
        assert!(["hello-0", "hello-1", "hello-2"].contains(&node), "{queue}");
        let connection = connect(pod_ip(0), &credentials)
            .await
            .expect("AMQP to hello-0");
        let channel = connection.create_channel().await.expect("channel");
        consume_expecting(&channel, "parked", &parked, TIMEOUT).await;
        connection.close(200, "done".into()).await.expect("close");
    }
    // `kubectl describe` tells the story: events under the operator's name.
    let events: Api<Event> = Api::namespaced(client.clone(), NAMESPACE);
    wait_for("ScalingUp and ScaledDown events", TIMEOUT, || {
        let events = events.clone();
        async move {
            (cluster_events(&events, "ScalingUp").await >= 1
                && cluster_events(&events, "ScaledDown").await >= 1)
                .then_some(())
        }
    })
    .await;
    steps.done("step 4: scaled down to 3 members");
    operator.assert_running();

    // Step 5: a configuration change rolls the pods one at a time while a
    // client keeps publishing with confirms through whichever pod is Ready.
    let rolling = format!(
        "apiVersion: synod.dev/v1alpha1\nkind: Queue\nmetadata:\n  name: rolling\nspec:\n  clusterRef:\n    name: {CLUSTER}\n  name: rolling\n  durable: true\n"
    );
    kubectl_ok(
        &env,
        &["apply", "--namespace", NAMESPACE, "-f", "-"],
        Some(&rolling),
    );
    wait_topology(&queues, "rolling", |o| o.status.as_ref(), ("True", "")).await;
    let before: BTreeMap<String, Option<String>> = broker_pods(&pods)
        .await
        .into_iter()
        .map(|(name, pod)| (name, pod.uid()))
        .collect();
    assert_eq!(before.len(), 3);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let addresses: Vec<Ipv4Addr> = (0..3).map(pod_ip).collect();
    let publisher = tokio::spawn(publish_until_stopped(
        pods.clone(),
        addresses,
        credentials.clone(),
        "rolling".to_string(),
        stop_rx.clone(),
    ));
    let observer = tokio::spawn(max_not_ready(pods.clone(), 3, stop_rx));
    kubectl_ok(
        &env,
        &[
            "patch",
            "--namespace",
            NAMESPACE,
            "brokercluster/hello",
            "--type=merge",
            "--patch",
            r#"{"spec":{"config":{"max-message-size":67108864}}}"#,
        ],
        None,
    );
    wait_for(
        "every pod restarted with the new configuration",
        CONVERGE_TIMEOUT,
        || {
            let (pods, before) = (pods.clone(), before.clone());
            async move {
                let current = broker_pods(&pods).await;
                let restarted = current.len() == 3
                    && current.iter().all(|(name, pod)| {
                        before.get(name) != Some(&pod.uid()) && pod_serving(pod)
                    });
                restarted.then_some(())
            }
        },
    )
    .await;
    wait_cluster_converged(&clusters, 3).await;
    let _ = stop_tx.send(true);
    let report = publisher.await.expect("publisher task");
    let worst = observer.await.expect("observer task");
    eprintln!(
        "e2e: roll: {} sent, {} confirmed, {} nacked, {} connection(s); at most {worst} pod(s) not Ready at once",
        report.sent,
        report.confirmed.len(),
        report.nacked,
        report.connections
    );
    assert!(
        worst <= 1,
        "{worst} pods were not Ready at the same time during the roll"
    );
    assert!(
        report.confirmed.len() >= ROLL_CONFIRMED_MIN,
        "only {} publishes confirmed during the roll",
        report.confirmed.len()
    );
    let config = Api::<ConfigMap>::namespaced(client.clone(), NAMESPACE)
        .get(&format!("{CLUSTER}-config"))
        .await
        .expect("ConfigMap");
    let toml = config
        .data
        .unwrap_or_default()
        .remove("synod.toml")
        .unwrap_or_default();
    assert!(toml.contains("max-message-size = 67108864"), "{toml}");
    let connection = connect(pod_ip(0), &credentials)
        .await
        .expect("AMQP to hello-0");
    let channel = connection.create_channel().await.expect("channel");
    consume_expecting(&channel, "rolling", &report.confirmed, TIMEOUT).await;
    connection.close(200, "done".into()).await.expect("close");
    wait_for("a RestartingPod event", TIMEOUT, || {
        let events = events.clone();
        async move { (cluster_events(&events, "RestartingPod").await >= 1).then_some(()) }
    })
    .await;
    steps.done("step 5: configuration roll, every confirmed message consumed");
    operator.assert_running();

    // Step 6: a deleted pod comes back and rejoins.
    let old_uid = pods.get("hello-1").await.expect("hello-1").uid();
    kubectl_ok(
        &env,
        &[
            "delete",
            "pod",
            "--namespace",
            NAMESPACE,
            "hello-1",
            "--wait=false",
        ],
        None,
    );
    wait_for("hello-1 recreated and Ready", CONVERGE_TIMEOUT, || {
        let (pods, old_uid) = (pods.clone(), old_uid.clone());
        async move {
            let pod = pods.get_opt("hello-1").await.ok()??;
            (pod.uid() != old_uid && pod_serving(&pod)).then_some(())
        }
    })
    .await;
    let rejoined = Management::of(pod_ip(1), &credentials);
    let (code, _) = rejoined.get("/api/cluster/ready").await;
    assert_eq!(code, StatusCode::OK, "hello-1 is a caught-up member again");
    wait_cluster_converged(&clusters, 3).await;
    steps.done("step 6: deleted pod recreated and rejoined");

    // Step 7: deleting a Queue deletes it on the broker; deleting the cluster
    // takes every object it owns, and every finalizer is released.
    kubectl_ok(
        &env,
        &[
            "delete",
            "queue",
            "--namespace",
            NAMESPACE,
            "logs-archive",
            "--timeout=60s",
        ],
        None,
    );
    wait_gone(&queues, "Queue", "logs-archive").await;
    steps.done("step 7: Queue deleted");
    let (code, _) = management.get("/api/queues/%2F/logs.archive").await;
    assert_eq!(
        code,
        StatusCode::NOT_FOUND,
        "the queue is gone from the broker"
    );
    let (code, _) = management.get("/api/queues/%2F/logs.alerts").await;
    assert_eq!(code, StatusCode::OK, "the other queue stays");
    kubectl_ok(
        &env,
        &[
            "delete",
            "brokercluster",
            "--namespace",
            NAMESPACE,
            CLUSTER,
            "--wait=false",
        ],
        None,
    );
    wait_gone(&clusters, "BrokerCluster", CLUSTER).await;
    steps.done("step 7: BrokerCluster gone");
    wait_gone(&statefulsets, "StatefulSet", CLUSTER).await;
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    wait_gone(&services, "Service", CLUSTER).await;
    wait_gone(&services, "Service", "hello-nodes").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    wait_gone(&secrets, "Secret", "hello-default-user").await;
    wait_gone(&secrets, "Secret", "hello-cluster-secret").await;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    wait_gone(&config_maps, "ConfigMap", "hello-config").await;
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), NAMESPACE);
    wait_gone(&budgets, "PodDisruptionBudget", CLUSTER).await;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), NAMESPACE);
    wait_gone(&accounts, "ServiceAccount", CLUSTER).await;
    wait_for("the broker pods gone", TIMEOUT, || {
        let pods = pods.clone();
        async move { broker_pods(&pods).await.is_empty().then_some(()) }
    })
    .await;
    steps.done("step 7: owned objects garbage-collected");
    // Topology of a deleted cluster goes with the cluster's brokers: deleting
    // it releases the finalizers without a broker to talk to. (`bindings`
    // alone is the core API's pod Binding: users must name the group.)
    kubectl_ok(
        &env,
        &[
            "delete",
            "exchanges.synod.dev,queues.synod.dev,bindings.synod.dev",
            "--all",
            "--namespace",
            NAMESPACE,
            "--wait=false",
        ],
        None,
    );
    for name in ["logs"] {
        wait_gone(&exchanges, "Exchange", name).await;
    }
    for name in ["logs-alerts", "rolling"] {
        wait_gone(&queues, "Queue", name).await;
    }
    for name in ["logs-to-archive", "logs-to-alerts"] {
        wait_gone(&bindings, "Binding", name).await;
    }
    steps.done("step 7: topology of the deleted cluster released");

    // Step 8: invalid resources are refused with messages that say why.
    let refused = |yaml: &str| {
        kubectl(
            &env,
            &[
                "apply",
                "--server-side",
                "--namespace",
                NAMESPACE,
                "-f",
                "-",
            ],
            Some(yaml),
        )
        .expect_err("the API server refuses it")
    };
    let message = refused(
        "apiVersion: synod.dev/v1alpha1\nkind: BrokerCluster\nmetadata:\n  name: negative\nspec:\n  replicas: -1\n",
    );
    assert!(
        message.contains("spec.replicas") && message.contains("greater than or equal to 1"),
        "{message}"
    );
    let message = refused(
        "apiVersion: synod.dev/v1alpha1\nkind: Exchange\nmetadata:\n  name: odd\nspec:\n  clusterRef:\n    name: hello\n  name: odd\n  type: bogus\n",
    );
    assert!(
        message.contains("spec.type") && message.contains(r#"Unsupported value: "bogus""#),
        "{message}"
    );
    let message = refused(
        "apiVersion: synod.dev/v1alpha1\nkind: BrokerCluster\nmetadata:\n  name: managed\nspec:\n  config:\n    peers: x=y:1\n",
    );
    assert!(
        message.contains("config may not set keys the operator manages"),
        "{message}"
    );
    let orphan = |name: &str| {
        format!(
            "apiVersion: synod.dev/v1alpha1\nkind: Queue\nmetadata:\n  name: orphan\nspec:\n  clusterRef:\n    name: nowhere\n  name: {name}\n  durable: true\n"
        )
    };
    kubectl_ok(
        &env,
        &[
            "apply",
            "--server-side",
            "--namespace",
            NAMESPACE,
            "-f",
            "-",
        ],
        Some(&orphan("orphan")),
    );
    wait_topology(
        &queues,
        "orphan",
        |o| o.status.as_ref(),
        ("False", "ClusterNotFound"),
    )
    .await;
    let message = refused(&orphan("renamed"));
    assert!(message.contains("name is immutable"), "{message}");
    kubectl_ok(
        &env,
        &[
            "delete",
            "queue",
            "--namespace",
            NAMESPACE,
            "orphan",
            "--timeout=60s",
        ],
        None,
    );
    steps.done("step 8: invalid resources refused, missing cluster reported");

    operator.assert_running();
    steps.summary();
    drop(operator);
    kubelet.stop().await;
}
