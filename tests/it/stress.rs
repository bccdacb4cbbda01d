//! Under stress (issue 10): pruning a large history while polls go on, a
//! first poll with many events and a large answer, another connection
//! holding the write lock, and a dead writer thread.

use std::time::Duration;

use dari_relay::admin::Listener;
use dari_relay::config::ListenAddr;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::fakes::{FakeDari, FakeReceiver, Relay, Reply, config_text, watch_on};
use dari_relay::vocab::now_ms;

const JOB: &str = "5f0c2a4e-7b1d-4c3a-9e8f-00000000aaaa";

/// The job's answer once `events` events have happened, with `extra` fields.
fn answer(status: &str, events: usize, extra: Value) -> Reply {
    let events: Vec<Value> =
        (0..events).map(|i| json!({"event_type": "step", "message": format!("step {i}"), "data": {}})).collect();
    let mut body = json!({"status": status, "events": events});
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    Reply::Json(body)
}

/// Pruning with 200,000 deliveries of history never stops the polls: the
/// longest gap between two polls of a job whose answer changes every time
/// (so every poll commits) stays under a second while the pruner runs, and
/// no poll fails on the lock. Before, one transaction on the connection the
/// poller's scans share scanned every delivery for each old notification
/// (no index on `notification_id`): the poller loop waited on that lock for
/// the whole prune, and the writer's deferred transactions failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_a_large_history_never_stops_polls_for_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    // An answer that changes on every poll: 400 of them.
    dari.script(JOB, (1..=400).map(|k| answer("running", k, json!({}))).collect());
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "")).await;
    let hooks = ["a", "b", "c", "d"];

    let day_ago = now_ms() - 24 * 3_600_000;
    let seeding = std::sync::Arc::clone(&relay.store);
    tokio::task::spawn_blocking(move || {
        // 1,000 old notifications (4,000 deliveries, with their attempts)
        // past the cutoff, and 49,000 recent ones (196,000 deliveries) that
        // stay. Each old notification cost a scan of every delivery before.
        seeding.seed_history_for_test("00000000-0000-4000-8000-0000000000a1", 1_000, &hooks, day_ago, true)?;
        seeding.seed_history_for_test("00000000-0000-4000-8000-0000000000a2", 49_000, &hooks, now_ms(), false)
    })
    .await
    .unwrap()
    .unwrap();
    relay.store.add_watches(&[watch_on("acme/portal", JOB)]).unwrap();
    receiver.next().await;
    let pruning = std::sync::Arc::clone(&relay.store);
    let started = Instant::now();
    let pruned = tokio::task::spawn_blocking(move || pruning.prune(now_ms() - 3_600_000)).await.unwrap().unwrap();
    let ended = Instant::now();
    // Polls keep going a little after, so the gap around the end is seen.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (store, metrics) = (std::sync::Arc::clone(&relay.store), std::sync::Arc::clone(&relay.metrics));
    relay.stop().await;
    assert_eq!(metrics.polls("acme", "store_error"), 0, "a poll failed on the lock instead of waiting");
    assert_eq!(pruned.deliveries, 4_000);
    assert_eq!(pruned.attempts, 4_000);
    assert_eq!(pruned.notifications, 1_000);
    assert_eq!(pruned.watches, 1, "the old finished watch is left with nothing and goes");
    // The recent history stays, and so does everything of the live job.
    let counts = store.delivery_counts().unwrap();
    assert!(counts["delivered"] > 196_000, "{counts:?}");
    assert!(!store.notifications_of(JOB).unwrap().is_empty());
    let polls: Vec<Instant> = dari.requests().iter().map(|r| r.at).collect();
    let before = polls.iter().rposition(|at| *at <= started).expect("a poll before pruning");
    let after = polls.iter().position(|at| *at >= ended).expect("a poll after pruning");
    let gap = polls[before..=after].windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        gap < Duration::from_secs(1),
        "a {gap:?} gap between polls while pruning for {:?} ({} polls meanwhile)",
        ended - started,
        after - before - 1
    );
}

