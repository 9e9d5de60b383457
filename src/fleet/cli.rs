//! `pgfanout fleet …`: manage the registry, from any machine that reaches PostgreSQL and
//! Kafka.

use std::collections::BTreeMap;

use super::error::FleetError;
use super::registry::{self, RegisteredDevice};
use super::status::rfc3339;
use super::topic;
use crate::config::{KafkaSettings, PostgresSettings};
use crate::pg;

#[derive(Debug, clap::Subcommand)]
pub enum FleetCommand {
    /// Register a device; prints its key, shown this once (the device needs it as
    /// `PGFANOUT_DEVICE_KEY`).
    Add {
        /// The device's id, as it will be started with `--id`.
        id: String,
        /// A label such as `site=berlin` (repeatable).
        #[arg(long = "label", value_parser = registry::parse_label)]
        labels: Vec<(String, String)>,
        /// The device's subscription (which share of the data it gets).
        #[arg(long = "subscription")]
        subscription: Option<String>,
        /// Print only the key (for scripts).
        #[arg(long = "key-only")]
        key_only: bool,
    },
    /// Retire a device: no confirmation waits for it from now on.
    Retire { id: String },
    /// Give a device a new key; its acknowledgements count again once it runs with it.
    RotateKey {
        id: String,
        /// Print only the key (for scripts).
        #[arg(long = "key-only")]
        key_only: bool,
    },
    /// The registered devices.
    List {
        /// One JSON object per device instead of a table.
        #[arg(long = "json")]
        json: bool,
    },
    /// Each device's watermark, lag, last contact and state, as the confirmation service
    /// last recorded them.
    Status {
        /// One JSON object per device instead of a table.
        #[arg(long = "json")]
        json: bool,
    },
}

pub async fn run(kafka: &KafkaSettings, postgres: &PostgresSettings, command: FleetCommand) -> Result<(), FleetError> {
    let client = pg::connect(&postgres.conninfo).await?;
    registry::ensure(&client).await?;
    let changed = match command {
        FleetCommand::Add { id, labels, subscription, key_only } => {
            let labels: BTreeMap<String, String> = labels.into_iter().collect();
            let device = registry::add(&client, &id, &labels, subscription.as_deref()).await?;
            print_key(&device, key_only, "registered");
            device
        }
        FleetCommand::Retire { id } => {
            let device = registry::retire(&client, &id).await?;
            println!("device {id} is retired; no confirmation waits for it");
            device
        }
        FleetCommand::RotateKey { id, key_only } => {
            let device = registry::rotate_key(&client, &id).await?;
            print_key(&device, key_only, "has a new key");
            device
        }
        FleetCommand::List { json } => {
            print!("{}", render_list(&registry::list(&client).await?, json));
            return Ok(());
        }
        FleetCommand::Status { json } => {
            print!("{}", super::status::read(&client).await?.render(json));
            return Ok(());
        }
    };
    topic::publish(kafka, &[changed]).await
}

fn print_key(device: &RegisteredDevice, key_only: bool, what: &str) {
    let key = device.key.to_hex();
    if key_only {
        println!("{key}");
    } else {
        println!("device {} {what}; its key (shown only now):\n{key}", device.id);
        println!("start it with: PGFANOUT_DEVICE_KEY={key} pgfanout device --id {} --store …", device.id);
    }
}

fn render_list(devices: &[RegisteredDevice], json: bool) -> String {
    let mut out = String::new();
    if json {
        for d in devices {
            let line = serde_json::json!({
                "id": d.id,
                "state": if d.active() { "active" } else { "retired" },
                "labels": d.labels,
                "subscription": d.subscription,
                "registered_at": rfc3339(d.registered_at),
                "retired_at": d.retired_at.map(rfc3339),
                "key_fingerprint": d.key.fingerprint(),
            });
            out.push_str(&line.to_string());
            out.push('\n');
        }
        return out;
    }
    out.push_str(&format!(
        "{:<24} {:<8} {:<30} {:<12} {:<20} {}\n",
        "DEVICE", "STATE", "LABELS", "SUBSCRIPTION", "REGISTERED", "KEY"
    ));
    for d in devices {
        let labels: Vec<String> = d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!(
            "{:<24} {:<8} {:<30} {:<12} {:<20} {}\n",
            d.id,
            if d.active() { "active" } else { "retired" },
            labels.join(","),
            d.subscription.as_deref().unwrap_or("-"),
            rfc3339(d.registered_at),
            d.key.fingerprint()
        ));
    }
    out
}
