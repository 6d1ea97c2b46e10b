//! Builder of the StatefulSet `X` that runs the brokers: stable pod names,
//! a `data` volume per pod, probes, drain on stop and the "restricted" Pod
//! Security Standard. Pure: no API calls.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, SleepAction,
    TCPSocketAction, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest, Sha256};

use super::config::{CLUSTER_SECRET_DIR, CONFIG_DIR, DATA_DIR, TLS_DIR, broker_config_toml};
use super::{
    AMQP_PORT, AMQPS_PORT, CLUSTER_PORT, CONFIG_FILE_KEY, Error, MANAGEMENT_PORT, METRICS_PORT,
    Names, PASSWORD_KEY, USERNAME_KEY, labels, owned_metadata, selector_labels,
};
use crate::crd::BrokerCluster;
use crate::crd::broker_cluster::DEFAULT_IMAGE;

/// Pod-template annotation: hash of everything whose change needs a broker
/// restart. The seed list is left out, so scaling does not restart members.
pub const RESTART_HASH_ANNOTATION: &str = "synod.dev/restart-hash";
/// Name of the broker container.
pub const CONTAINER_NAME: &str = "broker";
/// Name of the volume claim template (PVCs are `data-X-i`).
pub const DATA_VOLUME: &str = "data";
/// User and group the broker runs as (non-root, as the restricted profile requires).
pub const BROKER_UID: i64 = 999;
/// Default grace period: connections drain on SIGTERM before the broker exits.
pub const TERMINATION_GRACE_PERIOD_SECONDS: i64 = 60;
/// Seconds `preStop` waits so endpoints drop the pod before the broker stops accepting.
pub const PRE_STOP_SLEEP_SECONDS: i64 = 5;

/// StatefulSet `X` with `replicas` pods whose seed list names all of them.
///
/// `replicas` is passed separately from the spec because on scale-down the
/// StatefulSet shrinks only after the leaving members were removed from Paxos.
pub fn stateful_set(cluster: &BrokerCluster, replicas: i32) -> Result<StatefulSet, Error> {
    let names = Names::of(cluster)?;
    let peers = names.peers(replicas);
    let mut template = pod_template(cluster, &names, &peers)?;
    let hash = restart_hash(cluster)?;
    template
        .metadata
        .get_or_insert_with(ObjectMeta::default)
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(RESTART_HASH_ANNOTATION.to_string(), hash);
    let storage = &cluster.spec.storage;
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_VOLUME.to_string()),
            labels: Some(labels(cluster, "broker")),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(storage.size.clone()),
                )])),
                limits: None,
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    };
    Ok(StatefulSet {
        metadata: owned_metadata(cluster, names.cluster.clone(), "broker")?,
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(names.nodes_service()),
            // All pods start together: a lone first pod could never become
            // ready, because readiness needs an agreed configuration.
            pod_management_policy: Some("Parallel".to_string()),
            // The operator restarts pods itself, one at a time, each after
            // the previous one rejoined (see controller::broker_cluster).
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".to_string()),
                rolling_update: None,
            }),
            selector: LabelSelector {
                match_labels: Some(selector_labels(cluster)),
                match_expressions: None,
            },
            template,
            volume_claim_templates: Some(vec![claim]),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(
                        cluster
                            .spec
                            .persistent_volume_claim_retention
                            .as_str()
                            .to_string(),
                    ),
                    // A removed member's volume is kept: scaling never destroys data.
                    when_scaled: Some("Retain".to_string()),
                },
            ),
            ..StatefulSetSpec::default()
        }),
        status: None,
    })
}

/// Hash of the pod template and broker configuration with the seed list
/// blanked out: equal hashes mean a running broker needs no restart.
pub fn restart_hash(cluster: &BrokerCluster) -> Result<String, Error> {
    let names = Names::of(cluster)?;
    let template = pod_template(cluster, &names, "")?;
    let config = broker_config_toml(cluster, "")?;
    let mut hasher = Sha256::new();
    hasher.update(serde_json::to_vec(&template).expect("a pod template serializes to JSON"));
    hasher.update(config.as_bytes());
    let digest = hasher.finalize();
    Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
}

