//! AMQP 0-9-1 frames, methods and field tables. Pure: no tokio, no sockets.
//!
//! Framing is ours (two steps, as mini-redis does): [`Frame::check`] finds a
//! complete frame in the read buffer without allocating, enforcing
//! `frame_max` and the frame-end octet; [`Frame::parse`] then splits it off.
//! Method arguments, content-header properties and field tables are decoded
//! and encoded by `amq-protocol`, which is generated from the spec. Body
//! frames stay zero-copy `Bytes` slices of the read buffer.

use amq_protocol::frame::WriteContext;
use amq_protocol::frame::parsing::parse_content_header;
use amq_protocol::protocol::{AMQPClass, basic::AMQPProperties, basic::gen_properties, gen_class};
use bytes::{Buf, BufMut, Bytes, BytesMut};

pub mod reply;

/// The protocol header a 0-9-1 client sends first.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// Frame type octet of a method frame.
pub const FRAME_METHOD: u8 = 1;
/// Frame type octet of a content-header frame.
pub const FRAME_HEADER: u8 = 2;
/// Frame type octet of a content-body frame.
pub const FRAME_BODY: u8 = 3;
/// Frame type octet of a heartbeat frame.
pub const FRAME_HEARTBEAT: u8 = 8;
/// The octet that ends every frame.
pub const FRAME_END: u8 = 0xCE;
/// Bytes of a frame that are not payload: type, channel, size, frame-end.
pub const FRAME_OVERHEAD: usize = 8;
/// Class id of `basic`, the only content class.
pub const CLASS_BASIC: u16 = 60;

/// Why bytes from a peer are not a valid frame. Every variant is a
/// connection-level error; [`Error::reply_code`] gives the AMQP code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The frame announces a payload larger than the negotiated `frame_max`.
    #[error("frame size {size} exceeds frame_max {max}")]
    FrameTooLarge {
        /// Announced frame size including overhead.
        size: u64,
        /// Negotiated maximum.
        max: u32,
    },
    /// The octet after the payload was not 0xCE.
    #[error("frame end octet was {0:#04x}, expected 0xce")]
    BadFrameEnd(u8),
    /// The frame type octet is not one of 1, 2, 3, 8.
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    /// A method frame names a class or method we do not know.
    #[error("unknown method {class_id}/{method_id}")]
    UnknownMethod {
        /// Class id read from the payload.
        class_id: u16,
        /// Method id read from the payload.
        method_id: u16,
    },
    /// A method or content header whose arguments do not decode.
    #[error("malformed {what} frame on channel {channel}")]
    Malformed {
        /// `method` or `content header`.
        what: &'static str,
        /// Channel of the frame.
        channel: u16,
    },
}

impl Error {
    /// The hard error code to close the connection with.
    pub fn reply_code(&self) -> u16 {
        match self {
            Error::FrameTooLarge { .. } | Error::BadFrameEnd(_) | Error::UnknownFrameType(_) => {
                reply::FRAME_ERROR
            }
            Error::UnknownMethod { .. } => reply::NOT_IMPLEMENTED,
            Error::Malformed { .. } => reply::SYNTAX_ERROR,
        }
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A method with its arguments.
    Method(u16, Box<AMQPClass>),
    /// A content header: class id, body size, properties, and the raw
    /// property bytes (flags + list) so deliveries can copy them verbatim.
    Header {
        /// Channel number.
        channel: u16,
        /// Content class (60 for basic).
        class_id: u16,
        /// Total body size announced.
        body_size: u64,
        /// Decoded properties.
        properties: Box<AMQPProperties>,
        /// Encoded properties as received.
        properties_raw: Bytes,
    },
    /// A slice of content body, zero-copy from the read buffer.
    Body(u16, Bytes),
    /// A heartbeat; the channel should be 0.
    Heartbeat(u16),
}

impl Frame {
    /// Checks whether `buf` starts with a complete frame. Returns its total
    /// length, `Ok(None)` when more bytes are needed, or an error as soon as
    /// the header proves the frame invalid. Allocates nothing.
    pub fn check(buf: &[u8], frame_size_max: u32) -> Result<Option<usize>, Error> {
        if buf.is_empty() {
            return Ok(None);
        }
        let frame_type = buf[0];
        if !matches!(
            frame_type,
            FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
        ) {
            return Err(Error::UnknownFrameType(frame_type));
        }
        if buf.len() < 7 {
            return Ok(None);
        }
        let payload_size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as u64;
        let total = payload_size + FRAME_OVERHEAD as u64;
        if total > u64::from(frame_size_max) {
            return Err(Error::FrameTooLarge {
                size: total,
                max: frame_size_max,
            });
        }
        let total = total as usize;
        if buf.len() < total {
            return Ok(None);
        }
        if buf[total - 1] != FRAME_END {
            return Err(Error::BadFrameEnd(buf[total - 1]));
        }
        Ok(Some(total))
    }

