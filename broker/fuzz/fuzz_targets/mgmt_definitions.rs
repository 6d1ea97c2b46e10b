//! libFuzzer target: arbitrary bytes as a definitions document (the body of
//! `POST /api/definitions`). Must not panic; a parse error is fine.
#![no_main]

use libfuzzer_sys::fuzz_target;
use synod_broker::mgmt::api::Definitions;

fuzz_target!(|data: &[u8]| {
    if let Ok(definitions) = serde_json::from_slice::<Definitions>(data) {
        let text = serde_json::to_vec(&definitions).expect("what parsed serializes");
        let _: Definitions = serde_json::from_slice(&text).expect("what serialized parses");
    }
});
