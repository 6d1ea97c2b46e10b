//! `synod-operator`: reconciles `BrokerCluster`, `Exchange`, `Queue` and
//! `Binding` resources into Kubernetes objects and broker topology.
//!
//! Codemap:
//! - [`crd`]: spec and status types of each custom resource.
//! - [`resources`]: pure builders of Kubernetes objects (`&BrokerCluster -> StatefulSet`).
//! - [`controller`]: reconcile, cleanup and error policy, one file per kind.
//! - [`broker_client`]: typed client of a broker's management API.
//! - [`conditions`]: status conditions and their transition times.
//! - [`leader`]: leader election on a Lease.
//! - [`metrics`]: the operator's Prometheus registry.
#![warn(missing_docs)]

pub mod broker_client;
pub mod conditions;
pub mod controller;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod resources;

/// Selects aws-lc-rs as the process-wide TLS crypto provider.
///
/// The dependencies enable both of rustls' providers (kube asks for ring,
/// reqwest and the broker's AMQP stack for aws-lc-rs), and rustls then
/// refuses to guess. Call this once before creating any client; later calls
/// (and a provider installed by someone else) are fine.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
