//! The fleet: registration, one confirmation per instruction on the confirmations topic,
//! acknowledgements no device can forge. On real parts: PostgreSQL, the broker, SQLite
//! stores, every component a process of its own.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use pgfanout::contract::codec::encode_device_ack;
use pgfanout::contract::{now_micros, Confirmation, ConfirmationStatus, DeviceAck, InstructionResult, ResultStatus, Target};
use pgfanout::fleet::signature::DeviceKey;
use pgfanout::submit::produce_instructions;
use pgfanout::test_support::fleet::Confirmations;
use pgfanout::test_support::http::{free_addr, metric_value};
use pgfanout::test_support::{wait_for, Pipeline};
use pgfanout::workload::Workload;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;

/// What the confirmations topic said of each instruction so far.
#[derive(Default)]
struct Seen {
    finals: HashMap<String, Vec<Confirmation>>,
    pending: HashMap<String, Vec<Confirmation>>,
}

impl Seen {
    /// Reads confirmations until `done` holds or `timeout` passes; `check` sees each batch
    /// as soon as it is read.
    fn read_until(
        &mut self,
        from: &Confirmations,
        timeout: Duration,
        mut check: impl FnMut(&[Confirmation]),
        done: impl Fn(&Seen) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            if Instant::now() > deadline {
                return false;
            }
            let batch = from.poll(Duration::from_millis(200));
            check(&batch);
            for c in batch {
                let into = if c.status == ConfirmationStatus::Applied { &mut self.finals } else { &mut self.pending };
                into.entry(c.instruction_id.clone()).or_default().push(c);
            }
        }
        true
    }

    fn all_final(&self, ids: &HashSet<String>) -> bool {
        ids.iter().all(|id| self.finals.contains_key(id))
    }
}

fn committed(results: &HashMap<String, InstructionResult>) -> HashSet<String> {
    results.values().filter(|r| r.status == ResultStatus::Committed).map(|r| r.instruction_id.clone()).collect()
}

/// Every final names exactly one confirmation per committed instruction, and none for
/// anything else.
fn assert_exactly_one_final(seen: &Seen, committed: &HashSet<String>) {
    for id in committed {
        let n = seen.finals.get(id).map_or(0, Vec::len);
        assert_eq!(n, 1, "instruction {id} has {n} final confirmations");
    }
    let strays: Vec<&String> = seen.finals.keys().filter(|id| !committed.contains(*id)).collect();
    assert!(strays.is_empty(), "finals for instructions not committed: {strays:?}");
}

/// Submits `n` instructions, waits for their results, returns the committed ids.
async fn round(p: &mut Pipeline, workload: &mut Workload, n: usize) -> HashSet<String> {
    let instructions = workload.instructions(n);
    committed(&p.submit_and_wait(&instructions).await)
}

async fn fleet_of(name: &str, devices: &[&str], confirm: &[&str]) -> Pipeline {
    let mut p = Pipeline::new(name).await;
    p.start_executor();
    p.start_capture().await;
    for d in devices {
        p.start_device(d, &["--ack-interval-ms", "10"]);
    }
    p.start_confirm(confirm).await;
    p
}

/// Five registered devices, 2,000 instructions: each committed one gets exactly one final
/// `applied`, and when it is read every device's store already holds the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_instruction_is_confirmed_once_and_only_after_every_store_applied_it() {
    const DEVICES: [&str; 5] = ["d1", "d2", "d3", "d4", "d5"];
    let mut p = fleet_of("fleet_once", &DEVICES, &[]).await;
    let confirmations = p.confirmations();
    let instructions = Workload::new(19, "fleet").instructions(2_000);
    let results = p.submit_and_wait(&instructions).await;
    let committed = committed(&results);
    assert!(committed.len() > 1_500, "only {} of 2,000 committed", committed.len());
    let mut early = Vec::new();
    let mut seen = Seen::default();
    let finished = seen.read_until(
        &confirmations,
        Duration::from_secs(120),
        |batch| {
            let finals: Vec<&Confirmation> = batch.iter().filter(|c| c.status == ConfirmationStatus::Applied).collect();
            if finals.is_empty() {
                return;
            }
            let stores: Vec<(&str, i64)> = DEVICES.iter().map(|d| (*d, p.store_watermark(d))).collect();
            for c in finals {
                for (d, applied) in &stores {
                    if *applied < c.commit_lsn {
                        early.push(format!("{} at {} confirmed while {d} had applied {applied}", c.instruction_id, c.commit_lsn));
                    }
                }
                assert_eq!(c.devices, 5, "{c:?}");
            }
        },
        |seen| seen.all_final(&committed),
    );
    assert!(finished, "{} of {} committed instructions confirmed", seen.finals.len(), committed.len());
    // Anything repeated would follow soon.
    seen.read_until(&confirmations, Duration::from_secs(3), |_| {}, |_| false);
    assert!(early.is_empty(), "{} confirmations came early, first: {}", early.len(), early[0]);
    assert_exactly_one_final(&seen, &committed);
    p.assert_all_running();
}

