//! No poison pill: whatever an instruction holds, it ends as its own result and the
//! executor goes on; its id is a UUID in any spelling, and means one content.

use super::{field, insert_item, instruction, op};
use pgfanout::contract::{Instruction, InstructionResult, OperationKind, ResultStatus, Value};
use pgfanout::executor::batch::execute_batch;
use pgfanout::executor::catalog::{AllowedTables, Catalog, Statements};
use pgfanout::test_support::{logged_ids, Pipeline};

fn text(s: &str) -> Value {
    Value::String(s.to_string())
}

fn expect_outcome(
    results: &std::collections::HashMap<String, InstructionResult>,
    i: &Instruction,
    want: (ResultStatus, Option<&str>),
) {
    let r = results.get(&i.instruction_id).unwrap_or_else(|| panic!("no result for {:?}", i.instruction_id));
    assert_eq!((r.status, r.error_code.as_deref()), want, "{r:?}");
    if want.0 != ResultStatus::Committed {
        assert!(r.error_message.as_ref().is_some_and(|m| !m.is_empty()), "a rejection says why: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_character_in_any_string_field_is_rejected_and_the_executor_goes_on() {
    let mut p = Pipeline::new("nul").await;
    p.start_executor();
    let nul_issuer = Instruction { issued_by: "dev\0ice".into(), ..insert_item(1, text("a"), Value::Long(1)) };
    let nul_id =
        Instruction { instruction_id: format!("{}\0", uuid::Uuid::new_v4()), ..insert_item(2, text("a"), Value::Long(1)) };
    let mut nul_table = insert_item(3, text("a"), Value::Long(1));
    nul_table.operations[0].table = "public.it\0ems".into();
    let mut nul_column = insert_item(4, text("a"), Value::Long(1));
    nul_column.operations[0].values[0].name = "na\0me".into();
    let nul_value = insert_item(5, text("a\0b"), Value::Long(1));
    let nul_key = instruction(
        "t",
        vec![op(OperationKind::Upsert, "public.sites", vec![field("code", text("\0"))], vec![field("city", text("x"))])],
    );
    let mut nul_expect =
        instruction("t", vec![op(OperationKind::Update, "public.items", vec![field("id", Value::Long(1))], vec![])]);
    nul_expect.operations[0].values = vec![field("qty", Value::Long(2))];
    nul_expect.operations[0].expect = vec![field("name", text("\0"))];
    let bad = [
        (nul_issuer, "PGF10"),
        (nul_id, "PGF06"),
        (nul_table, "PGF10"),
        (nul_column, "PGF10"),
        (nul_value, "PGF10"),
        (nul_key, "PGF10"),
        (nul_expect, "PGF10"),
    ];
    // Each bad instruction alone in its batch, then a valid one: every later one commits.
    for (k, (bad, code)) in bad.iter().enumerate() {
        let results = p.submit_and_wait(std::slice::from_ref(bad)).await;
        expect_outcome(&results, bad, (ResultStatus::Rejected, Some(code)));
        let good = insert_item(100 + k as i64, text("after"), Value::Long(1));
        expect_outcome(&p.submit_and_wait(std::slice::from_ref(&good)).await, &good, (ResultStatus::Committed, None));
    }
    // All of them in one batch with valid ones between them.
    let mut mixed = Vec::new();
    for (k, (bad, _)) in bad.iter().enumerate() {
        mixed.push(Instruction { instruction_id: uuid::Uuid::new_v4().to_string(), ..bad.clone() });
        mixed.push(insert_item(200 + k as i64, text("between"), Value::Long(1)));
    }
    mixed[2].instruction_id = format!("{}\0", uuid::Uuid::new_v4()); // keep the bad id bad
    let results = p.submit_and_wait(&mixed).await;
    for (k, i) in mixed.iter().enumerate() {
        let want = if k % 2 == 0 { (ResultStatus::Rejected, Some(bad[k / 2].1)) } else { (ResultStatus::Committed, None) };
        expect_outcome(&results, i, want);
    }
    let client = p.client().await;
    let rows: i64 = client.query_one("SELECT count(*) FROM public.items", &[]).await.unwrap().get(0);
    assert_eq!(rows, 2 * bad.len() as i64, "exactly the valid instructions took effect");
    p.assert_running("executor");
    p.stop("executor");
}

/// Content PostgreSQL refuses, one error class each, with the instruction that causes it.
fn every_error_class() -> Vec<(Instruction, ResultStatus, &'static str)> {
    let checked = |id: i64, values: Vec<(&str, Value)>| {
        instruction(
            "t",
            vec![op(
                OperationKind::Insert,
                "public.checked",
                vec![field("id", Value::Long(id))],
                values.into_iter().map(|(n, v)| field(n, v)).collect(),
            )],
        )
    };
    use ResultStatus::{Failed, Rejected};
    vec![
        (checked(1, vec![("short", text("far too long"))]), Rejected, "22001"),
        (checked(2, vec![("amount", text("123456.789"))]), Rejected, "22003"),
        (checked(3, vec![("amount", text("twelve"))]), Rejected, "22P02"),
        (checked(4, vec![("small", Value::Long(1 << 40))]), Rejected, "22003"),
        (checked(5, vec![("day", text("2026-02-30"))]), Rejected, "22008"),
        (checked(6, vec![("doc", text("{not json"))]), Rejected, "22P02"),
        (checked(7, vec![("positive", Value::Long(-1))]), Rejected, "23514"),
        (checked(8, vec![("required", Value::Null)]), Rejected, "23502"),
        (checked(9, vec![("parent", Value::Long(404))]), Rejected, "23503"),
        (checked(10, vec![("late_parent", Value::Long(404))]), Rejected, "23503"),
        (checked(11, vec![("code", text("dup"))]), Rejected, "23505"),
        (checked(12, vec![("tags", text("{1,2"))]), Rejected, "22P02"),
        (checked(13, vec![("short", text("boom"))]), Failed, "P0001"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_class_an_instruction_can_cause_ends_as_its_result_and_the_executor_never_restarts() {
    let mut p = Pipeline::new("classes").await;
    let client = p.client().await;
    client
        .batch_execute(
            "CREATE TABLE public.parents (id bigint PRIMARY KEY);
             INSERT INTO public.parents VALUES (1);
             CREATE TABLE public.checked (
                 id bigint PRIMARY KEY,
                 short varchar(5),
                 amount numeric(5,2),
                 small smallint,
                 day date,
                 doc jsonb,
                 positive integer CHECK (positive > 0),
                 required text NOT NULL DEFAULT 'x',
                 parent bigint REFERENCES public.parents,
                 late_parent bigint REFERENCES public.parents DEFERRABLE INITIALLY DEFERRED,
                 code text UNIQUE,
                 tags integer[]);
             INSERT INTO public.checked (id, code) VALUES (0, 'dup');
             CREATE FUNCTION checked_guard() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.short = 'boom' THEN RAISE EXCEPTION 'boom' USING ERRCODE = 'P0001'; END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER checked_guard BEFORE INSERT ON public.checked FOR EACH ROW EXECUTE FUNCTION checked_guard();
             ALTER PUBLICATION pgfanout ADD TABLE public.parents, public.checked;",
        )
        .await
        .unwrap();
    p.start_executor();
    let cases = every_error_class();
    // Alone, each with a valid neighbour in its batch; then all mixed in one batch.
    for (k, (bad, status, code)) in cases.iter().enumerate() {
        let good = insert_item(k as i64, text("fine"), Value::Long(1));
        let results = p.submit_and_wait(&[bad.clone(), good.clone()]).await;
        expect_outcome(&results, bad, (*status, Some(code)));
        expect_outcome(&results, &good, (ResultStatus::Committed, None));
    }
    let mut mixed = Vec::new();
    for (k, (bad, _, _)) in cases.iter().enumerate() {
        let mut again = bad.clone();
        again.instruction_id = uuid::Uuid::new_v4().to_string();
        again.operations[0].key[0].value = Value::Long(100 + k as i64);
        mixed.push(again);
        mixed.push(insert_item(100 + k as i64, text("between"), Value::Long(1)));
    }
    let results = p.submit_and_wait(&mixed).await;
    for (k, i) in mixed.iter().enumerate() {
        let want = if k % 2 == 0 { (cases[k / 2].1, Some(cases[k / 2].2)) } else { (ResultStatus::Committed, None) };
        expect_outcome(&results, i, want);
    }
    let checked: i64 = client.query_one("SELECT count(*) FROM public.checked", &[]).await.unwrap().get(0);
    assert_eq!(checked, 1, "no refused row took effect");
    let log = std::fs::read_to_string(p.dir.join("executor.log")).unwrap();
    assert_eq!(log.matches("executor started").count(), 1, "the executor never started over:\n{log}");
    p.assert_running("executor");
    p.stop("executor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_uuid_in_any_spelling_is_one_instruction_and_a_reused_id_with_other_content_changes_nothing() {
    let mut p = Pipeline::new("spelling").await;
    p.start_executor();
    let client = p.client().await;
    let first = insert_item(1, text("first"), Value::Long(1));
    let canonical = first.instruction_id.clone();
    let spellings = [canonical.to_uppercase(), canonical.replace('-', ""), format!("{{{canonical}}}")];
    // The canonical id is what the results carry, whatever the spelling sent.
    let as_awaited = [first.clone()];
    let watcher = p.watch_results().await;
    p.submit(&as_awaited).await;
    let results = p.await_results(watcher, &as_awaited).await;
    expect_outcome(&results, &first, (ResultStatus::Committed, None));
    let stored = results[&canonical].clone();
    for spelling in &spellings {
        let copy = Instruction { instruction_id: spelling.clone(), issued_at: first.issued_at + 1, ..first.clone() };
        let watcher = p.watch_results().await;
        p.submit(&[copy]).await;
        let results = p.await_results(watcher, &as_awaited).await;
        assert_eq!(results[&canonical], stored, "{spelling}: the stored result, not a second insert (23505)");
    }
    let logged = logged_ids(&client).await;
    assert_eq!(logged, vec![canonical.clone()], "one log row, under the canonical id");

    // The same id with other content: rejected with its own code; nothing changes.
    let mut other = insert_item(1, text("second"), Value::Long(2));
    other.instruction_id = canonical.to_uppercase();
    let watcher = p.watch_results().await;
    p.submit(&[other]).await;
    let results = p.await_results(watcher, &as_awaited).await;
    let r = &results[&canonical];
    assert_eq!((r.status, r.error_code.as_deref()), (ResultStatus::Rejected, Some("PGF09")), "{r:?}");
    let name: String = client.query_one("SELECT name FROM public.items WHERE id = 1", &[]).await.unwrap().get(0);
    assert_eq!(name, "first");
    let status: String = client
        .query_one("SELECT status FROM pgfanout.instruction_log WHERE instruction_id = $1", &[&canonical])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "committed", "the stored result stands");
    // Within one batch, too: the second copy with other content is refused.
    let mut catalog = Catalog::new(AllowedTables::Publication(p.postgres.publication.clone()));
    let a = insert_item(2, text("a"), Value::Long(1));
    let b = Instruction { operations: insert_item(2, text("b"), Value::Long(1)).operations, ..a.clone() };
    let results = execute_batch(&client, &mut catalog, &mut Statements::default(), &[a.clone(), b, a]).await.unwrap();
    let outcomes: Vec<_> = results.iter().map(|r| (r.status, r.error_code.as_deref())).collect();
    assert_eq!(
        outcomes,
        [(ResultStatus::Committed, None), (ResultStatus::Rejected, Some("PGF09")), (ResultStatus::Committed, None)]
    );
    // And the same content again is answered with the stored result.
    let results = p.submit_and_wait(&as_awaited).await;
    assert_eq!(results[&canonical], stored);
    p.stop("executor");
}
