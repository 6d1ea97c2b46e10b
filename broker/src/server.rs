//! Listeners and lifecycle: binds the AMQP socket (and, with
//! [`start_serving`], the management and metrics sockets), accepts connections
//! (bounded by a semaphore), runs housekeeping, and drains on shutdown.
//! Shutdown is a future passed in, so tests and `main` control it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::broker::{Broker, Settings};
use crate::config::Config;
use crate::limits;
use crate::metrics::Metrics;

/// Why the broker could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The data directory could not be opened, locked or restored.
    #[error("{0}")]
    Durable(#[from] crate::durable::Error),
    /// The cluster member could not start (listener, secret file, Paxos storage).
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::Error),
}

impl Error {
    /// The process exit code: 2 for a data directory of an incompatible
    /// format (a configuration problem), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Durable(err) if err.is_incompatible_format() => 2,
            Error::Cluster(crate::cluster::Error::Secret { .. }) => 2,
            _ => 1,
        }
    }
}

/// A broker running in the background.
#[derive(Debug)]
pub struct RunningBroker {
    /// The bound AMQP address (the real port when configured with 0).
    pub amqp_addr: SocketAddr,
    /// The broker, for inspection and management calls.
    pub broker: Arc<Broker>,
    /// The bound management API address, when started with [`start_serving`].
    pub mgmt_addr: Option<SocketAddr>,
    /// The bound `/metrics` address, when started with [`start_serving`].
    pub metrics_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    http_tasks: Vec<JoinHandle<()>>,
}

impl RunningBroker {
    /// Closes every connection (320 CONNECTION_FORCED) and waits for the
    /// listener and connections to finish.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
        for task in self.http_tasks {
            let _ = task.await;
        }
        if let Some(cluster) = self.broker.cluster() {
            cluster.stop().await;
        }
        if let Some(durable) = self.broker.durable() {
            durable.close();
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
    Ok((listener, bound))
}

/// Starts a broker with its management API (`mgmt_listen`) and Prometheus
/// `/metrics` (`metrics_listen`) listeners as well as AMQP.
pub async fn start_serving(
    config: Config,
    settings: Option<Settings>,
) -> Result<RunningBroker, Error> {
    serve_http(start_with(config.clone(), settings).await?, &config).await
}

/// [`start_durable`] plus the management API and `/metrics` listeners: the
/// broker the binary runs.
pub async fn start_durable_serving(
    config: Config,
    settings: Option<Settings>,
) -> Result<RunningBroker, Error> {
    serve_http(start_durable(config.clone(), settings).await?, &config).await
}

async fn serve_http(mut running: RunningBroker, config: &Config) -> Result<RunningBroker, Error> {
    let listeners = async {
        Ok::<_, Error>((
            bind(config.mgmt_listen).await?,
            bind(config.metrics_listen).await?,
        ))
    };
    let ((mgmt, mgmt_addr), (metrics, metrics_addr)) = match listeners.await {
        Ok(bound) => bound,
        Err(err) => {
            running.shutdown().await;
            return Err(err);
        }
    };
    let broker = running.broker.clone();
    let stop = running.shutdown.subscribe();
    running.http_tasks.push(tokio::spawn(crate::mgmt::serve(
        mgmt,
        crate::mgmt::router(broker.clone()),
        stop.clone(),
    )));
    running.http_tasks.push(tokio::spawn(crate::mgmt::serve(
        metrics,
        crate::mgmt::metrics_router(broker),
        stop,
    )));
    tracing::info!("management API on {mgmt_addr}, metrics on {metrics_addr}");
    running.mgmt_addr = Some(mgmt_addr);
    running.metrics_addr = Some(metrics_addr);
    Ok(running)
}

/// Starts a broker with default settings for `config`, keeping everything
/// in memory (embedding and in-process tests; see [`start_durable`]).
pub async fn start(config: Config) -> Result<RunningBroker, Error> {
    start_with(config, None).await
}

/// Starts a broker whose durable state lives in `config.data_dir`: locks the
/// directory, opens the store, restores topology and messages, then listens.
pub async fn start_durable(
    config: Config,
    settings: Option<Settings>,
) -> Result<RunningBroker, Error> {
    start_inner(config, settings, true).await
}

/// Starts a broker; `settings` overrides the defaults (tests use this to
/// lower the memory watermark, for instance).
pub async fn start_with(
    config: Config,
    settings: Option<Settings>,
) -> Result<RunningBroker, Error> {
    start_inner(config, settings, false).await
}

async fn start_inner(
    config: Config,
    settings: Option<Settings>,
    durable: bool,
) -> Result<RunningBroker, Error> {
    let settings = settings.unwrap_or_else(|| Settings::new(&config.node_name));
    let metrics = Metrics::new();
    metrics.set_per_queue(config.metrics_per_queue);
    metrics
        .identity_info
        .with_label_values(&[config.node_name.as_str(), config.node_name.as_str()])
        .set(1);
    let durable_opened = if durable {
        Some(crate::durable::Durable::open(&config.data_dir, &metrics)?)
    } else {
        None
    };
    let broker = Broker::new(settings, metrics);
    if let Some((durable, recovered)) = durable_opened {
        durable.restore(&broker, recovered)?;
    }
    // Paxos state lives in the data directory, so only a durable broker
    // joins a cluster; an in-memory one stays a single node.
    if durable
        && !config.peers.is_empty()
        && let Err(err) = join_cluster(&broker, &config).await
    {
        if let Some(durable) = broker.durable() {
            durable.close();
        }
        return Err(err);
    }
    let listener = TcpListener::bind(config.amqp_listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.amqp_listen,
            source,
        })?;
    let amqp_addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: config.amqp_listen,
        source,
    })?;
    tracing::info!(
        "synod-broker listening amqp={amqp_addr} node={}",
        config.node_name
    );
    let (shutdown, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(accept_loop(broker.clone(), listener, shutdown_rx));
    Ok(RunningBroker {
        amqp_addr,
        broker,
        mgmt_addr: None,
        metrics_addr: None,
        shutdown,
        task,
        http_tasks: Vec::new(),
    })
}

