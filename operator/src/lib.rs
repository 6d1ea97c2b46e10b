//! `synod-operator`: reconciles `BrokerCluster`, `Exchange`, `Queue` and
//! `Binding` resources into Kubernetes objects and broker topology.
//!
//! Codemap:
//! - `crd`: spec and status types of each custom resource.
//! - `controller`: reconcile, cleanup and error policy, one file per kind.
//! - `resources`: pure builders of Kubernetes objects.
#![warn(missing_docs)]

pub mod crd;
pub mod resources;
