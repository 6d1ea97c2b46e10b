//! The chart's operator dashboard and the operator's alert rule against a
//! real Prometheus scraping a real `synod-operator` process, which
//! reconciles against a real kube-apiserver: one Exchange reconciles
//! successfully (its cluster is missing, which is waiting, not failing), one
//! BrokerCluster fails (its headless Service exists already with a cluster
//! IP, which the API server refuses to change). Every panel query must be
//! valid and return series and SynodOperatorReconcileErrors must fire. Must
//! not fake the API server, the operator or Prometheus.

// rustfmt resolves modules even where nothing is compiled; the support files
// are formatted through the test environment's own tests.
#[rustfmt::skip]
mod support;

// The broker's dashboard test uses the same Prometheus harness.
#[path = "../../broker/tests/prometheus_support/mod.rs"]
mod prometheus_support;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};

use k8s_openapi::api::core::v1::{Namespace, Service, ServicePort, ServiceSpec};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use prometheus_support::{
    Prometheus, TempDir, check_dashboard, free_loopback_port, http_client, scrape_job, test_rules,
    variable_values, wait_for,
};
use support::envtest::EnvTest;
use synod_operator::crd::broker_cluster::BrokerClusterSpec;
use synod_operator::crd::exchange::{ExchangeKind, ExchangeSpec};
use synod_operator::crd::{self, BrokerCluster, ClusterRef, Exchange};

/// Namespace of the watched resources.
const WATCHED: &str = "dash";

/// The `namespace` target label of the operator's metrics: the namespace
/// its pod runs in, as the chart's operator PodMonitor scrapes it.
const OPERATOR_NAMESPACE: &str = "synod-system";

/// Panels allowed to return no series here, and why. None today: the
/// test provokes a failing reconcile, so even the error panel has series.
const EXPECTED_EMPTY: &[(&str, &str)] = &[];

async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in crd::all() {
        crds.create(&PostParams::default(), &crd)
            .await
            .unwrap_or_else(|err| panic!("install {}: {err}", crd.name_any()));
    }
    for (_, crd) in crd::all() {
        let name = crd.name_any();
        let crds = &crds;
        let name = &name;
        wait_for(&format!("{name} established"), || async move {
            let crd = crds.get(name).await.ok()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        })
        .await;
    }
}

/// The `synod-operator` binary, killed (only it) on drop.
struct OperatorProcess(Child);

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operator_panel_and_the_operator_alert_work() {
    // Goal: every operator dashboard panel returns series from a real operator, and a failing reconcile fires SynodOperatorReconcileErrors.
    synod_operator::install_crypto_provider();
    let env = EnvTest::start().await.unwrap_or_else(|err| panic!("{err}"));
    let client = env.client();
    install_crds(&client).await;
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(WATCHED.into()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await
        .expect("create namespace");
    // A Service with an allocated cluster IP where the operator wants its
    // headless `alpha-nodes`: the API server refuses to change the IP, so
    // every reconcile of BrokerCluster alpha fails.
    Api::<Service>::namespaced(client.clone(), WATCHED)
        .create(
            &PostParams::default(),
            &Service {
                metadata: ObjectMeta {
                    name: Some("alpha-nodes".into()),
                    ..ObjectMeta::default()
                },
                spec: Some(ServiceSpec {
                    ports: Some(vec![ServicePort {
                        name: Some("cluster".into()),
                        port: 25672,
                        ..ServicePort::default()
                    }]),
                    ..ServiceSpec::default()
                }),
                ..Service::default()
            },
        )
        .await
        .expect("create conflicting service");

    let metrics_port = free_loopback_port();
    let _operator = OperatorProcess(
        Command::new(env!("CARGO_BIN_EXE_synod-operator"))
            .args(["--namespace", WATCHED, "--no-leader-election"])
            .env("KUBECONFIG", env.kubeconfig())
            .env(
                "SYNOD_OPERATOR_METRICS_LISTEN",
                format!("127.0.0.1:{metrics_port}"),
            )
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start synod-operator"),
    );
    let http = http_client();
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    wait_for("the operator's /metrics", || async {
        let response = http.get(&metrics_url).send().await.ok()?;
        response.status().is_success().then_some(())
    })
    .await;

    Api::<BrokerCluster>::namespaced(client.clone(), WATCHED)
        .create(
            &PostParams::default(),
            &BrokerCluster::new("alpha", BrokerClusterSpec::with_defaults()),
        )
        .await
        .expect("create BrokerCluster");
    Api::<Exchange>::namespaced(client.clone(), WATCHED)
        .create(
            &PostParams::default(),
            &Exchange::new(
                "orders",
                ExchangeSpec {
                    cluster_ref: ClusterRef {
                        name: "missing".into(),
                    },
                    name: "orders".into(),
                    vhost: "/".into(),
                    kind: ExchangeKind::Topic,
                    durable: true,
                    auto_delete: false,
                    arguments: BTreeMap::new(),
                },
            ),
        )
        .await
        .expect("create Exchange");

    let prom_dir = TempDir::new("operator-prometheus");
    let rules = test_rules(&prom_dir.0);
    let job = scrape_job(
        "synod-operator",
        &[format!("127.0.0.1:{metrics_port}")],
        &[("namespace", OPERATOR_NAMESPACE)],
    );
    let prometheus = Prometheus::start(&prom_dir.0, &[job], &rules);
    let prometheus = &prometheus;
    wait_for("a success and a failure scraped", || async move {
        let success = prometheus
            .query("synod_operator_reconcile_total{kind=\"Exchange\",result=\"success\"}")
            .await
            .ok()?;
        let failure = prometheus
            .query("synod_operator_reconcile_total{kind=\"BrokerCluster\",result!=\"success\"}")
            .await
            .ok()?;
        (!success.is_empty() && !failure.is_empty()).then_some(())
    })
    .await;
    prometheus.wait_scraped("synod-operator", 1).await;

    let values = variable_values(&[("namespace", OPERATOR_NAMESPACE)]);
    let check = check_dashboard(
        prometheus,
        "dashboards/synod-operator.json",
        &values,
        EXPECTED_EMPTY,
    )
    .await;
    println!("{}", check.report.join("\n"));
    assert!(
        check.failures.is_empty(),
        "dashboard problems:\n{}",
        check.failures.join("\n")
    );

    let rule_names = prometheus.assert_rules_evaluate().await;
    assert!(
        rule_names.contains("SynodOperatorReconcileErrors"),
        "rules loaded: {rule_names:?}"
    );
    prometheus
        .wait_firing(
            "SynodOperatorReconcileErrors",
            &[("kind", "BrokerCluster"), ("namespace", OPERATOR_NAMESPACE)],
        )
        .await;
    let errors_for_exchanges = prometheus
        .alerts("SynodOperatorReconcileErrors", "firing")
        .await
        .into_iter()
        .filter(|labels| labels["kind"] == "Exchange")
        .count();
    assert_eq!(
        errors_for_exchanges, 0,
        "waiting for a missing cluster is not a reconcile error"
    );
}
