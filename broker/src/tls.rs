//! TLS for the broker's listeners and cluster links: builds rustls
//! configurations from the `--tls-cert` / `--tls-key` / `--tls-ca` files,
//! rebuilds them when the files change ([`Certificates::watch`]), reads the
//! subject common name of a verified client certificate (SASL EXTERNAL), and
//! wraps a TCP listener so that axum serves HTTPS. Must not speak AMQP, HTTP
//! or the cluster protocol itself, nor trust a certificate that rustls has
//! not verified.
//!
//! - AMQPS: with `--tls-ca`, a client certificate signed by that CA is
//!   required (mutual TLS); without it, none is asked for.
//! - HTTPS (management API, `/metrics`): same certificate, no client
//!   certificate; callers authenticate with HTTP basic auth as before.
//! - Cluster (`--cluster-listen`, both directions): the node certificate is
//!   presented as server and as client certificate; the peer's must chain to
//!   `--tls-ca`. The dialer also checks that the host it dialed (from
//!   `--peers` or a peer's announced address) is among the server
//!   certificate's subject alternative names.
//!
//! Reload: every `TLS_RELOAD_INTERVAL_MS` the three files are read again;
//! when their bytes differ from the last ones tried, new configurations are
//! built and used for new connections (open ones keep theirs). Files that
//! do not make a valid configuration leave the previous one in place.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus::IntCounter;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::TlsConfig;
use crate::limits;
use crate::metrics::Metrics;

/// Why the TLS files could not be used. Each names the flag at fault; the
/// binary exits 2, as for any configuration error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A PEM file could not be read or holds nothing usable.
    #[error("--{flag} {path}: {reason}")]
    File {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the certificate, key or CA bundle.
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

fn file_error(flag: &'static str, path: &Path, reason: impl ToString) -> Error {
    Error::File {
        flag,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The bytes of the certificate, key and CA files at one moment.
#[derive(Clone, PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Option<Vec<u8>>,
}

impl Files {
    fn read(tls: &TlsConfig) -> Result<Files, Error> {
        let read = |flag: &'static str, path: &Path| {
            std::fs::read(path).map_err(|err| file_error(flag, path, err))
        };
        Ok(Files {
            cert: read("tls-cert", &tls.cert)?,
            key: read("tls-key", &tls.key)?,
            ca: tls.ca.as_deref().map(|ca| read("tls-ca", ca)).transpose()?,
        })
    }
}

fn parse_certificates(
    flag: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| file_error(flag, path, err))?;
    if certificates.is_empty() {
        return Err(file_error(flag, path, "no PEM certificate in the file"));
    }
    Ok(certificates)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // Named explicitly rather than installed process-wide: the broker is a
    // library too, and its embedder may have chosen another default.
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The rustls configurations in use at one moment, all built from the same
/// files.
pub struct Configs {
    /// The AMQPS listener's: mutual TLS when `--tls-ca` is given.
    pub amqps: Arc<ServerConfig>,
    /// The HTTPS listeners' (management, metrics): no client certificate.
    pub https: Arc<ServerConfig>,
    /// The cluster port's, when cluster TLS is on.
    pub cluster: Option<ClusterConfigs>,
}

/// Both sides of cluster TLS: the node certificate is presented either way
/// and the peer's is verified against `--tls-ca`.
#[derive(Clone)]
pub struct ClusterConfigs {
    /// Accepting: a client certificate chaining to the CA is required.
    pub server: Arc<ServerConfig>,
    /// Dialing: the server certificate must chain to the CA and name the
    /// dialed host; this node's certificate answers the server's request.
    pub client: Arc<ClientConfig>,
}

impl Configs {
    fn build(tls: &TlsConfig, files: &Files) -> Result<Configs, Error> {
        let chain = parse_certificates("tls-cert", &tls.cert, &files.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&files.key)
            .map_err(|err| file_error("tls-key", &tls.key, err))?;
        let roots = match (&tls.ca, &files.ca) {
            (Some(path), Some(pem)) => {
                let mut roots = RootCertStore::empty();
                for certificate in parse_certificates("tls-ca", path, pem)? {
                    roots
                        .add(certificate)
                        .map_err(|err| file_error("tls-ca", path, err))?;
                }
                Some((path.as_path(), Arc::new(roots)))
            }
            _ => None,
        };
        let server = |client_ca: Option<&(&Path, Arc<RootCertStore>)>, alpn: Vec<Vec<u8>>| {
            let builder = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|err| Error::Rustls(err.to_string()))?;
            let builder = match client_ca {
                Some((path, roots)) => {
                    let verifier =
                        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                            .build()
                            .map_err(|err| file_error("tls-ca", path, err))?;
                    builder.with_client_cert_verifier(verifier)
                }
                None => builder.with_no_client_auth(),
            };
            let mut config = builder
                .with_single_cert(chain.clone(), key.clone_key())
                .map_err(|err| Error::Rustls(format!("--tls-cert/--tls-key: {err}")))?;
            config.alpn_protocols = alpn;
            Ok::<_, Error>(Arc::new(config))
        };
        let amqps = server(roots.as_ref(), Vec::new())?;
        let https = server(None, vec![b"http/1.1".to_vec()])?;
        let cluster = match (&roots, tls.cluster) {
            (Some((path, roots)), true) => {
                let verifier =
                    WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
                        .build()
                        .map_err(|err| file_error("tls-ca", path, err))?;
                let client = ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|err| Error::Rustls(err.to_string()))?
                    .with_webpki_verifier(verifier)
                    .with_client_auth_cert(chain.clone(), key.clone_key())
                    .map_err(|err| Error::Rustls(format!("--tls-cert/--tls-key: {err}")))?;
                // Accepting a peer is AMQPS's mutual TLS: a client
                // certificate chaining to the CA is required.
                Some(ClusterConfigs {
                    server: amqps.clone(),
                    client: Arc::new(client),
                })
            }
            (None, true) => {
                return Err(Error::Rustls(
                    "--tls-ca is required for TLS between cluster nodes".into(),
                ));
            }
            (_, false) => None,
        };
        Ok(Configs {
            amqps,
            https,
            cluster,
        })
    }
}