fn pod_template(
    cluster: &BrokerCluster,
    names: &Names,
    peers: &str,
) -> Result<PodTemplateSpec, Error> {
    let overrides = cluster.spec.pod_template.clone().unwrap_or_default();
    let mut pod_labels = overrides.labels.clone();
    pod_labels.extend(labels(cluster, "broker"));
    let tls = cluster.spec.tls.is_some();
    let scheme = if tls { "HTTPS" } else { "HTTP" };

    let mut ports = vec![
        container_port("amqp", AMQP_PORT),
        container_port("management", MANAGEMENT_PORT),
        container_port("metrics", METRICS_PORT),
        container_port("cluster", CLUSTER_PORT),
    ];
    if tls {
        ports.push(container_port("amqps", AMQPS_PORT));
    }

    let mut mounts = vec![
        mount(DATA_VOLUME, DATA_DIR, false),
        mount("config", CONFIG_DIR, true),
        mount("cluster-secret", CLUSTER_SECRET_DIR, true),
        // The root filesystem is read-only; the broker may still need scratch space.
        mount("tmp", "/tmp", false),
    ];
    let mut volumes = vec![
        Volume {
            name: "config".to_string(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.config_map(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "cluster-secret".to_string(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names.cluster_secret()),
                default_mode: Some(0o400),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".to_string(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    if let Some(spec_tls) = &cluster.spec.tls {
        mounts.push(mount("tls", TLS_DIR, true));
        volumes.push(Volume {
            name: "tls".to_string(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(spec_tls.secret_name.clone()),
                default_mode: Some(0o400),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }

    let env = vec![
        EnvVar {
            name: "SYNOD_NODE_NAME".to_string(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".to_string(),
                    api_version: None,
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
        EnvVar {
            name: "SYNOD_PEERS".to_string(),
            value: Some(peers.to_string()),
            ..EnvVar::default()
        },
        secret_env(
            "SYNOD_DEFAULT_USER",
            &names.default_user_secret(),
            USERNAME_KEY,
        ),
        secret_env(
            "SYNOD_DEFAULT_PASS",
            &names.default_user_secret(),
            PASSWORD_KEY,
        ),
    ];

    let container = Container {
        name: CONTAINER_NAME.to_string(),
        image: Some(
            cluster
                .spec
                .image
                .clone()
                .unwrap_or_else(|| DEFAULT_IMAGE.to_string()),
        ),
        // The release image also holds the operator: name the program.
        command: Some(vec!["synod-broker".to_string()]),
        image_pull_policy: cluster
            .spec
            .image_pull_policy
            .map(|policy| policy.as_str().to_string()),
        args: Some(vec![
            "--config".to_string(),
            format!("{CONFIG_DIR}/{CONFIG_FILE_KEY}"),
        ]),
        env: Some(env),
        ports: Some(ports),
        resources: cluster.spec.resources.clone(),
        volume_mounts: Some(mounts),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/api/cluster/ready".to_string()),
                port: IntOrString::Int(MANAGEMENT_PORT),
                scheme: Some(scheme.to_string()),
                ..HTTPGetAction::default()
            }),
            initial_delay_seconds: Some(5),
            period_seconds: Some(5),
            timeout_seconds: Some(3),
            failure_threshold: Some(3),
            ..Probe::default()
        }),
        // Liveness asks only "is the process serving", never "is the cluster
        // healthy": a partitioned node must not be restarted in a loop.
        liveness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(AMQP_PORT),
                host: None,
            }),
            initial_delay_seconds: Some(30),
            period_seconds: Some(10),
            timeout_seconds: Some(5),
            failure_threshold: Some(6),
            ..Probe::default()
        }),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRE_STOP_SLEEP_SECONDS,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(BROKER_UID),
            run_as_group: Some(BROKER_UID),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                add: None,
            }),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };

    Ok(PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: (!overrides.annotations.is_empty()).then(|| overrides.annotations.clone()),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(names.cluster.clone()),
            automount_service_account_token: Some(false),
            containers: vec![container],
            volumes: Some(volumes),
            affinity: cluster.spec.affinity.clone(),
            tolerations: cluster.spec.tolerations.clone(),
            node_selector: (!overrides.node_selector.is_empty())
                .then(|| overrides.node_selector.clone()),
            priority_class_name: overrides.priority_class_name.clone(),
            topology_spread_constraints: (!overrides.topology_spread_constraints.is_empty())
                .then(|| overrides.topology_spread_constraints.clone()),
            image_pull_secrets: (!overrides.image_pull_secrets.is_empty())
                .then(|| overrides.image_pull_secrets.clone()),
            termination_grace_period_seconds: Some(
                overrides
                    .termination_grace_period_seconds
                    .unwrap_or(TERMINATION_GRACE_PERIOD_SECONDS),
            ),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(BROKER_UID),
                run_as_group: Some(BROKER_UID),
                fs_group: Some(BROKER_UID),
                seccomp_profile: Some(runtime_default_seccomp()),
                ..PodSecurityContext::default()
            }),
            ..PodSpec::default()
        }),
    })
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_string(),
        localhost_profile: None,
    }
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_string()),
        container_port: port,
        protocol: Some("TCP".to_string()),
        ..ContainerPort::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_string(),
                key: key.to_string(),
                optional: None,
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::broker_cluster::{PodTemplateOverride, PvcRetention, TlsSpec};
    use crate::resources::test_support::{cluster, cluster_with};

    fn pod_spec(set: &StatefulSet) -> PodSpec {
        set.spec
            .as_ref()
            .and_then(|s| s.template.spec.clone())
            .expect("pod spec")
    }

    fn broker(set: &StatefulSet) -> Container {
        pod_spec(set).containers[0].clone()
    }

    fn env_value(container: &Container, name: &str) -> Option<EnvVar> {
        container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .cloned()
    }

    #[test]
    fn shape_names_volumes_and_ownership() {
        // Goal: X has the requested replicas, serviceName X-nodes, a `data` claim and an owner ref.
        let set = stateful_set(&cluster(), 3).expect("builds");
        assert_eq!(set.metadata.name.as_deref(), Some("rabbit"));
        assert!(set.metadata.owner_references.is_some());
        let spec = set.spec.as_ref().expect("spec");
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(spec.service_name.as_deref(), Some("rabbit-nodes"));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        assert_eq!(
            spec.update_strategy
                .as_ref()
                .and_then(|u| u.type_.as_deref()),
            Some("OnDelete")
        );
        assert_eq!(
            spec.selector.match_labels,
            Some(selector_labels(&cluster()))
        );
        let claims = spec.volume_claim_templates.as_ref().expect("claims");
        assert_eq!(claims[0].metadata.name.as_deref(), Some("data"));
        let requests = claims[0]
            .spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .expect("requests");
        assert_eq!(requests["storage"], Quantity("1Gi".into()));
        let template_labels = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .expect("labels");
        for (key, value) in selector_labels(&cluster()) {
            assert_eq!(template_labels[&key], value, "pods match the selector");
        }
        assert_eq!(
            pod_spec(&set).service_account_name.as_deref(),
            Some("rabbit")
        );
    }

    #[test]
    fn pods_meet_the_restricted_pod_security_standard() {
        // Goal: non-root, read-only root fs, no privilege escalation, ALL dropped, RuntimeDefault seccomp.
        let set = stateful_set(&cluster(), 3).expect("builds");
        let pod = pod_spec(&set).security_context.expect("pod security");
        assert_eq!(pod.run_as_non_root, Some(true));
        assert_eq!(
            pod.seccomp_profile.map(|s| s.type_).as_deref(),
            Some("RuntimeDefault")
        );
        let container = broker(&set).security_context.expect("container security");
        assert_eq!(container.run_as_non_root, Some(true));
        assert_eq!(container.read_only_root_filesystem, Some(true));
        assert_eq!(container.allow_privilege_escalation, Some(false));
        assert_eq!(
            container.capabilities.and_then(|c| c.drop),
            Some(vec!["ALL".to_string()])
        );
        assert_eq!(
            container.seccomp_profile.map(|s| s.type_).as_deref(),
            Some("RuntimeDefault")
        );
        assert!(container.privileged.is_none());
        assert!(pod_spec(&set).host_network.is_none());
    }

    #[test]
    fn probes_and_drain_hook() {
        // Goal: readiness is GET /api/cluster/ready on 15672; liveness is not cluster-dependent; preStop waits.
        let container = broker(&stateful_set(&cluster(), 3).expect("builds"));
        let readiness = container
            .readiness_probe
            .and_then(|p| p.http_get)
            .expect("http");
        assert_eq!(readiness.path.as_deref(), Some("/api/cluster/ready"));
        assert_eq!(readiness.port, IntOrString::Int(15672));
        assert_eq!(readiness.scheme.as_deref(), Some("HTTP"));
        let liveness = container.liveness_probe.expect("liveness");
        assert!(liveness.http_get.is_none());
        assert_eq!(
            liveness.tcp_socket.map(|t| t.port),
            Some(IntOrString::Int(5672))
        );
        let pre_stop = container
            .lifecycle
            .and_then(|l| l.pre_stop)
            .expect("preStop");
        assert_eq!(
            pre_stop.sleep.map(|s| s.seconds),
            Some(PRE_STOP_SLEEP_SECONDS)
        );
    }

    #[test]
    fn env_names_the_node_from_the_pod_and_lists_stable_peers() {
        // Goal: SYNOD_NODE_NAME comes from metadata.name and SYNOD_PEERS names X-i.X-nodes.<ns>.svc:25672.
        let container = broker(&stateful_set(&cluster(), 2).expect("builds"));
        let node_name = env_value(&container, "SYNOD_NODE_NAME").expect("node name");
        assert_eq!(
            node_name
                .value_from
                .and_then(|v| v.field_ref)
                .map(|f| f.field_path)
                .as_deref(),
            Some("metadata.name")
        );
        let peers = env_value(&container, "SYNOD_PEERS")
            .and_then(|e| e.value)
            .expect("peers");
        assert_eq!(
            peers,
            "rabbit-0=rabbit-0.rabbit-nodes.prod.svc:25672,rabbit-1=rabbit-1.rabbit-nodes.prod.svc:25672"
        );
        let password = env_value(&container, "SYNOD_DEFAULT_PASS")
            .and_then(|e| e.value_from)
            .and_then(|v| v.secret_key_ref)
            .expect("secret ref");
        assert_eq!(password.name, "rabbit-default-user");
        assert_eq!(container.command, Some(vec!["synod-broker".to_string()]));
        assert_eq!(container.args.expect("args")[1], "/etc/synod/synod.toml");
        assert_eq!(container.image.as_deref(), Some(DEFAULT_IMAGE));
    }

    #[test]
    fn scaling_does_not_change_the_restart_hash_but_config_does() {
        // Goal: a different replica count keeps the hash (no restarts); a config change alters it.
        let hash = |set: &StatefulSet| {
            set.spec
                .as_ref()
                .and_then(|s| s.template.metadata.as_ref())
                .and_then(|m| m.annotations.as_ref())
                .map(|a| a[RESTART_HASH_ANNOTATION].clone())
                .expect("hash annotation")
        };
        let three = stateful_set(&cluster(), 3).expect("builds");
        let five = stateful_set(&cluster(), 5).expect("builds");
        assert_eq!(hash(&three), hash(&five));
        let mut spec = cluster().spec;
        spec.config.insert(
            "heartbeat".into(),
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(10),
        );
        let changed = stateful_set(&cluster_with(spec), 3).expect("builds");
        assert_ne!(hash(&three), hash(&changed));
        let mut spec = cluster().spec;
        spec.image = Some("synod:other".into());
        assert_ne!(
            restart_hash(&cluster()).expect("hash"),
            restart_hash(&cluster_with(spec)).expect("hash")
        );
    }

    #[test]
    fn tls_overrides_and_retention_are_applied() {
        // Goal: TLS mounts certs and probes HTTPS; overrides and PVC retention reach the spec.
        let mut spec = cluster().spec;
        spec.tls = Some(TlsSpec {
            secret_name: "certs".into(),
        });
        spec.persistent_volume_claim_retention = PvcRetention::Delete;
        spec.pod_template = Some(PodTemplateOverride {
            priority_class_name: Some("critical".into()),
            termination_grace_period_seconds: Some(120),
            labels: BTreeMap::from([
                ("team".to_string(), "a".to_string()),
                ("app.kubernetes.io/name".to_string(), "hijack".to_string()),
            ]),
            ..PodTemplateOverride::default()
        });
        let set = stateful_set(&cluster_with(spec), 3).expect("builds");
        let pod = pod_spec(&set);
        assert_eq!(pod.priority_class_name.as_deref(), Some("critical"));
        assert_eq!(pod.termination_grace_period_seconds, Some(120));
        assert!(
            pod.volumes.iter().flatten().any(|v| v
                .secret
                .as_ref()
                .and_then(|s| s.secret_name.as_deref())
                == Some("certs"))
        );
        let tls_volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "tls")
            .and_then(|v| v.secret.clone())
            .expect("tls volume");
        assert_eq!(tls_volume.secret_name.as_deref(), Some("certs"));
        let container = broker(&set);
        let tls_mount = container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "tls")
            .expect("tls mount");
        assert_eq!(tls_mount.mount_path, "/etc/synod/tls");
        assert_eq!(tls_mount.read_only, Some(true));
        let ports: Vec<(Option<String>, i32)> = container
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone(), p.container_port))
            .collect();
        assert!(ports.contains(&(Some("amqps".into()), 5671)), "{ports:?}");
        assert!(ports.contains(&(Some("amqp".into()), 5672)), "{ports:?}");
        let plain = broker(&stateful_set(&cluster(), 3).expect("builds"));
        assert!(
            plain
                .ports
                .iter()
                .flatten()
                .all(|p| p.container_port != 5671),
            "no amqps port without TLS"
        );
        assert!(
            plain
                .volume_mounts
                .iter()
                .flatten()
                .all(|m| m.name != "tls")
        );
        assert_eq!(
            container
                .readiness_probe
                .and_then(|p| p.http_get)
                .and_then(|h| h.scheme)
                .as_deref(),
            Some("HTTPS")
        );
        let spec = set.spec.expect("spec");
        assert_eq!(
            spec.persistent_volume_claim_retention_policy
                .and_then(|p| p.when_deleted)
                .as_deref(),
            Some("Delete")
        );
        let labels = spec
            .template
            .metadata
            .and_then(|m| m.labels)
            .expect("labels");
        assert_eq!(labels["team"], "a");
        assert_eq!(
            labels["app.kubernetes.io/name"], "synod",
            "operator labels win"
        );
    }
}
