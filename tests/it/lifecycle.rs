//! A job's whole life through the real relay: notifications, order, fields,
//! signatures, retries, restarts and watches added while running.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::fakes::{FakeDari, FakeReceiver, Relay, Reply, SECRET, config_text};
use dari_relay::vocab::NewWatch;

pub(crate) const JOB: &str = "550e8400-e29b-41d4-a716-446655440000";

pub(crate) fn event(i: usize) -> Value {
    json!({"event_type": "step_completed", "message": format!("step {i}"), "data": {"step": i}, "timestamp": format!("2026-11-30T10:30:{i:02}Z")})
}

fn question() -> Value {
    json!({"event_type": "question", "message": "Which plan?", "data": {"question_id": "q-7"}, "timestamp": "2026-11-30T10:31:00Z"})
}

pub(crate) fn answer(status: &str, events: &[Value], extra: Value) -> Value {
    let mut body = json!({
        "status": status, "events": events, "current_step": format!("at {status}"),
        "browser_url": "https://live.example/s/1", "total_cost_usd": 0.05,
        "created_at": "2026-11-30T10:29:58Z", "novel_field": {"kept": true}
    });
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

/// The job of acceptance 1: pending, running with 3 events, waiting for a
/// human (with a question event), running, completed.
pub(crate) fn full_life() -> Vec<Reply> {
    let e: Vec<Value> = (0..3).map(event).collect();
    let mut with_q = e.clone();
    with_q.push(question());
    let mut last = with_q.clone();
    last.push(event(4));
    vec![
        Reply::Json(answer("pending", &[], json!({}))),
        Reply::Json(answer("running", &e[..1], json!({}))),
        Reply::Json(answer("running", &e[..3], json!({}))),
        Reply::Json(answer("waiting_for_input", &with_q, json!({}))),
        Reply::Json(answer("running", &last, json!({}))),
        Reply::Json(answer("completed", &last, json!({"final_result": {"confirmation": "CF-1", "rows": [1, 2]}}))),
    ]
}

pub(crate) const FULL_LIFE_TYPES: [&str; 10] = [
    "job.pending",
    "job.event",
    "job.running",
    "job.event",
    "job.event",
    "job.event",
    "job.waiting_for_input",
    "job.event",
    "job.running",
    "job.completed",
];

pub(crate) fn watch(job_id: &str) -> NewWatch {
    NewWatch {
        job_id: job_id.into(),
        portal: "acme/contact_form".parse().unwrap(),
        webhooks: None,
        labels: [("customer".to_owned(), "acme".to_owned())].into(),
        from_now: false,
    }
}

/// Acceptance 1 and 2: the exact notifications in order, each delivered
/// once, fields passed through, every signature valid per the independent
/// `standardwebhooks` crate, and a distinct webhook-id per notification.
#[tokio::test]
async fn full_life_is_delivered_in_order_once_and_signed() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB, full_life());
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[("backend", &receiver.url)], "")).await;
    relay.store.add_watches(&[watch(JOB)]).unwrap();

    let got = receiver.until_delivered("job.completed").await;
    relay.settle().await;
    relay.stop().await;
    let got: Vec<_> = got.into_iter().chain(receiver.drain()).collect();

    let kinds: Vec<String> = got.iter().map(|r| r.kind()).collect();
    assert_eq!(kinds, FULL_LIFE_TYPES);
    let verifier = standardwebhooks::Webhook::new(SECRET).unwrap();
    let mut ids = HashSet::new();
    for r in &got {
        verifier.verify(r.body.as_bytes(), &r.headers).expect("signature verifies");
        assert!(ids.insert(r.header("webhook-id")), "webhook-id reused across notifications");
        assert_eq!(r.header("content-type"), "application/json");
        assert!(r.header("user-agent").starts_with("dari-relay/"));
    }
    let bodies: Vec<Value> = got.iter().map(|r| r.json()).collect();
    // Events in list order, with their index and content.
    let events: Vec<(u64, String)> = bodies
        .iter()
        .filter(|b| b["type"] == "job.event")
        .map(|b| {
            (b["data"]["event"]["index"].as_u64().unwrap(), b["data"]["event"]["message"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(
        events,
        [
            (0, "step 0".into()),
            (1, "step 1".into()),
            (2, "step 2".into()),
            (3, "Which plan?".into()),
            (4, "step 4".into())
        ]
    );
    assert_eq!(bodies[5]["data"]["event"]["data"]["question_id"], "q-7", "the question event is delivered whole");
    // Status changes carry the previous status; the first has none.
    assert_eq!(bodies[0]["data"]["previous_status"], Value::Null);
    assert_eq!(bodies[6]["data"]["previous_status"], "running");
    assert_eq!(bodies[8]["data"]["previous_status"], "waiting_for_input");
    // Fields pass through unchanged, unknown ones included; absent ones are null.
    let done = &bodies[9]["data"];
    assert_eq!(done["job_id"], JOB);
    assert_eq!(done["portal_id"], "acme/contact_form");
    assert_eq!(done["status"], "completed");
    assert_eq!(done["final_result"], json!({"confirmation": "CF-1", "rows": [1, 2]}));
    assert_eq!(done["novel_field"], json!({"kept": true}));
    assert_eq!(done["total_cost_usd"], 0.05);
    assert_eq!(done["browser_url"], "https://live.example/s/1");
    assert_eq!(done["log_url"], Value::Null);
    assert_eq!(done["labels"], json!({"customer": "acme"}));
    assert!(done.get("events").is_none() && done.get("event").is_none());
    // Polling ended with the terminal status.
    let store_counts = relay_counts(&dir);
    assert_eq!(store_counts, (10, 0, 0));
}

/// (delivered, pending, failed) in the test's database.
fn relay_counts(dir: &tempfile::TempDir) -> (i64, i64, i64) {
    let store = dari_relay::store::Store::open(&dir.path().join("r.db")).unwrap();
    let c = store.delivery_counts().unwrap();
    let get = |k: &str| c.get(k).copied().unwrap_or(0);
    (get("delivered"), get("pending"), get("failed"))
}

/// Acceptance 3: a 500 then a 200 delivers on retry with the same
/// webhook-id (and a valid fresh signature), and the job's later
/// notifications wait for it.
#[tokio::test]
async fn failed_delivery_is_retried_with_the_same_id_and_blocks_later_ones() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    receiver.answer_with(&[500, 503]);
    dari.script(JOB, full_life());
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[("backend", &receiver.url)], "")).await;
    relay.store.add_watches(&[watch(JOB)]).unwrap();

    let got = receiver.until_delivered("job.completed").await;
    relay.settle().await;
    relay.stop().await;

    let first_id = got[0].header("webhook-id");
    assert_eq!((got[0].kind(), got[0].answered), ("job.pending".into(), 500));
    assert_eq!((got[1].header("webhook-id"), got[1].answered), (first_id.clone(), 503));
    assert_eq!((got[2].header("webhook-id"), got[2].answered), (first_id, 204));
    assert_eq!(got[0].body, got[2].body, "the body is the same on every retry");
    let verifier = standardwebhooks::Webhook::new(SECRET).unwrap();
    verifier.verify(got[2].body.as_bytes(), &got[2].headers).unwrap();
    // The retry waited on the schedule (100 ms, 200 ms, with ±20% jitter).
    assert!(got[1].at - got[0].at >= Duration::from_millis(80));
    // Nothing else of the job was sent before the retried delivery got through.
    let after: Vec<String> = got[3..].iter().map(|r| r.kind()).collect();
    assert_eq!(after, FULL_LIFE_TYPES[1..]);
    assert!(got[3..].iter().all(|r| r.answered == 204));
}

