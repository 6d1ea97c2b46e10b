//! A real Kubernetes control plane for integration tests: etcd, kube-apiserver
//! and (when built) kube-controller-manager as child processes on loopback,
//! with certificates and a kubeconfig made for each run. It must not fake any
//! API behaviour, and it must not leave a process behind when dropped.
//!
//! The binaries come from `scripts/setup-k8s.sh` (found through
//! `SYNOD_K8S_BIN`, else in the cache directory that script writes for the
//! pinned version). Without them, [`EnvTest::start`] fails with a message that
//! names the script: a test that needs a cluster never passes by skipping.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleRef, Subject};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use super::http;

/// How long the API server may take to report ready. Generous because the
/// test machine is shared with compilers.
const APISERVER_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long kube-controller-manager may take to run its first controllers.
const CONTROLLER_MANAGER_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long etcd may take to serve `/health`.
const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often readiness is polled.
const READY_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Start attempts when a picked port was taken by someone else meanwhile.
const START_ATTEMPTS_MAX: usize = 3;
/// Lines of a component's log quoted in an error.
const LOG_TAIL_LINES: usize = 40;
/// Lifetime of ServiceAccount tokens minted for restricted clients.
const TOKEN_EXPIRATION_SECONDS: i64 = 3600;
/// Service IPs are allocated from this range. It is a loopback range so that
/// nothing in a test can send traffic off this machine by dialling a
/// Service's cluster IP.
const SERVICE_CLUSTER_IP_RANGE: &str = "127.96.0.0/16";
/// The first address of [`SERVICE_CLUSTER_IP_RANGE`]: the `kubernetes` Service.
const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(127, 96, 0, 1);

/// Why the test environment could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The control-plane binaries are not built.
    #[error(
        "{what} not found in {dir}: run scripts/setup-k8s.sh (it builds the Kubernetes \
         control plane into ~/.cache/synod/k8s and exports SYNOD_K8S_BIN)"
    )]
    MissingBinaries {
        /// The binary that is missing.
        what: String,
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("generating {what}: {source}")]
    Certificate {
        /// Which certificate or key.
        what: &'static str,
        /// The underlying error.
        source: rcgen::Error,
    },
    /// A component exited or did not become ready in time.
    #[error("{component} {reason}; last lines of its log {log}:\n{tail}")]
    Component {
        /// `etcd`, `kube-apiserver` or `kube-controller-manager`.
        component: &'static str,
        /// What happened.
        reason: String,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// The kubeconfig could not be turned into a client.
    #[error("building a client from {what}: {reason}")]
    Client {
        /// Which kubeconfig.
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// An API call made while setting up an identity failed.
    #[error("{context}: {source}")]
    Api {
        /// What was being done.
        context: String,
        /// The API error.
        source: kube::Error,
    },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

fn api_error(context: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let context = context.into();
    move |source| Error::Api { context, source }
}

/// Where the control-plane binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The directory holding them.
    pub dir: PathBuf,
}

impl Binaries {
    /// Finds the binaries: `SYNOD_K8S_BIN`, else the cache directory that
    /// `scripts/setup-k8s.sh` fills for the Kubernetes version pinned in
    /// `scripts/k8s/kubernetes/go.mod`.
    pub fn locate() -> Result<Self, Error> {
        let dir = match std::env::var_os("SYNOD_K8S_BIN") {
            Some(dir) => PathBuf::from(dir),
            None => default_bin_dir(),
        };
        let binaries = Binaries { dir };
        for required in ["etcd", "kube-apiserver"] {
            if !binaries.path(required).is_file() {
                return Err(Error::MissingBinaries {
                    what: required.to_string(),
                    dir: binaries.dir.clone(),
                });
            }
        }
        Ok(binaries)
    }

    /// The path of one binary, whether or not it exists.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The path of one binary, or an error naming the setup script.
    pub fn require(&self, name: &str) -> Result<PathBuf, Error> {
        let path = self.path(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(Error::MissingBinaries {
                what: name.to_string(),
                dir: self.dir.clone(),
            })
        }
    }
}

/// `~/.cache/synod/k8s/<pinned version>/bin`, as `scripts/setup-k8s.sh` writes it.
fn default_bin_dir() -> PathBuf {
    let cache = std::env::var_os("SYNOD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/synod")
        });
    let go_mod = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/k8s/kubernetes/go.mod");
    let version = std::fs::read_to_string(&go_mod)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let mut words = line.split_whitespace();
                match (words.next(), words.next()) {
                    (Some("k8s.io/kubernetes"), Some(version)) if version.starts_with('v') => {
                        Some(version.to_string())
                    }
                    (Some("require"), Some("k8s.io/kubernetes")) => {
                        words.next().map(str::to_string)
                    }
                    _ => None,
                }
            })
        })
        .unwrap_or_else(|| "unknown-version".to_string());
    cache.join("k8s").join(version).join("bin")
}

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Run kube-controller-manager (StatefulSet, garbage collector, namespace
    /// and ServiceAccount controllers, ...). `None`: run it when it is built.
    pub controller_manager: Option<bool>,
    /// Extra kube-apiserver flags, e.g. `--feature-gates=...`.
    pub apiserver_args: Vec<String>,
}

