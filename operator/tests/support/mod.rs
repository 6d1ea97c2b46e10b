//! Test support for the operator's integration tests: a real control plane
//! ([`envtest`]) and a node simulator that runs pods as local processes
//! ([`kubelet`]). Integration tests include it with `mod support;`. Nothing
//! here fakes the API server; it must not be used outside tests.

// Each test crate uses a different part of this module.
#![allow(dead_code)]

pub mod envtest;
pub mod http;
pub mod kubelet;
pub mod process;
