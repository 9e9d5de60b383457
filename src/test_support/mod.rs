//! The harness of the integration tests and the benchmarks (feature `test-support`, which
//! the crate's dev-dependency on itself turns on for them).
//!
//! Tests run against the real thing: a PostgreSQL and a Kafka-protocol broker started by
//! `deploy/local/test.sh`, which exports their addresses ([`env`]), with one fresh database
//! and one topic prefix per test ([`Pipeline`]) and the `pgfanout` binary run as child
//! processes ([`process`]). A test that kills and restarts a service gets one of its own
//! ([`services`]). Every wait polls with a deadline ([`wait`]), never a bare sleep.

pub mod bench;
pub mod clock;
mod convergence;
pub mod env;
pub mod fleet;
pub mod http;
mod pipeline;
pub mod process;
mod results;
pub mod services;
pub mod sql;
mod topics;
pub mod wait;

pub use env::{required_env, unique_name};
pub use pipeline::Pipeline;
pub use sql::{logged_count, logged_ids, slot_streaming, sql_client};
pub use topics::TopicRecord;
pub use wait::{wait_for, Deadline, TIMEOUT};