/// The TLS configurations of a running broker, rebuilt when the files change.
pub struct Certificates {
    files: TlsConfig,
    current: RwLock<Arc<Configs>>,
    /// The bytes last tried (successfully or not), so that a broken file is
    /// reported once, and fixing it is noticed.
    tried: Mutex<Result<Files, String>>,
    reloads_total: IntCounter,
    reload_failures_total: IntCounter,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// What one look at the files found.
#[derive(Debug)]
pub enum Reload {
    /// The files hold what was last tried.
    Unchanged,
    /// New configurations are in use.
    Reloaded,
    /// The files changed but do not make a configuration; the previous
    /// one stays in use.
    Failed(Error),
}

impl Certificates {
    /// Reads the files and builds the first configurations; an error here is
    /// a configuration error (exit 2).
    pub fn load(tls: &TlsConfig, metrics: &Metrics) -> Result<Arc<Certificates>, Error> {
        let files = Files::read(tls)?;
        let configs = Configs::build(tls, &files)?;
        Ok(Arc::new(Certificates {
            files: tls.clone(),
            current: RwLock::new(Arc::new(configs)),
            tried: Mutex::new(Ok(files)),
            reloads_total: metrics.tls_reloads_total.clone(),
            reload_failures_total: metrics.tls_reload_failures_total.clone(),
        }))
    }

    /// The configurations for a connection starting now.
    pub fn current(&self) -> Arc<Configs> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The AMQPS listener's configuration now.
    pub fn amqps(&self) -> Arc<ServerConfig> {
        self.current().amqps.clone()
    }

    /// The HTTPS listeners' configuration now.
    pub fn https(&self) -> Arc<ServerConfig> {
        self.current().https.clone()
    }