/// A stopped device holds confirmations back: `pending` names it after the deadline, the
/// final `applied` follows once it runs again. A retired device holds nothing back, and
/// neither a retired nor an unregistered id, nor a wrong key, can start a device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_device_is_named_pending_until_it_catches_up_or_is_retired() {
    let metrics = free_addr();
    let mut p = fleet_of("fleet_pending", &["a", "b"], &["--deadline-secs", "2", "--metrics-addr", &metrics]).await;
    let confirmations = p.confirmations();
    let mut seen = Seen::default();
    let mut workload = Workload::new(23, "pending");

    let first = round(&mut p, &mut workload, 20).await;
    assert!(seen.read_until(&confirmations, Duration::from_secs(60), |_| {}, |s| s.all_final(&first)));

    p.stop("device-b");
    let second = round(&mut p, &mut workload, 10).await;
    let named = |s: &Seen, ids: &HashSet<String>| {
        ids.iter().all(|id| {
            s.pending.get(id).is_some_and(|c| c[0].missing.iter().map(|m| m.device_id.as_str()).collect::<Vec<_>>() == ["b"])
        })
    };
    assert!(
        seen.read_until(&confirmations, Duration::from_secs(60), |_| {}, |s| named(s, &second)),
        "no pending naming only b for every instruction"
    );
    assert!(second.iter().all(|id| !seen.finals.contains_key(id)), "applied while b was stopped");
    p.start_device("b", &["--ack-interval-ms", "10"]);
    assert!(seen.read_until(&confirmations, Duration::from_secs(60), |_| {}, |s| s.all_final(&second)));
    assert!(second.iter().all(|id| seen.finals[id][0].slowest_device.as_deref() == Some("b")));

    p.stop("device-b");
    let third = round(&mut p, &mut workload, 10).await;
    assert!(seen.read_until(&confirmations, Duration::from_secs(60), |_| {}, |s| named(s, &third)));
    let out = p.run_cli(&["fleet", "retire", "b"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(seen.read_until(&confirmations, Duration::from_secs(30), |_| {}, |s| s.all_final(&third)));
    assert!(third.iter().all(|id| seen.finals[id][0].devices == 1));
    // A retired device's gauges go blank; the active one's stay.
    let age = |d: &str| metric_value(&metrics, &format!("pgfanout_fleet_device_last_seen_age_seconds{{device=\"{d}\"}}"));
    wait_for("b's gauges blank once retired", Duration::from_secs(10), || async { age("b").is_nan().then_some(()) }).await;
    assert!(age("a") < 10.0, "a last seen {} s ago", age("a"));
    let all: HashSet<String> = first.iter().chain(&second).chain(&third).cloned().collect();
    seen.read_until(&confirmations, Duration::from_secs(2), |_| {}, |_| false);
    assert_exactly_one_final(&seen, &all);

    // Refused at start: retired, unregistered, a wrong key.
    let key_a = p.device_key("a");
    let other_key = DeviceKey::generate().unwrap().to_hex();
    for (id, key, says) in [
        ("b", key_a.as_str(), "retired"),
        ("ghost", key_a.as_str(), "not registered"),
        ("a", other_key.as_str(), "other than its registered"),
    ] {
        let store = p.dir.join(format!("refused-{id}.sqlite")).to_string_lossy().into_owned();
        let out = p.run_cli_with(&["device", "--id", id, "--store", &store], &[("PGFANOUT_DEVICE_KEY", key)]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(says), "device {id} with that key: {stderr}");
    }
    p.assert_all_running();
}

/// Devices whose clocks are an hour ahead and an hour behind (`faketime`) are judged by the
/// service's and the server's time, not their own: confirmed like the device on time, each
/// confirmation stamped by the service's clock, and all three shown `current`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_with_clocks_an_hour_off_are_confirmed_and_current() {
    let mut p = fleet_of("fleet_clocks", &["on_time"], &[]).await;
    p.start_device_shifted("ahead", "+1h", &["--ack-interval-ms", "10"]);
    p.start_device_shifted("behind", "-1h", &["--ack-interval-ms", "10"]);
    let confirmations = p.confirmations();
    let ids = round(&mut p, &mut Workload::new(29, "clocks"), 300).await;
    let mut seen = Seen::default();
    assert!(
        seen.read_until(&confirmations, Duration::from_secs(60), |_| {}, |s| s.all_final(&ids)),
        "{} of {} committed instructions confirmed",
        seen.finals.len(),
        ids.len()
    );
    seen.read_until(&confirmations, Duration::from_secs(2), |_| {}, |_| false);
    assert_exactly_one_final(&seen, &ids);
    assert!(seen.pending.is_empty(), "pending while every device ran: {:?}", seen.pending.keys().next());
    let now = now_micros();
    for c in seen.finals.values().flatten() {
        assert_eq!(c.devices, 3, "{c:?}");
        let off = [c.confirmed_at, c.last_applied_at.expect("the last device's time")].map(|t| (now - t).abs());
        assert!(off.iter().all(|us| *us < 120_000_000), "a time from a device's clock: {c:?}");
    }
    let states = wait_for("every device current in fleet status", Duration::from_secs(30), || async {
        let out = p.run_cli(&["fleet", "status", "--json"]).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let devices: Vec<serde_json::Value> =
            String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let fresh = |d: &serde_json::Value| d["last_seen"].as_i64().is_some_and(|t| (now_micros() - t).abs() < 10_000_000);
        let ok = devices.len() == 3 && devices.iter().all(|d| d["state"] == "current" && fresh(d));
        ok.then_some(devices)
    })
    .await;
    assert!(states.iter().all(|d| d["lag_seconds"].as_f64().is_some_and(|l| l < 5.0)), "{states:?}");
    p.assert_all_running();
}