    /// Splits one complete frame off the front of `buf` and decodes it.
    /// `Ok(None)` means more bytes are needed; `buf` is then untouched.
    pub fn parse(buf: &mut BytesMut, frame_size_max: u32) -> Result<Option<Frame>, Error> {
        let Some(total) = Frame::check(buf, frame_size_max)? else {
            return Ok(None);
        };
        let mut frame = buf.split_to(total).freeze();
        let frame_type = frame.get_u8();
        let channel = frame.get_u16();
        let _size = frame.get_u32();
        frame.truncate(total - FRAME_OVERHEAD);
        let payload = frame;
        match frame_type {
            FRAME_METHOD => parse_method(channel, &payload).map(Some),
            FRAME_HEADER => parse_header(channel, payload).map(Some),
            FRAME_BODY => Ok(Some(Frame::Body(channel, payload))),
            _ => Ok(Some(Frame::Heartbeat(channel))),
        }
    }
}

fn parse_method(channel: u16, payload: &[u8]) -> Result<Frame, Error> {
    match amq_protocol::protocol::parse_class(payload) {
        Ok(([], class)) => Ok(Frame::Method(channel, Box::new(class))),
        Ok(_) => Err(Error::Malformed {
            what: "method",
            channel,
        }),
        Err(_) => {
            if payload.len() >= 4 {
                let class_id = u16::from_be_bytes([payload[0], payload[1]]);
                let method_id = u16::from_be_bytes([payload[2], payload[3]]);
                if !is_known_method(class_id, method_id) {
                    return Err(Error::UnknownMethod {
                        class_id,
                        method_id,
                    });
                }
            }
            Err(Error::Malformed {
                what: "method",
                channel,
            })
        }
    }
}

fn is_known_method(class_id: u16, method_id: u16) -> bool {
    let methods: &[u16] = match class_id {
        10 => &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51, 60, 61, 70, 71],
        20 => &[10, 11, 20, 21, 40, 41],
        30 => &[10, 11],
        40 => &[10, 11, 20, 21, 30, 31, 40, 51],
        50 => &[10, 11, 20, 21, 30, 31, 40, 41, 50, 51],
        60 => &[
            10, 11, 20, 21, 30, 31, 40, 50, 60, 70, 71, 72, 80, 90, 100, 110, 111, 120,
        ],
        85 => &[10, 11],
        90 => &[10, 11, 20, 21, 30, 31],
        _ => &[],
    };
    methods.contains(&method_id)
}

fn parse_header(channel: u16, payload: Bytes) -> Result<Frame, Error> {
    let malformed = Error::Malformed {
        what: "content header",
        channel,
    };
    match parse_content_header(&payload[..]) {
        Ok(([], header)) => {
            // class (2) + weight (2) + body size (8) precede the properties.
            let properties_raw = payload.slice(12..);
            Ok(Frame::Header {
                channel,
                class_id: header.class_id,
                body_size: header.body_size,
                properties: Box::new(header.properties),
                properties_raw,
            })
        }
        _ => Err(malformed),
    }
}

/// Writes frames into a connection's write buffer. Keeps one scratch
/// buffer so encoding a method allocates nothing once warm.
#[derive(Debug, Default)]
pub struct Encoder {
    scratch: Vec<u8>,
}

