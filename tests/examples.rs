//! The producer examples in `examples/` submit to a real pipeline: what another language
//! writes is read by the executor, and the result comes back to it.

use std::path::PathBuf;
use std::process::Output;

use pgfanout::test_support::{Pipeline, TIMEOUT};
use serde_json::Value as Json;

fn python_example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/python/submit_instruction.py")
}

/// Runs `python3 <args>`; panics when python3 cannot be started or does not end in time.
async fn python3(args: &[&str], kafka_properties: &str) -> Output {
    let run = tokio::process::Command::new("python3")
        .args(args)
        .env("PGFANOUT_KAFKA_PROPERTIES", kafka_properties)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(TIMEOUT, run)
        .await
        .unwrap_or_else(|_| panic!("python3 {args:?} did not end within {TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): ./deploy/local/test.sh installs it"))
}

/// Runs the Python example against the pipeline with `--wait`; returns its exit code, its
/// output, and a report of both for assertion messages.
async fn submit_with_python(p: &Pipeline, op_args: &[&str], timeout_secs: u32) -> (i32, String, String) {
    submit_with_python_waiting(p, "committed", op_args, timeout_secs).await
}

/// [`submit_with_python`] with `--wait <wait>`.
async fn submit_with_python_waiting(p: &Pipeline, wait: &str, op_args: &[&str], timeout_secs: u32) -> (i32, String, String) {
    let script = python_example().to_string_lossy().into_owned();
    let timeout = timeout_secs.to_string();
    let mut args = vec![script.as_str(), "--brokers", &p.kafka.brokers, "--topic-prefix", &p.kafka.topic_prefix];
    args.extend_from_slice(op_args);
    args.extend_from_slice(&["--wait", wait, "--timeout", &timeout]);
    let out = python3(&args, &p.kafka.properties.to_string()).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = format!("{}\nstdout:\n{stdout}\nstderr:\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), stdout, report)
}

/// The result the example printed: its last line of output, as JSON.
fn printed_result(stdout: &str, report: &str) -> Json {
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("the last line is not a JSON result ({e}): {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_producer_submits_and_reads_its_result() {
    // Missing packages fail the test: the suite's script installs them.
    let deps = python3(&["-c", "import confluent_kafka, fastavro"], "").await;
    assert!(
        deps.status.success(),
        "the Python example's packages do not import (pip install -r examples/python/requirements.txt): {}",
        String::from_utf8_lossy(&deps.stderr)
    );
    let mut p = Pipeline::new("py_example").await;

    // No executor yet: no result, and exit status 2 once --timeout has passed.
    let (code, stdout, report) = submit_with_python(
        &p,
        &["--op", "upsert", "--table", "public.items", "--key", "id=8", "--value", "name=\"late\"", "--value", "qty=1"],
        2,
    )
    .await;
    assert_eq!(code, 2, "{report}");
    assert!(stdout.starts_with("submitted "), "{report}");

    p.start_executor();
    let (code, stdout, report) = submit_with_python(
        &p,
        &[
            "--op",
            "upsert",
            "--table",
            "public.items",
            "--key",
            "id=7",
            "--value",
            "name=\"widget\"",
            "--value",
            "qty=3",
            "--value",
            "price=\"12.50\"",
        ],
        90,
    )
    .await;
    assert_eq!(code, 0, "{report}");
    let result = printed_result(&stdout, &report);
    assert_eq!(result["status"], "committed", "{report}");
    assert_eq!(result["rows_affected"], 1, "{report}");
    assert!(result["commit_lsn"].as_i64().is_some_and(|lsn| lsn > 0), "{report}");
    assert!(result["instruction_id"].as_str().is_some_and(|id| stdout.starts_with(&format!("submitted {id}\n"))), "{report}");

    let client = p.client().await;
    let row = client.query_one("SELECT name, qty, price::text FROM public.items WHERE id = 7", &[]).await.unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i32>(1), row.get::<_, String>(2)),
        ("widget".to_string(), 3, "12.50".to_string())
    );

    // An unknown column: rejected as a whole, and said so by the exit status.
    let (code, stdout, report) = submit_with_python(
        &p,
        &["--op", "update", "--table", "public.items", "--key", "id=7", "--value", "qty=4", "--value", "colour=\"red\""],
        90,
    )
    .await;
    assert_eq!(code, 1, "{report}");
    let result = printed_result(&stdout, &report);
    assert_eq!(result["status"], "rejected", "{report}");
    assert_eq!(result["error_code"], "PGF02", "{report}");
    let qty: i32 = client.query_one("SELECT qty FROM public.items WHERE id = 7", &[]).await.unwrap().get(0);
    assert_eq!(qty, 3, "a rejected instruction changes nothing");
    // The instruction that timed out waiting was not lost: the executor applied it later.
    let late: i64 =
        client.query_one("SELECT count(*) FROM public.items WHERE id = 8 AND name = 'late'", &[]).await.unwrap().get(0);
    assert_eq!(late, 1);

    waits_for_the_fleet(&mut p).await;
    p.stop("confirm");
    p.stop("executor");
}

/// With the fleet running, `--wait fleet` ends on the final confirmation: of the whole
/// fleet, or of the quorum `--at-least` asks for.
async fn waits_for_the_fleet(p: &mut Pipeline) {
    p.start_capture().await;
    p.start_device("a", &[]);
    p.start_confirm(&[]).await;
    let (code, stdout, report) = submit_with_python_waiting(
        p,
        "fleet",
        &["--op", "upsert", "--table", "public.items", "--key", "id=9", "--value", "name=\"everywhere\"", "--value", "qty=2"],
        90,
    )
    .await;
    assert_eq!(code, 0, "{report}");
    let confirmation = printed_result(&stdout, &report);
    assert_eq!((confirmation["status"].as_str(), confirmation["devices"].as_i64()), (Some("applied"), Some(1)), "{report}");
    assert_eq!(confirmation["slowest_device"], "a", "{report}");
    // A registered device that does not run holds back the whole fleet, not a quorum of one.
    p.register("b", &[]);
    let (code, stdout, report) = submit_with_python_waiting(
        p,
        "fleet",
        &[
            "--op",
            "upsert",
            "--table",
            "public.items",
            "--key",
            "id=10",
            "--value",
            "name=\"one\"",
            "--value",
            "qty=1",
            "--at-least",
            "1",
        ],
        90,
    )
    .await;
    assert_eq!(code, 0, "{report}");
    let confirmation = printed_result(&stdout, &report);
    assert_eq!((confirmation["status"].as_str(), confirmation["devices"].as_i64()), (Some("applied"), Some(1)), "{report}");
}