/// Submits `n` instructions for `target`, waits for their results, returns the committed ids.
async fn targeted_round(p: &mut Pipeline, workload: &mut Workload, n: usize, target: Option<Target>) -> HashSet<String> {
    let mut instructions = workload.instructions(n);
    instructions.iter_mut().for_each(|i| i.target.clone_from(&target));
    committed(&p.submit_and_wait(&instructions).await)
}

/// An instruction for `site=berlin` waits for the devices in Berlin only, one for
/// `at_least=k` for any k devices; what the fleet cannot meet yet is `pending`, naming the
/// targeted devices missing, until it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_by_label_or_quorum_waits_for_those_devices_only() {
    let mut p = Pipeline::new("fleet_targets").await;
    p.start_executor();
    p.start_capture().await;
    for (id, site) in [("a", "site=berlin"), ("b", "site=berlin"), ("c", "site=paris")] {
        p.register(id, &[site]);
        p.start_device(id, &["--ack-interval-ms", "10"]);
    }
    p.start_confirm(&["--deadline-secs", "2"]).await;
    let confirmations = p.confirmations();
    let mut seen = Seen::default();
    let mut workload = Workload::new(31, "targets");
    let target = |site: Option<&str>, at_least: Option<i32>| {
        Some(Target { labels: site.map(|s| ("site".to_string(), s.to_string())).into_iter().collect(), at_least })
    };
    let missing = |s: &Seen, id: &String| -> Option<Vec<String>> {
        s.pending.get(id).map(|c| c[0].missing.iter().map(|m| m.device_id.clone()).collect())
    };

    p.stop("device-c");
    let berlin = targeted_round(&mut p, &mut workload, 10, target(Some("berlin"), None)).await;
    let everyone = targeted_round(&mut p, &mut workload, 10, None).await;
    let all_pending =
        |s: &Seen, ids: &HashSet<String>, names: &[&str]| ids.iter().all(|id| missing(s, id).is_some_and(|m| m == names));
    assert!(seen.read_until(
        &confirmations,
        Duration::from_secs(60),
        |_| {},
        |s| s.all_final(&berlin) && all_pending(s, &everyone, &["c"])
    ));
    assert!(berlin.iter().all(|id| seen.finals[id][0].devices == 2), "berlin: a and b");
    assert!(everyone.iter().all(|id| !seen.finals.contains_key(id)), "everyone waits for c");

    p.stop("device-b");
    let any_one = targeted_round(&mut p, &mut workload, 10, target(None, Some(1))).await;
    let two_in_berlin = targeted_round(&mut p, &mut workload, 10, target(Some("berlin"), Some(2))).await;
    let rome = targeted_round(&mut p, &mut workload, 5, target(Some("rome"), None)).await;
    assert!(seen.read_until(
        &confirmations,
        Duration::from_secs(60),
        |_| {},
        |s| s.all_final(&any_one) && all_pending(s, &two_in_berlin, &["b"]) && all_pending(s, &rome, &[])
    ));
    assert!(any_one.iter().all(|id| seen.finals[id][0].slowest_device.as_deref() == Some("a")));
    assert!(two_in_berlin.iter().chain(&rome).all(|id| !seen.finals.contains_key(id)));

    p.start_device("b", &["--ack-interval-ms", "10"]);
    p.start_device("c", &["--ack-interval-ms", "10"]);
    let met: HashSet<String> = everyone.iter().chain(&two_in_berlin).cloned().collect();
    assert!(seen.read_until(&confirmations, Duration::from_secs(60), |_| {}, |s| s.all_final(&met)));
    assert!(everyone.iter().all(|id| seen.finals[id][0].devices == 3));
    seen.read_until(&confirmations, Duration::from_secs(3), |_| {}, |_| false);
    assert!(rome.iter().all(|id| !seen.finals.contains_key(id)), "no device is in rome");
    let all: HashSet<String> = berlin.iter().chain(&met).chain(&any_one).cloned().collect();
    assert_exactly_one_final(&seen, &all);
    p.assert_all_running();
}

