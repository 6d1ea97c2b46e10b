//! Management HTTP API (RabbitMQ-compatible paths and JSON shapes).

pub mod api;
