//! The sample workload of the demo and the tests: two tables and a reproducible mix of
//! inserts, updates, upserts and deletes (some instructions with several operations).

use std::collections::BTreeSet;

use crate::contract::{now_micros, Field, Instruction, Operation, OperationKind, Value};

/// Tables of the sample workload and the publication that covers them.
pub fn schema_sql(publication: &str) -> String {
    let ident = crate::quote::quote_ident(publication);
    let literal = crate::quote::quote_literal(publication);
    format!(
        "CREATE TABLE IF NOT EXISTS public.items (
             id bigint PRIMARY KEY,
             name text NOT NULL,
             qty integer NOT NULL,
             price numeric(12,2),
             tags jsonb,
             updated_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE IF NOT EXISTS public.sites (
             code text PRIMARY KEY,
             city text,
             active boolean NOT NULL DEFAULT true,
             lat double precision,
             payload bytea);
         DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = {literal}) THEN
                 CREATE PUBLICATION {ident} FOR TABLE public.items, public.sites;
             END IF;
         END $$;"
    )
}

/// A small, seedable generator (SplitMix64): reproducible workloads without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// Generates `count` instructions. Keys are random, so repeated runs on the same database
/// do not collide; updates and deletes target rows this workload inserted.
pub struct Workload {
    rng: Rng,
    issued_by: String,
    items: Vec<i64>,
    sites: Vec<String>,
}

impl Workload {
    pub fn new(seed: u64, issued_by: &str) -> Self {
        Workload { rng: Rng::new(seed), issued_by: issued_by.to_string(), items: Vec::new(), sites: Vec::new() }
    }

    pub fn instructions(&mut self, count: usize) -> Vec<Instruction> {
        (0..count).map(|_| self.instruction()).collect()
    }

    fn instruction(&mut self) -> Instruction {
        let n_ops = if self.rng.below(10) == 0 { 2 } else { 1 };
        let operations = (0..n_ops).map(|_| self.operation()).collect();
        let id = uuid::Builder::from_random_bytes({
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&self.rng.next_u64().to_le_bytes());
            b[8..].copy_from_slice(&self.rng.next_u64().to_le_bytes());
            b
        })
        .into_uuid();
        Instruction {
            instruction_id: id.to_string(),
            issued_by: self.issued_by.clone(),
            issued_at: now_micros(),
            operations,
            target: None,
        }
    }

    fn operation(&mut self) -> Operation {
        if self.rng.below(2) == 0 {
            self.item_operation()
        } else {
            self.site_operation()
        }
    }

    fn pick(&mut self, len: usize) -> Option<usize> {
        (len > 0).then(|| self.rng.below(len as u64) as usize)
    }

    fn item_operation(&mut self) -> Operation {
        let roll = self.rng.below(100);
        let values = |rng: &mut Rng| {
            vec![
                field("name", Value::String(format!("item-{}", rng.below(1_000_000)))),
                field("qty", Value::Long(rng.below(1000) as i64)),
                field("price", Value::String(format!("{}.{:02}", rng.below(10_000), rng.below(100)))),
                field(
                    "tags",
                    if rng.below(3) == 0 { Value::Null } else { Value::String(format!("{{\"batch\": {}}}", rng.below(50))) },
                ),
            ]
        };
        match (roll, self.pick(self.items.len())) {
            (0..40, _) | (_, None) => {
                let id = (self.rng.next_u64() >> 2) as i64;
                self.items.push(id);
                op(OperationKind::Insert, "public.items", field("id", Value::Long(id)), values(&mut self.rng))
            }
            (40..65, Some(i)) => {
                let id = self.items[i];
                op(
                    OperationKind::Update,
                    "public.items",
                    field("id", Value::Long(id)),
                    vec![field("qty", Value::Long(self.rng.below(1000) as i64))],
                )
            }
            (65..85, Some(i)) => {
                let id = if self.rng.below(2) == 0 {
                    self.items[i]
                } else {
                    let id = (self.rng.next_u64() >> 2) as i64;
                    self.items.push(id);
                    id
                };
                op(OperationKind::Upsert, "public.items", field("id", Value::Long(id)), values(&mut self.rng))
            }
            (_, Some(i)) => {
                let id = self.items.swap_remove(i);
                op(OperationKind::Delete, "public.items", field("id", Value::Long(id)), vec![])
            }
        }
    }

    fn site_operation(&mut self) -> Operation {
        let roll = self.rng.below(100);
        let values = |rng: &mut Rng| {
            let payload: Vec<u8> = (0..rng.below(24)).map(|_| rng.below(256) as u8).collect();
            vec![
                field("city", Value::String(["Lyon", "Osaka", "Quito", "Tromsø", "Cork"][rng.below(5) as usize].to_string())),
                field("active", Value::Boolean(rng.below(4) != 0)),
                field("lat", Value::Double((rng.below(180_000) as f64) / 1000.0 - 90.0)),
                field("payload", if payload.is_empty() { Value::Null } else { Value::Bytes(payload) }),
            ]
        };
        match (roll, self.pick(self.sites.len())) {
            (0..45, _) | (_, None) => {
                let code = format!("S{:016x}", self.rng.next_u64());
                self.sites.push(code.clone());
                op(OperationKind::Upsert, "public.sites", field("code", Value::String(code)), values(&mut self.rng))
            }
            (45..75, Some(i)) => {
                let code = self.sites[i].clone();
                op(
                    OperationKind::Update,
                    "public.sites",
                    field("code", Value::String(code)),
                    vec![field("active", Value::Boolean(self.rng.below(2) == 0))],
                )
            }
            (_, Some(i)) => {
                let code = self.sites.swap_remove(i);
                op(OperationKind::Delete, "public.sites", field("code", Value::String(code)), vec![])
            }
        }
    }
}

fn field(name: &str, value: Value) -> Field {
    Field { name: name.to_string(), value }
}

fn op(kind: OperationKind, table: &str, key: Field, values: Vec<Field>) -> Operation {
    Operation { op: kind, table: table.to_string(), key: vec![key], values, expect: Vec::new() }
}

/// Distinct operation kinds and tables in a workload (used to check the mix).
pub fn mix(instructions: &[Instruction]) -> (BTreeSet<&'static str>, BTreeSet<String>) {
    let ops = instructions.iter().flat_map(|i| i.operations.iter().map(|o| o.op.as_str())).collect();
    let tables = instructions.iter().flat_map(|i| i.operations.iter().map(|o| o.table.clone())).collect();
    (ops, tables)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_is_reproducible_and_mixed() {
        let a = Workload::new(7, "d").instructions(500);
        let b = Workload::new(7, "d").instructions(500);
        assert_eq!(
            a.iter().map(|i| &i.instruction_id).collect::<Vec<_>>(),
            b.iter().map(|i| &i.instruction_id).collect::<Vec<_>>()
        );
        let (ops, tables) = mix(&a);
        assert_eq!(ops.into_iter().collect::<Vec<_>>(), vec!["delete", "insert", "update", "upsert"]);
        assert_eq!(tables.len(), 2);
        assert!(a.iter().any(|i| i.operations.len() == 2));
    }
}
