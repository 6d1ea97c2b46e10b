//! Build script: tells the integration tests whether the Kubernetes test
//! environment (`tests/support/`, the control plane and node simulator) is
//! present, as the cfg `synod_envtest_support`. It must do nothing else.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(synod_envtest_support)");
    println!("cargo::rerun-if-changed=tests");
    if std::path::Path::new("tests/support/mod.rs").exists() {
        println!("cargo::rustc-cfg=synod_envtest_support");
    }
}