    /// The cluster port's configurations now, when cluster TLS is on.
    pub fn cluster(&self) -> Option<ClusterConfigs> {
        self.current().cluster.clone()
    }

    /// Whether cluster connections use TLS.
    pub fn cluster_enabled(&self) -> bool {
        self.files.cluster
    }

    /// Reads the files; when they differ from what was last tried, builds
    /// and installs new configurations, or keeps the old ones and says why.
    pub fn reload_if_changed(&self) -> Reload {
        let read = Files::read(&self.files).map_err(|err| err.to_string());
        let mut tried = self.tried.lock().unwrap_or_else(|p| p.into_inner());
        if *tried == read {
            return Reload::Unchanged;
        }
        *tried = read.clone();
        drop(tried);
        let built = match read {
            Ok(files) => Configs::build(&self.files, &files),
            Err(reason) => Err(Error::Rustls(reason)),
        };
        match built {
            Ok(configs) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(configs);
                self.reloads_total.inc();
                Reload::Reloaded
            }
            Err(err) => {
                self.reload_failures_total.inc();
                Reload::Failed(err)
            }
        }
    }

    /// Looks at the files every `interval` until `shutdown` turns true,
    /// logging each reload and each failure.
    pub async fn watch(self: Arc<Self>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = shutdown.changed() => return,
            }
            let certificates = self.clone();
            // File reads and key parsing are blocking work.
            let outcome =
                tokio::task::spawn_blocking(move || certificates.reload_if_changed()).await;
            match outcome {
                Ok(Reload::Unchanged) => {}
                Ok(Reload::Reloaded) => tracing::info!(
                    cert = %self.files.cert.display(),
                    "TLS certificate, key or CA changed: new connections use the new ones"
                ),
                Ok(Reload::Failed(err)) => tracing::warn!(
                    %err,
                    "TLS files changed but cannot be used; keeping the previous certificate"
                ),
                Err(err) => tracing::warn!(%err, "TLS reload task failed"),
            }
        }
    }
}

/// The subject common name of a DER certificate, if it has one that is
/// UTF-8. Used only on certificates rustls has verified.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = certificate
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(name)
}

/// The verified client certificate's common name on an accepted TLS stream.
pub fn peer_common_name(stream: &TlsStream<TcpStream>) -> Option<String> {
    let (_, connection) = stream.get_ref();
    let first = connection.peer_certificates()?.first()?;
    common_name(first.as_ref())
}

/// A TCP listener whose accepted sockets complete a TLS handshake before
/// axum sees them; plain TCP when built without TLS. Handshakes run
/// concurrently (at most `limits::HTTPS_HANDSHAKES_MAX`), each bounded by
/// the handshake timeout, so one slow client cannot stall the others.
pub struct HttpListener {
    listener: TcpListener,
    tls: Option<Arc<Certificates>>,
    handshake_timeout: Duration,
    handshakes: JoinSet<(SocketAddr, Option<TlsStream<TcpStream>>)>,
}

/// A socket accepted by [`HttpListener`].
pub type HttpStream = tokio_util::either::Either<TcpStream, TlsStream<TcpStream>>;

impl HttpListener {
    /// Serves `listener` over TLS with the certificate `tls` holds at each
    /// accept, or in the clear without.
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<Certificates>>,
        handshake_timeout: Duration,
    ) -> HttpListener {
        HttpListener {
            listener,
            tls,
            handshake_timeout,
            handshakes: JoinSet::new(),
        }
    }
}

