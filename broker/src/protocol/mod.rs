//! AMQP 0-9-1 frames, methods and field tables. Pure: no tokio, no sockets.
