//! The pgoutput decoder and the change decoder behind it never panic, whatever the server
//! (or a corrupted stream) sends.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use pgfanout::capture::changes::ChangeDecoder;
use pgfanout::capture::pgoutput::decode;

fuzz_target!(|data: &[u8]| {
    // Several messages in one input, split at a marker byte, through one change decoder,
    // so that relations, transactions and rows meet.
    let mut changes = ChangeDecoder::new();
    for (i, message) in data.split(|b| *b == 0xfe).enumerate() {
        if let Ok(m) = decode(&Bytes::copy_from_slice(message)) {
            let _ = changes.on_message(i as u64, m);
        }
    }
});
