//! Any bytes on the deltas topic decode to a delta or to an error (the device records it
//! as rejected), never a panic; the device's in-place reader and the serde decoder accept
//! exactly the same records and agree on them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgfanout::contract::codec::{decode_delta, decode_delta_view};

fuzz_target!(|data: &[u8]| {
    let owned = decode_delta(data);
    let view = decode_delta_view(data);
    assert_eq!(owned.is_ok(), view.is_ok(), "the two decoders disagree on acceptance");
    if let (Ok(owned), Ok(view)) = (owned, view) {
        // Compared as text: a NaN double is equal to itself there.
        assert_eq!(format!("{:?}", owned.view()), format!("{view:?}"));
    }
});
