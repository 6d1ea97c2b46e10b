//! Listeners and lifecycle: binds the AMQP socket (unless `--no-plain-amqp`)
//! and, with TLS configured, the AMQPS socket (and, with [`start_serving`],
//! the management and metrics sockets, HTTPS when TLS is configured),
//! accepts connections (one connection bound for AMQP and AMQPS together),
//! watches the TLS files for a renewed certificate, runs housekeeping, and
//! drains on shutdown. Shutdown is a future passed in, so tests and `main`
//! control it. Must not speak AMQP itself: `connection` does.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::tls::Certificates;

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
    /// The stored Paxos log was not replayed in time.
    #[error("cluster: the stored log was replayed only to slot {applied} of {index} in time")]
    Replay {
        /// Decided index found on disk.
        index: u64,
        /// Slot reached.
        applied: u64,
    },
    /// The TLS certificate, key or CA files could not be used.
    #[error("{0}")]
    Tls(#[from] crate::tls::Error),
}

impl Error {
    /// The process exit code: 2 for a data directory of an incompatible
    /// format (a configuration problem), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Durable(err) if err.is_incompatible_format() => 2,
            Error::Cluster(crate::cluster::Error::Secret { .. }) => 2,
            Error::Tls(_) => 2,
            _ => 1,
        }
    }
}

/// A broker running in the background.
#[derive(Debug)]
pub struct RunningBroker {
    /// The bound AMQP address (the real port when configured with 0); the
    /// AMQPS address when plain AMQP is switched off (`--no-plain-amqp`).
    pub amqp_addr: SocketAddr,
    /// Whether `amqp_addr` serves plain AMQP.
    pub amqp_plain: bool,
    /// The bound AMQPS address, when TLS is configured.
    pub amqps_addr: Option<SocketAddr>,
    /// The broker, for inspection and management calls.
    pub broker: Arc<Broker>,
    /// The bound management API address, when started with [`start_serving`].
    pub mgmt_addr: Option<SocketAddr>,
    /// The bound `/metrics` address, when started with [`start_serving`].
    pub metrics_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    http_tasks: Vec<JoinHandle<()>>,
    /// The TLS configurations, reloaded when the files change.
    certificates: Option<Arc<Certificates>>,
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
    let https = running.certificates.clone();
    let broker = running.broker.clone();
    let handshake_timeout = Duration::from_millis(broker.settings.handshake_timeout_ms);
    let stop = running.shutdown.subscribe();
    running.http_tasks.push(tokio::spawn(crate::mgmt::serve(
        crate::tls::HttpListener::new(mgmt, https.clone(), handshake_timeout),
        crate::mgmt::router(broker.clone()),
        stop.clone(),
    )));
    running.http_tasks.push(tokio::spawn(crate::mgmt::serve(
        crate::tls::HttpListener::new(metrics, https.clone(), handshake_timeout),
        crate::mgmt::metrics_router(broker),
        stop,
    )));
    let scheme = if https.is_some() { "https" } else { "http" };
    // Scripts and tests read the addresses from this line: keep them bare.
    tracing::info!("management API on {mgmt_addr}, metrics on {metrics_addr} ({scheme})");
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
    let mut settings = settings.unwrap_or_else(|| Settings::from_config(&config));
    if let Some(user) = &config.default_user {
        settings.default_user = Some(user.clone());
    }
    let metrics = Metrics::new();
    // Bad TLS files are a configuration error: report them before any
    // state is opened.
    let certificates = config
        .tls
        .as_ref()
        .map(|tls| Certificates::load(tls, &metrics))
        .transpose()?;
    metrics.set_per_queue(config.metrics_per_queue);
    metrics
        .identity_info
        .with_label_values(&[config.node_name.as_str(), config.cluster_name.as_str()])
        .set(1);
    let durable_opened = if durable {
        Some(crate::durable::Durable::open(&config.data_dir, &metrics)?)
    } else {
        None
    };
    let broker = Broker::new(settings, metrics);
    // Paxos state lives in the data directory, so only a durable broker
    // joins a cluster; an in-memory one stays a single node.
    let clustered = durable && !config.peers.is_empty();
    if let Some((durable, recovered)) = durable_opened {
        durable.set_queue_memory_max_bytes(config.queue_memory_max_bytes);
        let restored = if clustered {
            join_cluster(&broker, &config, &durable, recovered, certificates.clone()).await
        } else {
            durable.restore(&broker, recovered).map_err(Error::from)
        };
        if let Err(err) = restored {
            durable.close();
            return Err(err);
        }
    }
    let listeners = async {
        let amqp = match config.amqp_plain {
            true => Some(bind(config.amqp_listen).await?),
            false => None,
        };
        let amqps = match (&config.tls, &certificates) {
            (Some(tls), Some(certificates)) => {
                let (listener, addr) = bind(tls.amqps_listen).await?;
                Some((listener, addr, certificates.clone()))
            }
            _ => None,
        };
        Ok::<_, Error>((amqp, amqps))
    };
    let (amqp, amqps) = match listeners.await {
        Ok(bound) => bound,
        Err(err) => {
            if let Some(cluster) = broker.cluster() {
                cluster.stop().await;
            }
            if let Some(durable) = broker.durable() {
                durable.close();
            }
            return Err(err);
        }
    };
    let amqps_addr = amqps.as_ref().map(|(_, addr, _)| *addr);
    let (listener, amqp_addr) = match amqp {
        Some((listener, addr)) => (Some(listener), Some(addr)),
        None => (None, None),
    };
    let off = |addr: Option<SocketAddr>| addr.map_or_else(|| "off".to_string(), |a| a.to_string());
    tracing::info!(
        "synod-broker listening amqp={} amqps={} node={}",
        off(amqp_addr),
        off(amqps_addr),
        config.node_name
    );
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut http_tasks = Vec::new();
    if let Some(certificates) = &certificates {
        http_tasks.push(tokio::spawn(certificates.clone().watch(
            Duration::from_millis(limits::TLS_RELOAD_INTERVAL_MS),
            shutdown_rx.clone(),
        )));
    }
    let amqps = amqps.map(|(listener, _, certificates)| (listener, certificates));
    let task = tokio::spawn(accept_loop(broker.clone(), listener, amqps, shutdown_rx));
    Ok(RunningBroker {
        amqp_addr: amqp_addr
            .or(amqps_addr)
            .expect("configuration validation leaves at least one AMQP listener"),
        amqp_plain: amqp_addr.is_some(),
        amqps_addr,
        broker,
        mgmt_addr: None,
        metrics_addr: None,
        shutdown,
        task,
        http_tasks,
        certificates,
    })
}

