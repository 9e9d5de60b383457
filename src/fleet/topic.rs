//! The registry's copy on the fleet topic: every change `fleet` makes is published there,
//! keyed by device id, and the confirmation service republishes the whole registry when it
//! starts, so the topic converges on PostgreSQL's table even after a lost publish. A
//! starting device reads it whole to check that it is registered, active and holds the
//! registered key: devices talk to Kafka only.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::Offset;

use super::error::FleetError;
use super::registry::RegisteredDevice;
use super::signature::DeviceKey;
use crate::config::KafkaSettings;
use crate::contract::codec::{decode_fleet_device, encode_fleet_device};
use crate::contract::FleetDevice;
use crate::kafka::{self, ClientRole};

/// Publishes devices on the fleet topic and waits for Kafka's acknowledgement.
pub async fn publish(settings: &KafkaSettings, devices: &[RegisteredDevice]) -> Result<(), FleetError> {
    let producer: FutureProducer = kafka::client_config(settings, ClientRole::Producer).create()?;
    let topic = settings.topics().fleet;
    let payloads = devices.iter().map(|d| encode_fleet_device(&d.public())).collect::<Result<Vec<_>, _>>()?;
    let sends = devices.iter().zip(&payloads).map(|(d, payload)| {
        let record = FutureRecord::to(&topic).key(d.id.as_bytes()).payload(payload);
        producer.send(record, Timeout::After(Duration::from_secs(30)))
    });
    for sent in futures::future::join_all(sends).await {
        sent.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// The newest record of every device on the fleet topic. Blocking.
pub fn read_blocking(settings: &KafkaSettings) -> Result<HashMap<String, FleetDevice>, FleetError> {
    let topic = settings.topics().fleet;
    let mut out = HashMap::new();
    let read = kafka::read_to_end(
        settings,
        &topic,
        |_, _| Ok(Offset::Beginning),
        Duration::from_secs(10),
        |m| {
            // A record that does not decode is skipped: the registry in PostgreSQL is the
            // truth, and the confirmation service republishes it.
            if let Some(Ok(device)) = m.payload().map(decode_fleet_device) {
                out.insert(device.id.clone(), device);
            }
        },
    )?;
    read.ok_or(FleetError::NoTopic(topic))?;
    Ok(out)
}

/// Refuses a device that is not registered, retired, or holds a key other than its
/// registered one. Blocking.
pub fn check_registration_blocking(settings: &KafkaSettings, id: &str, key: &DeviceKey) -> Result<FleetDevice, FleetError> {
    let device = read_blocking(settings)?.remove(id).ok_or_else(|| FleetError::NotRegistered(id.to_string()))?;
    check(device, key)
}

fn check(device: FleetDevice, key: &DeviceKey) -> Result<FleetDevice, FleetError> {
    if device.retired_at.is_some() {
        return Err(FleetError::Retired(device.id));
    }
    let held = key.fingerprint();
    if device.key_fingerprint != held {
        return Err(FleetError::WrongKey { id: device.id, registered: device.key_fingerprint, held });
    }
    Ok(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_active_device_with_its_registered_key_passes() {
        let key = DeviceKey::generate().unwrap();
        let device = FleetDevice {
            id: "d".into(),
            labels: Default::default(),
            subscription: None,
            registered_at: 1,
            retired_at: None,
            key_fingerprint: key.fingerprint(),
        };
        assert!(check(device.clone(), &key).is_ok());
        let other = DeviceKey::generate().unwrap();
        assert!(matches!(check(device.clone(), &other), Err(FleetError::WrongKey { .. })));
        assert!(matches!(check(FleetDevice { retired_at: Some(2), ..device }, &key), Err(FleetError::Retired(_))));
    }
}