/// Acknowledgements in another device's name with the wrong key or none, and for an id not
/// registered, are not counted and show in the metric; the device's own signed one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_acknowledgements_move_no_confirmation() {
    let mut p = Pipeline::new("fleet_forged").await;
    p.start_executor();
    p.start_capture().await;
    p.start_device("a", &["--ack-interval-ms", "10"]);
    let key_b = DeviceKey::parse(&p.device_key("b")).unwrap();
    let metrics = free_addr();
    p.start_confirm(&["--metrics-addr", &metrics]).await;
    let confirmations = p.confirmations();
    let results = p.submit_and_wait(&Workload::new(29, "forged").instructions(5)).await;
    let ids = committed(&results);
    let top = results.values().filter_map(|r| r.commit_lsn).max().unwrap();

    let stranger = DeviceKey::generate().unwrap();
    let mut forged = vec![ack("b", top + 1_000_000, None), ack("b", top + 1_000_000, Some(&stranger))];
    forged.push(ack("ghost", top, Some(&stranger)));
    publish_acks(&p, &forged).await;
    let mut seen = Seen::default();
    seen.read_until(&confirmations, Duration::from_secs(4), |_| {}, |_| false);
    assert!(ids.iter().all(|id| !seen.finals.contains_key(id)), "a forged acknowledgement confirmed something");
    let refused = |reason: &str| metric_value(&metrics, &format!("pgfanout_confirm_acks_refused_total{{reason=\"{reason}\"}}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while (refused("signature"), refused("unregistered")) != (2.0, 1.0) {
        assert!(
            Instant::now() < deadline,
            "refused: signature {}, unregistered {}",
            refused("signature"),
            refused("unregistered")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = std::fs::read_to_string(p.log("confirm")).unwrap();
    assert!(log.contains("claimed_device=b") && log.contains("claimed_device=ghost"), "{log}");

    publish_acks(&p, &[ack("b", top, Some(&key_b))]).await;
    assert!(seen.read_until(&confirmations, Duration::from_secs(30), |_| {}, |s| s.all_final(&ids)), "b's own ack");
    p.assert_all_running();
}

fn ack(device: &str, applied_lsn: i64, key: Option<&DeviceKey>) -> DeviceAck {
    let mut ack = DeviceAck { device_id: device.into(), applied_lsn, at: now_micros(), signature: None };
    if let Some(key) = key {
        key.sign(&mut ack).unwrap();
    }
    ack
}

async fn publish_acks(p: &Pipeline, acks: &[DeviceAck]) {
    let producer = p.producer().await;
    let topic = p.kafka.topics().device_acks;
    for a in acks {
        let payload = encode_device_ack(a).unwrap();
        let record = FutureRecord::to(&topic).key(a.device_id.as_bytes()).payload(payload.as_slice());
        producer.send(record, Timeout::After(Duration::from_secs(10))).await.unwrap();
    }
}

/// The confirmation service killed (SIGKILL) again and again while instructions flow: each
/// committed instruction still ends with exactly one final confirmation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmation_service_killed_under_load_confirms_each_instruction_once() {
    let mut p = fleet_of("fleet_kill", &["a", "b"], &[]).await;
    let confirmations = p.confirmations();
    let instructions = Workload::new(31, "kill").instructions(3_000);
    let watcher = p.watch_results().await;
    let (producer, topic) = (p.producer().await, p.kafka.topics().instructions);
    let load = {
        let instructions = instructions.clone();
        tokio::spawn(async move {
            for batch in instructions.chunks(100) {
                produce_instructions(&producer, &topic, batch).await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut seen = Seen::default();
    for round in 0..6u64 {
        // Some confirmations published, the checkpoint at a different point each time.
        seen.read_until(&confirmations, Duration::from_millis(400 + 250 * round), |_| {}, |_| false);
        p.kill("confirm");
        p.start_confirm(&[]).await;
    }
    load.await.unwrap();
    let results = p.await_results(watcher, &instructions).await;
    let committed = committed(&results);
    assert!(seen.read_until(&confirmations, Duration::from_secs(120), |_| {}, |s| s.all_final(&committed)));
    seen.read_until(&confirmations, Duration::from_secs(3), |_| {}, |_| false);
    assert_exactly_one_final(&seen, &committed);
    let log = std::fs::read_to_string(p.log("confirm")).unwrap();
    assert_eq!(log.matches("confirmation service started").count(), 7, "every restart came up");
    p.assert_all_running();
}
