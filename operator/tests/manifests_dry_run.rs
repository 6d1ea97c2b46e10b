//! What users apply is accepted by a real API server: the Helm chart rendered
//! with `helm template` (defaults and with its core-API options on), the
//! single-file `deploy/synod.yaml`, the chart's examples and the objects the
//! operator builds for a `BrokerCluster`, each through
//! `kubectl apply --server-side --dry-run=server` after the shipped CRDs are
//! installed.
//! Namespaces enforce the "restricted" Pod Security Standard, and any
//! warning kubectl prints (Pod Security, deprecations, unknown fields) fails
//! the test. Nothing here is persisted except the CRDs and namespaces.

// The support files are formatted through the test environment's own tests.
#[rustfmt::skip]
mod support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kube::Resource as _;
use kube::api::{Api, PostParams};
use serde::Serialize;
use support::envtest::{EnvTest, Options};
use synod_operator::crd::BrokerCluster;
use synod_operator::crd::broker_cluster::{BrokerClusterSpec, TlsSpec};
use synod_operator::resources;

/// Namespace of the operator, as `deploy/synod.yaml` names it.
const OPERATOR_NAMESPACE: &str = "synod-system";
/// Namespace of the broker clusters and topology.
const APPS_NAMESPACE: &str = "apps";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the operator crate sits in the workspace root")
        .to_path_buf()
}

/// Runs `command` (with `stdin` piped in) and returns its stdout; panics with
/// stdout and stderr when it fails or prints a warning.
fn run(what: &str, mut command: Command, stdin: Option<&[u8]>) -> String {
    command
        .current_dir(repo_root())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|err| panic!("{what}: {err}"));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input)
            .unwrap_or_else(|err| panic!("{what}: writing stdin: {err}"));
    }
    let output = child
        .wait_with_output()
        .unwrap_or_else(|err| panic!("{what}: {err}"));
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|line| line.to_ascii_lowercase().contains("warning"))
        .collect();
    assert!(
        warnings.is_empty(),
        "{what} printed warnings:\n{}",
        warnings.join("\n")
    );
    stdout
}

/// `kubectl apply --server-side --dry-run=server` of `yaml`; returns what
/// kubectl reported. Server-side apply throughout, so that objects installed
/// for real (the CRDs) are updated without client-side apply's annotation.
fn dry_run(env: &EnvTest, what: &str, yaml: &str, namespace: Option<&str>) -> String {
    let mut kubectl = env.kubectl().expect("kubectl built");
    kubectl.args(["apply", "--server-side", "--dry-run=server", "-f", "-"]);
    if let Some(namespace) = namespace {
        kubectl.args(["--namespace", namespace]);
    }
    let out = run(
        &format!("dry run of {what}"),
        kubectl,
        Some(yaml.as_bytes()),
    );
    eprintln!("{what}:\n{out}");
    out
}

/// A restricted namespace, created for real (a dry-run object needs it).
fn create_restricted_namespace(env: &EnvTest, name: &str) {
    let yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    pod-security.kubernetes.io/enforce: restricted\n    pod-security.kubernetes.io/warn: restricted\n    pod-security.kubernetes.io/audit: restricted\n"
    );
    let mut kubectl = env.kubectl().expect("kubectl built");
    kubectl.args(["apply", "--server-side", "-f", "-"]);
    run(
        &format!("create namespace {name}"),
        kubectl,
        Some(yaml.as_bytes()),
    );
}