impl Encoder {
    /// Appends a method frame.
    pub fn method(&mut self, out: &mut BytesMut, channel: u16, method: &AMQPClass) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        // Generation into a Vec fails only for short strings over 255
        // bytes; names are validated on input and reply texts truncated.
        let scratch = gen_class(method)(WriteContext::from(scratch))
            .expect("every short string the broker sends fits in 255 bytes")
            .write;
        put_frame_header(out, FRAME_METHOD, channel, scratch.len());
        out.extend_from_slice(&scratch);
        out.put_u8(FRAME_END);
        self.scratch = scratch;
    }

    /// Appends a content header with already-encoded properties, then the
    /// body split into frames of at most `frame_size_max` bytes.
    pub fn content(
        &mut self,
        out: &mut BytesMut,
        channel: u16,
        properties_raw: &[u8],
        body: &[u8],
        frame_size_max: u32,
    ) {
        put_frame_header(out, FRAME_HEADER, channel, 12 + properties_raw.len());
        out.put_u16(CLASS_BASIC);
        out.put_u16(0);
        out.put_u64(body.len() as u64);
        out.extend_from_slice(properties_raw);
        out.put_u8(FRAME_END);
        let chunk_max = (frame_size_max as usize)
            .saturating_sub(FRAME_OVERHEAD)
            .max(1);
        for chunk in body.chunks(chunk_max) {
            put_frame_header(out, FRAME_BODY, channel, chunk.len());
            out.extend_from_slice(chunk);
            out.put_u8(FRAME_END);
        }
    }

    /// Appends a heartbeat frame.
    pub fn heartbeat(&mut self, out: &mut BytesMut) {
        put_frame_header(out, FRAME_HEARTBEAT, 0, 0);
        out.put_u8(FRAME_END);
    }

    /// Appends `basic.deliver` encoded by hand: it is the hot path, and
    /// writing it directly avoids building owned strings per delivery.
    #[allow(clippy::too_many_arguments)]
    pub fn deliver(
        &mut self,
        out: &mut BytesMut,
        channel: u16,
        consumer_tag: &str,
        delivery_tag: u64,
        redelivered: bool,
        exchange: &str,
        routing_key: &str,
    ) {
        let size = 4 + 1 + consumer_tag.len() + 8 + 1 + 1 + exchange.len() + 1 + routing_key.len();
        put_frame_header(out, FRAME_METHOD, channel, size);
        out.put_u16(CLASS_BASIC);
        out.put_u16(60);
        put_short_str(out, consumer_tag);
        out.put_u64(delivery_tag);
        out.put_u8(u8::from(redelivered));
        put_short_str(out, exchange);
        put_short_str(out, routing_key);
        out.put_u8(FRAME_END);
    }
}

fn put_short_str(out: &mut BytesMut, text: &str) {
    // Names reaching this point were decoded from short strings or
    // generated by the broker, so they fit in 255 bytes.
    let len = text.len().min(255);
    out.put_u8(len as u8);
    out.extend_from_slice(&text.as_bytes()[..len]);
}

fn put_frame_header(out: &mut BytesMut, frame_type: u8, channel: u16, payload_size: usize) {
    out.reserve(payload_size + FRAME_OVERHEAD);
    out.put_u8(frame_type);
    out.put_u16(channel);
    out.put_u32(payload_size as u32);
}

/// Encodes properties (flags + list) as they travel in a content header.
pub fn encode_properties(properties: &AMQPProperties) -> Bytes {
    let context = gen_properties(properties)(WriteContext::from(Vec::new()))
        .expect("properties decoded from short strings re-encode as short strings");
    Bytes::from(context.write)
}

/// A protocol-level failure that closes a channel or the connection, with
/// the reply code and text sent to the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {text}")]
pub struct AmqpError {
    /// Reply code from the spec (see [`reply`]).
    pub code: u16,
    /// Human-readable reason, RabbitMQ-style (`NOT_FOUND - no queue 'q' in vhost '/'`).
    pub text: String,
    /// Class of the method that failed (0 when none).
    pub class_id: u16,
    /// Method that failed (0 when none).
    pub method_id: u16,
}

impl AmqpError {
    /// An error with `code` and text `NAME - detail`.
    pub fn new(code: u16, detail: impl std::fmt::Display) -> AmqpError {
        AmqpError {
            code,
            text: format!("{} - {detail}", reply::name(code)),
            class_id: 0,
            method_id: 0,
        }
    }

    /// Whether this code closes the whole connection (a hard error).
    pub fn is_hard(&self) -> bool {
        reply::is_hard(self.code)
    }

