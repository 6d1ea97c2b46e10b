//! `synod-broker`: an AMQP 0-9-1 message broker whose replicas agree on
//! membership and metadata through Paxos.
//!
//! Codemap (see `ARCHITECTURE.md` for the invariants):
//! - [`config`]: command line / environment / TOML configuration.
//! - [`limits`]: every `*_max` bound of the broker, in one place.
//! - [`server`]: listeners, accept loop, housekeeping, graceful shutdown; [`run`].
//! - [`broker`]: the `Broker` facade: metadata + queues + connection registry.
//! - [`meta`]: metadata changed only by `Command`s through `Metadata::apply` (pure).
//! - [`auth`]: RabbitMQ-compatible password hashes, PLAIN / AMQPLAIN / EXTERNAL.
//! - [`login_throttle`]: failed logins per address; delays replies to guessers.
//! - [`resources`]: memory available to the process, free disk space, alarm reasons.
//! - [`tls`]: TLS configurations (reloaded when the files change), client-certificate names, HTTPS listener.
//! - [`protocol`]: AMQP 0-9-1 frames, methods and field tables (pure; no tokio).
//! - [`connection`]: sockets <-> frames, handshake, heartbeats, flow control.
//! - [`channel`]: per-channel state: consumers, unacked deliveries, confirms, qos.
//! - [`exchange`]: direct, fanout, topic and headers routing (pure).
//! - [`message`]: the shared, reference-counted message.
//! - [`queue`]: messages, consumers, redelivery, TTL, length limits, dead-lettering.
//! - [`store`]: durable log and metadata; versioned formats; a backend trait.
//! - [`durable`]: wires the store into the broker: topology snapshots, message
//!   logging, recovery at startup, confirms after fsync, the disk alarm.
//! - [`paxos`]: consensus and reconfiguration (pure; no I/O, no clock, seeded rng).
//! - [`cluster`]: drives `paxos`: transport, timers, persistence, forwarding.
//! - [`drain`]: moves a leaving node's queues (metadata and messages) away.
//! - [`mgmt`]: management HTTP API.
//! - [`metrics`]: the one Prometheus registry.
#![warn(missing_docs)]

pub mod auth;
pub mod broker;
pub mod channel;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod drain;
pub mod durable;
pub mod exchange;
pub mod limits;
pub mod local;
pub mod login_throttle;
pub mod message;
pub mod meta;
pub mod metrics;
pub mod mgmt;
pub mod paxos;
pub mod protocol;
pub mod queue;
pub mod replication;
pub mod resources;
pub mod server;
pub mod store;
pub mod tls;

pub use server::run;
