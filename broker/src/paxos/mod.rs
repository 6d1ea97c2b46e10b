//! Multi-Paxos consensus and reconfiguration as a pure state machine.
//!
//! Architecture invariant: this module knows nothing of sockets, files,
//! tokio or wall clocks; time arrives through `tick()`, messages through
//! `step()`, and output leaves as a `Ready` batch.