/// Starts this node's Paxos member on `--cluster-listen` with the `--peers`
/// seed list and makes it the source of the broker's metadata: replays the
/// stored log, puts the store's messages back into the queues that exist at
/// that point, then deletes (through the log) the transient queues this
/// node's previous run left behind.
async fn join_cluster(
    broker: &Arc<Broker>,
    config: &Config,
    durable: &Arc<crate::durable::Durable>,
    recovered: crate::store::Recovered,
    certificates: Option<Arc<Certificates>>,
) -> Result<(), Error> {
    let mut cluster_config = crate::cluster::ClusterConfig::from_broker_config(config)?;
    cluster_config.tls = certificates.filter(|certificates| certificates.cluster_enabled());
    let (node, applied) = crate::cluster::ClusterNode::start(
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
    let node = Arc::new(node);
    durable.set_topology_in_log();
    broker.attach_durable(durable.clone());
    broker.attach_cluster(node.clone());
    // Queues homed on other nodes are reached over the same port.
    broker.attach_links(node.transport().clone());
    let replication = crate::replication::Replication::new(&config.node_name, node.clone());
    tokio::spawn(replication.clone().run_applier(broker.clone(), applied));
    let replay_to = node.decided_at_start();
    if !replication
        .wait_applied(replay_to, crate::replication::REPLAY_TIMEOUT)
        .await
    {
        node.stop().await;
        return Err(Error::Replay {
            index: replay_to,
            applied: replication.applied_index(),
        });
    }
    broker.attach_replication(replication.clone());
    durable.restore_messages(broker, recovered.queues)?;
    tokio::spawn(replication.drop_stale_queues(broker.clone(), crate::replication::REPLAY_TIMEOUT));
    // After the restore: a drain copies the messages the store gave back.
    tokio::spawn(crate::drain::supervise(broker.clone()));
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

/// Accepts a socket from `listener`, or waits forever when there is none.
async fn accept_from(
    listener: Option<&TcpListener>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

async fn accept_loop(
    broker: Arc<Broker>,
    listener: Option<TcpListener>,
    amqps: Option<(TcpListener, Arc<Certificates>)>,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(broker.settings.connections_max));
    let refusing = Arc::new(Semaphore::new(broker.settings.connections_refusing_max));
    let handshake_timeout = Duration::from_millis(broker.settings.handshake_timeout_ms);
    let mut connections = tokio::task::JoinSet::new();
    let mut housekeeping =
        tokio::time::interval(Duration::from_millis(limits::HOUSEKEEPING_INTERVAL_MS));
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = housekeeping.tick() => broker.tick(),
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = accept_from(listener.as_ref()) => {
                if let Some((socket, peer, permit)) = admit(&broker, &permits, &refusing, accepted).await {
                    let deadline = tokio::time::Instant::now() + handshake_timeout;
                    let local = socket.local_addr().unwrap_or(peer);
                    let broker = broker.clone();
                    let shutdown = shutdown.clone();
                    connections.spawn(async move {
                        let peer_info = crate::connection::PeerInfo {
                            addr: peer,
                            local,
                            certificate_name: None,
                            over_connection_limit: permit.over_limit,
                        };
                        if let Err(err) = crate::connection::serve(broker, socket, peer_info, deadline, shutdown).await {
                            tracing::debug!(%peer, %err, "connection ended");
                        }
                        drop(permit);
                    });
                }
            }
            accepted = accept_from(amqps.as_ref().map(|(listener, _)| listener)) => {
                let Some((_, certificates)) = &amqps else { continue };
                if let Some((socket, peer, permit)) = admit(&broker, &permits, &refusing, accepted).await {
                    let deadline = tokio::time::Instant::now() + handshake_timeout;
                    let local = socket.local_addr().unwrap_or(peer);
                    let broker = broker.clone();
                    let shutdown = shutdown.clone();
                    // The certificate in use now: a reload applies to new connections.
                    let acceptor = TlsAcceptor::from(certificates.amqps());
                    let over_limit = permit.over_limit;
                    connections.spawn(async move {
                        serve_tls(broker, acceptor, socket, (peer, local, over_limit), deadline, shutdown).await;
                        drop(permit);
                    });
                }
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

/// A connection slot held by an accepted socket until its task ends.
struct Admitted {
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// The slot is one of the few kept for refusing politely.
    over_limit: bool,
}

/// Takes a connection slot for an accepted socket. Over `--max-connections`
/// the socket takes one of `connections_refusing_max` refusal slots: its
/// handshake runs and `connection.open` is answered with `530 NOT_ALLOWED`.
/// Without either, the socket is closed at once, before any AMQP byte.
/// Refusals are logged and counted; open connections are not disturbed.
async fn admit(
    broker: &Broker,
    permits: &Arc<Semaphore>,
    refusing: &Arc<Semaphore>,
    accepted: std::io::Result<(tokio::net::TcpStream, SocketAddr)>,
) -> Option<(tokio::net::TcpStream, SocketAddr, Admitted)> {
    let (socket, peer) = match accepted {
        Ok(pair) => pair,
        Err(err) => {
            // Out of file descriptors and the like: back off, keep serving.
            tracing::warn!(%err, "accept failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
            return None;
        }
    };
    let admitted = match permits.clone().try_acquire_owned() {
        Ok(permit) => Admitted {
            _permit: permit,
            over_limit: false,
        },
        Err(_) => {
            broker.metrics.connections_refused_total.inc();
            let Ok(permit) = refusing.clone().try_acquire_owned() else {
                tracing::warn!(
                    %peer,
                    connections_max = broker.settings.connections_max,
                    "connection limit reached; closing the socket"
                );
                drop(socket);
                return None;
            };
            Admitted {
                _permit: permit,
                over_limit: true,
            }
        }
    };
    let _ = socket.set_nodelay(true);
    Some((socket, peer, admitted))
}

/// Runs the TLS handshake (bounded by the same deadline as the AMQP
/// handshake that follows), then serves AMQP over the TLS stream.
async fn serve_tls(
    broker: Arc<Broker>,
    acceptor: TlsAcceptor,
    socket: tokio::net::TcpStream,
    (peer, local, over_connection_limit): (SocketAddr, SocketAddr, bool),
    deadline: tokio::time::Instant,
    shutdown: watch::Receiver<bool>,
) {
    let stream = match tokio::time::timeout_at(deadline, acceptor.accept(socket)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            // A missing or untrusted client certificate ends here.
            tracing::warn!(%peer, %err, "AMQPS TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "AMQPS TLS handshake timed out");
            return;
        }
    };
    let peer_info = crate::connection::PeerInfo {
        addr: peer,
        local,
        certificate_name: crate::tls::peer_common_name(&stream),
        over_connection_limit,
    };
    if let Err(err) = crate::connection::serve(broker, stream, peer_info, deadline, shutdown).await
    {
        tracing::debug!(%peer, %err, "AMQPS connection ended");
    }
}
