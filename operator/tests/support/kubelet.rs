//! A node simulator that plays kubelet (and the scheduler) for the test control
//! plane: it registers a Node, binds unscheduled Pods to it, runs each
//! container as a local process with the Pod's command, environment and
//! volumes, reports status (IP, phase, readiness from the Pod's probes) and
//! stops the processes when the Pod is deleted. It must not run containers,
//! fake API objects it does not own, or use any address outside 127.0.0.0/8.
//!
//! How a Pod maps onto this machine:
//! - **Program.** A container whose `command` is empty (the image's
//!   entrypoint) or starts with `synod-broker` runs the broker binary
//!   (`SYNOD_BROKER_BIN`, else `synod-broker` next to the test executable's
//!   target directory); any other `command` runs as given from `PATH` (e.g.
//!   `sleep`). `$(VAR)` references are expanded as kubelet does.
//! - **Network.** Each Pod gets its own loopback address: every simulator
//!   claims a /24 `127.A.B.0` (a lock file under the temp dir keeps parallel
//!   test processes apart), the node is `.1` and Pods get `.2`, `.3`, ... in
//!   the order their names are first seen. The address is reserved per Pod
//!   name, so a recreated StatefulSet Pod gets its old address back. Pods
//!   share the host's network namespace, so listen addresses `0.0.0.0:P` and
//!   `[::]:P` in args, env and ConfigMap files are rewritten to `<podIP>:P`,
//!   and the broker's `SYNOD_*_LISTEN` variables default to `<podIP>:<port>`.
//! - **Peer discovery.** There is no cluster DNS. A name of the form
//!   `<pod>.<service>.<namespace>.svc[.cluster.local]` (what a headless
//!   Service gives each StatefulSet Pod) in args, env or ConfigMap files is
//!   replaced by that Pod's reserved address, reserving it when the Pod does
//!   not exist yet; so `--peers X-0=X-0.X-nodes.ns.svc:25672,...` reaches the
//!   right processes whichever starts first.
//! - **Volumes.** ConfigMap, Secret, projected (ConfigMap, Secret, downward
//!   API, ServiceAccount token), downward API and emptyDir volumes are written
//!   into a per-Pod directory once, when the Pod starts; a PersistentVolumeClaim
//!   is a directory kept per claim (name and uid) for the simulator's lifetime,
//!   so a restarted Pod finds its data and a recreated claim starts empty.
//!   Every `mountPath` that appears in args, env values or ConfigMap files is
//!   rewritten to the directory standing in for it. Pending claims get a
//!   hostPath PersistentVolume pre-bound to them (the simulator is the
//!   provisioner), which kube-controller-manager then binds.
//! - **API access.** Pods that mount a ServiceAccount token also get
//!   `KUBECONFIG` pointing at a kubeconfig with that token, so a process
//!   using the usual client configuration reaches the API server as the Pod's
//!   ServiceAccount.
//! - **Probes.** Readiness and liveness probes (httpGet, tcpSocket, exec) run
//!   against the Pod's address every `probe_interval` (the probes' own
//!   periods and delays are compressed to that); their thresholds apply.
//! - **Time.** Container restarts back off from 200 ms to 5 s, not kubelet's
//!   10 s to 5 min, so crash-restart tests stay short.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    Binding, ConfigMap, Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, HostPathVolumeSource, KeyToPath, Node,
    NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo, ObjectReference, PersistentVolume,
    PersistentVolumeClaim, PersistentVolumeSpec, Pod, PodCondition, PodIP, PodStatus, Probe,
    Secret, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Client;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};
use tokio::sync::{Notify, watch};

use super::envtest::EnvTest;
use super::http;
use super::process;

/// Restart back-off bounds for crashed containers.
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(200);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A probe that has not answered by then has failed.
const PROBE_TIMEOUT_MAX: Duration = Duration::from_secs(2);
/// Pods a simulator runs at once: the addresses of one /24.
const PODS_MAX: u32 = 250;
/// Lifetime of ServiceAccount tokens written into Pods.
const POD_TOKEN_EXPIRATION_SECONDS: i64 = 3600;
/// Default broker ports, as DESIGN.md fixes them.
const BROKER_LISTEN_DEFAULTS: [(&str, u16); 4] = [
    ("SYNOD_AMQP_LISTEN", 5672),
    ("SYNOD_MGMT_LISTEN", 15672),
    ("SYNOD_METRICS_LISTEN", 15692),
    ("SYNOD_CLUSTER_LISTEN", 25672),
];
/// Where subnet claims of concurrently running simulators are recorded.
const SUBNET_LOCK_DIR: &str = "synod-kubelet-subnets";

/// A volume's files: path inside the volume, content.
type VolumeFiles = Vec<(String, Vec<u8>)>;

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("{context}: {source}")]
    Api {
        /// What was being done.
        context: String,
        /// The API error.
        source: kube::Error,
    },
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Every candidate loopback /24 is claimed.
    #[error("no free loopback /24 for pod addresses under {0}")]
    NoSubnet(PathBuf),
}

/// How the simulator behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// The Node's name.
    pub node_name: String,
    /// The broker binary; `None`: `SYNOD_BROKER_BIN`, else the workspace's.
    pub broker_bin: Option<PathBuf>,
    /// How often processes are checked and probes run.
    pub probe_interval: Duration,
    /// Upper bound on a Pod's termination grace period.
    pub termination_grace_max: Duration,
    /// Bind Pods that name no node to this one (the scheduler's job).
    pub schedule: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            node_name: "synod-node-0".to_string(),
            broker_bin: None,
            probe_interval: Duration::from_millis(300),
            termination_grace_max: Duration::from_secs(15),
            schedule: true,
        }
    }
}

/// The broker binary: `SYNOD_BROKER_BIN`, else `synod-broker` in the target
/// directory of the running test executable (`target/<profile>/deps/..`).
pub fn default_broker_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("SYNOD_BROKER_BIN") {
        return PathBuf::from(path);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf))
        .map(|profile_dir| profile_dir.join("synod-broker"))
        .unwrap_or_else(|| PathBuf::from("synod-broker"))
}

/// A claimed loopback /24, released on drop.
struct Subnet {
    prefix: [u8; 3],
    lock: PathBuf,
}

impl Subnet {
    fn claim() -> Result<Self, Error> {
        let dir = std::env::temp_dir().join(SUBNET_LOCK_DIR);
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            context: format!("creating {}", dir.display()),
            source,
        })?;
        // 127.0.x.x is left to everyone else, 127.96.x.x is the Service range.
        let seed = std::process::id() as usize
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.subsec_nanos() as usize)
                .unwrap_or(0);
        let candidates = 150 * 256;
        for step in 0..candidates {
            let index = (seed + step * 7919) % candidates;
            let first = 100 + (index / 256) as u8;
            let second = (index % 256) as u8;
            if first == 96 {
                continue;
            }
            let lock = dir.join(format!("127.{first}.{second}"));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&lock)
            {
                Ok(mut file) => {
                    use std::io::Write as _;
                    let _ = write!(file, "{}", std::process::id());
                    return Ok(Subnet {
                        prefix: [127, first, second],
                        lock,
                    });
                }
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                    // A claim whose process is gone is stale.
                    let owner = std::fs::read_to_string(&lock).unwrap_or_default();
                    let alive = owner
                        .trim()
                        .parse::<u32>()
                        .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                    if !alive {
                        let _ = std::fs::remove_file(&lock);
                    }
                }
                Err(_) => {}
            }
        }
        Err(Error::NoSubnet(dir))
    }

    fn address(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], host)
    }
}

impl Drop for Subnet {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.lock);
    }
}

/// Pod addresses, reserved per `(namespace, pod name)`.
#[derive(Default)]
struct Addresses {
    by_pod: HashMap<(String, String), Ipv4Addr>,
    next_host: u32,
}

