//! Tests of the `synod-operator` and `crdgen` binaries as processes: the
//! operator refuses to start without its CRDs and says how to install them;
//! crdgen writes one YAML file per kind that parses back into a CRD.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// How long the operator may take to notice the CRDs are missing.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// An API server stand-in on 127.0.0.1:0 that knows no resource at all, as a
/// cluster without the synod.dev CRDs answers for their paths.
fn start_empty_api_server() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    listener.set_nonblocking(true).expect("non-blocking");
    let addr = listener.local_addr().expect("local addr");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let router = Router::new().fallback(|| async {
                (
                    StatusCode::NOT_FOUND,
                    axum::Json(serde_json::json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "message": "the server could not find the requested resource",
                        "reason": "NotFound", "details": {}, "code": 404
                    })),
                )
            });
            axum::serve(listener, router).await.expect("serve");
        });
    });
    addr
}

#[test]
fn the_operator_exits_with_an_install_hint_when_the_crds_are_missing() {
    // Goal: without the synod.dev CRDs the operator exits 2 and names the install command.
    let addr = start_empty_api_server();
    let dir = std::env::temp_dir().join(format!("synod-operator-process-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://{addr}\n\
             users:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n\
             current-context: c\n"
        ),
    )
    .expect("write kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_synod-operator"))
        .env("KUBECONFIG", &kubeconfig)
        .env("SYNOD_OPERATOR_METRICS_LISTEN", "127.0.0.1:0")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start synod-operator");
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("synod-operator did not exit within {EXIT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr piped")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("CRDs are not installed"), "{stderr}");
    assert!(stderr.contains("kubectl apply -f crds/"), "{stderr}");
}

#[test]
fn crdgen_writes_one_parsable_crd_per_kind() {
    // Goal: crdgen writes brokercluster/exchange/queue/binding.yaml that parse as synod.dev CRDs.
    let dir = std::env::temp_dir().join(format!("synod-crdgen-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_crdgen"))
        .arg(&dir)
        .status()
        .expect("run crdgen");
    assert!(status.success());
    for stem in ["brokercluster", "exchange", "queue", "binding"] {
        let text = std::fs::read_to_string(dir.join(format!("{stem}.yaml"))).expect("written");
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("parses");
        assert_eq!(crd.spec.group, "synod.dev");
        assert_eq!(crd.spec.names.kind.to_lowercase(), stem);
    }
    std::fs::remove_dir_all(&dir).ok();
}
