//! Acknowledgements no device can forge: each device signs its acknowledgements with its own
//! key (HMAC-SHA256), held by the device and in the registry, and the confirmation service
//! counts an acknowledgement only if the signature is right for the device it names.
//!
//! Why signatures rather than one topic per device with ACLs: they work the same on every
//! Kafka-protocol broker, including ones without authorisation, need no broker
//! administration per device, and keep one acknowledgement topic whatever the fleet's size.
//! A stolen device key lets its holder speak only for that device; `fleet rotate-key`
//! replaces it.

use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::sign::Signer;
use sha2::{Digest, Sha256};

use crate::contract::DeviceAck;

/// Bytes of a device key.
pub const KEY_LEN: usize = 32;

/// A device's secret key.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceKey(Vec<u8>);

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceKey({})", self.fingerprint())
    }
}

impl DeviceKey {
    pub fn generate() -> Result<DeviceKey, ErrorStack> {
        let mut key = vec![0; KEY_LEN];
        openssl::rand::rand_bytes(&mut key)?;
        Ok(DeviceKey(key))
    }

    pub fn from_bytes(bytes: Vec<u8>) -> DeviceKey {
        DeviceKey(bytes)
    }

    /// Parses the hex form that `fleet add` prints.
    pub fn parse(hex: &str) -> Result<DeviceKey, String> {
        let hex = hex.trim();
        let bytes = decode_hex(hex).ok_or("a device key is hex digits, as `pgfanout fleet add` prints it")?;
        if bytes.len() != KEY_LEN {
            return Err(format!("a device key is {KEY_LEN} bytes ({} hex digits), this one {}", KEY_LEN * 2, bytes.len()));
        }
        Ok(DeviceKey(bytes))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        encode_hex(&self.0)
    }

    /// What the fleet topic shows of the key: enough for a device to tell it holds the
    /// registered key, useless for signing.
    pub fn fingerprint(&self) -> String {
        encode_hex(&Sha256::digest(&self.0)[..8])
    }

    fn mac(&self, ack: &DeviceAck) -> Result<Vec<u8>, ErrorStack> {
        let pkey = PKey::hmac(&self.0)?;
        let mut signer = Signer::new(MessageDigest::sha256(), &pkey)?;
        signer.update(b"pgfanout device ack v1\0")?;
        signer.update(&(ack.device_id.len() as u64).to_be_bytes())?;
        signer.update(ack.device_id.as_bytes())?;
        signer.update(&ack.applied_lsn.to_be_bytes())?;
        signer.update(&ack.at.to_be_bytes())?;
        signer.sign_to_vec()
    }

    /// Sets `ack.signature`.
    pub fn sign(&self, ack: &mut DeviceAck) -> Result<(), ErrorStack> {
        ack.signature = Some(self.mac(ack)?.into());
        Ok(())
    }

    /// Whether `ack` carries this key's signature (compared in constant time).
    pub fn verifies(&self, ack: &DeviceAck) -> bool {
        match (&ack.signature, self.mac(ack)) {
            (Some(sig), Ok(expected)) => sig.len() == expected.len() && openssl::memcmp::eq(sig, &expected),
            _ => false,
        }
    }
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(device: &str, lsn: i64) -> DeviceAck {
        DeviceAck { device_id: device.into(), applied_lsn: lsn, at: 17, signature: None }
    }

    #[test]
    fn only_the_devices_own_key_signs_its_acknowledgements() {
        let (a, b) = (DeviceKey::generate().unwrap(), DeviceKey::generate().unwrap());
        let mut signed = ack("a", 100);
        a.sign(&mut signed).unwrap();
        assert!(a.verifies(&signed));
        assert!(!b.verifies(&signed), "another device's key");
        assert!(!a.verifies(&ack("a", 100)), "no signature");
        for forged in [
            DeviceAck { applied_lsn: 101, ..signed.clone() },
            DeviceAck { device_id: "b".into(), ..signed.clone() },
            DeviceAck { at: 18, ..signed.clone() },
        ] {
            assert!(!a.verifies(&forged), "{forged:?} passed");
        }
    }

    #[test]
    fn keys_round_trip_through_hex_and_bad_ones_are_refused() {
        let k = DeviceKey::generate().unwrap();
        assert_eq!(DeviceKey::parse(&k.to_hex()).unwrap(), k);
        assert_eq!(k.fingerprint().len(), 16);
        assert!(DeviceKey::parse("abc").is_err());
        assert!(DeviceKey::parse(&"zz".repeat(KEY_LEN)).is_err());
        assert!(DeviceKey::parse(&"00".repeat(KEY_LEN - 1)).is_err());
        assert!(DeviceKey::parse("é").is_err());
    }
}
