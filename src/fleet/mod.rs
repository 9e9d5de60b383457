//! The fleet: the registry of target devices ([`registry`], in PostgreSQL), its copy on the
//! compacted fleet topic that devices read to check their own registration ([`topic`]), and
//! the per-device keys that make acknowledgements unforgeable ([`signature`]). The
//! confirmation service that counts the fleet's acknowledgements is [`crate::confirm`].

pub mod cli;
mod error;
pub mod registry;
pub mod signature;
pub mod status;
pub mod topic;

use tokio_postgres::Client;

use crate::config::KafkaSettings;
pub use error::FleetError;
use signature::DeviceKey;

/// Registers `id`, or gives it a new key when it is registered already, publishes it on the
/// fleet topic and returns its key: for the tools that start devices of their own (the
/// demo, the tests, the benchmarks).
pub async fn register_for_local_run(client: &Client, kafka: &KafkaSettings, id: &str) -> Result<DeviceKey, FleetError> {
    registry::ensure(client).await?;
    let device = match registry::add(client, id, &Default::default(), None).await {
        Err(FleetError::AlreadyRegistered(_)) => registry::rotate_key(client, id).await?,
        outcome => outcome?,
    };
    topic::publish(kafka, std::slice::from_ref(&device)).await?;
    Ok(device.key)
}
