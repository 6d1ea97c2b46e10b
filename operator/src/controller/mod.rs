//! The controllers: shared `Context`, the operator's `Error`, error policy
//! with per-object backoff, and how to reach a cluster's brokers. One file
//! per kind holds its reconcile and cleanup; object shapes come from `resources`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, warn};

use crate::broker_client::{self, BrokerClient};
use crate::crd::BrokerCluster;
use crate::metrics::Metrics;
use crate::resources::{self, CLUSTER_PORT, MANAGEMENT_PORT, Names};

pub mod binding;
pub mod broker_cluster;
pub mod exchange;
pub mod queue;
mod topology;

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "synod-operator";
/// Finalizer the operator puts on every Synod resource.
pub const FINALIZER: &str = "synod.dev/finalizer";
/// Default URL of pod `X-i`'s management API: its pod IP, so it works without cluster DNS.
pub const DEFAULT_BROKER_URL_TEMPLATE: &str = "{scheme}://{pod_ip}:{port}";
/// URL of pod `X-i`'s management API when the cluster serves HTTPS and the
/// configured template uses `{pod_ip}`: the pod's stable DNS name, which its
/// certificate names; the connection still goes to the pod IP (see
/// [`BrokerAccess::client_for`]), so no cluster DNS is needed.
pub const TLS_BROKER_URL_TEMPLATE: &str = "https://{pod}.{cluster}-nodes.{namespace}.svc:{port}";
/// Default cluster address announced for a joining pod: its stable DNS name,
/// the same form as the seed list (pod IPs change when pods are recreated).
pub const DEFAULT_PEER_ADDRESS_TEMPLATE: &str = "{pod}.{cluster}-nodes.{namespace}.svc:{port}";
/// First retry delay after a failed reconcile.
pub const BACKOFF_MIN: Duration = Duration::from_secs(2);
/// Longest retry delay after repeated failures.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Errors of a reconcile; each knows its metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The spec cannot be turned into objects.
    #[error("invalid spec: {0}")]
    Build(#[from] resources::Error),
    /// A broker's management API failed.
    #[error("{0}")]
    Broker(#[from] broker_client::Error),
    /// Adding or removing the finalizer, or the wrapped reconcile, failed.
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// No broker of the cluster answered.
    #[error("no broker of {0} is reachable")]
    NoBrokerReachable(String),
    /// The `X-default-user` Secret is missing or incomplete.
    #[error("Secret {0} has no complete username/password")]
    MissingCredentials(String),
    /// The TLS Secret of `spec.tls` has no usable `ca.crt`, so the operator
    /// cannot verify the brokers' HTTPS certificates.
    #[error("Secret {secret} cannot be used to verify the brokers' certificates: {reason}")]
    TlsTrust {
        /// The Secret named by `spec.tls.secretName`.
        secret: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl Error {
    /// The `result` label of `synod_operator_reconcile_total` for this error.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_error",
            Error::Build(_) => "invalid_spec",
            Error::Broker(_) => "broker_error",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(err)
                | kube::runtime::finalizer::Error::CleanupFailed(err) => err.metric_label(),
                _ => "finalizer_error",
            },
            Error::NoBrokerReachable(_) => "broker_unreachable",
            Error::MissingCredentials(_) => "missing_credentials",
            Error::TlsTrust { .. } => "tls_trust",
        }
    }
}

/// Settings of the controllers, from the operator's flags.
#[derive(Debug, Clone)]
pub struct Settings {
    /// URL template of a pod's management API; see [`BrokerAccess`].
    pub broker_url_template: String,
    /// Template of the cluster address announced for a joining pod.
    pub peer_address_template: String,
    /// How often a healthy object is reconciled anyway, to repair drift.
    pub resync_interval: Duration,
    /// How often a cluster in transition (scaling, rolling, not ready) is re-checked.
    pub transition_interval: Duration,
    /// Broker image of clusters whose `spec.image` is absent.
    pub broker_image: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            broker_url_template: DEFAULT_BROKER_URL_TEMPLATE.to_string(),
            peer_address_template: DEFAULT_PEER_ADDRESS_TEMPLATE.to_string(),
            resync_interval: Duration::from_secs(300),
            transition_interval: Duration::from_secs(5),
            broker_image: crate::crd::broker_cluster::DEFAULT_IMAGE.to_string(),
        }
    }
}