/// One running (or restarting) container.
struct ContainerRuntime {
    launch: Launch,
    child: Option<Child>,
    started_at: Option<Time>,
    restart_count: i32,
    last_termination: Option<ContainerStateTerminated>,
    next_start: Instant,
    backoff: Duration,
    ready: bool,
    readiness_successes: i32,
    readiness_failures: i32,
    liveness_failures: i32,
    /// Init containers run once to success.
    succeeded: bool,
}

/// Everything needed to start one container's process.
#[derive(Clone)]
struct Launch {
    name: String,
    image: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    readiness: Option<Probe>,
    liveness: Option<Probe>,
    /// Named container ports, for probes that name their port.
    ports: Vec<(String, u16)>,
}

/// A Pod this node runs.
struct PodRuntime {
    namespace: String,
    name: String,
    ip: Ipv4Addr,
    dir: PathBuf,
    start_time: Time,
    init: Vec<ContainerRuntime>,
    containers: Vec<ContainerRuntime>,
    restart_policy: String,
    /// Why the containers cannot be created yet (missing ConfigMap, ...).
    waiting: Option<(String, String)>,
    terminating_deadline: Option<Instant>,
    condition_times: BTreeMap<String, (String, Time)>,
    last_status: Option<serde_json::Value>,
}

/// State shared between the simulator's task and its handle.
struct Shared {
    /// Process groups alive, killed when the simulator is dropped.
    groups: Mutex<HashSet<u32>>,
}

/// The simulated node. Dropping it kills every process it started.
pub struct Kubelet {
    node_name: String,
    subnet: Subnet,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    watch_task: tokio::task::JoinHandle<()>,
    root: PathBuf,
    addresses: Arc<Mutex<Addresses>>,
}

struct Context {
    client: Client,
    options: Options,
    broker_bin: PathBuf,
    host_ip: Ipv4Addr,
    subnet_prefix: [u8; 3],
    root: PathBuf,
    server: String,
    ca_pem: String,
    shared: Arc<Shared>,
    addresses: Arc<Mutex<Addresses>>,
    pods: Store<Pod>,
    claims: Store<PersistentVolumeClaim>,
    provisioned: HashSet<String>,
    runtimes: HashMap<String, PodRuntime>,
}

impl Kubelet {
    /// Registers the node and starts simulating it in `env`.
    pub async fn start(env: &EnvTest) -> Result<Self, Error> {
        Self::start_with(env, Options::default()).await
    }

    /// Registers the node and starts simulating it with `options`.
    pub async fn start_with(env: &EnvTest, options: Options) -> Result<Self, Error> {
        let client = env.client();
        let subnet = Subnet::claim()?;
        let host_ip = subnet.address(1);
        let root = env.dir().join(format!("node-{}", options.node_name));
        std::fs::create_dir_all(&root).map_err(|source| Error::Io {
            context: format!("creating {}", root.display()),
            source,
        })?;
        register_node(&client, &options.node_name, host_ip).await?;

        let shared = Arc::new(Shared {
            groups: Mutex::new(HashSet::new()),
        });
        let addresses = Arc::new(Mutex::new(Addresses::default()));
        let wake = Arc::new(Notify::new());
        let (pods, pods_writer) = reflector::store();
        let pod_events = reflector::reflector(
            pods_writer,
            watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()),
        )
        .default_backoff()
        .touched_objects();
        let (claims, claims_writer) = reflector::store();
        let claim_events = reflector::reflector(
            claims_writer,
            watcher(
                Api::<PersistentVolumeClaim>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .touched_objects();

        let (shutdown, mut shutdown_rx) = watch::channel(false);
        let mut context = Context {
            client,
            broker_bin: options
                .broker_bin
                .clone()
                .unwrap_or_else(default_broker_bin),
            options: options.clone(),
            host_ip,
            subnet_prefix: subnet.prefix,
            root: root.clone(),
            server: env.server().to_string(),
            ca_pem: env.ca_pem().to_string(),
            shared: shared.clone(),
            addresses: addresses.clone(),
            pods,
            claims,
            provisioned: HashSet::new(),
            runtimes: HashMap::new(),
        };
        // Watch events only wake the loop, which reads the reflectors' stores.
        let mut events = futures::stream::select(
            pod_events.map(|_| ()).boxed(),
            claim_events.map(|_| ()).boxed(),
        );
        let waker = wake.clone();
        let watch_task = tokio::spawn(async move {
            while events.next().await.is_some() {
                waker.notify_one();
            }
        });
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown_rx.changed() => break,
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(context.options.probe_interval) => {}
                }
                context.sync().await;
            }
            context.stop_all();
        });
        Ok(Kubelet {
            node_name: options.node_name,
            subnet,
            shared,
            shutdown,
            task,
            watch_task,
            root,
            addresses,
        })
    }

    /// The Node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The node's own address (`127.A.B.1`).
    pub fn host_ip(&self) -> Ipv4Addr {
        self.subnet.address(1)
    }

    /// The loopback address reserved for Pod `namespace/name` (the one it has
    /// or will get), so tests can reach a Pod's ports.
    pub fn pod_ip(&self, namespace: &str, name: &str) -> Ipv4Addr {
        reserve_address(&self.addresses, self.subnet.prefix, namespace, name)
    }

    /// The directory standing in for PersistentVolumeClaim `namespace/claim`
    /// (all incarnations of it), e.g. to inspect or destroy a Pod's disk.
    pub fn claim_dir(&self, namespace: &str, claim: &str) -> PathBuf {
        self.root.join("volumes").join(namespace).join(claim)
    }

    /// The output of a container of a Pod (all its restarts), empty if none.
    pub fn logs(&self, namespace: &str, pod: &str, container: &str) -> String {
        std::fs::read_to_string(
            self.root
                .join("pods")
                .join(namespace)
                .join(pod)
                .join(format!("{container}.log")),
        )
        .unwrap_or_default()
    }

    /// Sends `signal` to the process group of `container` in `pod`, as the
    /// Pod's status names it (`containerID: synod-process://<group>`); false
    /// when that status names no process this simulator runs. SIGSTOP and
    /// SIGCONT make a broker unresponsive and back without the restart a
    /// crash would cause.
    pub fn signal_container(&self, pod: &Pod, container: &str, signal: libc::c_int) -> bool {
        let group = pod
            .status
            .as_ref()
            .and_then(|status| status.container_statuses.as_ref())
            .and_then(|statuses| statuses.iter().find(|s| s.name == container))
            .and_then(|status| status.container_id.as_deref())
            .and_then(|id| id.strip_prefix("synod-process://"))
            .and_then(|group| group.parse::<u32>().ok());
        let Some(group) = group else {
            return false;
        };
        // A stale status may name a process that is gone (and a pid reused):
        // only groups this simulator started and still tracks are signalled.
        let ours = self
            .shared
            .groups
            .lock()
            .map(|groups| groups.contains(&group))
            .unwrap_or(false);
        if ours {
            process::signal_group(group, signal);
        }
        ours
    }

    /// Stops simulating: kills every process now (Pods stay in the API).
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        drop(self);
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.task.abort();
        self.watch_task.abort();
        let groups = self
            .shared
            .groups
            .lock()
            .map(|groups| groups.clone())
            .unwrap_or_default();
        for group in groups {
            process::signal_group(group, libc::SIGKILL);
        }
    }
}

