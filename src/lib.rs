//! pgfanout: instructions applied once to PostgreSQL, their changes read from the WAL and
//! fanned out through Kafka to every device's SQLite store.
//!
//! Components (one subcommand each): [`executor`], [`capture`], [`device`], plus
//! [`submit`], [`verify`] and [`demo`]. The data contracts are in [`contract`], Kafka
//! client set-up in [`kafka`], PostgreSQL helpers in [`pg`]; every option is listed in
//! `docs/configuration.md`, rendered by [`config_reference`]. With the `test-support`
//! feature, `test_support` is the harness of the integration tests and benchmarks.

pub mod backoff;
pub mod byte_reader;
pub mod capture;
pub mod cli;
pub mod component;
pub mod config;
pub mod config_reference;
pub mod confirm;
pub mod conninfo;
pub mod contract;
pub mod demo;
pub mod device;
pub mod error_kind;
pub mod executor;
pub mod fleet;
pub mod kafka;
pub mod pg;
pub mod quote;
pub mod shutdown;
pub mod sqlstate;
pub mod submit;
pub mod telemetry;
#[cfg(feature = "test-support")]
pub mod test_support;
pub mod tls;
pub mod verify;
pub mod workload;
