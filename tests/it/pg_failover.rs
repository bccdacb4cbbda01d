//! Failover with the real binary on PostgreSQL: three `dari-relay run`
//! processes on one database, one active and two standbys, while jobs are
//! busy. The active one is frozen (SIGSTOP) past its lease and resumed (it
//! must stop, fenced), the next is stopped with SIGTERM (its lease handed
//! over at once) and restarted, the next killed (SIGKILL). Every
//! notification still arrives, in order per job, each re-send with its
//! first `webhook-id`, and nothing under two ids.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::Child;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::delivery::{signal, spawn_daemon, wait_exit};
use crate::fakes::{FakeDari, FakeReceiver, Received, Reply, config_text, eventually, log_says};
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

const ACTIVE: &str = "this instance is the active one";
const TTL: Duration = Duration::from_secs(3);

/// Waits until one of `logs` says it became active once more than
/// `actives` counted, and returns which.
async fn wait_new_active(logs: &[std::path::PathBuf], actives: &mut [usize; 3]) -> usize {
    let mut next = None;
    let took_over = || {
        for (i, log) in logs.iter().enumerate() {
            let said = std::fs::read_to_string(log).unwrap_or_default().matches(ACTIVE).count();
            if said > actives[i] {
                actives[i] = said;
                next = Some(i);
                return true;
            }
        }
        false
    };
    eventually(Duration::from_secs(15), || "no standby took over".to_owned(), took_over).await;
    next.expect("took over")
}

#[tokio::test]
async fn three_instances_survive_a_freeze_a_restart_and_a_kill_and_nothing_is_lost_or_reordered() {
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

    // Three instances: the first active, two standbys.
    let logs: Vec<_> = (0..3).map(|i| dir.path().join(format!("{i}.log"))).collect();
    let mut relays: Vec<Child> = Vec::new();
    relays.push(spawn_daemon(&config, &logs[0]));
    log_says(&logs[0], 1, ACTIVE).await;
    for log in &logs[1..] {
        relays.push(spawn_daemon(&config, log));
        log_says(log, 1, "waiting as a standby").await;
    }
    let mut got: Vec<Received> = Vec::new();
    let mut take = async |got: &mut Vec<Received>, n: usize| {
        let until = got.len() + n;
        while got.len() < until {
            got.push(tokio::time::timeout(Duration::from_secs(10), receiver.next()).await.expect("deliveries flow"));
        }
    };
    take(&mut got, 15).await;
    let mut actives = [1, 0, 0];

    // 1. SIGSTOP the active one past its lease: a standby takes over within
    // lease_ttl + 2 s; resumed, the frozen one finds itself fenced and exits.
    signal(&relays[0], "STOP");
    let frozen = Instant::now();
    let next = wait_new_active(&logs, &mut actives).await;
    assert!(frozen.elapsed() < TTL + Duration::from_secs(2), "taken over in {:?}", frozen.elapsed());
    assert_ne!(next, 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&relays[0], "CONT");
    let status = wait_exit(&mut relays[0], Duration::from_secs(10)).await;
    assert!(!status.success(), "the resumed instance stops: it lost its lease");
    take(&mut got, 15).await;

    // 2. SIGTERM the active one: it releases, the last standby takes over
    // within 2 s; the stopped one is restarted and waits as a standby.
    signal(&relays[next], "TERM");
    let stopped = Instant::now();
    assert!(wait_exit(&mut relays[next], Duration::from_secs(15)).await.success());
    let last = wait_new_active(&logs, &mut actives).await;
    assert!(stopped.elapsed() < Duration::from_secs(4), "taken over in {:?}", stopped.elapsed());
    let restarted = dir.path().join("restarted.log");
    relays[next] = spawn_daemon(&config, &restarted);
    log_says(&restarted, 1, "waiting as a standby").await;
    take(&mut got, 15).await;

    // 3. SIGKILL the active one: the restarted standby takes over.
    signal(&relays[last], "KILL");
    let killed = Instant::now();
    wait_exit(&mut relays[last], Duration::from_secs(5)).await;
    log_says(&restarted, 1, ACTIVE).await;
    assert!(killed.elapsed() < TTL + Duration::from_secs(2), "taken over in {:?}", killed.elapsed());

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
    signal(&relays[next], "TERM");
    assert!(wait_exit(&mut relays[next], Duration::from_secs(15)).await.success());
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
