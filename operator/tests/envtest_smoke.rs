//! Smoke tests of the operator's test environment: a real control plane
//! starts, serves and enforces RBAC, kube-controller-manager turns a
//! StatefulSet into Pods, the node simulator runs them as processes, and
//! kubectl and helm talk to it. They test the environment, not the operator.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapKeySelector, ConfigMapVolumeSource, Container, ContainerPort, EnvVar,
    EnvVarSource, ExecAction, HTTPGetAction, Namespace, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, Pod, PodSpec, PodTemplateSpec, Probe, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use support::envtest::EnvTest;
use support::kubelet::Kubelet;

/// How long Pods may take to be created, started and reported.
const POD_TIMEOUT: Duration = Duration::from_secs(90);
const POLL_INTERVAL: Duration = Duration::from_millis(200);

async fn start_env() -> EnvTest {
    let started = Instant::now();
    let env = EnvTest::start()
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    eprintln!("envtest: control plane ready in {:.1?}", started.elapsed());
    env
}

async fn create_namespace(env: &EnvTest, name: &str) {
    let namespaces: Api<Namespace> = Api::all(env.client());
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create namespace");
}

/// Polls `check` until it returns `Some`, failing the test after `timeout`.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|condition| condition.type_ == "Ready" && condition.status == "True")
        })
}

fn phase(pod: &Pod) -> Option<String> {
    pod.status.as_ref().and_then(|status| status.phase.clone())
}