/// What every reconcile gets: API client, event recorder, metrics, broker access.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Publishes Kubernetes events about the objects.
    pub recorder: Recorder,
    /// The operator's metrics.
    pub metrics: Metrics,
    /// How to reach brokers.
    pub brokers: BrokerAccess,
    /// Intervals and templates.
    pub settings: Settings,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context publishing events as `synod-operator` (instance `identity`).
    pub fn new(
        client: Client,
        metrics: Metrics,
        settings: Settings,
        identity: Option<String>,
    ) -> Context {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.to_string(),
                instance: identity,
            },
        );
        let http = reqwest::Client::builder()
            .timeout(broker_client::REQUEST_TIMEOUT)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Context {
            client,
            recorder,
            metrics,
            brokers: BrokerAccess::new(http, &settings.broker_url_template)
                .with_peer_address_template(&settings.peer_address_template),
            settings,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes an event about `object`; a failure to publish is logged, not fatal.
    pub async fn publish<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: action.to_string(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, &object.object_ref(&())).await {
            warn!(error = %err, reason, "could not publish event");
        }
    }

    /// Forgets the failures of `key` after a successful reconcile.
    pub(crate) fn reset_backoff(&self, key: &str) {
        self.failures
            .lock()
            .expect("failure map lock is never poisoned: no panics while held")
            .remove(key);
    }

    /// Counts a failure of `key` and returns how long to wait before retrying.
    pub(crate) fn next_backoff(&self, key: &str) -> Duration {
        let mut failures = self
            .failures
            .lock()
            .expect("failure map lock is never poisoned: no panics while held");
        let count = failures.entry(key.to_string()).or_insert(0);
        *count = count.saturating_add(1);
        backoff(*count)
    }
}

/// Delay before retry number `failures` (1-based): doubling from
/// [`BACKOFF_MIN`] up to [`BACKOFF_MAX`], so a broken object never hot-loops.
pub fn backoff(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    BACKOFF_MIN
        .saturating_mul(1u32 << exponent)
        .min(BACKOFF_MAX)
}

/// Key of an object in the backoff map.
pub(crate) fn object_key<K: Resource<DynamicType = ()>>(object: &K) -> String {
    ObjectRef::from_obj(object).to_string()
}

/// Shared error policy: count the failure and retry with backoff.
pub(crate) fn error_policy<K: Resource<DynamicType = ()>>(
    object: Arc<K>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let key = object_key(object.as_ref());
    let delay = ctx.next_backoff(&key);
    warn!(object = %key, error = %error, retry_in_s = delay.as_secs(), "reconcile failed");
    Action::requeue(delay)
}

/// Fills a URL or address template for `pod`; `None` when it needs the pod IP
/// and the pod has none yet, or the pod is not one of the cluster's.
pub fn render_template(
    template: &str,
    names: &Names,
    pod: &Pod,
    tls: bool,
    port: i32,
) -> Option<String> {
    let name = pod.name_any();
    let ordinal = names.ordinal_of(&name)?;
    let pod_ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone());
    if template.contains("{pod_ip}") && pod_ip.is_none() {
        return None;
    }
    Some(
        template
            .replace("{scheme}", if tls { "https" } else { "http" })
            .replace("{pod_ip}", pod_ip.as_deref().unwrap_or_default())
            .replace("{pod}", &name)
            .replace("{ordinal}", &ordinal.to_string())
            .replace("{cluster}", &names.cluster)
            .replace("{namespace}", &names.namespace)
            .replace("{port}", &port.to_string()),
    )
}

/// How the operator reaches the management API of broker pods.
///
/// The URL of pod `X-i` comes from a template with the placeholders
/// `{scheme}` (`http`/`https`), `{pod_ip}` (from the Pod's status), `{pod}`,
/// `{ordinal}`, `{cluster}`, `{namespace}` and `{port}` (15672). The default,
/// `{scheme}://{pod_ip}:{port}`, uses pod IPs from the API, so it works
/// inside Kubernetes and where cluster DNS does not resolve; the DNS form is
/// `{scheme}://{pod}.{cluster}-nodes.{namespace}.svc:{port}`.
#[derive(Debug, Clone)]
pub struct BrokerAccess {
    http: reqwest::Client,
    url_template: String,
    peer_address_template: String,
}

/// One broker pod and the URL of its management API.
#[derive(Debug, Clone)]
pub struct BrokerPod {
    /// Pod name (also the broker's node name).
    pub name: String,
    /// StatefulSet ordinal.
    pub ordinal: i32,
    /// Whether Kubernetes considers the pod ready.
    pub ready: bool,
    /// Value of the pod's restart-hash annotation.
    pub restart_hash: Option<String>,
    /// Whether the pod is being deleted.
    pub terminating: bool,
    /// Management API URL, when the pod has the address the template needs.
    pub url: Option<String>,
    /// Where the URL's host is reached: the pod IP and management port, when
    /// the URL names the pod by DNS and the pod has an IP.
    pub address: Option<SocketAddr>,
    /// Cluster address to announce when the pod joins.
    pub peer_address: Option<String>,
}