    /// Records the method that failed, unless already set.
    pub fn on_method(mut self, class_id: u16, method_id: u16) -> AmqpError {
        if self.class_id == 0 {
            self.class_id = class_id;
            self.method_id = method_id;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::basic;

    fn encode(method: &AMQPClass) -> BytesMut {
        let mut out = BytesMut::new();
        Encoder::default().method(&mut out, 1, method);
        out
    }

    #[test]
    fn check_reports_partial_frames_and_limits() {
        // Goal: a frame is found only when complete; size and end octet are enforced.
        let frame = encode(&AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: 7,
            multiple: false,
        })));
        type Case = (Vec<u8>, u32, Result<Option<usize>, Error>);
        let cases: Vec<Case> = vec![
            (vec![], 4096, Ok(None)),
            (frame[..3].to_vec(), 4096, Ok(None)),
            (frame[..frame.len() - 1].to_vec(), 4096, Ok(None)),
            (frame.to_vec(), 4096, Ok(Some(frame.len()))),
            (
                frame.to_vec(),
                10,
                Err(Error::FrameTooLarge {
                    size: frame.len() as u64,
                    max: 10,
                }),
            ),
            (
                vec![9, 0, 0, 0, 0, 0, 0, 0xCE],
                4096,
                Err(Error::UnknownFrameType(9)),
            ),
            (
                vec![8, 0, 0, 0, 0, 0, 0, 0xCD],
                4096,
                Err(Error::BadFrameEnd(0xCD)),
            ),
        ];
        for (bytes, max, expected) in cases {
            assert_eq!(Frame::check(&bytes, max), expected, "{bytes:?}");
        }
    }

    #[test]
    fn methods_round_trip_and_unknown_ones_are_named() {
        // Goal: an encoded method parses back; unknown class/method maps to 540.
        let method = AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "amq.topic".into(),
            routing_key: "a.b".into(),
            mandatory: true,
            immediate: false,
        }));
        let mut buf = encode(&method);
        buf.extend_from_slice(&[1, 0, 1, 0, 0, 0, 4, 0, 99, 0, 1, 0xCE]);
        let parsed = Frame::parse(&mut buf, 4096)
            .expect("valid")
            .expect("complete");
        assert_eq!(parsed, Frame::Method(1, Box::new(method)));
        let err = Frame::parse(&mut buf, 4096).expect_err("unknown class");
        assert_eq!(err.reply_code(), reply::NOT_IMPLEMENTED);
    }

    #[test]
    fn content_is_split_to_frame_max_and_parses_back_zero_copy() {
        // Goal: a body larger than frame_max becomes several body frames.
        let props = AMQPProperties::default().with_content_type("text/plain".into());
        let raw = encode_properties(&props);
        let body = vec![7u8; 10_000];
        let mut out = BytesMut::new();
        Encoder::default().content(&mut out, 3, &raw, &body, 4096);
        let mut total = 0;
        let mut bodies = 0;
        while let Some(frame) = Frame::parse(&mut out, 4096).expect("valid") {
            match frame {
                Frame::Header {
                    body_size,
                    properties,
                    ..
                } => {
                    assert_eq!(body_size, 10_000);
                    assert_eq!(*properties, props);
                }
                Frame::Body(3, bytes) => {
                    total += bytes.len();
                    bodies += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!((total, bodies), (10_000, 3));
    }

    #[test]
    fn deliver_encoded_by_hand_matches_the_generated_codec() {
        // Goal: the hand-written basic.deliver is byte-identical to amq-protocol's.
        let mut ours = BytesMut::new();
        Encoder::default().deliver(&mut ours, 5, "ctag", 42, true, "ex", "rk");
        let theirs = {
            let mut out = BytesMut::new();
            Encoder::default().method(
                &mut out,
                5,
                &AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                    consumer_tag: "ctag".into(),
                    delivery_tag: 42,
                    redelivered: true,
                    exchange: "ex".into(),
                    routing_key: "rk".into(),
                })),
            );
            out
        };
        assert_eq!(ours, theirs);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn random_bytes_never_panic_the_parser(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            // Goal: arbitrary input yields frames or errors, never a panic or a stall.
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = Frame::parse(&mut buf, 4096) {}
        }

        #[test]
        fn mutated_valid_frames_never_panic_the_parser(index in 0usize..64, value in proptest::prelude::any::<u8>()) {
            // Goal: flipping one byte of valid frames yields frames or errors, never a panic.
            let mut buf = encode(&AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: "q".into(),
                consumer_tag: "t".into(),
                no_local: false,
                no_ack: false,
                exclusive: true,
                nowait: false,
                arguments: Default::default(),
            })));
            let raw = encode_properties(&AMQPProperties::default().with_priority(3));
            Encoder::default().content(&mut buf, 1, &raw, b"hello", 4096);
            let at = index % buf.len();
            buf[at] = value;
            while let Ok(Some(_)) = Frame::parse(&mut buf, 4096) {}
        }
    }
}
