//! `synod-broker`: an AMQP 0-9-1 message broker whose replicas agree on
//! membership and metadata through Paxos.
//!
//! Codemap (see `ARCHITECTURE.md` for the invariants):
//! - [`config`]: command line / environment / TOML configuration.
//! - [`limits`]: every `*_max` bound of the broker, in one place.
//! - [`protocol`]: AMQP 0-9-1 frames, methods and field tables (pure; no tokio).
//! - [`connection`]: sockets <-> frames, handshake, heartbeats, flow control.
//! - [`channel`]: per-channel state: consumers, unacked deliveries, confirms, qos.
//! - [`exchange`]: direct, fanout, topic and headers routing (pure).
//! - [`queue`]: messages, consumers, redelivery, TTL, length limits, dead-lettering.
//! - [`store`]: durable log and metadata; versioned formats; a backend trait.
//! - [`paxos`]: consensus and reconfiguration (pure; no I/O, no clock, seeded rng).
//! - [`cluster`]: drives `paxos`: transport, timers, persistence, forwarding.
//! - [`mgmt`]: management HTTP API.
//! - [`metrics`]: the one Prometheus registry.
#![warn(missing_docs)]

pub mod channel;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod exchange;
pub mod limits;
pub mod metrics;
pub mod mgmt;
pub mod paxos;
pub mod protocol;
pub mod queue;
pub mod store;