impl BrokerAccess {
    /// Access through `url_template` (see the type's documentation).
    pub fn new(http: reqwest::Client, url_template: &str) -> BrokerAccess {
        BrokerAccess {
            http,
            url_template: url_template.to_string(),
            peer_address_template: DEFAULT_PEER_ADDRESS_TEMPLATE.to_string(),
        }
    }

    /// The same access, announcing joining pods at `template` (placeholders as for URLs).
    pub fn with_peer_address_template(mut self, template: &str) -> BrokerAccess {
        self.peer_address_template = template.to_string();
        self
    }

    /// The management URL of `pod`, or `None` if the template needs a pod IP it lacks.
    ///
    /// With TLS a template using `{pod_ip}` gives way to
    /// [`TLS_BROKER_URL_TEMPLATE`]: certificates name pods by DNS, not by IP.
    pub fn url(&self, names: &Names, pod: &Pod, tls: bool) -> Option<String> {
        let template = if tls && self.url_template.contains("{pod_ip}") {
            TLS_BROKER_URL_TEMPLATE
        } else {
            &self.url_template
        };
        render_template(template, names, pod, tls, MANAGEMENT_PORT)
    }

    /// The pod IP and management port, where a URL naming the pod by DNS is
    /// sent when the cluster serves HTTPS.
    pub fn address(&self, pod: &Pod, tls: bool) -> Option<SocketAddr> {
        if !tls {
            return None;
        }
        let ip: IpAddr = pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
        Some(SocketAddr::new(ip, u16::try_from(MANAGEMENT_PORT).ok()?))
    }

    /// The cluster-traffic address `host:port` of `pod`, announced when it
    /// joins; see [`DEFAULT_PEER_ADDRESS_TEMPLATE`].
    pub fn peer_address(&self, names: &Names, pod: &Pod) -> Option<String> {
        render_template(&self.peer_address_template, names, pod, false, CLUSTER_PORT)
    }

    /// A client of the broker at `url` as the cluster's default user.
    pub fn client(&self, url: &str, credentials: &(String, String)) -> BrokerClient {
        BrokerClient::new(self.http.clone(), url, &credentials.0, &credentials.1)
    }

    /// A client of `pod` as the cluster's default user; `None` when the pod
    /// has no URL yet.
    ///
    /// Without `trust` this is [`BrokerAccess::client`]. With it (the PEM CA
    /// of the cluster's TLS Secret) the client trusts only that CA, checks
    /// that the certificate names the URL's host, and connects to the pod's
    /// address whatever DNS says: the TLS handshake, not the name lookup, is
    /// what proves it reached the right broker.
    pub fn client_for(
        &self,
        pod: &BrokerPod,
        trust: Option<&ClusterTrust>,
        credentials: &(String, String),
    ) -> Option<BrokerClient> {
        let url = pod.url.as_deref()?;
        let Some(trust) = trust else {
            return Some(self.client(url, credentials));
        };
        let mut builder = reqwest::Client::builder()
            .timeout(broker_client::REQUEST_TIMEOUT)
            .tls_certs_only(trust.roots.iter().cloned());
        if let (Some(address), Some(host)) = (
            pod.address,
            reqwest::Url::parse(url)
                .ok()
                .and_then(|u| u.host_str().map(str::to_string)),
        ) {
            builder = builder.resolve(&host, address);
        }
        // A builder with only certificates and a resolver cannot fail but
        // for the TLS backend; fall back to a client that will report the
        // handshake failure as the broker being unreachable.
        let http = builder.build().unwrap_or_else(|_| self.http.clone());
        Some(BrokerClient::new(http, url, &credentials.0, &credentials.1))
    }
}

/// The certificate authorities a TLS cluster's brokers are verified with.
#[derive(Debug, Clone)]
pub struct ClusterTrust {
    roots: Vec<reqwest::Certificate>,
}

impl ClusterTrust {
    /// Parses the PEM bundle of `ca.crt`; at least one certificate is required.
    pub fn from_pem(pem: &[u8]) -> Result<ClusterTrust, String> {
        let roots = reqwest::Certificate::from_pem_bundle(pem).map_err(|err| err.to_string())?;
        if roots.is_empty() {
            return Err("ca.crt holds no PEM certificate".to_string());
        }
        Ok(ClusterTrust { roots })
    }
}

