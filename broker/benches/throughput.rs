//! End-to-end throughput: one publisher and one auto-ack consumer on one
//! queue with 16-byte messages (PerfTest's `-x1 -y1 -s16 -a`), against a
//! broker started in-process on 127.0.0.1:0. The clients are minimal
//! hand-driven AMQP peers so that the broker, not a client library, is
//! what gets measured. Prints messages per second.
//!
//! Run: `cargo bench -p synod-broker --bench throughput [-- MESSAGES]`.

use std::time::{Duration, Instant};

use amq_protocol::protocol::{AMQPClass, basic, channel, connection, queue};
use bytes::BytesMut;
use clap::Parser;
use synod_broker::config::{Args, Config};
use synod_broker::protocol::{Encoder, Frame, encode_properties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Peer {
    socket: TcpStream,
    buf: BytesMut,
    encoder: Encoder,
}

impl Peer {
    async fn open(addr: std::net::SocketAddr) -> Peer {
        let mut socket = TcpStream::connect(addr).await.expect("connect");
        socket.set_nodelay(true).expect("nodelay");
        socket
            .write_all(b"AMQP\x00\x00\x09\x01")
            .await
            .expect("header");
        let mut peer = Peer {
            socket,
            buf: BytesMut::with_capacity(1 << 20),
            encoder: Encoder::default(),
        };
        peer.next().await;
        peer.call(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: Default::default(),
                mechanism: "PLAIN".into(),
                response: "\0guest\0guest".into(),
                locale: "en_US".into(),
            })),
        )
        .await;
        peer.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 16,
                frame_max: 131_072,
                heartbeat: 0,
            })),
        )
        .await;
        peer.call(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        )
        .await;
        peer.call(
            1,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await;
        peer
    }

    async fn send(&mut self, channel: u16, method: AMQPClass) {
        let mut out = BytesMut::new();
        self.encoder.method(&mut out, channel, &method);
        self.socket.write_all(&out).await.expect("write");
    }

    async fn call(&mut self, channel: u16, method: AMQPClass) -> Frame {
        self.send(channel, method).await;
        self.next().await
    }

    async fn next(&mut self) -> Frame {
        loop {
            if let Some(frame) = Frame::parse(&mut self.buf, 1 << 20).expect("valid frame") {
                return frame;
            }
            assert!(
                self.socket.read_buf(&mut self.buf).await.expect("read") > 0,
                "server closed"
            );
        }
    }
}

fn main() {
    let messages: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let config = Config::from_args(
            Args::try_parse_from(["synod-broker", "--amqp-listen", "127.0.0.1:0"]).expect("flags"),
        )
        .expect("config");
        let broker = synod_broker::server::start(config).await.expect("broker");
        let addr = broker.amqp_addr;

        let mut consumer = Peer::open(addr).await;
        consumer
            .call(
                1,
                AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                    queue: "bench".into(),
                    passive: false,
                    durable: false,
                    exclusive: false,
                    auto_delete: false,
                    nowait: false,
                    arguments: Default::default(),
                })),
            )
            .await;
        consumer
            .call(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                    queue: "bench".into(),
                    consumer_tag: "bench".into(),
                    no_local: false,
                    no_ack: true,
                    exclusive: false,
                    nowait: false,
                    arguments: Default::default(),
                })),
            )
            .await;
        let started = Instant::now();
        let consuming = tokio::spawn(async move {
            let mut received = 0u64;
            while received < messages {
                if let Frame::Body(..) = consumer.next().await {
                    received += 1;
                }
            }
            started.elapsed()
        });

        let mut publisher = Peer::open(addr).await;
        let properties = encode_properties(&Default::default());
        let body = [b'x'; 16];
        let mut batch = BytesMut::new();
        let publish = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "bench".into(),
            mandatory: false,
            immediate: false,
        }));
        let batch_size = 256;
        let mut sent = 0;
        while sent < messages {
            batch.clear();
            for _ in 0..batch_size.min(messages - sent) {
                publisher.encoder.method(&mut batch, 1, &publish);
                publisher
                    .encoder
                    .content(&mut batch, 1, &properties, &body, 131_072);
                sent += 1;
            }
            publisher.socket.write_all(&batch).await.expect("publish");
        }
        let published_in = started.elapsed();
        let consumed_in = tokio::time::timeout(Duration::from_secs(600), consuming)
            .await
            .expect("consumer finishes")
            .expect("consumer task");
        let rate = |d: Duration| messages as f64 / d.as_secs_f64();
        println!(
            "throughput: {messages} messages of 16 bytes, 1 publisher, 1 auto-ack consumer: \
             published {:.0} msg/s, consumed {:.0} msg/s ({:.2}s)",
            rate(published_in),
            rate(consumed_in),
            consumed_in.as_secs_f64()
        );
        broker.shutdown().await;
    });
}
