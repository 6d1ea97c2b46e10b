//! Durable storage: append-only segment log and metadata. Never sends anything on the network.
