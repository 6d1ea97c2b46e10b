//! Placeholder: filled by the AMQP broker work.
