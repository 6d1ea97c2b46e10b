//! The `synod-operator` binary: flags, logging, signals, `/metrics` and
//! `/healthz`, leader election, then the library's controllers. No reconcile
//! logic lives here.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::routing::get;
use clap::Parser;
use futures::FutureExt;
use kube::Client;
use kube::api::{Api, ListParams};
use synod_operator::controller::{
    self, DEFAULT_BROKER_URL_TEMPLATE, DEFAULT_PEER_ADDRESS_TEMPLATE, Settings,
};
use synod_operator::crd::BrokerCluster;
use synod_operator::crd::broker_cluster::DEFAULT_IMAGE;
use synod_operator::leader::LeaseLock;
use synod_operator::metrics::Metrics;
use tracing::{error, info};

/// Exit code when the CRDs are not installed.
const EXIT_CRDS_MISSING: i32 = 2;

/// Command-line flags; each also settable from the environment variable shown.
#[derive(Debug, Parser)]
#[command(
    name = "synod-operator",
    version,
    about = "Kubernetes operator for Synod broker clusters"
)]
struct Args {
    /// Address of the HTTP server for `/metrics` and `/healthz`.
    #[arg(
        long,
        env = "SYNOD_OPERATOR_METRICS_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    metrics_listen: SocketAddr,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "SYNOD_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Run controllers without leader election (a single replica only).
    #[arg(long, env = "SYNOD_OPERATOR_NO_LEADER_ELECTION")]
    no_leader_election: bool,
    /// Name of the Lease used for leader election.
    #[arg(
        long,
        env = "SYNOD_OPERATOR_LEASE_NAME",
        default_value = "synod-operator"
    )]
    lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Identity in the election and in events (default: `<hostname>-<pid>`).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// URL template of a broker pod's management API. Placeholders:
    /// {scheme} {pod_ip} {pod} {ordinal} {cluster} {namespace} {port}.
    #[arg(long, env = "SYNOD_BROKER_URL_TEMPLATE", default_value = DEFAULT_BROKER_URL_TEMPLATE)]
    broker_url_template: String,
    /// Cluster address announced for a joining broker pod (same placeholders;
    /// `{port}` is 25672). Tests without cluster DNS use `{pod_ip}:{port}`.
    #[arg(long, env = "SYNOD_PEER_ADDRESS_TEMPLATE", default_value = DEFAULT_PEER_ADDRESS_TEMPLATE)]
    peer_address_template: String,
    /// Broker image for clusters that do not set `spec.image`.
    #[arg(long, env = "SYNOD_OPERATOR_BROKER_IMAGE", default_value = DEFAULT_IMAGE)]
    broker_image: String,
    /// Seconds between reconciles of healthy objects (drift repair).
    #[arg(long, env = "SYNOD_OPERATOR_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
    /// Seconds between checks of a cluster that is scaling, rolling or not ready.
    #[arg(long, env = "SYNOD_OPERATOR_TRANSITION_SECONDS", default_value_t = 5)]
    transition_seconds: u64,
    /// Log format: `text` or `json`.
    #[arg(long, env = "SYNOD_OPERATOR_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "synod-operator".to_string());
    format!("{host}-{}", std::process::id())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c().map(drop);
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return ctrl_c.await,
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}

/// Fails with an install hint when the `synod.dev` CRDs are not served.
async fn check_crds(client: &Client) -> anyhow::Result<bool> {
    let api: Api<BrokerCluster> = Api::all(client.clone());
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(err) => Err(err).context("cannot list BrokerClusters"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(&args.log_format);
    synod_operator::install_crypto_provider();
    let identity = args.identity.clone().unwrap_or_else(default_identity);

    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
    if !check_crds(&client).await? {
        error!("the synod.dev CRDs are not installed");
        eprintln!(
            "synod-operator: the synod.dev CRDs are not installed in this cluster.\n\
             Install them first:  kubectl apply -f crds/   (or: helm install synod charts/synod)"
        );
        std::process::exit(EXIT_CRDS_MISSING);
    }

    let metrics = Metrics::new();
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_listen))?;
    info!(address = %listener.local_addr()?, "serving /metrics and /healthz");
    let served = metrics.clone();
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || {
                let served = served.clone();
                async move { served.encode() }
            }),
        );

    // One signal ends everything: the HTTP server, the election and the controllers.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = {
        let mut stop_rx = stop_rx.clone();
        async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        }
        .boxed()
        .shared()
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown requested");
        let _ = stop_tx.send(true);
    });
    let http = tokio::spawn(
        axum::serve(listener, router)
            .with_graceful_shutdown(stopped.clone())
            .into_future(),
    );

    let settings = Settings {
        broker_url_template: args.broker_url_template.clone(),
        peer_address_template: args.peer_address_template.clone(),
        resync_interval: Duration::from_secs(args.resync_seconds.max(1)),
        transition_interval: Duration::from_secs(args.transition_seconds.max(1)),
        broker_image: args.broker_image.clone(),
    };

    let lost_leadership = if args.no_leader_election {
        controller::run(
            client,
            metrics,
            settings,
            Some(identity),
            args.namespace,
            stopped.clone(),
        )
        .await;
        false
    } else {
        let lock = LeaseLock::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
        );
        info!(lease = %args.lease_name, identity = %identity, "waiting for leadership");
        tokio::select! {
            _ = lock.acquire() => {}
            _ = stopped.clone() => {
                let _ = http.await;
                return Ok(());
            }
        }
        let (lost_tx, lost_rx) = tokio::sync::watch::channel(false);
        let run_until = {
            let stopped = stopped.clone();
            let mut lost_rx = lost_rx.clone();
            async move {
                tokio::select! {
                    _ = stopped => {},
                    _ = lost_rx.wait_for(|lost| *lost) => {},
                }
            }
            .boxed()
            .shared()
        };
        let controllers = controller::run(
            client,
            metrics,
            settings,
            Some(identity),
            args.namespace,
            run_until,
        );
        let renewing = async {
            lock.keep_renewing().await;
            let _ = lost_tx.send(true);
        };
        tokio::select! {
            _ = controllers => {}
            _ = renewing => {
                // Let the controllers stop before another replica takes over.
                info!("leadership lost; stopping controllers");
            }
        }
        let lost = *lost_rx.borrow();
        if !lost {
            lock.release().await;
        }
        lost
    };
    if lost_leadership {
        // Exit non-zero so the pod restarts as a standby in a clean state.
        anyhow::bail!("lost the leader lease");
    }
    let _ = http.await;
    info!("stopped");
    Ok(())
}
