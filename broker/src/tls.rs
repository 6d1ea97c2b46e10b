//! TLS for the broker's listeners: builds rustls server configurations from
//! the `--tls-cert` / `--tls-key` / `--tls-ca` files, reads the subject
//! common name of a verified client certificate (SASL EXTERNAL), and wraps a
//! TCP listener so that axum serves HTTPS. Must not speak AMQP or HTTP
//! itself, nor trust a client certificate that rustls has not verified.
//!
//! - AMQPS: with `--tls-ca`, a client certificate signed by that CA is
//!   required (mutual TLS); without it, none is asked for.
//! - HTTPS (management API, `/metrics`): same certificate, no client
//!   certificate; callers authenticate with HTTP basic auth as before.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::TlsConfig;
use crate::limits;

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

fn read_certificates(
    flag: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|err| file_error(flag, path, err))?
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

/// The server configuration of the AMQPS listener: mutual TLS when the CA
/// bundle is configured.
pub fn amqps_server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, Error> {
    server_config(tls, tls.ca.as_deref(), Vec::new())
}

/// The server configuration of the HTTPS listeners (management, metrics).
pub fn https_server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, Error> {
    server_config(tls, None, vec![b"http/1.1".to_vec()])
}

fn server_config(
    tls: &TlsConfig,
    client_ca: Option<&Path>,
    alpn_protocols: Vec<Vec<u8>>,
) -> Result<Arc<ServerConfig>, Error> {
    let chain = read_certificates("tls-cert", &tls.cert)?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|err| file_error("tls-key", &tls.key, err))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| Error::Rustls(err.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for certificate in read_certificates("tls-ca", ca)? {
                roots
                    .add(certificate)
                    .map_err(|err| file_error("tls-ca", ca, err))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|err| file_error("tls-ca", ca, err))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|err| Error::Rustls(format!("--tls-cert/--tls-key: {err}")))?;
    config.alpn_protocols = alpn_protocols;
    Ok(Arc::new(config))
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
    acceptor: Option<TlsAcceptor>,
    handshake_timeout: Duration,
    handshakes: JoinSet<(SocketAddr, Option<TlsStream<TcpStream>>)>,
}

/// A socket accepted by [`HttpListener`].
pub type HttpStream = tokio_util::either::Either<TcpStream, TlsStream<TcpStream>>;

impl HttpListener {
    /// Serves `listener` over TLS with `config`, or in the clear without.
    pub fn new(
        listener: TcpListener,
        config: Option<Arc<ServerConfig>>,
        handshake_timeout: Duration,
    ) -> HttpListener {
        HttpListener {
            listener,
            acceptor: config.map(TlsAcceptor::from),
            handshake_timeout,
            handshakes: JoinSet::new(),
        }
    }
}

impl std::fmt::Debug for HttpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpListener")
            .field("listener", &self.listener)
            .field("tls", &self.acceptor.is_some())
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
                    let Some(acceptor) = self.acceptor.clone() else {
                        return (tokio_util::either::Either::Left(socket), peer);
                    };
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
        };
        let err = amqps_server_config(&config).expect_err("missing cert");
        assert!(err.to_string().contains("--tls-cert"), "{err}");
        let config = TlsConfig {
            cert: empty.clone(),
            ..config
        };
        let err = amqps_server_config(&config).expect_err("empty cert");
        assert!(err.to_string().contains("--tls-cert"), "{err}");
    }
}