/// A client and kubeconfig for an identity with only the rights RBAC gives it.
#[derive(Clone)]
pub struct Identity {
    /// The user name the API server sees.
    pub user: String,
    /// A client authenticated as that user.
    pub client: Client,
    /// A kubeconfig for kubectl or helm, authenticated as that user.
    pub kubeconfig: PathBuf,
}

/// A child process that is killed, with its process group, when dropped.
struct Process {
    component: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(
        component: &'static str,
        program: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<Self, Error> {
        let log_file =
            std::fs::File::create(&log).map_err(io_error(format!("creating {}", log.display())))?;
        let log_err = log_file
            .try_clone()
            .map_err(io_error(format!("opening {}", log.display())))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        super::process::isolate(&mut command);
        let child = command
            .spawn()
            .map_err(io_error(format!("starting {}", program.display())))?;
        Ok(Process {
            component,
            child,
            log,
        })
    }

    /// `Err` with the log's tail when the process has exited.
    fn check_running(&mut self) -> Result<(), Error> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.failure(format!("exited ({status})"))),
            Err(error) => Err(self.failure(format!("could not be waited for: {error}"))),
        }
    }

    fn failure(&self, reason: String) -> Error {
        Error::Component {
            component: self.component,
            reason,
            log: self.log.clone(),
            tail: log_tail(&self.log),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        super::process::kill_group(&mut self.child);
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// A free loopback port: bound, then released for the child to bind. Another
/// process may take it meanwhile; [`EnvTest::start`] retries when that happens.
fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(io_error("binding a free loopback port"))?;
    listener
        .local_addr()
        .map(|address| address.port())
        .map_err(io_error("reading a bound port"))
}

/// PEM files made for one run.
struct Pki {
    ca_cert: PathBuf,
    ca_pem: String,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    service_account_key: PathBuf,
    service_account_public_key: PathBuf,
    admin_cert_pem: String,
    admin_key_pem: String,
}

fn write_file(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(io_error(format!("writing {}", path.display())))
}

impl Pki {
    fn generate(dir: &Path) -> Result<Self, Error> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let cert_error = |what| move |source| Error::Certificate { what, source };

        let ca_key = KeyPair::generate().map_err(cert_error("CA key"))?;
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).map_err(cert_error("CA parameters"))?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "synod-envtest-ca");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .map_err(cert_error("CA certificate"))?;
        let issuer = Issuer::new(ca_params, ca_key);

        // The names a client may dial the API server by, in and out of the cluster.
        let serving_names: Vec<String> = vec![
            "127.0.0.1".into(),
            "localhost".into(),
            KUBERNETES_SERVICE_IP.to_string(),
            "kubernetes".into(),
            "kubernetes.default".into(),
            "kubernetes.default.svc".into(),
            "kubernetes.default.svc.cluster.local".into(),
        ];
        let serving_key = KeyPair::generate().map_err(cert_error("serving key"))?;
        let mut serving_params =
            CertificateParams::new(serving_names).map_err(cert_error("serving parameters"))?;
        serving_params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving_params
            .signed_by(&serving_key, &issuer)
            .map_err(cert_error("serving certificate"))?;

        // system:masters is the group RBAC never restricts: the admin client.
        let admin_key = KeyPair::generate().map_err(cert_error("admin key"))?;
        let mut admin_params =
            CertificateParams::new(Vec::<String>::new()).map_err(cert_error("admin parameters"))?;
        admin_params
            .distinguished_name
            .push(DnType::CommonName, "synod-envtest-admin");
        admin_params
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_cert = admin_params
            .signed_by(&admin_key, &issuer)
            .map_err(cert_error("admin certificate"))?;

        let service_account_key =
            KeyPair::generate().map_err(cert_error("service account signing key"))?;

        let pki = Pki {
            ca_cert: dir.join("ca.crt"),
            ca_pem: ca_cert.pem(),
            serving_cert: dir.join("apiserver.crt"),
            serving_key: dir.join("apiserver.key"),
            service_account_key: dir.join("service-account.key"),
            service_account_public_key: dir.join("service-account.pub"),
            admin_cert_pem: admin_cert.pem(),
            admin_key_pem: admin_key.serialize_pem(),
        };
        write_file(&pki.ca_cert, &pki.ca_pem)?;
        write_file(&pki.serving_cert, &serving_cert.pem())?;
        write_file(&pki.serving_key, &serving_key.serialize_pem())?;
        write_file(
            &pki.service_account_key,
            &service_account_key.serialize_pem(),
        )?;
        // The API server reads verification keys only as public keys or
        // PKCS#1/SEC1 private keys, not as the PKCS#8 that rcgen writes.
        write_file(
            &pki.service_account_public_key,
            &service_account_key.public_key_pem(),
        )?;
        Ok(pki)
    }
}