/// Acceptance 4: a restart re-announces nothing, and a transition that
/// happened while the relay was down is announced after it.
#[tokio::test]
async fn restart_neither_repeats_nor_misses() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    let e: Vec<Value> = (0..3).map(event).collect();
    dari.script(
        JOB,
        vec![Reply::Json(answer("pending", &[], json!({}))), Reply::Json(answer("running", &e[..1], json!({})))],
    );
    let config = config_text(&db, &dari, &[("backend", &receiver.url)], "");

    let relay = Relay::start(&config).await;
    relay.store.add_watches(&[watch(JOB)]).unwrap();
    let first: Vec<String> = receiver.until_delivered("job.running").await.iter().map(|r| r.kind()).collect();
    assert_eq!(first, ["job.pending", "job.event", "job.running"]);
    relay.settle().await;
    relay.stop().await;
    let polls_before = dari.polls(JOB);

    // While the relay is down, the job moves on.
    dari.script(JOB, vec![Reply::Json(answer("completed", &e, json!({"final_result": {"ok": true}})))]);
    let relay = Relay::start(&config).await;
    let second = receiver.until_delivered("job.completed").await;
    relay.settle().await;
    relay.stop().await;
    let kinds: Vec<String> = second.iter().chain(receiver.drain().iter()).map(|r| r.kind()).collect();
    assert_eq!(kinds, ["job.event", "job.event", "job.completed"]);
    let indexes: Vec<u64> = second
        .iter()
        .filter(|r| r.kind() == "job.event")
        .map(|r| r.json()["data"]["event"]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [1, 2]);
    assert!(dari.polls(JOB) > polls_before);

    // A third start with nothing new announces nothing and polls nothing: the job is finished.
    let polls_done = dari.polls(JOB);
    let relay = Relay::start(&config).await;
    relay.settle().await;
    relay.stop().await;
    assert!(receiver.drain().is_empty());
    assert_eq!(dari.polls(JOB), polls_done);
}