fn pod_ip(pod: &Pod) -> Option<String> {
    pod.status.as_ref().and_then(|status| status.pod_ip.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_serves_objects_enforces_rbac_and_runs_statefulset_pods() {
    // Goal: the environment starts; objects round-trip; RBAC restricts a
    // ServiceAccount; a StatefulSet gets Ready Pods with their own loopback
    // addresses; a deleted Pod comes back with its address; deleting the
    // StatefulSet removes its Pods through the garbage collector.
    let env = start_env().await;
    assert!(
        env.has_controller_manager(),
        "kube-controller-manager is not built: run scripts/setup-k8s.sh"
    );
    let client = env.client();
    create_namespace(&env, "smoke").await;

    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "smoke");
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some("settings".into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "greeting".to_string(),
            "hello".to_string(),
        )])),
        ..ConfigMap::default()
    };
    config_maps
        .create(&PostParams::default(), &config_map)
        .await
        .expect("create ConfigMap");
    let read_back = config_maps.get("settings").await.expect("get ConfigMap");
    assert_eq!(
        read_back
            .data
            .and_then(|data| data.get("greeting").cloned()),
        Some("hello".to_string())
    );

    // A ServiceAccount bound to the built-in `view` role reads but cannot write.
    let viewer = env
        .identity_with_cluster_role("smoke", "viewer", "view")
        .await
        .expect("viewer identity");
    let viewer_config_maps: Api<ConfigMap> = Api::namespaced(viewer.client.clone(), "smoke");
    viewer_config_maps
        .get("settings")
        .await
        .expect("view may read ConfigMaps");
    let mut denied = config_map.clone();
    denied.metadata.name = Some("denied".into());
    match viewer_config_maps
        .create(&PostParams::default(), &denied)
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("view must not create ConfigMaps, got {other:?}"),
    }

    let kubelet = Kubelet::start(&env).await.expect("start node simulator");
    let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
    let stateful_set = StatefulSet {
        metadata: ObjectMeta {
            name: Some("web".into()),
            ..ObjectMeta::default()
        },
        spec: Some(StatefulSetSpec {
            replicas: Some(2),
            service_name: Some("web-nodes".into()),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels.clone()),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    termination_grace_period_seconds: Some(2),
                    containers: vec![Container {
                        name: "main".into(),
                        image: Some("busybox".into()),
                        // Each start leaves a line on the Pod's volume, then idles.
                        command: Some(vec![
                            "sh".into(),
                            "-c".into(),
                            "echo started >> /var/lib/web/boots; exec sleep 600".into(),
                        ]),
                        volume_mounts: Some(vec![VolumeMount {
                            name: "data".into(),
                            mount_path: "/var/lib/web".into(),
                            ..VolumeMount::default()
                        }]),
                        readiness_probe: Some(Probe {
                            exec: Some(ExecAction {
                                command: Some(vec!["true".into()]),
                            }),
                            ..Probe::default()
                        }),
                        ..Container::default()
                    }],
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some("data".into()),
                    ..ObjectMeta::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([(
                            "storage".to_string(),
                            Quantity("1Gi".into()),
                        )])),
                        ..VolumeResourceRequirements::default()
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                ..PersistentVolumeClaim::default()
            }]),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    };
    let stateful_sets: Api<StatefulSet> = Api::namespaced(client.clone(), "smoke");
    stateful_sets
        .create(&PostParams::default(), &stateful_set)
        .await
        .expect("create StatefulSet");

    let started = Instant::now();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "smoke");
    let ready_pods = wait_for("2 Ready pods of StatefulSet web", POD_TIMEOUT, || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&Default::default()).await.ok()?;
            let ready: Vec<Pod> = list
                .items
                .into_iter()
                .filter(|pod| is_ready(pod) && phase(pod).as_deref() == Some("Running"))
                .collect();
            (ready.len() == 2).then_some(ready)
        }
    })
    .await;
    eprintln!(
        "envtest: StatefulSet of 2 Ready in {:.1?}",
        started.elapsed()
    );
    let mut names: Vec<String> = ready_pods
        .iter()
        .filter_map(|pod| pod.metadata.name.clone())
        .collect();
    names.sort();
    assert_eq!(names, ["web-0", "web-1"]);
    let ip_0 = pod_ip(&ready_pods[0]).expect("pod IP");
    let ip_1 = pod_ip(&ready_pods[1]).expect("pod IP");
    assert_ne!(ip_0, ip_1, "each Pod has its own address");
    for ip in [&ip_0, &ip_1] {
        let address: std::net::Ipv4Addr = ip.parse().expect("an IPv4 pod IP");
        assert!(address.is_loopback(), "pod IP {ip} must be loopback");
    }
    let web_0_ip = kubelet.pod_ip("smoke", "web-0").to_string();
    wait_for("StatefulSet status readyReplicas 2", POD_TIMEOUT, || {
        let stateful_sets = stateful_sets.clone();
        async move {
            let status = stateful_sets.get("web").await.ok()?.status?;
            (status.ready_replicas == Some(2)).then_some(())
        }
    })
    .await;

    // A deleted Pod is stopped, removed, recreated by the controller with the
    // same name, and started again with the same address.
    let old_uid = pods.get("web-0").await.expect("web-0").metadata.uid;
    pods.delete("web-0", &DeleteParams::default())
        .await
        .expect("delete web-0");
    let recreated = wait_for("web-0 recreated and Ready", POD_TIMEOUT, || {
        let pods = pods.clone();
        let old_uid = old_uid.clone();
        async move {
            let pod = pods.get_opt("web-0").await.ok()??;
            (pod.metadata.uid != old_uid && is_ready(&pod)).then_some(pod)
        }
    })
    .await;
    assert_eq!(pod_ip(&recreated), Some(web_0_ip));
    // The recreated Pod found the data its predecessor wrote on its claim,
    // which the simulator provisioned and kube-controller-manager bound.
    let claim_dir = kubelet.claim_dir("smoke", "data-web-0");
    wait_for("two starts recorded on data-web-0", POD_TIMEOUT, || {
        let claim_dir = claim_dir.clone();
        async move {
            let boots: String = std::fs::read_dir(&claim_dir)
                .ok()?
                .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("boots")).ok())
                .collect();
            (boots.lines().count() == 2).then_some(())
        }
    })
    .await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "smoke");
    wait_for("claim data-web-0 Bound", POD_TIMEOUT, || {
        let claims = claims.clone();
        async move {
            let phase = claims.get("data-web-0").await.ok()?.status?.phase?;
            (phase == "Bound").then_some(())
        }
    })
    .await;

    // Deleting the owner removes its Pods (garbage collector + simulator).
    stateful_sets
        .delete("web", &DeleteParams::foreground())
        .await
        .expect("delete StatefulSet");
    wait_for("Pods of web gone", POD_TIMEOUT, || {
        let pods = pods.clone();
        async move {
            let list = pods.list(&Default::default()).await.ok()?;
            list.items.is_empty().then_some(())
        }
    })
    .await;
    drop(kubelet);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_simulator_resolves_env_volumes_peers_and_http_readiness() {
    // Goal: a Pod's command sees downward-API and ConfigMap env, its ConfigMap
    // volume at a rewritten mount path, a peer's cluster DNS name as that
    // peer's address; an HTTP readiness probe against the Pod's own address
    // makes it Ready; deleting the Pod stops its process.
    let env = start_env().await;
    let client = env.client();
    create_namespace(&env, "sim").await;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "sim");
    config_maps
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("files".into()),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([
                    ("color".to_string(), "blue".to_string()),
                    ("index.html".to_string(), "hi".to_string()),
                ])),
                ..ConfigMap::default()
            },
        )
        .await
        .expect("create ConfigMap");
    let kubelet = Kubelet::start(&env).await.expect("start node simulator");
    let env_var = |name: &str, field: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    // The script prints what it sees, then serves the ConfigMap volume over
    // HTTP on the Pod's address so that the readiness probe can pass.
    let script = "echo name=$POD_NAME ns=$POD_NAMESPACE ip=$POD_IP color=$COLOR peer=$PEER; \
                  cat /srv/www/index.html; echo; \
                  exec python3 -m http.server --bind $POD_IP --directory /srv/www 8080";
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some("probe".into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            termination_grace_period_seconds: Some(5),
            volumes: Some(vec![Volume {
                name: "www".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: "files".into(),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            }]),
            containers: vec![Container {
                name: "web".into(),
                image: Some("python".into()),
                command: Some(vec!["sh".into(), "-c".into(), script.into()]),
                env: Some(vec![
                    env_var("POD_NAME", "metadata.name"),
                    env_var("POD_NAMESPACE", "metadata.namespace"),
                    env_var("POD_IP", "status.podIP"),
                    EnvVar {
                        name: "COLOR".into(),
                        value_from: Some(EnvVarSource {
                            config_map_key_ref: Some(ConfigMapKeySelector {
                                name: "files".into(),
                                key: "color".into(),
                                ..ConfigMapKeySelector::default()
                            }),
                            ..EnvVarSource::default()
                        }),
                        ..EnvVar::default()
                    },
                    EnvVar {
                        name: "PEER".into(),
                        value: Some("other-1.other-nodes.sim.svc.cluster.local:25672".into()),
                        ..EnvVar::default()
                    },
                ]),
                ports: Some(vec![ContainerPort {
                    name: Some("http".into()),
                    container_port: 8080,
                    ..ContainerPort::default()
                }]),
                volume_mounts: Some(vec![VolumeMount {
                    name: "www".into(),
                    mount_path: "/srv/www".into(),
                    ..VolumeMount::default()
                }]),
                readiness_probe: Some(Probe {
                    http_get: Some(HTTPGetAction {
                        path: Some("/index.html".into()),
                        port: IntOrString::String("http".into()),
                        ..HTTPGetAction::default()
                    }),
                    ..Probe::default()
                }),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), "sim");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create Pod");
    let ready = wait_for("Pod probe Ready", POD_TIMEOUT, || {
        let pods = pods.clone();
        async move {
            let pod = pods.get("probe").await.ok()?;
            is_ready(&pod).then_some(pod)
        }
    })
    .await;
    let ip = kubelet.pod_ip("sim", "probe");
    assert_eq!(pod_ip(&ready), Some(ip.to_string()));
    let peer_ip = kubelet.pod_ip("sim", "other-1");
    let log = kubelet.logs("sim", "probe", "web");
    assert!(
        log.contains(&format!(
            "name=probe ns=sim ip={ip} color=blue peer={peer_ip}:25672"
        )),
        "unexpected output: {log}"
    );
    assert!(log.contains("hi"), "ConfigMap volume not readable: {log}");

    // A container without a command runs the broker binary with the Pod's
    // args: `--peers` without `--cluster-secret-file` is a configuration
    // error, which the broker reports with exit code 2.
    let broker_bin = support::kubelet::default_broker_bin();
    assert!(
        broker_bin.is_file(),
        "{} is missing: build it with `cargo build -p synod-broker` (or set SYNOD_BROKER_BIN)",
        broker_bin.display()
    );
    let broker_pod = Pod {
        metadata: ObjectMeta {
            name: Some("broker".into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            containers: vec![Container {
                name: "broker".into(),
                image: Some("synod/broker".into()),
                args: Some(vec![
                    "--peers".into(),
                    "broker=broker.nodes.sim.svc:25672".into(),
                ]),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    pods.create(&PostParams::default(), &broker_pod)
        .await
        .expect("create broker Pod");
    let exit_code = wait_for("broker Pod Failed", POD_TIMEOUT, || {
        let pods = pods.clone();
        async move {
            let status = pods.get("broker").await.ok()?.status?;
            if status.phase.as_deref() != Some("Failed") {
                return None;
            }
            let terminated = status
                .container_statuses?
                .first()?
                .state
                .clone()?
                .terminated?;
            Some(terminated.exit_code)
        }
    })
    .await;
    let log = kubelet.logs("sim", "broker", "broker");
    assert_eq!(exit_code, 2, "broker output: {log}");
    assert!(log.contains("cluster-secret-file"), "broker output: {log}");

    pods.delete("probe", &DeleteParams::default())
        .await
        .expect("delete Pod");
    wait_for("Pod probe removed", POD_TIMEOUT, || {
        let pods = pods.clone();
        async move { pods.get_opt("probe").await.ok()?.is_none().then_some(()) }
    })
    .await;
    // The process is gone: nothing answers on the Pod's address any more.
    let address = std::net::SocketAddr::from((ip, 8080));
    assert!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "the Pod's process still serves {address}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_and_helm_reach_the_api_server() {
    // Goal: the kubeconfig works for the real CLIs users run against a cluster.
    let env = start_env().await;
    let output = env
        .kubectl()
        .expect("kubectl built")
        .args(["version", "-o", "json"])
        .output()
        .expect("run kubectl");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "kubectl version failed: {output:?}"
    );
    let version: serde_json::Value = serde_json::from_str(&text).expect("kubectl version JSON");
    let server = version["serverVersion"]["gitVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        server.starts_with("v1."),
        "server version {server:?} in {text}"
    );
    eprintln!("envtest: kubectl reports server {server}");

    let output = env
        .kubectl()
        .expect("kubectl built")
        .args(["create", "namespace", "from-kubectl"])
        .output()
        .expect("run kubectl");
    assert!(output.status.success(), "kubectl create failed: {output:?}");
    let namespaces: Api<Namespace> = Api::all(env.client());
    namespaces
        .get("from-kubectl")
        .await
        .expect("namespace made by kubectl is visible to the client");

    let output = env
        .helm()
        .expect("helm built")
        .args(["version", "--short"])
        .output()
        .expect("run helm");
    assert!(output.status.success(), "helm version failed: {output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("v3."));
    let output = env
        .helm()
        .expect("helm built")
        .args(["list", "--all-namespaces", "-o", "json"])
        .output()
        .expect("run helm");
    assert!(output.status.success(), "helm list failed: {output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "[]");
}