/// A kubeconfig with one cluster, one user and one context, as YAML.
fn kubeconfig_yaml(
    server: &str,
    ca_pem: &str,
    user: &str,
    credentials: &[(&str, String)],
) -> String {
    let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    let mut yaml = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        yaml,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: envtest\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: {user}\n  user:",
        b64(ca_pem)
    );
    for (key, value) in credentials {
        let _ = writeln!(yaml, "    {key}: {value}");
    }
    let _ = writeln!(
        yaml,
        "contexts:\n- name: envtest\n  context:\n    cluster: envtest\n    user: {user}\n    namespace: default\ncurrent-context: envtest"
    );
    yaml
}

async fn client_from_kubeconfig(yaml: &str, what: &str) -> Result<Client, Error> {
    let client_error = |reason: String| Error::Client {
        what: what.to_string(),
        reason,
    };
    let kubeconfig =
        Kubeconfig::from_yaml(yaml).map_err(|error| client_error(error.to_string()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|error| client_error(error.to_string()))?;
    Client::try_from(config).map_err(|error| client_error(error.to_string()))
}

/// A running control plane. Dropping it stops every process it started and
/// removes its files (set `SYNOD_ENVTEST_KEEP=1` to keep them for a post-mortem).
pub struct EnvTest {
    // Field order is drop order: controllers first, then the API server, then
    // its store, then the files they used.
    controller_manager: Option<Process>,
    apiserver: Process,
    etcd: Process,
    client: Client,
    server: String,
    ca_pem: String,
    kubeconfig: PathBuf,
    binaries: Binaries,
    dir: tempfile::TempDir,
}

impl EnvTest {
    /// Starts etcd, kube-apiserver and, when built, kube-controller-manager,
    /// and waits until they serve.
    pub async fn start() -> Result<Self, Error> {
        Self::start_with(Options::default()).await
    }

    /// Starts the control plane with `options`.
    pub async fn start_with(options: Options) -> Result<Self, Error> {
        // The operator's dependencies enable two rustls crypto backends, so
        // the process must pick one before the first TLS client, as main does.
        synod_operator::install_crypto_provider();
        let binaries = Binaries::locate()?;
        let mut attempt = 1;
        loop {
            match Self::start_once(&binaries, &options).await {
                Err(Error::Component { ref tail, .. })
                    if attempt < START_ATTEMPTS_MAX && tail.contains("address already in use") =>
                {
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once(binaries: &Binaries, options: &Options) -> Result<Self, Error> {
        let dir = tempfile::Builder::new()
            .prefix("synod-envtest-")
            .tempdir()
            .map_err(io_error("creating the environment's temp dir"))?;
        if std::env::var_os("SYNOD_ENVTEST_KEEP").is_some() {
            eprintln!("envtest: keeping {}", dir.path().display());
        }
        let root = dir.path().to_path_buf();
        let pki = Pki::generate(&root)?;

        let etcd_client_port = free_port()?;
        let etcd_peer_port = free_port()?;
        let apiserver_port = free_port()?;
        let etcd_client_url = format!("http://127.0.0.1:{etcd_client_port}");
        let etcd_peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        let etcd_args: Vec<String> = vec![
            "--name=envtest".into(),
            format!("--data-dir={}", root.join("etcd").display()),
            format!("--listen-client-urls={etcd_client_url}"),
            format!("--advertise-client-urls={etcd_client_url}"),
            format!("--listen-peer-urls={etcd_peer_url}"),
            format!("--initial-advertise-peer-urls={etcd_peer_url}"),
            format!("--initial-cluster=envtest={etcd_peer_url}"),
            // The store lives as long as one test: durability buys nothing.
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
        ];
        let mut etcd = Process::spawn(
            "etcd",
            &binaries.require("etcd")?,
            &etcd_args,
            root.join("etcd.log"),
        )?;
        let etcd_address = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), etcd_client_port);
        let deadline = Instant::now() + ETCD_READY_TIMEOUT;
        loop {
            etcd.check_running()?;
            if http::get_status(etcd_address, "/health", READY_POLL_INTERVAL).await == Some(200) {
                break;
            }
            if Instant::now() > deadline {
                return Err(etcd.failure(format!(
                    "did not serve /health within {ETCD_READY_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(READY_POLL_INTERVAL).await;
        }

        let mut apiserver_args: Vec<String> = vec![
            format!("--etcd-servers={etcd_client_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={apiserver_port}"),
            format!("--cert-dir={}", root.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", pki.serving_cert.display()),
            format!("--tls-private-key-file={}", pki.serving_key.display()),
            format!("--client-ca-file={}", pki.ca_cert.display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!(
                "--service-account-key-file={}",
                pki.service_account_public_key.display()
            ),
            format!(
                "--service-account-signing-key-file={}",
                pki.service_account_key.display()
            ),
            format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
            "--authorization-mode=RBAC".into(),
            // Endpoints may not hold loopback addresses, and the API server's
            // own address is one: skip publishing the `kubernetes` Service's.
            "--endpoint-reconciler-type=none".into(),
            "--profiling=false".into(),
        ];
        apiserver_args.extend(options.apiserver_args.iter().cloned());
        let mut apiserver = Process::spawn(
            "kube-apiserver",
            &binaries.require("kube-apiserver")?,
            &apiserver_args,
            root.join("kube-apiserver.log"),
        )?;

        let server = format!("https://127.0.0.1:{apiserver_port}");
        let admin_yaml = kubeconfig_yaml(
            &server,
            &pki.ca_pem,
            "admin",
            &[
                (
                    "client-certificate-data",
                    base64::engine::general_purpose::STANDARD.encode(&pki.admin_cert_pem),
                ),
                (
                    "client-key-data",
                    base64::engine::general_purpose::STANDARD.encode(&pki.admin_key_pem),
                ),
            ],
        );
        let kubeconfig = root.join("kubeconfig");
        write_file(&kubeconfig, &admin_yaml)?;
        let client = client_from_kubeconfig(&admin_yaml, "the admin kubeconfig").await?;

        let deadline = Instant::now() + APISERVER_READY_TIMEOUT;
        loop {
            etcd.check_running()?;
            apiserver.check_running()?;
            let request = ::http::Request::get("/readyz")
                .body(Vec::new())
                .expect("a constant request is valid");
            let ready = tokio::time::timeout(READY_POLL_INTERVAL * 5, client.request_text(request))
                .await
                .is_ok_and(|response| response.is_ok_and(|body| body.trim() == "ok"));
            if ready {
                break;
            }
            if Instant::now() > deadline {
                return Err(apiserver.failure(format!(
                    "did not report /readyz ok within {APISERVER_READY_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(READY_POLL_INTERVAL).await;
        }

        let run_controller_manager = options
            .controller_manager
            .unwrap_or_else(|| binaries.path("kube-controller-manager").is_file());
        let controller_manager = if run_controller_manager {
            let args: Vec<String> = vec![
                format!("--kubeconfig={}", kubeconfig.display()),
                // Serving its own metrics and health needs more certificates
                // and ports, and nothing in the tests reads them.
                "--secure-port=0".into(),
                "--leader-elect=false".into(),
                // No kubelet posts node heartbeats here, so the node lifecycle
                // controller would mark the simulated nodes unreachable and
                // evict their pods; nodes have no pod CIDRs to allocate.
                "--controllers=*,-nodelifecycle,-nodeipam".into(),
                format!(
                    "--service-account-private-key-file={}",
                    pki.service_account_key.display()
                ),
                format!("--root-ca-file={}", pki.ca_cert.display()),
                format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
            ];
            let mut process = Process::spawn(
                "kube-controller-manager",
                &binaries.require("kube-controller-manager")?,
                &args,
                root.join("kube-controller-manager.log"),
            )?;
            // The ServiceAccount controller making `default/default` shows the
            // controllers are running; pods cannot be admitted before it.
            let service_accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
            let deadline = Instant::now() + CONTROLLER_MANAGER_READY_TIMEOUT;
            loop {
                process.check_running()?;
                if matches!(service_accounts.get_opt("default").await, Ok(Some(_))) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(process.failure(format!(
                        "did not create ServiceAccount default/default within \
                         {CONTROLLER_MANAGER_READY_TIMEOUT:?}"
                    )));
                }
                tokio::time::sleep(READY_POLL_INTERVAL).await;
            }
            Some(process)
        } else {
            None
        };

        let dir = if std::env::var_os("SYNOD_ENVTEST_KEEP").is_some() {
            // `disable_cleanup` keeps the files when the environment drops.
            let mut dir = dir;
            dir.disable_cleanup(true);
            dir
        } else {
            dir
        };
        Ok(EnvTest {
            controller_manager,
            apiserver,
            etcd,
            client,
            server,
            ca_pem: pki.ca_pem,
            kubeconfig,
            binaries: binaries.clone(),
            dir,
        })
    }

    /// A client with every right (group `system:masters`).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The admin kubeconfig file, for kubectl and helm.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL (`https://127.0.0.1:<port>`).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The CA that signed the API server's certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The environment's private directory (logs, certificates, data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Where the binaries are.
    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    /// Whether kube-controller-manager runs, so StatefulSets get pods and
    /// deleted owners take their dependents with them.
    pub fn has_controller_manager(&self) -> bool {
        self.controller_manager.is_some()
    }

    /// `Err` naming the component that has exited, with its log's tail.
    pub fn check_running(&mut self) -> Result<(), Error> {
        self.etcd.check_running()?;
        self.apiserver.check_running()?;
        if let Some(process) = self.controller_manager.as_mut() {
            process.check_running()?;
        }
        Ok(())
    }

    /// `kubectl` set up for the admin kubeconfig.
    pub fn kubectl(&self) -> Result<Command, Error> {
        let mut command = Command::new(self.binaries.require("kubectl")?);
        command
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.dir.path());
        Ok(command)
    }

    /// `helm` set up for the admin kubeconfig, with its caches and settings
    /// inside this environment's directory.
    pub fn helm(&self) -> Result<Command, Error> {
        let mut command = Command::new(self.binaries.require("helm")?);
        let helm_home = self.dir.path().join("helm");
        command
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.dir.path())
            .env("HELM_CACHE_HOME", helm_home.join("cache"))
            .env("HELM_CONFIG_HOME", helm_home.join("config"))
            .env("HELM_DATA_HOME", helm_home.join("data"));
        Ok(command)
    }

    /// An identity for the existing ServiceAccount `namespace/name`: a token
    /// from the TokenRequest API, so exactly the RBAC bindings of that
    /// ServiceAccount apply (as for a pod running as it).
    pub async fn service_account_identity(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Identity, Error> {
        let service_accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: Vec::new(),
                expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        let response: TokenRequest = service_accounts
            .create_subresource("token", name, &PostParams::default(), &request)
            .await
            .map_err(api_error(format!(
                "requesting a token for ServiceAccount {namespace}/{name}"
            )))?;
        let token = response
            .status
            .map(|status| status.token)
            .unwrap_or_default();
        let user = format!("system:serviceaccount:{namespace}:{name}");
        let yaml = kubeconfig_yaml(&self.server, &self.ca_pem, name, &[("token", token)]);
        let kubeconfig = self
            .dir
            .path()
            .join(format!("kubeconfig-{namespace}-{name}"));
        write_file(&kubeconfig, &yaml)?;
        let client = client_from_kubeconfig(&yaml, &user).await?;
        Ok(Identity {
            user,
            client,
            kubeconfig,
        })
    }

    /// An identity that can do exactly what `cluster_role` allows: creates
    /// ServiceAccount `namespace/name` (and the namespace) if missing, binds it
    /// to the ClusterRole cluster-wide, and returns its token identity.
    pub async fn identity_with_cluster_role(
        &self,
        namespace: &str,
        name: &str,
        cluster_role: &str,
    ) -> Result<Identity, Error> {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let namespace_object = Namespace {
            metadata: ObjectMeta {
                name: Some(namespace.to_string()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        create_if_missing(&namespaces, &namespace_object, "namespace").await?;
        let service_accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let service_account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        create_if_missing(&service_accounts, &service_account, "ServiceAccount").await?;
        let bindings: Api<ClusterRoleBinding> = Api::all(self.client.clone());
        let binding = ClusterRoleBinding {
            metadata: ObjectMeta {
                name: Some(format!("{namespace}-{name}-{cluster_role}")),
                ..ObjectMeta::default()
            },
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "ClusterRole".into(),
                name: cluster_role.into(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: name.into(),
                namespace: Some(namespace.into()),
                ..Subject::default()
            }]),
        };
        create_if_missing(&bindings, &binding, "ClusterRoleBinding").await?;
        self.service_account_identity(namespace, name).await
    }
}

async fn create_if_missing<K>(api: &Api<K>, object: &K, kind: &str) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(source) => Err(Error::Api {
            context: format!(
                "creating {kind} {}",
                object.meta().name.clone().unwrap_or_default()
            ),
            source,
        }),
    }
}

/// Labels as a `key=value,...` selector.
pub fn label_selector(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}