impl std::fmt::Debug for HttpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpListener")
            .field("listener", &self.listener)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = HttpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (HttpStream, SocketAddr) {
        loop {
            let room = self.handshakes.len() < limits::HTTPS_HANDSHAKES_MAX;
            tokio::select! {
                accepted = self.listener.accept(), if room => {
                    let (socket, peer) = match accepted {
                        Ok(pair) => pair,
                        Err(err) => {
                            // Out of file descriptors and the like: back off, keep serving.
                            tracing::warn!(%err, "HTTP accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let Some(tls) = &self.tls else {
                        return (tokio_util::either::Either::Left(socket), peer);
                    };
                    let acceptor = TlsAcceptor::from(tls.https());
                    let timeout = self.handshake_timeout;
                    self.handshakes.spawn(async move {
                        match tokio::time::timeout(timeout, acceptor.accept(socket)).await {
                            Ok(Ok(stream)) => (peer, Some(stream)),
                            Ok(Err(err)) => {
                                tracing::debug!(%peer, %err, "HTTPS handshake failed");
                                (peer, None)
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "HTTPS handshake timed out");
                                (peer, None)
                            }
                        }
                    });
                }
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok((peer, Some(stream))) = done {
                        return (tokio_util::either::Either::Right(stream), peer);
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_names_come_from_the_subject_and_garbage_has_none() {
        // Goal: the CN of a real certificate is read; bytes that are not a certificate yield None.
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "app-user");
        let certificate = params.self_signed(&key).expect("certificate");
        assert_eq!(common_name(certificate.der()).as_deref(), Some("app-user"));
        assert_eq!(common_name(b"not a certificate"), None);
        assert_eq!(common_name(&certificate.der()[..40]), None);
    }

    /// A self-signed certificate for 127.0.0.1 and its key, as PEM.
    fn self_signed() -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
        let certificate = params.self_signed(&key).expect("certificate");
        (certificate.pem(), key.serialize_pem())
    }

    #[test]
    fn changed_files_are_reloaded_and_broken_ones_keep_the_previous_configuration() {
        // Goal: unchanged files do nothing; new valid files replace the configuration and count a reload; garbage keeps it and counts a failure once.
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = self_signed();
        let tls = TlsConfig {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            ca: None,
            amqps_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            cluster: false,
        };
        std::fs::write(&tls.cert, cert).expect("write");
        std::fs::write(&tls.key, key).expect("write");
        let metrics = Metrics::new();
        let certificates = Certificates::load(&tls, &metrics).expect("valid files");
        let first = certificates.current();
        assert!(matches!(
            certificates.reload_if_changed(),
            Reload::Unchanged
        ));
        assert!(Arc::ptr_eq(&first, &certificates.current()));

        let (cert, key) = self_signed();
        std::fs::write(&tls.cert, cert).expect("write");
        std::fs::write(&tls.key, key).expect("write");
        assert!(matches!(certificates.reload_if_changed(), Reload::Reloaded));
        let second = certificates.current();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(metrics.tls_reloads_total.get(), 1);

        std::fs::write(&tls.cert, "garbage").expect("write");
        let failed = certificates.reload_if_changed();
        assert!(
            matches!(&failed, Reload::Failed(err) if err.to_string().contains("--tls-cert")),
            "{failed:?}"
        );
        assert!(Arc::ptr_eq(&second, &certificates.current()));
        assert!(matches!(
            certificates.reload_if_changed(),
            Reload::Unchanged
        ));
        assert_eq!(metrics.tls_reload_failures_total.get(), 1);
    }

    #[test]
    fn unreadable_files_name_their_flag() {
        // Goal: a missing or empty PEM file is an error naming --tls-cert / --tls-ca.
        let dir = tempfile::tempdir().expect("temp dir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let config = TlsConfig {
            cert: dir.path().join("missing.pem"),
            key: empty.clone(),
            ca: None,
            amqps_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            cluster: false,
        };
        let metrics = Metrics::new();
        let err = Certificates::load(&config, &metrics).expect_err("missing cert");
        assert!(err.to_string().contains("--tls-cert"), "{err}");
        let config = TlsConfig {
            cert: empty.clone(),
            ..config
        };
        let err = Certificates::load(&config, &metrics).expect_err("empty cert");
        assert!(err.to_string().contains("--tls-cert"), "{err}");
    }
}
