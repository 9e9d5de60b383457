use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    pgfanout::cli::run(pgfanout::cli::Cli::parse())
}
