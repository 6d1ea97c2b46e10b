//! Queues: messages, consumers, redelivery, TTL, length limits, dead-lettering.
