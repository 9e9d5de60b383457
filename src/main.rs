use std::process::ExitCode;

use clap::Parser;

/// Decoding and applying deltas allocate many small strings; mimalloc serves them faster
/// than the system allocator (see BENCHMARKS.md, device benchmark).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    pgfanout::cli::run(pgfanout::cli::Cli::parse())
}
