//! The fleet registry in PostgreSQL, `pgfanout.devices`: the source of truth for which
//! devices the confirmations wait on. `fleet add|retire|rotate-key` change it and publish
//! the changed device on the fleet topic ([`super::topic`]); the confirmation service
//! reads it, and records there what it last saw of every device.

use std::collections::BTreeMap;

use tokio_postgres::{Client, Row};

use super::error::FleetError;
use super::signature::DeviceKey;
use crate::contract::FleetDevice;

pub const REGISTRY_SQL: &str = "
CREATE SCHEMA IF NOT EXISTS pgfanout;
CREATE TABLE IF NOT EXISTS pgfanout.devices (
    id text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9._-]{1,128}$'),
    labels jsonb NOT NULL DEFAULT '{}',
    subscription text,
    -- the key the device signs its acknowledgements with (see fleet::signature)
    ack_key bytea NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now(),
    retired_at timestamptz,
    -- the confirmation service's last reading: the device's watermark, and when the service
    -- received its last valid acknowledgement (the service's clock, never the device's)
    watermark_lsn bigint,
    last_seen_at timestamptz
);
-- How long the first instruction the device misses has waited, and when the service last
-- wrote these readings.
ALTER TABLE pgfanout.devices ADD COLUMN IF NOT EXISTS lag_seconds double precision;
ALTER TABLE pgfanout.devices ADD COLUMN IF NOT EXISTS observed_at timestamptz;
-- The confirmation service's positions: where it resumes reading results and acknowledgements,
-- and from where it reads back the confirmations it already published.
CREATE TABLE IF NOT EXISTS pgfanout.confirm_positions (
    topic text NOT NULL,
    partition int NOT NULL,
    next_offset bigint NOT NULL,
    PRIMARY KEY (topic, partition)
);
";

pub async fn ensure(client: &Client) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(REGISTRY_SQL).await
}

/// A device as the registry holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisteredDevice {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub subscription: Option<String>,
    pub key: DeviceKey,
    /// Microseconds since the Unix epoch.
    pub registered_at: i64,
    pub retired_at: Option<i64>,
    pub watermark: Option<i64>,
    pub last_seen_at: Option<i64>,
}

impl RegisteredDevice {
    pub fn active(&self) -> bool {
        self.retired_at.is_none()
    }

    /// What the fleet topic publishes of it.
    pub fn public(&self) -> FleetDevice {
        FleetDevice {
            id: self.id.clone(),
            labels: self.labels.clone(),
            subscription: self.subscription.clone(),
            registered_at: self.registered_at,
            retired_at: self.retired_at,
            key_fingerprint: self.key.fingerprint(),
        }
    }
}

const COLUMNS: &str = "id, labels::text, subscription, ack_key,
    (extract(epoch FROM registered_at) * 1e6)::int8, (extract(epoch FROM retired_at) * 1e6)::int8,
    watermark_lsn, (extract(epoch FROM last_seen_at) * 1e6)::int8";

fn from_row(row: &Row) -> Result<RegisteredDevice, FleetError> {
    let labels: String = row.get(1);
    Ok(RegisteredDevice {
        id: row.get(0),
        labels: serde_json::from_str(&labels).map_err(|e| FleetError::Labels(format!("{labels}: {e}")))?,
        subscription: row.get(2),
        key: DeviceKey::from_bytes(row.get(3)),
        registered_at: row.get(4),
        retired_at: row.get(5),
        watermark: row.get(6),
        last_seen_at: row.get(7),
    })
}

/// Every registered device, retired ones included, by id.
pub async fn list(client: &Client) -> Result<Vec<RegisteredDevice>, FleetError> {
    let rows = client.query(&format!("SELECT {COLUMNS} FROM pgfanout.devices ORDER BY id"), &[]).await?;
    rows.iter().map(from_row).collect()
}

pub async fn get(client: &Client, id: &str) -> Result<RegisteredDevice, FleetError> {
    let row = client.query_opt(&format!("SELECT {COLUMNS} FROM pgfanout.devices WHERE id = $1"), &[&id]).await?;
    from_row(&row.ok_or_else(|| FleetError::NotRegistered(id.to_string()))?)
}

/// Registers a device with a fresh key; its key is in the answer, and nowhere else but the
/// registry.
pub async fn add(
    client: &Client,
    id: &str,
    labels: &BTreeMap<String, String>,
    subscription: Option<&str>,
) -> Result<RegisteredDevice, FleetError> {
    check_id(id)?;
    let key = DeviceKey::generate()?;
    let labels = serde_json::to_string(labels).map_err(|e| FleetError::Labels(e.to_string()))?;
    let inserted = client
        .execute(
            "INSERT INTO pgfanout.devices (id, labels, subscription, ack_key) VALUES ($1, $2::text::jsonb, $3, $4)
             ON CONFLICT (id) DO NOTHING",
            &[&id, &labels, &subscription, &key.as_bytes()],
        )
        .await?;
    if inserted == 0 {
        return Err(FleetError::AlreadyRegistered(id.to_string()));
    }
    get(client, id).await
}

/// Retires a device: from now on no confirmation waits for it. Its id stays taken.
pub async fn retire(client: &Client, id: &str) -> Result<RegisteredDevice, FleetError> {
    client.execute("UPDATE pgfanout.devices SET retired_at = coalesce(retired_at, now()) WHERE id = $1", &[&id]).await?;
    get(client, id).await
}

/// Gives a device a new key; acknowledgements signed with the old one stop counting.
pub async fn rotate_key(client: &Client, id: &str) -> Result<RegisteredDevice, FleetError> {
    let key = DeviceKey::generate()?;
    let n = client.execute("UPDATE pgfanout.devices SET ack_key = $2 WHERE id = $1", &[&id, &key.as_bytes()]).await?;
    if n == 0 {
        return Err(FleetError::NotRegistered(id.to_string()));
    }
    get(client, id).await
}

/// The rule the registry's CHECK enforces, checked first for a clearer message.
pub fn check_id(id: &str) -> Result<(), FleetError> {
    let ok = (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(FleetError::InvalidId(id.to_string()))
    }
}

/// Parses `key=value` labels as `fleet add --label` takes them.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("label {s:?} is not key=value")),
    }
}
