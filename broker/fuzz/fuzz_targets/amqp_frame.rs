//! libFuzzer target: arbitrary bytes through the AMQP frame decoder, as a
//! connection would read them. Must not panic; errors are the expected outcome.
#![no_main]

use libfuzzer_sys::fuzz_target;
use synod_broker::protocol::Frame;

fuzz_target!(|data: &[u8]| {
    let mut buf = bytes::BytesMut::from(data);
    // The smallest frame_max a peer may negotiate, and the largest we offer.
    for frame_max in [4_096, synod_broker::limits::FRAME_SIZE_MAX] {
        let mut copy = buf.clone();
        while let Ok(Some(_)) = Frame::parse(&mut copy, frame_max) {}
    }
    buf.clear();
});