fn reserve_address(
    addresses: &Mutex<Addresses>,
    prefix: [u8; 3],
    namespace: &str,
    name: &str,
) -> Ipv4Addr {
    let mut addresses = addresses
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let key = (namespace.to_string(), name.to_string());
    if let Some(address) = addresses.by_pod.get(&key) {
        return *address;
    }
    assert!(
        addresses.next_host < PODS_MAX,
        "the node simulator ran out of pod addresses ({PODS_MAX})"
    );
    let host = u8::try_from(addresses.next_host + 2).expect("PODS_MAX keeps hosts below 256");
    addresses.next_host += 1;
    let address = Ipv4Addr::new(prefix[0], prefix[1], prefix[2], host);
    addresses.by_pod.insert(key, address);
    address
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

async fn register_node(client: &Client, name: &str, host_ip: Ipv4Addr) -> Result<(), Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_string(), name.to_string()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), "amd64".to_string()),
    ]);
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(source) => {
            return Err(Error::Api {
                context: format!("creating Node {name}"),
                source,
            });
        }
    }
    let capacity = BTreeMap::from([
        ("cpu".to_string(), Quantity("2".into())),
        ("memory".to_string(), Quantity("24Gi".into())),
        ("pods".to_string(), Quantity(PODS_MAX.to_string())),
        ("ephemeral-storage".to_string(), Quantity("100Gi".into())),
    ]);
    let time = now();
    let status = NodeStatus {
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: host_ip.to_string(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: name.into(),
            },
        ]),
        allocatable: Some(capacity.clone()),
        capacity: Some(capacity),
        conditions: Some(vec![NodeCondition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: Some("KubeletReady".into()),
            message: Some("node simulator is running".into()),
            last_heartbeat_time: Some(time.clone()),
            last_transition_time: Some(time),
        }]),
        node_info: Some(NodeSystemInfo {
            architecture: "amd64".into(),
            operating_system: "linux".into(),
            kubelet_version: "synod-node-simulator".into(),
            container_runtime_version: "synod-process://0".into(),
            ..NodeSystemInfo::default()
        }),
        ..NodeStatus::default()
    };
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": status })),
        )
        .await
        .map_err(|source| Error::Api {
            context: format!("reporting Node {name} ready"),
            source,
        })?;
    Ok(())
}