/// A first poll with 50 events and a 200 KB `final_result`: the database
/// grows by about one answer (not 50), and the bodies sent are exactly the
/// standard bodies (the serialised envelope, keys sorted) with the whole
/// answer in each, the same bytes on a retry.
#[tokio::test]
async fn a_large_answer_is_stored_once_and_sent_whole() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    // The first attempt of the first five deliveries fails: those bodies
    // are sent twice.
    receiver.answer_with(&[500, 200, 500, 200, 500, 200, 500, 200, 500, 200]);
    let result = "r".repeat(200 * 1024);
    dari.script(JOB, vec![answer("completed", 50, json!({"final_result": {"text": result}, "aardvark": 1}))]);
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "")).await;
    let empty = relay.store.stored_bytes().unwrap();
    relay.store.add_watches(&[watch_on("acme/portal", JOB)]).unwrap();
    let mut got = Vec::new();
    while got.len() < 56 {
        got.push(receiver.next().await);
    }
    relay.settle().await;
    let grown = relay.store.stored_bytes().unwrap() - empty;
    relay.stop().await;
    assert!(grown < 3 * result.len() as u64, "the database grew by {grown} bytes for one {} byte answer", result.len());

    let mut first_bodies = std::collections::HashMap::new();
    for r in &got {
        let body: Value = serde_json::from_str(&r.body).unwrap();
        // The old composition: the envelope's fields in order, `data`
        // serialised whole (its keys sorted).
        let old =
            format!("{{\"type\":{},\"timestamp\":{},\"data\":{}}}", body["type"], body["timestamp"], body["data"]);
        assert_eq!(r.body, old, "not the standard body's bytes");
        assert_eq!(body["data"]["final_result"]["text"].as_str().unwrap().len(), result.len());
        assert_eq!(body["data"]["aardvark"], 1);
        let id = r.header("webhook-id");
        match first_bodies.get(&id) {
            None => drop(first_bodies.insert(id, r.body.clone())),
            Some(first) => assert_eq!(first, &r.body, "a retry sends other bytes"),
        }
    }
    assert_eq!(first_bodies.len(), 51);
    let kinds: Vec<String> = got.iter().map(|r| r.kind()).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "job.event").count(), 55);
    let events: Vec<i64> = got
        .iter()
        .filter(|r| r.kind() == "job.event" && (200..300).contains(&r.answered))
        .map(|r| r.json()["data"]["event"]["index"].as_i64().unwrap())
        .collect();
    assert_eq!(events, (0..50).collect::<Vec<_>>());
}

/// Another connection holds the write lock for 2 s while the job changes:
/// the relay's polls wait for it (busy timeout) and succeed, none fails,
/// and `/readyz` answers at once meanwhile instead of queueing on the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_wait_for_a_write_lock_held_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB, vec![answer("running", 1, json!({}))]);
    let text = config_text(&db, &dari, &[("h", &receiver.url)], "[admin]\nlisten = \"127.0.0.1:0\"\n");
    let listener = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()), None).await.unwrap();
    let api = format!("http://{}", listener.describe());
    let relay = Relay::start_with_admin(&text, Some(listener)).await;
    relay.store.add_watches(&[watch_on("acme/portal", JOB)]).unwrap();
    assert_eq!(receiver.until_delivered("job.running").await.len(), 2);

    let (locked, is_locked) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        conn.execute_batch("COMMIT").unwrap();
    });
    is_locked.recv().unwrap();
    let locked_at = Instant::now();
    dari.script(JOB, vec![answer("running", 2, json!({})), answer("completed", 2, json!({}))]);
    // Probes while the lock is held answer promptly.
    for _ in 0..3 {
        let probe = Instant::now();
        let status = reqwest::get(format!("{api}/readyz")).await.unwrap().status();
        assert!(probe.elapsed() < Duration::from_millis(500), "/readyz waited {:?} for the lock", probe.elapsed());
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let got = receiver.until_delivered("job.completed").await;
    assert!(locked_at.elapsed() >= Duration::from_millis(1900), "delivered before the lock was released");
    holder.join().unwrap();
    let metrics = std::sync::Arc::clone(&relay.metrics);
    relay.stop().await;
    assert_eq!(got.iter().map(|r| r.kind()).collect::<Vec<_>>(), ["job.event", "job.completed"]);
    assert_eq!(metrics.polls("acme", "store_error"), 0, "a poll failed on the lock instead of waiting");
}

/// A dead writer thread makes the relay not ready: the loops still beat,
/// but nothing can be stored any more.
#[tokio::test]
async fn a_dead_writer_thread_makes_the_relay_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB, vec![answer("running", 1, json!({}))]);
    let text = config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "");
    let listener = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()), None).await.unwrap();
    let api = format!("http://{}", listener.describe());
    let relay = Relay::start_with_admin(&text, Some(listener)).await;
    relay.store.add_watches(&[watch_on("acme/portal", JOB)]).unwrap();
    receiver.until_delivered("job.running").await;
    assert_eq!(reqwest::get(format!("{api}/readyz")).await.unwrap().status(), 200);

    let store = std::sync::Arc::clone(&relay.store);
    tokio::task::spawn_blocking(move || store.stop_writer_for_test()).await.unwrap().unwrap();
    let answer = reqwest::get(format!("{api}/readyz")).await.unwrap();
    assert_eq!(answer.status(), 503);
    let body: Value = serde_json::from_str(&answer.text().await.unwrap()).unwrap();
    assert!(body["reasons"].to_string().contains("the database writer thread has stopped"), "{body}");
    relay.stop().await;
}
