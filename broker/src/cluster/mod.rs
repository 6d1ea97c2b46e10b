//! Drives `paxos`: transport between nodes, timers, durable acceptor state, forwarding.