/// The CA of a TLS cluster from its `spec.tls` Secret's `ca.crt`; `None`
/// for a cluster without TLS.
pub(crate) async fn cluster_trust(
    ctx: &Context,
    cluster: &BrokerCluster,
) -> Result<Option<ClusterTrust>, Error> {
    let Some(tls) = &cluster.spec.tls else {
        return Ok(None);
    };
    let names = Names::of(cluster)?;
    let fail = |reason: String| Error::TlsTrust {
        secret: tls.secret_name.clone(),
        reason,
    };
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), &names.namespace)
        .get_opt(&tls.secret_name)
        .await?
        .ok_or_else(|| fail("it does not exist".to_string()))?;
    let pem = secret
        .data
        .as_ref()
        .and_then(|data| data.get(resources::TLS_CA_KEY))
        .ok_or_else(|| fail(format!("it has no {}", resources::TLS_CA_KEY)))?;
    ClusterTrust::from_pem(&pem.0).map(Some).map_err(fail)
}

/// The broker pods of `cluster`, sorted by ordinal.
pub(crate) async fn broker_pods(
    ctx: &Context,
    cluster: &BrokerCluster,
) -> Result<Vec<BrokerPod>, Error> {
    let names = Names::of(cluster)?;
    let selector = resources::selector_labels(cluster)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &names.namespace)
        .list(&ListParams::default().labels(&selector))
        .await?;
    let tls = cluster.spec.tls.is_some();
    let mut brokers: Vec<BrokerPod> = pods
        .items
        .iter()
        .filter_map(|pod| {
            let name = pod.name_any();
            let ordinal = names.ordinal_of(&name)?;
            Some(BrokerPod {
                ordinal,
                ready: pod_is_ready(pod),
                restart_hash: pod
                    .annotations()
                    .get(resources::RESTART_HASH_ANNOTATION)
                    .cloned(),
                terminating: pod.metadata.deletion_timestamp.is_some(),
                url: ctx.brokers.url(&names, pod, tls),
                address: ctx.brokers.address(pod, tls),
                peer_address: ctx.brokers.peer_address(&names, pod),
                name,
            })
        })
        .collect();
    brokers.sort_by_key(|b| b.ordinal);
    Ok(brokers)
}

/// Whether the pod's `Ready` condition is `True`.
pub fn pod_is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// The default user's credentials of `cluster`, from `X-default-user`.
pub(crate) async fn cluster_credentials(
    ctx: &Context,
    cluster: &BrokerCluster,
) -> Result<(String, String), Error> {
    let names = Names::of(cluster)?;
    let secret_name = names.default_user_secret();
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), &names.namespace)
        .get_opt(&secret_name)
        .await?;
    resources::credentials(secret.as_ref()).ok_or(Error::MissingCredentials(secret_name))
}

/// Runs `call` against the cluster's brokers in ordinal order (ready pods
/// first) and returns the first answer; management calls may go to any member.
pub(crate) async fn with_any_broker<T, F, Fut>(
    ctx: &Context,
    cluster: &BrokerCluster,
    credentials: &(String, String),
    call: F,
) -> Result<T, Error>
where
    F: Fn(BrokerClient) -> Fut,
    Fut: std::future::Future<Output = Result<T, broker_client::Error>>,
{
    let trust = cluster_trust(ctx, cluster).await?;
    let mut pods = broker_pods(ctx, cluster).await?;
    pods.retain(|p| !p.terminating);
    pods.sort_by_key(|p| (!p.ready, p.ordinal));
    let mut last_error = None;
    for pod in pods {
        let Some(client) = ctx.brokers.client_for(&pod, trust.as_ref(), credentials) else {
            continue;
        };
        match call(client).await {
            Ok(answer) => return Ok(answer),
            // Only an unreachable broker justifies trying the next one; an
            // answer (even an error) is the cluster's answer.
            Err(err @ broker_client::Error::Unreachable { .. }) => last_error = Some(err),
            Err(err) => return Err(err.into()),
        }
    }
    match last_error {
        Some(err) => Err(err.into()),
        None => Err(Error::NoBrokerReachable(cluster.name_any())),
    }
}

/// Logs what a controller's stream reports. A reconcile scheduled for an
/// object that is already gone is expected (the owned objects of a deleted
/// cluster change while they are collected) and only logged at debug level,
/// so that a deletion does not look like a string of failures.
pub(crate) fn log_controller_error<R, Q>(kind: &str, err: &kube::runtime::controller::Error<R, Q>)
where
    R: std::error::Error + 'static,
    Q: std::error::Error + 'static,
{
    match err {
        kube::runtime::controller::Error::ObjectNotFound(object) => {
            debug!(kind, object = %object, "event for an object that is already deleted");
        }
        _ => warn!(kind, error = %err, "controller event"),
    }
}

