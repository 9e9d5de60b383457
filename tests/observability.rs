//! Observability against a real Prometheus: every metric the processes expose is documented
//! in METRICS.md and every documented one is exposed; every PromQL expression of every
//! dashboard panel returns data from a pipeline under load; the alert rules load, evaluate
//! and pass their `promtool` unit tests.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pgfanout::contract::{now_micros, Field, Instruction, Operation, OperationKind, ResultStatus, Value};
use pgfanout::test_support::http::{free_addr, http_get};
use pgfanout::test_support::{wait_for, Deadline, Pipeline};
use pgfanout::workload::Workload;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;

const DEVICES: [&str; 2] = ["a", "b"];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Metric names (from `# TYPE` lines) an endpoint exposes.
fn exposed_names(addr: &str) -> BTreeSet<String> {
    let body = http_get(addr, "/metrics").unwrap_or_default();
    body.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split_whitespace().next()).map(String::from).collect()
}

/// Metric names in METRICS.md's tables.
fn documented_names() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo("METRICS.md")).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("pgfanout_"))
        .map(String::from)
        .collect()
}

/// Every `expr` of every panel target in every dashboard, with the dashboard's file name.
fn dashboard_expressions() -> Vec<(String, String)> {
    fn walk(v: &serde_json::Value, file: &str, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(serde_json::Value::Array(targets)) = map.get("targets") {
                    for t in targets {
                        if let Some(expr) = t.get("expr").and_then(|e| e.as_str()) {
                            out.push((file.to_string(), expr.to_string()));
                        }
                    }
                }
                for child in map.values() {
                    walk(child, file, out);
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, file, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(repo("dashboards")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    for path in files.into_iter().filter(|p| p.extension().is_some_and(|e| e == "json")) {
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        walk(&json["panels"], &path.file_name().unwrap().to_string_lossy(), &mut out);
    }
    out
}

/// Grafana's template variables, replaced the way Grafana would for "all devices".
fn substitute_variables(expr: &str) -> String {
    let out = expr
        .replace("$__rate_interval", "15s")
        .replace("$__interval", "5s")
        .replace("$__range", "5m")
        .replace("${device:regex}", ".+")
        .replace("${device}", ".+")
        .replace("$device", ".+");
    assert!(!out.contains('$'), "unknown template variable in {expr}");
    out
}

/// A Prometheus server of its own, killed on drop.
struct Prometheus {
    child: Child,
    addr: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(dir: &Path, jobs: &[(&str, Vec<String>)]) -> Prometheus {
        let mut config = String::from("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n");
        config.push_str(&format!("  - {}\nscrape_configs:\n", repo("deploy/prometheus/alerts.yml").display()));
        for (job, targets) in jobs {
            let list = targets.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", ");
            config.push_str(&format!("  - job_name: {job}\n    static_configs:\n      - targets: [{list}]\n"));
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let addr = free_addr();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("prometheus-data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("the prometheus binary (Debian package prometheus) is installed");
        Prometheus { child, addr }
    }

    /// The result of an instant query, or the error Prometheus gave.
    fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let body = http_get(&self.addr, &format!("/api/v1/query?query={}", url_encode(expr))).map_err(|e| e.to_string())?;
        let json: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if json["status"] != "success" {
            return Err(format!("{}: {}", json["errorType"], json["error"]));
        }
        Ok(json["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool").args(args).current_dir(repo("")).output().expect("promtool is installed");
    assert!(
        out.status.success(),
        "promtool {}:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn insert_item(id: i64) -> Instruction {
    Instruction {
        instruction_id: uuid::Uuid::new_v4().to_string(),
        issued_by: "observability".into(),
        issued_at: now_micros(),
        operations: vec![Operation {
            op: OperationKind::Insert,
            table: "public.items".into(),
            key: vec![Field { name: "id".into(), value: Value::Long(id) }],
            values: vec![Field { name: "name".into(), value: Value::String("x".into()) }],
            expect: vec![],
        }],
        target: None,
    }
}

#[test]
fn alert_rules_pass_promtool() {
    promtool(&["check", "rules", "deploy/prometheus/alerts.yml"]);
    promtool(&["test", "rules", "deploy/prometheus/alerts_test.yml"]);
    // Every alert's runbook link points at a README heading.
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let anchors: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.trim_start_matches('#').trim().strip_prefix("Runbook: "))
        .map(|name| format!("runbook-{}", name.to_lowercase()))
        .collect();
    let rules = std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap();
    let alerts = rules.lines().filter(|l| l.trim_start().starts_with("- alert:")).count();
    let links: Vec<&str> =
        rules.lines().filter_map(|l| l.split_once("README.md#")).map(|(_, rest)| rest.trim_end_matches('"')).collect();
    assert_eq!(links.len(), alerts, "every alert has a runbook link");
    for link in links {
        assert!(anchors.contains(link), "README.md has no heading for #{link}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_the_documentation_and_every_dashboard_panel_has_data() {
    let mut p = Pipeline::new("observability").await;
    let executor = free_addr();
    let capture = free_addr();
    let devices: Vec<String> = DEVICES.iter().map(|_| free_addr()).collect();
    p.start("executor", &["executor", "--metrics-addr", &executor]);
    p.start_capture_with(&["--metrics-addr", &capture]).await;
    for (d, addr) in DEVICES.iter().zip(&devices) {
        p.start_device(d, &["--metrics-addr", addr]);
    }
    let confirm = free_addr();
    p.start_confirm(&["--metrics-addr", &confirm]).await;
    let prometheus = Prometheus::start(
        &p.dir,
        &[
            ("executor", vec![executor.clone()]),
            ("capture", vec![capture.clone()]),
            ("confirm", vec![confirm.clone()]),
            ("device", devices.clone()),
        ],
    );

    load_with_every_outcome(&mut p).await;
    p.wait_converged(&DEVICES).await;

    let endpoints: Vec<&String> = [&executor, &capture, &confirm].into_iter().chain(&devices).collect();
    wait_metrics_documented(&endpoints).await;
    wait_panels_have_data(&prometheus).await;

    // The alert rules loaded into this Prometheus and evaluate without error.
    let rules = wait_for("the alert rules to be evaluated", Duration::from_secs(30), || async {
        let body = http_get(&prometheus.addr, "/api/v1/rules").ok()?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let rules: Vec<serde_json::Value> =
            json["data"]["groups"].as_array()?.iter().flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default()).collect();
        (!rules.is_empty() && rules.iter().all(|r| r["lastEvaluation"].as_str().is_some_and(|t| !t.starts_with("0001"))))
            .then_some(rules)
    })
    .await;
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "rule {} evaluates: {}", rule["name"], rule["lastError"]);
    }
    drop(prometheus);
    for d in DEVICES {
        p.stop(&format!("device-{d}"));
    }
    p.stop("confirm");
    p.stop("capture");
    p.stop("executor");
}

/// Load with every outcome: committed instructions, a constraint violation (SQLSTATE class
/// 23), an unknown table, and one undecodable record for the dead-letter topic.
async fn load_with_every_outcome(p: &mut Pipeline) {
    let mut instructions = Workload::new(7, "observability").instructions(300);
    let first = insert_item(900_001);
    let duplicate = insert_item(900_001);
    let mut unknown_table = insert_item(900_002);
    unknown_table.operations[0].table = "public.no_such_table".into();
    p.submit_and_wait(&[first]).await;
    instructions.extend([duplicate.clone(), unknown_table.clone()]);
    let results = p.submit_and_wait(&instructions).await;
    assert_eq!(results[&duplicate.instruction_id].status, ResultStatus::Rejected);
    assert_eq!(results[&unknown_table.instruction_id].status, ResultStatus::Rejected);
    let producer = p.producer().await;
    let topic = p.kafka.topics().instructions;
    let garbage: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).key(&b"garbage"[..]).payload(&[0xff, 0x00, 0x13][..]);
    producer.send(garbage, Timeout::After(Duration::from_secs(10))).await.unwrap();
}

/// Waits until every metric exposed at `endpoints` is documented in METRICS.md and every
/// documented one is exposed (librdkafka's statistics arrive every 5 s, the slot and
/// partition lags every 5 s).
async fn wait_metrics_documented(endpoints: &[&String]) {
    let documented = documented_names();
    let deadline =
        Deadline::after(Duration::from_secs(60), "the metrics to be exposed").polling_every(Duration::from_millis(500));
    loop {
        let exposed: BTreeSet<String> =
            endpoints.iter().flat_map(|a| exposed_names(a)).filter(|n| n.starts_with("pgfanout_")).collect();
        if exposed == documented {
            break;
        }
        if deadline.passed() {
            let undocumented: Vec<_> = exposed.difference(&documented).collect();
            let missing: Vec<_> = documented.difference(&exposed).collect();
            panic!("exposed but not in METRICS.md: {undocumented:?}; in METRICS.md but not exposed: {missing:?}");
        }
        deadline.sleep().await;
    }
}

/// Waits until every dashboard panel's expression returns at least one series (a few
/// scrapes are needed before rates exist).
async fn wait_panels_have_data(prometheus: &Prometheus) {
    let expressions = dashboard_expressions();
    assert!(expressions.len() >= 20, "the dashboards have panels: {}", expressions.len());
    let mut pending: Vec<(String, String)> = expressions;
    let deadline = Deadline::after(Duration::from_secs(90), "the panels to have data").polling_every(Duration::from_secs(2));
    loop {
        let mut still = Vec::new();
        for (file, expr) in pending {
            match prometheus.query(&substitute_variables(&expr)) {
                Ok(series) if !series.is_empty() => {}
                Ok(_) => still.push((file, expr)),
                Err(e) => panic!("{file}: invalid PromQL {expr}: {e}"),
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if deadline.passed() {
            panic!("panel expressions without data: {pending:#?}");
        }
        deadline.sleep().await;
    }
}