/// Acceptance 5: `dari-relay watch add` (the real binary, a separate
/// process) while the daemon runs: the first poll comes within 1 second.
#[tokio::test]
async fn watch_added_while_running_is_polled_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB, vec![Reply::Json(answer("running", &[], json!({})))]);
    let text = config_text(&db, &dari, &[("backend", &receiver.url)], "");
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, &text).unwrap();
    let relay = Relay::start(&text).await;
    // Let the scheduler start with no watches at all.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dari.polls(JOB), 0);

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_dari-relay"))
        .args(["watch", "add", "--config"])
        .arg(&config_path)
        .args(["acme/contact_form", JOB])
        .env("DARI_API_KEY", crate::fakes::API_KEY)
        .env("HOOK_SECRET", SECRET)
        .output()
        .await
        .unwrap();
    let added = Instant::now();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let first = receiver.next().await;
    assert_eq!(first.kind(), "job.running");
    let poll = dari.requests().into_iter().find(|r| r.job_id == JOB).expect("polled");
    let waited = poll.at.saturating_duration_since(added);
    assert!(waited < Duration::from_secs(1), "first poll {waited:?} after watch add");
    assert_eq!(poll.api_key, crate::fakes::API_KEY);
    relay.stop().await;
}

/// `--from-now` announces nothing of what the first poll sees, then
/// everything after it.
#[tokio::test]
async fn from_now_skips_what_the_first_poll_sees() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    let e: Vec<Value> = (0..3).map(event).collect();
    dari.script(
        JOB,
        vec![Reply::Json(answer("running", &e[..2], json!({}))), Reply::Json(answer("completed", &e, json!({})))],
    );
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[("backend", &receiver.url)], "")).await;
    relay.store.add_watches(&[NewWatch { from_now: true, ..watch(JOB) }]).unwrap();
    let got = receiver.until_delivered("job.completed").await;
    relay.settle().await;
    relay.stop().await;
    let kinds: Vec<String> = got.iter().map(|r| r.kind()).collect();
    assert_eq!(kinds, ["job.event", "job.completed"]);
    assert_eq!(got[0].json()["data"]["event"]["index"], 2);
    assert_eq!(got[1].json()["data"]["previous_status"], "running");
}

/// Webhook selection: a watch naming a webhook goes only there (its portal
/// patterns ignored, its type filter kept); otherwise portal patterns pick.
#[tokio::test]
async fn webhooks_are_chosen_by_name_or_by_portal_and_filtered_by_type() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut all = FakeReceiver::start().await;
    let mut statuses_only = FakeReceiver::start().await;
    let mut other_portals = FakeReceiver::start().await;
    dari.script(JOB, vec![Reply::Json(answer("completed", &[event(0)], json!({})))]);
    let extra = format!(
        "[[webhooks]]\nname = \"statuses\"\nurl = \"{}\"\ntypes = [\"job.*ed\", \"job.running\"]\nportals = [\"nobody/*\"]\n\
         [[webhooks]]\nname = \"elsewhere\"\nurl = \"{}\"\nportals = [\"other-org/*\"]\n",
        statuses_only.url, other_portals.url
    );
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[("all", &all.url)], &extra)).await;
    let second_job = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";
    dari.script(second_job, vec![Reply::Json(answer("completed", &[event(0)], json!({})))]);
    relay
        .store
        .add_watches(&[watch(JOB), NewWatch { webhooks: Some(vec!["statuses".into()]), ..watch(second_job) }])
        .unwrap();
    let to_all = all.until_delivered("job.completed").await;
    let to_statuses = statuses_only.until_delivered("job.completed").await;
    relay.settle().await;
    relay.stop().await;
    assert!(to_all.iter().all(|r| r.json()["data"]["job_id"] == JOB));
    assert_eq!(to_all.iter().map(|r| r.kind()).collect::<Vec<_>>(), ["job.event", "job.completed"]);
    assert_eq!(to_statuses.len(), 1);
    assert_eq!(to_statuses[0].json()["data"]["job_id"], second_job);
    assert!(all.drain().is_empty() && statuses_only.drain().is_empty() && other_portals.drain().is_empty());
}