/// Marks the object's status patch: server-side apply, forced, as `synod-operator`.
pub(crate) fn apply_params() -> kube::api::PatchParams {
    kube::api::PatchParams::apply(FIELD_MANAGER).force()
}

/// Runs `event` as `EventType::Warning` when `warning`, else `Normal`.
pub(crate) fn event_type(warning: bool) -> EventType {
    if warning {
        EventType::Warning
    } else {
        EventType::Normal
    }
}

/// Runs every controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    metrics: Metrics,
    settings: Settings,
    identity: Option<String>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + Clone + 'static,
) {
    let ctx = Arc::new(Context::new(client, metrics, settings, identity));
    futures::join!(
        broker_cluster::run(ctx.clone(), namespace.clone(), shutdown.clone()),
        exchange::run(ctx.clone(), namespace.clone(), shutdown.clone()),
        queue::run(ctx.clone(), namespace.clone(), shutdown.clone()),
        binding::run(ctx.clone(), namespace.clone(), shutdown.clone()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::test_support::cluster;
    use k8s_openapi::api::core::v1::PodStatus;

    #[test]
    fn backoff_doubles_and_is_capped() {
        // Goal: retries wait 2s, 4s, 8s, ... never more than five minutes, never zero.
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(2), Duration::from_secs(4));
        assert_eq!(backoff(4), Duration::from_secs(16));
        assert_eq!(backoff(30), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
        assert!(backoff(0) >= BACKOFF_MIN);
    }

    fn pod(name: &str, ip: Option<&str>) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.to_string());
        pod.status = Some(PodStatus {
            pod_ip: ip.map(str::to_string),
            ..PodStatus::default()
        });
        pod
    }

    #[test]
    fn broker_urls_follow_the_template() {
        // Goal: the default uses the pod IP; a DNS or loopback template fills its placeholders.
        let names = Names::of(&cluster()).expect("names");
        let http = reqwest::Client::new();
        let default = BrokerAccess::new(http.clone(), DEFAULT_BROKER_URL_TEMPLATE);
        assert_eq!(
            default.url(&names, &pod("rabbit-1", Some("127.0.0.12")), false),
            Some("http://127.0.0.12:15672".to_string())
        );
        assert_eq!(default.url(&names, &pod("rabbit-1", None), false), None);
        assert_eq!(
            default.url(&names, &pod("other-1", Some("1.2.3.4")), false),
            None
        );
        let dns = BrokerAccess::new(
            http,
            "{scheme}://{pod}.{cluster}-nodes.{namespace}.svc:{port}",
        );
        assert_eq!(
            dns.url(&names, &pod("rabbit-2", None), true),
            Some("https://rabbit-2.rabbit-nodes.prod.svc:15672".to_string())
        );
        assert_eq!(
            dns.peer_address(&names, &pod("rabbit-2", None)),
            Some("rabbit-2.rabbit-nodes.prod.svc:25672".to_string())
        );
        assert_eq!(
            default.url(&names, &pod("rabbit-1", Some("127.0.0.12")), true),
            Some("https://rabbit-1.rabbit-nodes.prod.svc:15672".to_string()),
            "certificates name pods by DNS, so TLS URLs do too"
        );
        assert_eq!(
            default.address(&pod("rabbit-1", Some("127.0.0.12")), true),
            Some("127.0.0.12:15672".parse().expect("address"))
        );
        assert_eq!(
            default.address(&pod("rabbit-1", Some("127.0.0.12")), false),
            None
        );
        let by_ip = dns.with_peer_address_template("{pod_ip}:{port}");
        assert_eq!(
            by_ip.peer_address(&names, &pod("rabbit-0", Some("127.0.9.2"))),
            Some("127.0.9.2:25672".to_string())
        );
    }

    #[test]
    fn error_labels_are_bounded() {
        // Goal: metric labels come from a fixed set, including through the finalizer wrapper.
        let inner = Error::NoBrokerReachable("x".into());
        assert_eq!(inner.metric_label(), "broker_unreachable");
        let wrapped = Error::Finalizer(Box::new(kube::runtime::finalizer::Error::ApplyFailed(
            Error::MissingCredentials("s".into()),
        )));
        assert_eq!(wrapped.metric_label(), "missing_credentials");
    }
}