impl Context {
    async fn sync(&mut self) {
        self.provision_claims().await;
        let pods = self.pods.state();
        let mut seen = HashSet::new();
        for pod in pods {
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            let node = pod.spec.as_ref().and_then(|spec| spec.node_name.clone());
            match node {
                None => {
                    if self.options.schedule && pod.metadata.deletion_timestamp.is_none() {
                        self.bind(&pod).await;
                    }
                }
                Some(node) if node == self.options.node_name => {
                    seen.insert(uid.clone());
                    self.sync_pod(&uid, &pod).await;
                }
                Some(_) => {}
            }
        }
        // Pods removed from the API without this node's consent (force deletion).
        let gone: Vec<String> = self
            .runtimes
            .keys()
            .filter(|uid| !seen.contains(*uid))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(mut runtime) = self.runtimes.remove(&uid) {
                self.kill_pod(&mut runtime);
            }
        }
    }

    async fn bind(&self, pod: &Pod) {
        let scheduler = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.scheduler_name.clone())
            .unwrap_or_else(|| "default-scheduler".into());
        if scheduler != "default-scheduler" {
            return;
        }
        let (Some(namespace), Some(name)) = (&pod.metadata.namespace, &pod.metadata.name) else {
            return;
        };
        let binding = Binding {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                uid: pod.metadata.uid.clone(),
                ..ObjectMeta::default()
            },
            target: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(self.options.node_name.clone()),
                ..ObjectReference::default()
            },
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        // A conflict means it was bound meanwhile; the next pass sees that.
        let _: Result<serde_json::Value, _> = pods
            .create_subresource("binding", name, &PostParams::default(), &binding)
            .await;
    }

    /// Gives each pending claim a hostPath volume pre-bound to it.
    async fn provision_claims(&mut self) {
        for claim in self.claims.state() {
            let (Some(namespace), Some(name), Some(uid)) = (
                claim.metadata.namespace.clone(),
                claim.metadata.name.clone(),
                claim.metadata.uid.clone(),
            ) else {
                continue;
            };
            let spec = claim.spec.clone().unwrap_or_default();
            if spec.volume_name.is_some()
                || claim.metadata.deletion_timestamp.is_some()
                || self.provisioned.contains(&uid)
            {
                continue;
            }
            let dir = self.claim_dir(&namespace, &name, &uid);
            if std::fs::create_dir_all(&dir).is_err() {
                continue;
            }
            let storage = spec
                .resources
                .as_ref()
                .and_then(|resources| resources.requests.as_ref())
                .and_then(|requests| requests.get("storage").cloned())
                .unwrap_or_else(|| Quantity("1Gi".into()));
            let volume = PersistentVolume {
                metadata: ObjectMeta {
                    name: Some(format!("pvc-{uid}")),
                    ..ObjectMeta::default()
                },
                spec: Some(PersistentVolumeSpec {
                    access_modes: spec.access_modes.clone(),
                    capacity: Some(BTreeMap::from([("storage".to_string(), storage)])),
                    claim_ref: Some(ObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("PersistentVolumeClaim".into()),
                        namespace: Some(namespace.clone()),
                        name: Some(name.clone()),
                        uid: Some(uid.clone()),
                        ..ObjectReference::default()
                    }),
                    host_path: Some(HostPathVolumeSource {
                        path: dir.display().to_string(),
                        type_: Some("DirectoryOrCreate".into()),
                    }),
                    persistent_volume_reclaim_policy: Some("Retain".into()),
                    storage_class_name: Some(spec.storage_class_name.clone().unwrap_or_default()),
                    volume_mode: spec.volume_mode.clone(),
                    ..PersistentVolumeSpec::default()
                }),
                ..PersistentVolume::default()
            };
            let volumes: Api<PersistentVolume> = Api::all(self.client.clone());
            match volumes.create(&PostParams::default(), &volume).await {
                Ok(_) => {
                    self.provisioned.insert(uid);
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    self.provisioned.insert(uid);
                }
                Err(_) => {}
            }
        }
    }

    fn claim_dir(&self, namespace: &str, claim: &str, uid: &str) -> PathBuf {
        self.root
            .join("volumes")
            .join(namespace)
            .join(claim)
            .join(uid)
    }

    async fn sync_pod(&mut self, uid: &str, pod: &Pod) {
        let (Some(namespace), Some(name)) =
            (pod.metadata.namespace.clone(), pod.metadata.name.clone())
        else {
            return;
        };
        if !self.runtimes.contains_key(uid) {
            if pod.metadata.deletion_timestamp.is_some() {
                self.finish_deletion(&namespace, &name, uid).await;
                return;
            }
            let ip = reserve_address(&self.addresses, self.subnet_prefix, &namespace, &name);
            let dir = self.root.join("pods").join(&namespace).join(&name);
            let restart_policy = pod
                .spec
                .as_ref()
                .and_then(|spec| spec.restart_policy.clone())
                .unwrap_or_else(|| "Always".into());
            self.runtimes.insert(
                uid.to_string(),
                PodRuntime {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    ip,
                    dir,
                    start_time: now(),
                    init: Vec::new(),
                    containers: Vec::new(),
                    restart_policy,
                    waiting: Some(("ContainerCreating".into(), String::new())),
                    terminating_deadline: None,
                    condition_times: BTreeMap::new(),
                    last_status: None,
                },
            );
        }
        let Some(mut runtime) = self.runtimes.remove(uid) else {
            return;
        };

        if pod.metadata.deletion_timestamp.is_some() {
            if self.terminate(&mut runtime, pod) {
                self.finish_deletion(&namespace, &name, uid).await;
                return;
            }
            self.runtimes.insert(uid.to_string(), runtime);
            return;
        }

        if runtime.init.is_empty() && runtime.containers.is_empty() {
            match self.prepare(pod, &runtime).await {
                Ok((init, containers)) => {
                    runtime.init = init.into_iter().map(ContainerRuntime::new).collect();
                    runtime.containers =
                        containers.into_iter().map(ContainerRuntime::new).collect();
                    runtime.waiting = None;
                }
                Err((reason, message)) => runtime.waiting = Some((reason, message)),
            }
        }
        if runtime.waiting.is_none() {
            self.run_containers(&mut runtime).await;
        }
        let status = pod_status(&mut runtime, self.host_ip, pod);
        let status_json = serde_json::to_value(&status).unwrap_or_default();
        if runtime.last_status.as_ref() != Some(&status_json) {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
            let patched = pods
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({ "status": status_json })),
                )
                .await;
            if patched.is_ok() {
                runtime.last_status = Some(status_json);
            }
        }
        self.runtimes.insert(uid.to_string(), runtime);
    }

    /// Starts, restarts and probes the Pod's containers.
    async fn run_containers(&mut self, runtime: &mut PodRuntime) {
        let ip = runtime.ip;
        let restart_policy = runtime.restart_policy.clone();
        // Init containers run one at a time, each to success, before the rest.
        for container in runtime.init.iter_mut() {
            if container.succeeded {
                continue;
            }
            self.reap(container);
            if container.child.is_none() {
                if container
                    .last_termination
                    .as_ref()
                    .is_some_and(|terminated| terminated.exit_code == 0)
                {
                    container.succeeded = true;
                    continue;
                }
                if restart_policy != "Never" || container.last_termination.is_none() {
                    self.start_container(container, runtime.ip, &runtime.dir);
                }
            }
            return;
        }
        for container in runtime.containers.iter_mut() {
            self.reap(container);
            if container.child.is_none() {
                let exited_ok = container
                    .last_termination
                    .as_ref()
                    .map(|terminated| terminated.exit_code == 0);
                let restart = matches!(
                    (restart_policy.as_str(), exited_ok),
                    (_, None) | ("Always", _) | ("OnFailure", Some(false))
                );
                if restart {
                    self.start_container(container, ip, &runtime.dir);
                }
                continue;
            }
            if let Some(probe) = container.launch.liveness.clone() {
                let live = run_probe(&probe, ip, &container.launch).await;
                if live {
                    container.liveness_failures = 0;
                } else {
                    container.liveness_failures += 1;
                    if container.liveness_failures >= probe.failure_threshold.unwrap_or(3) {
                        container.liveness_failures = 0;
                        if let Some(child) = container.child.as_mut() {
                            process::signal_group(child.id(), libc::SIGKILL);
                        }
                        continue;
                    }
                }
            }
            match container.launch.readiness.clone() {
                None => container.ready = true,
                Some(probe) => {
                    if run_probe(&probe, ip, &container.launch).await {
                        container.readiness_failures = 0;
                        container.readiness_successes += 1;
                        if container.readiness_successes >= probe.success_threshold.unwrap_or(1) {
                            container.ready = true;
                        }
                    } else {
                        container.readiness_successes = 0;
                        container.readiness_failures += 1;
                        if container.readiness_failures >= probe.failure_threshold.unwrap_or(3) {
                            container.ready = false;
                        }
                    }
                }
            }
        }
    }

    /// Notices an exited process and records how it ended.
    fn reap(&self, container: &mut ContainerRuntime) {
        let Some(child) = container.child.as_mut() else {
            return;
        };
        let Ok(Some(status)) = child.try_wait() else {
            return;
        };
        let group = child.id();
        // The group may still hold the process's own children.
        process::signal_group(group, libc::SIGKILL);
        self.forget_group(group);
        use std::os::unix::process::ExitStatusExt as _;
        let exit_code = status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        container.last_termination = Some(ContainerStateTerminated {
            exit_code,
            signal: status.signal(),
            reason: Some(if exit_code == 0 { "Completed" } else { "Error" }.into()),
            started_at: container.started_at.clone(),
            finished_at: Some(now()),
            container_id: Some(format!("synod-process://{group}")),
            ..ContainerStateTerminated::default()
        });
        container.child = None;
        container.ready = false;
        container.readiness_successes = 0;
        container.next_start = Instant::now() + container.backoff;
        container.backoff = (container.backoff * 2).min(RESTART_BACKOFF_MAX);
    }

    fn start_container(&self, container: &mut ContainerRuntime, ip: Ipv4Addr, dir: &Path) {
        if Instant::now() < container.next_start {
            return;
        }
        if container.last_termination.is_some() {
            container.restart_count += 1;
        }
        let launch = &container.launch;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&launch.log);
        let (Ok(log), Ok(log_err)) = (
            log.as_ref().map(|file| file.try_clone()),
            log.as_ref().map(|file| file.try_clone()),
        ) else {
            return;
        };
        let (Ok(log), Ok(log_err)) = (log, log_err) else {
            return;
        };
        let mut command = Command::new(&launch.program);
        command
            .args(&launch.args)
            .env_clear()
            .envs(launch.env.iter().map(|(key, value)| (key, value)))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        process::isolate(&mut command);
        match command.spawn() {
            Ok(child) => {
                self.shared
                    .groups
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(child.id());
                container.child = Some(child);
                container.started_at = Some(now());
            }
            Err(error) => {
                use std::io::Write as _;
                if let Ok(mut file) = std::fs::OpenOptions::new().append(true).open(&launch.log) {
                    let _ = writeln!(
                        file,
                        "node simulator: cannot start {} for {ip}: {error}",
                        launch.program.display()
                    );
                }
                container.last_termination = Some(ContainerStateTerminated {
                    exit_code: 128,
                    reason: Some("StartError".into()),
                    message: Some(format!("{}: {error}", launch.program.display())),
                    finished_at: Some(now()),
                    ..ContainerStateTerminated::default()
                });
                container.next_start = Instant::now() + container.backoff;
                container.backoff = (container.backoff * 2).min(RESTART_BACKOFF_MAX);
            }
        }
    }

    fn forget_group(&self, group: u32) {
        self.shared
            .groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&group);
    }

    /// Sends SIGTERM once, SIGKILL after the grace period; true when every
    /// process has exited.
    fn terminate(&self, runtime: &mut PodRuntime, pod: &Pod) -> bool {
        let grace = pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                pod.spec
                    .as_ref()
                    .and_then(|spec| spec.termination_grace_period_seconds)
            })
            .unwrap_or(30);
        let grace = Duration::from_secs(u64::try_from(grace).unwrap_or(0))
            .min(self.options.termination_grace_max);
        let deadline = *runtime.terminating_deadline.get_or_insert_with(|| {
            for container in runtime.init.iter_mut().chain(runtime.containers.iter_mut()) {
                if let Some(child) = container.child.as_ref() {
                    process::signal_group(child.id(), libc::SIGTERM);
                }
            }
            Instant::now() + grace
        });
        let past_deadline = Instant::now() >= deadline;
        let mut all_exited = true;
        for container in runtime.init.iter_mut().chain(runtime.containers.iter_mut()) {
            let Some(child) = container.child.as_mut() else {
                continue;
            };
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => {
                    let group = child.id();
                    process::signal_group(group, libc::SIGKILL);
                    self.forget_group(group);
                    container.child = None;
                }
                Ok(None) => {
                    if past_deadline {
                        let group = child.id();
                        process::kill_group(child);
                        self.forget_group(group);
                        container.child = None;
                    } else {
                        all_exited = false;
                    }
                }
            }
        }
        all_exited
    }

    /// Removes the Pod object, as kubelet does once its processes are gone.
    async fn finish_deletion(&self, namespace: &str, name: &str, uid: &str) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let _ = pods.delete(name, &params).await;
    }

    fn kill_pod(&self, runtime: &mut PodRuntime) {
        for container in runtime.init.iter_mut().chain(runtime.containers.iter_mut()) {
            if let Some(mut child) = container.child.take() {
                let group = child.id();
                process::kill_group(&mut child);
                self.forget_group(group);
            }
        }
    }

    fn stop_all(&mut self) {
        let runtimes: Vec<String> = self.runtimes.keys().cloned().collect();
        for uid in runtimes {
            if let Some(mut runtime) = self.runtimes.remove(&uid) {
                self.kill_pod(&mut runtime);
            }
        }
    }

    /// Resolves volumes, environment and program of every container. `Err`
    /// carries the waiting reason kubelet would report.
    async fn prepare(
        &self,
        pod: &Pod,
        runtime: &PodRuntime,
    ) -> Result<(Vec<Launch>, Vec<Launch>), (String, String)> {
        let spec = pod.spec.clone().unwrap_or_default();
        let namespace = runtime.namespace.as_str();
        let config_error = |message: String| ("CreateContainerConfigError".to_string(), message);
        let io_failure = |message: String| ("CreateContainerError".to_string(), message);
        std::fs::create_dir_all(&runtime.dir).map_err(|error| io_failure(error.to_string()))?;

        // Volumes: name -> directory on this machine.
        let mut volume_dirs: HashMap<String, PathBuf> = HashMap::new();
        let mut token_file: Option<PathBuf> = None;
        // ConfigMap text is rewritten like args, mount paths included, so it
        // is written once every volume has its directory.
        let mut config_files: Vec<(PathBuf, VolumeFiles)> = Vec::new();
        for volume in spec.volumes.clone().unwrap_or_default() {
            let dir = runtime.dir.join("volumes").join(&volume.name);
            std::fs::create_dir_all(&dir).map_err(|error| io_failure(error.to_string()))?;
            if let Some(source) = &volume.config_map {
                let files = self
                    .config_map_files(
                        namespace,
                        &source.name,
                        source.items.as_deref(),
                        source.optional,
                    )
                    .await
                    .map_err(config_error)?;
                config_files.push((dir.clone(), files));
            } else if let Some(source) = &volume.secret {
                let secret_name = source.secret_name.clone().unwrap_or_default();
                let files = self
                    .secret_files(
                        namespace,
                        &secret_name,
                        source.items.as_deref(),
                        source.optional,
                    )
                    .await
                    .map_err(config_error)?;
                self.write_files(&dir, files, None).map_err(io_failure)?;
            } else if let Some(source) = &volume.persistent_volume_claim {
                let claim = self
                    .claims
                    .state()
                    .into_iter()
                    .find(|claim| {
                        claim.metadata.namespace.as_deref() == Some(namespace)
                            && claim.metadata.name.as_deref() == Some(source.claim_name.as_str())
                    })
                    .ok_or_else(|| {
                        (
                            "ContainerCreating".to_string(),
                            format!("waiting for PersistentVolumeClaim {}", source.claim_name),
                        )
                    })?;
                let uid = claim.metadata.uid.clone().unwrap_or_default();
                let claim_dir = self.claim_dir(namespace, &source.claim_name, &uid);
                std::fs::create_dir_all(&claim_dir)
                    .map_err(|error| io_failure(error.to_string()))?;
                volume_dirs.insert(volume.name.clone(), claim_dir);
                continue;
            } else if let Some(source) = &volume.host_path {
                volume_dirs.insert(volume.name.clone(), PathBuf::from(&source.path));
                continue;
            } else if let Some(source) = &volume.downward_api {
                let mut files = Vec::new();
                for item in source.items.clone().unwrap_or_default() {
                    if let Some(field) = &item.field_ref {
                        files.push((
                            item.path.clone(),
                            field_value(pod, runtime.ip, &field.field_path).into_bytes(),
                        ));
                    }
                }
                self.write_files(&dir, files, None).map_err(io_failure)?;
            } else if let Some(source) = &volume.projected {
                for projection in source.sources.clone().unwrap_or_default() {
                    let files = if let Some(source) = &projection.config_map {
                        self.config_map_files(
                            namespace,
                            &source.name,
                            source.items.as_deref(),
                            source.optional,
                        )
                        .await
                        .map_err(config_error)?
                    } else if let Some(source) = &projection.secret {
                        self.secret_files(
                            namespace,
                            &source.name,
                            source.items.as_deref(),
                            source.optional,
                        )
                        .await
                        .map_err(config_error)?
                    } else if let Some(source) = &projection.downward_api {
                        source
                            .items
                            .clone()
                            .unwrap_or_default()
                            .into_iter()
                            .filter_map(|item| {
                                let field = item.field_ref?;
                                Some((
                                    item.path,
                                    field_value(pod, runtime.ip, &field.field_path).into_bytes(),
                                ))
                            })
                            .collect()
                    } else if let Some(source) = &projection.service_account_token {
                        let token = self
                            .pod_token(pod, source.audience.clone(), source.expiration_seconds)
                            .await
                            .map_err(config_error)?;
                        token_file = Some(dir.join(&source.path));
                        vec![(source.path.clone(), token.into_bytes())]
                    } else {
                        Vec::new()
                    };
                    self.write_files(&dir, files, None).map_err(io_failure)?;
                }
            }
            volume_dirs.insert(volume.name.clone(), dir);
        }
        // A volume mounted in several containers is rewritten with the first
        // container's paths (init containers first, as they start first).
        let mut mounts: Vec<(String, PathBuf)> = Vec::new();
        for container in spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
        {
            for (path, dir) in container_mounts(container, &volume_dirs) {
                if mounts.iter().all(|(known, _)| *known != path) {
                    mounts.push((path, dir));
                }
            }
        }
        let rewriter = Rewriter {
            mounts,
            ip: runtime.ip,
            addresses: self.addresses.clone(),
            subnet_prefix: self.subnet_prefix,
        };
        for (dir, files) in config_files {
            self.write_files(&dir, files, Some(&rewriter))
                .map_err(io_failure)?;
        }

        let mut init = Vec::new();
        for container in spec.init_containers.clone().unwrap_or_default() {
            init.push(
                self.launch(
                    pod,
                    runtime,
                    &container,
                    &volume_dirs,
                    token_file.as_deref(),
                )
                .await?,
            );
        }
        let mut containers = Vec::new();
        for container in spec.containers.clone() {
            containers.push(
                self.launch(
                    pod,
                    runtime,
                    &container,
                    &volume_dirs,
                    token_file.as_deref(),
                )
                .await?,
            );
        }
        Ok((init, containers))
    }

    async fn launch(
        &self,
        pod: &Pod,
        runtime: &PodRuntime,
        container: &Container,
        volume_dirs: &HashMap<String, PathBuf>,
        token_file: Option<&Path>,
    ) -> Result<Launch, (String, String)> {
        let namespace = runtime.namespace.as_str();
        let config_error = |message: String| ("CreateContainerConfigError".to_string(), message);
        let rewriter = Rewriter {
            mounts: container_mounts(container, volume_dirs),
            ip: runtime.ip,
            addresses: self.addresses.clone(),
            subnet_prefix: self.subnet_prefix,
        };

        // What the container runtime and kubelet put in every container.
        let mut env: Vec<(String, String)> = Vec::new();
        if let Some(path) = std::env::var_os("PATH") {
            env.push(("PATH".into(), path.to_string_lossy().into_owned()));
        }
        for passthrough in ["RUST_LOG", "RUST_BACKTRACE"] {
            if let Ok(value) = std::env::var(passthrough) {
                env.push((passthrough.into(), value));
            }
        }
        env.push(("HOSTNAME".into(), runtime.name.clone()));
        env.push(("HOME".into(), runtime.dir.display().to_string()));
        let server_port = self.server.rsplit(':').next().unwrap_or("443").to_string();
        env.push(("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()));
        env.push(("KUBERNETES_SERVICE_PORT".into(), server_port));
        for (variable, port) in BROKER_LISTEN_DEFAULTS {
            env.push((variable.into(), format!("{}:{port}", runtime.ip)));
        }
        if let Some(token_file) = token_file {
            let kubeconfig = runtime.dir.join("kubeconfig");
            let token = std::fs::read_to_string(token_file).unwrap_or_default();
            let yaml = pod_kubeconfig(&self.server, &self.ca_pem, &token);
            std::fs::write(&kubeconfig, yaml).map_err(|error| config_error(error.to_string()))?;
            env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
        }

        // envFrom, then env; later entries win, and $(VAR) sees earlier ones.
        for source in container.env_from.clone().unwrap_or_default() {
            let prefix = source.prefix.clone().unwrap_or_default();
            let entries: Vec<(String, Vec<u8>)> = if let Some(reference) = &source.config_map_ref {
                self.config_map_files(namespace, &reference.name, None, reference.optional)
                    .await
                    .map_err(config_error)?
            } else if let Some(reference) = &source.secret_ref {
                self.secret_files(namespace, &reference.name, None, reference.optional)
                    .await
                    .map_err(config_error)?
            } else {
                Vec::new()
            };
            for (key, value) in entries {
                set_env(
                    &mut env,
                    format!("{prefix}{key}"),
                    String::from_utf8_lossy(&value).into_owned(),
                );
            }
        }
        for variable in container.env.clone().unwrap_or_default() {
            let value = if let Some(source) = &variable.value_from {
                if let Some(field) = &source.field_ref {
                    field_value(pod, runtime.ip, &field.field_path)
                } else if let Some(selector) = &source.config_map_key_ref {
                    let entries = self
                        .config_map_files(namespace, &selector.name, None, selector.optional)
                        .await
                        .map_err(config_error)?;
                    match entries.into_iter().find(|(key, _)| *key == selector.key) {
                        Some((_, value)) => String::from_utf8_lossy(&value).into_owned(),
                        None if selector.optional == Some(true) => continue,
                        None => {
                            return Err(config_error(format!(
                                "key {} not found in ConfigMap {}",
                                selector.key, selector.name
                            )));
                        }
                    }
                } else if let Some(selector) = &source.secret_key_ref {
                    let entries = self
                        .secret_files(namespace, &selector.name, None, selector.optional)
                        .await
                        .map_err(config_error)?;
                    match entries.into_iter().find(|(key, _)| *key == selector.key) {
                        Some((_, value)) => String::from_utf8_lossy(&value).into_owned(),
                        None if selector.optional == Some(true) => continue,
                        None => {
                            return Err(config_error(format!(
                                "key {} not found in Secret {}",
                                selector.key, selector.name
                            )));
                        }
                    }
                } else if let Some(selector) = &source.resource_field_ref {
                    resource_value(container, &selector.resource)
                } else {
                    String::new()
                }
            } else {
                expand(&variable.value.clone().unwrap_or_default(), &env)
            };
            set_env(&mut env, variable.name.clone(), value);
        }
        let env: Vec<(String, String)> = env
            .into_iter()
            .map(|(key, value)| {
                let value = rewriter.rewrite(&value);
                (key, value)
            })
            .collect();

        let command: Vec<String> = container
            .command
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|part| rewriter.rewrite(&expand(part, &env)))
            .collect();
        let args: Vec<String> = container
            .args
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|part| rewriter.rewrite(&expand(part, &env)))
            .collect();
        let is_broker = command.first().is_none_or(|program| {
            Path::new(program)
                .file_name()
                .is_some_and(|name| name == "synod-broker")
        });
        let (program, args) = if is_broker {
            let mut all = command.into_iter().skip(1).collect::<Vec<_>>();
            all.extend(args);
            (self.broker_bin.clone(), all)
        } else {
            let mut all = command.into_iter();
            let program = PathBuf::from(all.next().unwrap_or_default());
            let mut rest: Vec<String> = all.collect();
            rest.extend(args);
            (program, rest)
        };
        Ok(Launch {
            name: container.name.clone(),
            image: container.image.clone().unwrap_or_default(),
            program,
            args,
            env,
            log: runtime.dir.join(format!("{}.log", container.name)),
            readiness: container.readiness_probe.clone(),
            liveness: container.liveness_probe.clone(),
            ports: container
                .ports
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|port| Some((port.name?, u16::try_from(port.container_port).ok()?)))
                .collect(),
        })
    }

    async fn config_map_files(
        &self,
        namespace: &str,
        name: &str,
        items: Option<&[KeyToPath]>,
        optional: Option<bool>,
    ) -> Result<Vec<(String, Vec<u8>)>, String> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        match api.get_opt(name).await {
            Ok(Some(config_map)) => {
                let mut entries: Vec<(String, Vec<u8>)> = config_map
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(key, value)| (key, value.into_bytes()))
                    .collect();
                entries.extend(
                    config_map
                        .binary_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(key, value)| (key, value.0)),
                );
                select_items(entries, items, &format!("ConfigMap {name}"))
            }
            Ok(None) if optional == Some(true) => Ok(Vec::new()),
            Ok(None) => Err(format!("configmap \"{name}\" not found")),
            Err(error) => Err(format!("reading ConfigMap {name}: {error}")),
        }
    }

    async fn secret_files(
        &self,
        namespace: &str,
        name: &str,
        items: Option<&[KeyToPath]>,
        optional: Option<bool>,
    ) -> Result<Vec<(String, Vec<u8>)>, String> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        match api.get_opt(name).await {
            Ok(Some(secret)) => {
                let mut entries: Vec<(String, Vec<u8>)> = secret
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(key, value)| (key, value.0))
                    .collect();
                entries.extend(
                    secret
                        .string_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(key, value)| (key, value.into_bytes())),
                );
                select_items(entries, items, &format!("Secret {name}"))
            }
            Ok(None) if optional == Some(true) => Ok(Vec::new()),
            Ok(None) => Err(format!("secret \"{name}\" not found")),
            Err(error) => Err(format!("reading Secret {name}: {error}")),
        }
    }

    /// Writes volume files; text is rewritten by `rewriter` when given
    /// (ConfigMap text gets the same rewriting as args).
    fn write_files(
        &self,
        dir: &Path,
        files: Vec<(String, Vec<u8>)>,
        rewriter: Option<&Rewriter>,
    ) -> Result<(), String> {
        for (path, content) in files {
            if path.split('/').any(|part| part == "..") {
                return Err(format!("volume file path {path} leaves its volume"));
            }
            let target = dir.join(&path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|error| error.to_string())?;
            }
            let content = match (rewriter, String::from_utf8(content)) {
                (Some(rewriter), Ok(text)) => rewriter.rewrite(&text).into_bytes(),
                (_, Ok(text)) => text.into_bytes(),
                (_, Err(error)) => error.into_bytes(),
            };
            std::fs::write(&target, content).map_err(|error| error.to_string())?;
        }
        Ok(())
    }

    /// A token for the Pod's ServiceAccount, bound to the Pod.
    async fn pod_token(
        &self,
        pod: &Pod,
        audience: Option<String>,
        expiration_seconds: Option<i64>,
    ) -> Result<String, String> {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let service_account = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: audience.into_iter().collect(),
                expiration_seconds: Some(
                    expiration_seconds.unwrap_or(POD_TOKEN_EXPIRATION_SECONDS),
                ),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                }),
            },
            ..TokenRequest::default()
        };
        let response: TokenRequest = api
            .create_subresource("token", &service_account, &PostParams::default(), &request)
            .await
            .map_err(|error| {
                format!("requesting a token for ServiceAccount {service_account}: {error}")
            })?;
        Ok(response
            .status
            .map(|status| status.token)
            .unwrap_or_default())
    }
}

