//! Failover with the real binary on PostgreSQL: two `dari-relay run`
//! processes on one database, one active and one standby. The active one
//! is killed with SIGKILL while jobs are busy; the standby takes over and
//! every notification still arrives, in order per job, each re-send with
//! its first `webhook-id`, and nothing under two ids.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::delivery::{signal, spawn_daemon, wait_exit};
use crate::fakes::{FakeDari, FakeReceiver, Received, Reply, config_text, log_says};
use crate::pg::TestDatabase;
use dari_relay::store::{OperatorStore, Postgres};
use dari_relay::vocab::NewWatch;

const JOBS: usize = 6;
/// Answers per job before it completes: one more event each.
const STEPS: usize = 25;

fn job_id(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

fn script() -> Vec<Reply> {
    let events = |k: usize| -> Vec<Value> {
        (0..k)
            .map(|i| json!({"event_type": "step", "message": format!("step {i}"), "timestamp": "2026-11-30T10:30:00Z"}))
            .collect()
    };
    let mut replies: Vec<Reply> =
        (1..=STEPS).map(|k| Reply::Json(json!({"status": "running", "events": events(k)}))).collect();
    replies.push(Reply::Json(json!({"status": "completed", "events": events(STEPS)})));
    replies
}

#[tokio::test]
async fn a_standby_takes_over_a_killed_instance_and_nothing_is_lost_or_reordered() {
    let Some(db) = TestDatabase::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    let store = Postgres::open(&db.url).await.unwrap();
    let watches: Vec<NewWatch> = (0..JOBS)
        .map(|n| {
            dari.script(&job_id(n), script());
            NewWatch {
                job_id: job_id(n),
                portal: "acme/form".parse().unwrap(),
                webhooks: None,
                labels: Default::default(),
                from_now: false,
            }
        })
        .collect();
    store.add_watches(watches).await.unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        config_text(Path::new(&db.url), &dari, &[("backend", &receiver.url)], "[cluster]\nlease_ttl = \"3s\"\n"),
    )
    .unwrap();

    let (log_a, log_b) = (dir.path().join("a.log"), dir.path().join("b.log"));
    let mut a = spawn_daemon(&config, &log_a);
    log_says(&log_a, 1, "this instance is the active one").await;
    let mut b = spawn_daemon(&config, &log_b);
    log_says(&log_b, 1, "waiting as a standby").await;

    // Kill the active one in the middle of the jobs' lives.
    let mut got: Vec<Received> = Vec::new();
    while got.len() < 20 {
        got.push(tokio::time::timeout(Duration::from_secs(10), receiver.next()).await.expect("deliveries flow"));
    }
    signal(&a, "KILL");
    let killed = Instant::now();
    wait_exit(&mut a, Duration::from_secs(5)).await;
    log_says(&log_b, 1, "this instance is the active one").await;
    assert!(killed.elapsed() < Duration::from_secs(5), "the standby took over in {:?}", killed.elapsed());

    // Every job completes; collect until each one's completion is in.
    let deadline = Instant::now() + Duration::from_secs(30);
    let completed = |got: &[Received]| {
        got.iter()
            .filter(|r| r.kind() == "job.completed" && r.answered == 204)
            .map(|r| r.json()["data"]["job_id"].to_string())
            .collect::<HashSet<_>>()
            .len()
    };
    while completed(&got) < JOBS {
        assert!(Instant::now() < deadline, "only {} of {JOBS} jobs completed", completed(&got));
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(500), receiver.next()).await {
            got.push(r);
        }
    }
    signal(&b, "TERM");
    assert!(wait_exit(&mut b, Duration::from_secs(15)).await.success(), "the standby-turned-active exits 0");
    got.extend(receiver.drain());

    // Per job: the distinct notifications in order of first arrival are
    // exactly its life (pending is skipped by the script: running first),
    // each id always with the same body.
    let mut bodies: BTreeMap<String, String> = BTreeMap::new();
    let mut per_job: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for r in &got {
        let id = r.header("webhook-id");
        if let Some(body) = bodies.get(&id) {
            assert_eq!(body, &r.body, "a re-send of {id} has its first body");
            continue;
        }
        bodies.insert(id.clone(), r.body.clone());
        let v = r.json();
        let kind = r.kind();
        let detail = if kind == "job.event" { v["data"]["event"]["index"].to_string() } else { String::new() };
        per_job.entry(v["data"]["job_id"].as_str().unwrap().to_owned()).or_default().push((kind, detail));
    }
    let mut expected = vec![("job.event".to_owned(), "0".to_owned()), ("job.running".to_owned(), String::new())];
    expected.extend((1..STEPS).map(|i| ("job.event".to_owned(), i.to_string())));
    expected.push(("job.completed".to_owned(), String::new()));
    assert_eq!(per_job.len(), JOBS);
    for (job, life) in &per_job {
        assert_eq!(life, &expected, "job {job}: every notification once, in order");
    }
}