/// Joins objects into one multi-document YAML stream.
fn yaml_stream<T: Serialize>(objects: &[T]) -> String {
    objects
        .iter()
        .map(|object| serde_yaml::to_string(object).expect("objects serialize to YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_manifests_and_built_objects_pass_a_server_side_dry_run() {
    // Goal: the chart (several value sets), deploy/synod.yaml, the examples and the operator's objects are accepted by kube-apiserver without warnings in restricted namespaces.
    synod_operator::install_crypto_provider();
    let env = EnvTest::start_with(Options {
        controller_manager: Some(false),
        ..Options::default()
    })
    .await
    .unwrap_or_else(|err| panic!("{err}"));

    // The CRDs as the chart ships them, installed for real: the topology and
    // cluster objects below are checked against their schemas and CEL rules.
    let mut kubectl = env.kubectl().expect("kubectl built");
    kubectl.args(["apply", "--server-side", "-f", "charts/synod/crds/"]);
    run("install the chart's CRDs", kubectl, None);
    let mut kubectl = env.kubectl().expect("kubectl built");
    kubectl.args([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd",
        "--all",
    ]);
    run("wait for the CRDs", kubectl, None);
    create_restricted_namespace(&env, OPERATOR_NAMESPACE);
    create_restricted_namespace(&env, APPS_NAMESPACE);

    // The chart: defaults, and every option that renders core or RBAC objects
    // only. PodMonitor and PrometheusRule need the Prometheus Operator's
    // CRDs, which this control plane does not have (scripts/test-chart.sh
    // lints them and checks the rules with promtool).
    let value_sets: &[&[&str]] = &[
        &[],
        &[
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "monitoring.dashboards.enabled=true",
            "--set",
            "operator.replicas=2",
            "--set",
            "operator.watchNamespace=apps",
            "--set",
            "operator.leaderElection=false",
        ],
        &[
            "--set",
            "rbac.create=false",
            "--set",
            "serviceAccount.create=false",
        ],
    ];
    for values in value_sets {
        let mut helm = env.helm().expect("helm built");
        helm.args([
            "template",
            "synod",
            "charts/synod",
            "--namespace",
            OPERATOR_NAMESPACE,
            "--include-crds",
        ])
        .args(*values);
        let rendered = run(&format!("helm template {values:?}"), helm, None);
        // No --namespace: every rendered object names its own (with
        // watchNamespace the brokers' NetworkPolicy lives in the watched namespace).
        let out = dry_run(&env, &format!("the chart with {values:?}"), &rendered, None);
        assert!(out.contains("deployment.apps/synod"), "{out}");
    }

    let install =
        std::fs::read_to_string(repo_root().join("deploy/synod.yaml")).expect("deploy/synod.yaml");
    let out = dry_run(&env, "deploy/synod.yaml", &install, None);
    for object in [
        "namespace/synod-system",
        "customresourcedefinition.apiextensions.k8s.io/brokerclusters.synod.dev",
        "clusterrole.rbac.authorization.k8s.io/synod",
        "deployment.apps/synod",
    ] {
        assert!(out.contains(object), "{object} missing in:\n{out}");
    }

    let examples = repo_root().join("charts/synod/examples");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&examples)
        .expect("examples directory")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no examples in {}", examples.display());
    for path in &paths {
        let yaml = std::fs::read_to_string(path).expect("read example");
        dry_run(
            &env,
            &path.display().to_string(),
            &yaml,
            Some(APPS_NAMESPACE),
        );
    }

    // What the operator makes of a BrokerCluster (with TLS, so every optional
    // part is present) must pass the same admission, Pod Security included.
    let mut spec = BrokerClusterSpec::with_defaults();
    spec.tls = Some(TlsSpec {
        secret_name: "rabbit-tls".into(),
    });
    let clusters: Api<BrokerCluster> = Api::namespaced(env.client(), APPS_NAMESPACE);
    let cluster = clusters
        .create(&PostParams::default(), &BrokerCluster::new("rabbit", spec))
        .await
        .expect("create the BrokerCluster the objects belong to");
    assert!(cluster.meta().uid.is_some());
    let names = resources::Names::of(&cluster).expect("names");
    let peers = names.peers(3);
    let built = vec![
        serde_json::to_value(resources::service_account(&cluster).expect("service account")),
        serde_json::to_value(resources::client_service(&cluster).expect("client service")),
        serde_json::to_value(resources::nodes_service(&cluster).expect("nodes service")),
        serde_json::to_value(resources::config_map(&cluster, &peers).expect("config map")),
        serde_json::to_value(
            resources::default_user_secret(&cluster, "user", "pass").expect("default user"),
        ),
        serde_json::to_value(resources::cluster_secret(&cluster, "s").expect("cluster secret")),
        serde_json::to_value(resources::pod_disruption_budget(&cluster).expect("budget")),
        serde_json::to_value(resources::stateful_set(&cluster, 3).expect("stateful set")),
    ]
    .into_iter()
    .map(|value| value.expect("objects serialize"))
    .collect::<Vec<_>>();
    let out = dry_run(
        &env,
        "the objects of BrokerCluster rabbit",
        &yaml_stream(&built),
        Some(APPS_NAMESPACE),
    );
    assert!(out.contains("statefulset.apps/rabbit"), "{out}");
}