impl ContainerRuntime {
    fn new(launch: Launch) -> Self {
        ContainerRuntime {
            launch,
            child: None,
            started_at: None,
            restart_count: 0,
            last_termination: None,
            next_start: Instant::now(),
            backoff: RESTART_BACKOFF_MIN,
            ready: false,
            readiness_successes: 0,
            readiness_failures: 0,
            liveness_failures: 0,
            succeeded: false,
        }
    }

    fn status(&self, init: bool, restart_policy: &str) -> ContainerStatus {
        // Whether kubelet would start this container again after its exit.
        let restarts = match self.last_termination.as_ref().map(|t| t.exit_code == 0) {
            None => true,
            Some(exited_ok) if init => !exited_ok && restart_policy != "Never",
            Some(exited_ok) => {
                restart_policy == "Always" || (restart_policy == "OnFailure" && !exited_ok)
            }
        };
        let state = match (&self.child, &self.last_termination) {
            (Some(_), _) => ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: self.started_at.clone(),
                }),
                ..ContainerState::default()
            },
            (None, Some(terminated)) if !restarts => ContainerState {
                terminated: Some(terminated.clone()),
                ..ContainerState::default()
            },
            (None, Some(_)) => ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("CrashLoopBackOff".into()),
                    message: None,
                }),
                ..ContainerState::default()
            },
            (None, None) => ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("PodInitializing".into()),
                    message: None,
                }),
                ..ContainerState::default()
            },
        };
        let last_state = match (&self.child, &self.last_termination) {
            (Some(_), Some(terminated)) => Some(ContainerState {
                terminated: Some(terminated.clone()),
                ..ContainerState::default()
            }),
            _ => None,
        };
        ContainerStatus {
            name: self.launch.name.clone(),
            image: self.launch.image.clone(),
            image_id: String::new(),
            container_id: self
                .child
                .as_ref()
                .map(|child| format!("synod-process://{}", child.id())),
            ready: self.ready && self.child.is_some(),
            started: Some(self.child.is_some()),
            restart_count: self.restart_count,
            state: Some(state),
            last_state,
            ..ContainerStatus::default()
        }
    }
}

