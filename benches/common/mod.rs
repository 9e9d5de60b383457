//! The benchmarks' shared part is `pgfanout::test_support::bench`; this module names it for
//! `benches/capture.rs`, which says `mod common;`.

pub use pgfanout::test_support::bench::{env, kafka_settings, start, Process};
