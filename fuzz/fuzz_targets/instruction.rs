//! Any bytes on the instructions topic decode to an instruction or to an error (the
//! executor dead-letters it), never a panic; what decodes encodes to bytes that decode and
//! encode to themselves.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgfanout::contract::codec::{decode_instruction, encode_instruction};

fuzz_target!(|data: &[u8]| {
    if let Ok(instruction) = decode_instruction(data) {
        let once = encode_instruction(&instruction).expect("a decoded instruction encodes");
        let twice = encode_instruction(&decode_instruction(&once).expect("and decodes again")).expect("and encodes");
        assert_eq!(once, twice);
    }
});