fn pod_status(runtime: &mut PodRuntime, host_ip: Ipv4Addr, pod: &Pod) -> PodStatus {
    let spec_containers = pod
        .spec
        .as_ref()
        .map(|spec| spec.containers.len())
        .unwrap_or(0);
    let initialized = runtime.init.iter().all(|container| container.succeeded);
    let running = runtime.waiting.is_none()
        && runtime.containers.len() == spec_containers
        && runtime
            .containers
            .iter()
            .all(|container| container.child.is_some());
    let containers_ready = running && runtime.containers.iter().all(|container| container.ready);
    let finished = runtime.restart_policy != "Always"
        && !runtime.containers.is_empty()
        && runtime
            .containers
            .iter()
            .all(|container| container.child.is_none() && container.last_termination.is_some());
    let phase = if finished {
        let all_ok = runtime.containers.iter().all(|container| {
            container
                .last_termination
                .as_ref()
                .is_some_and(|terminated| terminated.exit_code == 0)
        });
        if all_ok { "Succeeded" } else { "Failed" }
    } else if runtime.waiting.is_none()
        && initialized
        && runtime
            .containers
            .iter()
            .any(|c| c.child.is_some() || c.last_termination.is_some())
    {
        "Running"
    } else {
        "Pending"
    };
    let mut condition = |type_: &str, value: bool| {
        let status = if value { "True" } else { "False" }.to_string();
        let entry = runtime
            .condition_times
            .entry(type_.to_string())
            .or_insert_with(|| (status.clone(), now()));
        if entry.0 != status {
            *entry = (status.clone(), now());
        }
        PodCondition {
            type_: type_.to_string(),
            status,
            last_transition_time: Some(entry.1.clone()),
            ..PodCondition::default()
        }
    };
    let conditions = vec![
        condition("PodReadyToStartContainers", runtime.waiting.is_none()),
        condition("Initialized", initialized),
        condition("Ready", containers_ready),
        condition("ContainersReady", containers_ready),
        condition("PodScheduled", true),
    ];
    let (waiting_reason, waiting_message) = runtime.waiting.clone().unzip();
    let container_statuses: Vec<ContainerStatus> = if runtime.containers.is_empty() {
        pod.spec
            .as_ref()
            .map(|spec| {
                spec.containers
                    .iter()
                    .map(|container| ContainerStatus {
                        name: container.name.clone(),
                        image: container.image.clone().unwrap_or_default(),
                        state: Some(ContainerState {
                            waiting: Some(ContainerStateWaiting {
                                reason: waiting_reason.clone(),
                                message: waiting_message
                                    .clone()
                                    .filter(|message| !message.is_empty()),
                            }),
                            ..ContainerState::default()
                        }),
                        started: Some(false),
                        ..ContainerStatus::default()
                    })
                    .collect()
            })
            .unwrap_or_default()
    } else {
        runtime
            .containers
            .iter()
            .map(|container| container.status(false, &runtime.restart_policy))
            .collect()
    };
    let init_statuses: Vec<ContainerStatus> = runtime
        .init
        .iter()
        .map(|container| container.status(true, &runtime.restart_policy))
        .collect();
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(conditions),
        host_ip: Some(host_ip.to_string()),
        host_ips: Some(vec![HostIP {
            ip: host_ip.to_string(),
        }]),
        pod_ip: Some(runtime.ip.to_string()),
        pod_ips: Some(vec![PodIP {
            ip: runtime.ip.to_string(),
        }]),
        start_time: Some(runtime.start_time.clone()),
        container_statuses: Some(container_statuses),
        init_container_statuses: if init_statuses.is_empty() {
            None
        } else {
            Some(init_statuses)
        },
        ..PodStatus::default()
    }
}

