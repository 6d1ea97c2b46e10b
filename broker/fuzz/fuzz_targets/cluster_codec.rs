//! libFuzzer target: arbitrary bytes as a cluster peer's message and as
//! Paxos log records. Must not panic; whatever decodes must round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use synod_broker::cluster::codec::{Reader, decode_message, encode_message};

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = decode_message(data) {
        assert_eq!(decode_message(&encode_message(&message)), Ok(message));
    }
    let _ = Reader::new(data).snapshot();
    let _ = Reader::new(data).log_entry();
    let _ = Reader::new(data).hard_state();
});