/// Starts this node's Paxos member on `--cluster-listen` with the `--peers`
/// seed list and attaches it to the broker.
async fn join_cluster(broker: &Arc<Broker>, config: &Config) -> Result<(), Error> {
    let cluster_config = crate::cluster::ClusterConfig::from_broker_config(config)?;
    let (node, mut applied) = crate::cluster::ClusterNode::start(
        cluster_config,
        config.cluster_listen,
        broker.metrics.clone(),
    )
    .await?;
    tracing::info!(
        "cluster member {} listening on {}",
        config.node_name,
        node.local_addr()
    );
    // Topology is not yet carried in the log, so decided entries are only
    // read (the node waits when nobody reads them) and logged.
    tokio::spawn(async move {
        while let Some(entry) = applied.recv().await {
            tracing::debug!(?entry, "decided");
        }
    });
    // Queues homed on other nodes are reached over the same port.
    broker.attach_links(node.transport().clone());
    broker.attach_cluster(Arc::new(node));
    Ok(())
}

/// Runs a broker until `shutdown` completes, then drains connections.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let running = start_durable_serving(config, None).await?;
    shutdown.await;
    tracing::info!("shutting down: closing connections");
    running.shutdown().await;
    Ok(())
}

async fn accept_loop(
    broker: Arc<Broker>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(limits::CONNECTIONS_MAX));
    let mut connections = tokio::task::JoinSet::new();
    let mut housekeeping =
        tokio::time::interval(Duration::from_millis(limits::HOUSEKEEPING_INTERVAL_MS));
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = housekeeping.tick() => broker.tick(),
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (socket, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(err) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "connection limit reached; refusing");
                    continue;
                };
                let local = socket.local_addr().unwrap_or(peer);
                let broker = broker.clone();
                let shutdown = shutdown.clone();
                connections.spawn(async move {
                    if let Err(err) = crate::connection::serve(broker, socket, peer, local, shutdown).await {
                        tracing::debug!(%peer, %err, "connection ended");
                    }
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    // Connections saw the shutdown signal and are sending close; give them
    // the close-ok wait plus a margin, then abort the stragglers.
    let drain = Duration::from_millis(limits::CLOSE_OK_WAIT_MS * 2);
    let _ = tokio::time::timeout(drain, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.abort_all();
}