fn select_items(
    entries: Vec<(String, Vec<u8>)>,
    items: Option<&[KeyToPath]>,
    what: &str,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let Some(items) = items else {
        return Ok(entries);
    };
    let mut selected = Vec::new();
    for item in items {
        let value = entries
            .iter()
            .find(|(key, _)| *key == item.key)
            .map(|(_, value)| value.clone())
            .ok_or_else(|| format!("key {} not found in {what}", item.key))?;
        selected.push((item.path.clone(), value));
    }
    Ok(selected)
}

fn set_env(env: &mut Vec<(String, String)>, key: String, value: String) {
    env.retain(|(existing, _)| *existing != key);
    env.push((key, value));
}

/// Kubernetes' `$(VAR)` expansion: defined variables are replaced, `$$`
/// escapes, anything else stays as written.
fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(position) = rest.find('$') {
        out.push_str(&rest[..position]);
        let after = &rest[position + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.iter().rev().find(|(key, _)| key == name) {
                        Some((_, value)) => out.push_str(value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The value of a downward-API `fieldPath`.
fn field_value(pod: &Pod, ip: Ipv4Addr, field_path: &str) -> String {
    let metadata = &pod.metadata;
    let spec = pod.spec.as_ref();
    let from_map = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref()
            .and_then(|map| map.get(key).cloned())
            .unwrap_or_default()
    };
    if let Some(key) = field_path
        .strip_prefix("metadata.labels['")
        .and_then(|rest| rest.strip_suffix("']"))
    {
        return from_map(&metadata.labels, key);
    }
    if let Some(key) = field_path
        .strip_prefix("metadata.annotations['")
        .and_then(|rest| rest.strip_suffix("']"))
    {
        return from_map(&metadata.annotations, key);
    }
    match field_path {
        "metadata.name" => metadata.name.clone().unwrap_or_default(),
        "metadata.namespace" => metadata.namespace.clone().unwrap_or_default(),
        "metadata.uid" => metadata.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec
            .and_then(|spec| spec.node_name.clone())
            .unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|spec| spec.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => ip.to_string(),
        "status.hostIP" | "status.hostIPs" => {
            Ipv4Addr::new(ip.octets()[0], ip.octets()[1], ip.octets()[2], 1).to_string()
        }
        _ => String::new(),
    }
}

/// A `resourceFieldRef` value: the container's limit or request as written.
fn resource_value(container: &Container, resource: &str) -> String {
    let resources = container.resources.as_ref();
    let (map, key) = match resource.split_once('.') {
        Some(("limits", key)) => (resources.and_then(|r| r.limits.as_ref()), key),
        Some(("requests", key)) => (resources.and_then(|r| r.requests.as_ref()), key),
        _ => (None, resource),
    };
    map.and_then(|map| map.get(key))
        .map(|quantity| quantity.0.clone())
        .unwrap_or_else(|| "0".into())
}

fn pod_kubeconfig(server: &str, ca_pem: &str, token: &str) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: cluster\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: pod\n  user:\n    token: {token}\ncontexts:\n- name: pod\n  context:\n    cluster: cluster\n    user: pod\ncurrent-context: pod\n"
    )
}

/// Rewrites what a Pod says in terms of its container's view of the world
/// (mount paths, cluster DNS names, wildcard listen addresses) into this
/// machine's (directories, loopback addresses).
struct Rewriter {
    mounts: Vec<(String, PathBuf)>,
    ip: Ipv4Addr,
    addresses: Arc<Mutex<Addresses>>,
    subnet_prefix: [u8; 3],
}

impl Rewriter {
    fn rewrite(&self, text: &str) -> String {
        let pod_address = format!("{}:", self.ip);
        let mut text = replace_wildcard(text, "0.0.0.0:", &pod_address);
        text = replace_wildcard(&text, "[::]:", &pod_address);
        text = self.rewrite_dns_names(&text);
        replace_paths(&text, &self.mounts)
    }

    /// Replaces `<pod>.<service>.<namespace>.svc[.cluster.local]` names.
    fn rewrite_dns_names(&self, text: &str) -> String {
        let is_name_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
        let mut out = String::new();
        let mut token = String::new();
        let flush = |token: &mut String, out: &mut String| {
            out.push_str(&self.map_name(token));
            token.clear();
        };
        for c in text.chars() {
            if is_name_char(c) {
                token.push(c);
            } else {
                flush(&mut token, &mut out);
                out.push(c);
            }
        }
        flush(&mut token, &mut out);
        out
    }

    fn map_name(&self, token: &str) -> String {
        let trimmed = token.trim_end_matches('.');
        let base = trimmed
            .strip_suffix(".svc.cluster.local")
            .or_else(|| trimmed.strip_suffix(".svc"));
        if let Some(base) = base {
            let labels: Vec<&str> = base.split('.').collect();
            if let [pod, _service, namespace] = labels.as_slice()
                && !pod.is_empty()
                && !namespace.is_empty()
            {
                return reserve_address(&self.addresses, self.subnet_prefix, namespace, pod)
                    .to_string();
            }
        }
        token.to_string()
    }
}

/// Replaces a wildcard listen address unless it is the tail of a longer
/// address (`10.0.0.0:`).
fn replace_wildcard(text: &str, from: &str, to: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(position) = rest.find(from) {
        let before = rest[..position]
            .chars()
            .last()
            .or_else(|| out.chars().last());
        out.push_str(&rest[..position]);
        if before.is_some_and(|c| c.is_ascii_digit() || c == '.') {
            out.push_str(from);
        } else {
            out.push_str(to);
        }
        rest = &rest[position + from.len()..];
    }
    out.push_str(rest);
    out
}

/// Replaces every mount path that is a whole path or a path prefix by its
/// directory, in one pass: a replacement is never rewritten again (the
/// directories live under the temp dir, which may itself be a mount path
/// such as `/tmp`), and the longest mount path wins (`/etc/synod/tls` over
/// `/etc/synod`).
fn replace_paths(text: &str, mounts: &[(String, PathBuf)]) -> String {
    let is_path_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    let mut mounts: Vec<(&str, String)> = mounts
        .iter()
        .map(|(path, dir)| (path.trim_end_matches('/'), dir.display().to_string()))
        .filter(|(path, _)| !path.is_empty())
        .collect();
    mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    let mut out = String::with_capacity(text.len());
    let mut index = 0;
    'scan: while let Some(c) = text[index..].chars().next() {
        let starts_path = text[..index]
            .chars()
            .last()
            .is_none_or(|before| !(is_path_char(before) || before == '/'));
        if starts_path {
            for (path, dir) in &mounts {
                let Some(after) = text[index..].strip_prefix(path) else {
                    continue;
                };
                if after.chars().next().is_none_or(|next| !is_path_char(next)) {
                    out.push_str(dir);
                    index += path.len();
                    continue 'scan;
                }
            }
        }
        out.push(c);
        index += c.len_utf8();
    }
    out
}

