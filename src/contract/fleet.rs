//! The fleet's contracts: a registered device as devices read it, and the confirmation of
//! an instruction on the fleet.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One device of the registry, as published on the fleet topic (never its key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetDevice {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub subscription: Option<String>,
    /// Microseconds since the Unix epoch, by PostgreSQL's clock.
    pub registered_at: i64,
    #[serde(default)]
    pub retired_at: Option<i64>,
    pub key_fingerprint: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfirmationStatus {
    /// Final: every active device has applied the instruction's commit.
    Applied,
    /// Not final: the deadline passed with devices still missing.
    Pending,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MissingDevice {
    pub device_id: String,
    pub applied_lsn: i64,
    pub lag_bytes: i64,
    #[serde(default)]
    pub last_seen: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Confirmation {
    pub instruction_id: String,
    pub status: ConfirmationStatus,
    pub commit_lsn: i64,
    pub devices: i32,
    pub missing: Vec<MissingDevice>,
    #[serde(default)]
    pub slowest_device: Option<String>,
    #[serde(default)]
    pub last_applied_at: Option<i64>,
    pub committed_at: i64,
    pub confirmed_at: i64,
}