/// The mount paths of `container` and the directories standing in for them.
fn container_mounts(
    container: &Container,
    volume_dirs: &HashMap<String, PathBuf>,
) -> Vec<(String, PathBuf)> {
    container
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|mount| {
            let dir = volume_dirs.get(&mount.name)?;
            let dir = match &mount.sub_path {
                Some(sub_path) if !sub_path.is_empty() => dir.join(sub_path),
                _ => dir.clone(),
            };
            Some((mount.mount_path.clone(), dir))
        })
        .collect()
}

/// Runs one probe against the Pod; unsupported kinds (gRPC) count as passing.
async fn run_probe(probe: &Probe, ip: Ipv4Addr, launch: &Launch) -> bool {
    let timeout =
        Duration::from_secs(u64::try_from(probe.timeout_seconds.unwrap_or(1)).unwrap_or(1))
            .min(PROBE_TIMEOUT_MAX);
    if let Some(action) = &probe.http_get {
        let Some(port) = resolve_port(&action.port, launch) else {
            return false;
        };
        let path = action.path.clone().unwrap_or_else(|| "/".into());
        let address = SocketAddr::new(IpAddr::V4(ip), port);
        let status = if action.scheme.as_deref() == Some("HTTPS") {
            http::get_status_tls(address, &path, timeout).await
        } else {
            http::get_status(address, &path, timeout).await
        };
        return status.is_some_and(|code| (200..400).contains(&code));
    }
    if let Some(action) = &probe.tcp_socket {
        let Some(port) = resolve_port(&action.port, launch) else {
            return false;
        };
        return tokio::time::timeout(timeout, tokio::net::TcpStream::connect((ip, port)))
            .await
            .is_ok_and(|connected| connected.is_ok());
    }
    if let Some(action) = &probe.exec {
        let command = action.command.clone().unwrap_or_default();
        let Some((program, args)) = command.split_first() else {
            return false;
        };
        let mut child = tokio::process::Command::new(program);
        child
            .args(args)
            .env_clear()
            .envs(launch.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        return tokio::time::timeout(timeout, child.status())
            .await
            .is_ok_and(|status| status.is_ok_and(|status| status.success()));
    }
    true
}

/// A probe's port: a number, or the name of one of the container's ports.
fn resolve_port(port: &IntOrString, launch: &Launch) -> Option<u16> {
    match port {
        IntOrString::Int(number) => u16::try_from(*number).ok(),
        IntOrString::String(name) => launch
            .ports
            .iter()
            .find(|(port_name, _)| port_name == name)
            .map(|(_, number)| *number)
            .or_else(|| name.parse().ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expand_replaces_defined_variables_only() {
        // Goal: $(VAR) expansion follows Kubernetes: defined names replaced, $$ escapes.
        let env = vec![("A".to_string(), "x".to_string())];
        assert_eq!(expand("$(A)-$(B)-$$(A)", &env), "x-$(B)-$(A)");
    }

    #[test]
    fn rewriting_maps_wildcards_paths_and_peer_names() {
        // Goal: listen wildcards, mount paths and peer DNS names become this
        // machine's addresses and directories, and nothing else changes.
        let rewriter = Rewriter {
            mounts: vec![
                ("/etc/synod".into(), PathBuf::from("/tmp/p/config")),
                ("/etc/synod/tls".into(), PathBuf::from("/tmp/p/tls")),
                // The stand-in directories are under /tmp: never rewritten twice.
                ("/tmp".into(), PathBuf::from("/tmp/p/tmp")),
            ],
            ip: Ipv4Addr::new(127, 100, 0, 2),
            addresses: Arc::new(Mutex::new(Addresses::default())),
            subnet_prefix: [127, 100, 0],
        };
        assert_eq!(
            rewriter.rewrite("--amqp-listen=0.0.0.0:5672"),
            "--amqp-listen=127.100.0.2:5672"
        );
        assert_eq!(rewriter.rewrite("10.0.0.0:80"), "10.0.0.0:80");
        assert_eq!(
            rewriter.rewrite(
                "--config=/etc/synod/synod.toml --tls-cert /etc/synod/tls/tls.crt /etc/synodx"
            ),
            "--config=/tmp/p/config/synod.toml --tls-cert /tmp/p/tls/tls.crt /etc/synodx"
        );
        assert_eq!(
            rewriter.rewrite("dir = \"/tmp/x\"\nfile = \"/etc/synod/a\"\nother = \"/tmpfs\""),
            "dir = \"/tmp/p/tmp/x\"\nfile = \"/tmp/p/config/a\"\nother = \"/tmpfs\""
        );
        assert_eq!(
            rewriter
                .rewrite("a-0=a-0.a-nodes.ns.svc:25672,a-1=a-1.a-nodes.ns.svc.cluster.local:25672"),
            "a-0=127.100.0.2:25672,a-1=127.100.0.3:25672"
        );
    }
}
