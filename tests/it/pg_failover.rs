//! Several instances with the real binary on PostgreSQL: three `dari-relay
//! run` processes on one database share busy jobs in fair shares. One is
//! frozen (SIGSTOP) past its lease and resumed (it must stop, fenced), one
//! stopped with SIGTERM (its watches handed over at once) and restarted,
//! one killed (SIGKILL). Every job of a lost instance is polled again within
//! `lease_ttl + max_poll_interval + 2 s`; every notification arrives, in
//! order per job, each re-send with its first `webhook-id`, nothing under
//! two ids, and no chain is ever sent by two instances at once.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::delivery::{signal, spawn_daemon, wait_exit};
use crate::fakes::{
    Behaviour, FakeDari, FakeReceiver, Received, Reply, config_text, eventually, eventually_async, log_says,
};
use crate::pg::TestDatabase;
use dari_relay::store::{OperatorStore, Postgres};
use dari_relay::vocab::NewWatch;

const JOBS: usize = 21;
/// Changes per job before it completes: one more event each, every
/// other poll (so a job stays busy for about 16 s at `poll_interval =
/// 200ms`, through every phase, with a delivery per change).
const STEPS: usize = 32;
const TTL: Duration = Duration::from_secs(3);
const MAX_POLL: Duration = Duration::from_secs(1);
/// How long the receiver takes to answer: a chain's next request can only
/// come after its last answer, so two arrivals of one chain closer than
/// this mean two senders.
const ANSWER: Duration = Duration::from_millis(20);

fn job_id(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

fn script() -> Vec<Reply> {
    let events = |k: usize| -> Vec<Value> {
        (0..k)
            .map(|i| json!({"event_type": "step", "message": format!("step {i}"), "timestamp": "2026-11-30T10:30:00Z"}))
            .collect()
    };
    let mut replies: Vec<Reply> = (1..=STEPS)
        .flat_map(|k| [0, 1].map(|_| Reply::Json(json!({"status": "running", "events": events(k)}))))
        .collect();
    replies.push(Reply::Json(json!({"status": "completed", "events": events(STEPS)})));
    replies
}

/// The jobs `instance` owns that are still being polled.
async fn owned_active(store: &Postgres, instance: &str) -> Vec<String> {
    let mut out = Vec::new();
    for n in 0..JOBS {
        let job = job_id(n);
        let active = store
            .query_watches(&dari_relay::store::WatchQuery { job_id: Some(job.clone()), ..Default::default() })
            .await
            .unwrap()
            .first()
            .is_some_and(|w| w.state == "active");
        if active && store.owner_of(&job).await.unwrap().as_deref() == Some(instance) {
            out.push(job);
        }
    }
    out
}

/// Checks that every job in `jobs` was polled after `lost` and within the
/// bound, waiting for it as long as the bound allows.
async fn polled_again(dari: &FakeDari, jobs: &[String], lost: Instant, what: &str) {
    let bound = TTL + MAX_POLL + Duration::from_secs(2);
    let pending = |dari: &FakeDari| -> Vec<String> {
        let requests = dari.requests();
        jobs.iter().filter(|j| !requests.iter().any(|r| &r.job_id == *j && r.at > lost)).cloned().collect()
    };
    let left = bound.saturating_sub(lost.elapsed());
    eventually(
        left,
        || format!("{what}: not polled again within {bound:?}: {:?}", pending(dari)),
        || pending(dari).is_empty(),
    )
    .await;
    for job in jobs {
        let first = dari.requests().iter().filter(|r| &r.job_id == job && r.at > lost).map(|r| r.at).min().unwrap();
        assert!(first - lost <= bound, "{what}: {job} polled again after {:?}", first - lost);
    }
}

/// The live instances' watch counts, once all of `names` are live and the
/// watches spread over them in fair shares (none above its share plus one).
async fn spread(store: &Postgres, names: &[&str]) -> BTreeMap<String, i64> {
    let mut counts = BTreeMap::new();
    let fair = JOBS.div_ceil(names.len()) as i64;
    let spread_out = async || {
        let live = store.instances().await.unwrap();
        counts = live.iter().map(|i| (i.instance.clone(), i.watches)).collect();
        let total: i64 = counts.values().sum();
        live.len() == names.len()
            && names.iter().all(|n| counts.contains_key(*n))
            && total >= JOBS as i64 - 1
            && counts.values().all(|&w| w >= 1 && w <= fair + 1)
    };
    eventually_async(Duration::from_secs(20), || "the watches never spread in fair shares".to_owned(), spread_out)
        .await;
    counts
}

fn write_config(dir: &Path, db: &str, dari: &FakeDari, receiver: &str, instance: &str) -> PathBuf {
    let text = config_text(
        Path::new(db),
        dari,
        &[("backend", receiver)],
        &format!("[cluster]\ninstance = \"{instance}\"\nlease_ttl = \"{}s\"\n", TTL.as_secs()),
    )
    .replace("max_poll_interval = \"400ms\"", &format!("max_poll_interval = \"{}s\"", MAX_POLL.as_secs()))
    .replace("poll_interval = \"50ms\"", "poll_interval = \"200ms\"");
    let path = dir.join(format!("{instance}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn three_instances_share_the_work_and_survive_a_freeze_a_restart_and_a_kill() {
    let Some(db) = TestDatabase::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    receiver.behave(Behaviour { flaky: 0.0, delay: ANSWER });
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
    let names = ["relay-0", "relay-1", "relay-2"];
    let configs: Vec<PathBuf> =
        names.iter().map(|n| write_config(dir.path(), &db.url, &dari, &receiver.url, n)).collect();
    let logs: Vec<PathBuf> = names.iter().map(|n| dir.path().join(format!("{n}.log"))).collect();
    let mut relays: Vec<Child> = Vec::new();
    for (config, log) in configs.iter().zip(&logs) {
        relays.push(spawn_daemon(config, log));
        log_says(log, 1, "joined the cluster").await;
    }
    let began = Instant::now();
    let shares = spread(&store, &names).await;
    eprintln!("{:?}: three instances, watches each: {shares:?}", began.elapsed());
    let mut got: Vec<Received> = Vec::new();

    // 1. SIGSTOP relay-0 past its lease: its jobs are polled again by the
    // others in time; resumed, it finds itself fenced and exits.
    let jobs = owned_active(&store, "relay-0").await;
    assert!(!jobs.is_empty(), "relay-0 owns busy jobs: {shares:?}");
    signal(&relays[0], "STOP");
    let frozen = Instant::now();
    eprintln!("{:?}: SIGSTOP relay-0", frozen - began);
    polled_again(&dari, &jobs, frozen, "after SIGSTOP").await;
    // Its jobs were taken over, so its row has expired: it is past its
    // lease (checked, not slept for).
    let gone = async || store.instances().await.unwrap().iter().all(|i| i.instance != "relay-0");
    eventually_async(Duration::from_secs(1), || "relay-0 still listed as live".to_owned(), gone).await;
    assert!(
        frozen.elapsed() >= TTL.saturating_sub(Duration::from_millis(500)),
        "taken over before its lease could end"
    );
    eprintln!("{:?}: SIGCONT relay-0", began.elapsed());
    signal(&relays[0], "CONT");
    let status = wait_exit(&mut relays[0], Duration::from_secs(10)).await;
    assert!(!status.success(), "the resumed instance stops: it lost its leases");
    got.extend(receiver.drain());

    // 2. SIGTERM relay-1: it leaves, relay-2 takes its jobs at once; it is
    // restarted under its name and gets its share back.
    let jobs = owned_active(&store, "relay-1").await;
    assert!(!jobs.is_empty(), "relay-1 owns busy jobs");
    signal(&relays[1], "TERM");
    let stopped = Instant::now();
    eprintln!("{:?}: SIGTERM relay-1", stopped - began);
    assert!(wait_exit(&mut relays[1], Duration::from_secs(15)).await.success());
    polled_again(&dari, &jobs, stopped, "after SIGTERM").await;
    eventually_async(
        Duration::from_secs(4),
        || "relay-2 did not take relay-1's jobs within 2 s".to_owned(),
        async || {
            let mut all = true;
            for job in &jobs {
                all &= store.owner_of(job).await.unwrap().as_deref() == Some("relay-2");
            }
            all
        },
    )
    .await;
    assert!(
        stopped.elapsed() < Duration::from_secs(2) + Duration::from_millis(1500),
        "taken over in {:?} (stop included)",
        stopped.elapsed()
    );
    let restarted = dir.path().join("relay-1.restarted.log");
    relays[1] = spawn_daemon(&configs[1], &restarted);
    log_says(&restarted, 1, "joined the cluster").await;
    let shares = spread(&store, &names[1..]).await;
    eprintln!("{:?}: after the restart, watches each: {shares:?}", began.elapsed());
    got.extend(receiver.drain());

    // 3. SIGKILL relay-2: the restarted relay-1 takes everything.
    let jobs = owned_active(&store, "relay-2").await;
    assert!(!jobs.is_empty(), "relay-2 owns busy jobs");
    signal(&relays[2], "KILL");
    let killed = Instant::now();
    wait_exit(&mut relays[2], Duration::from_secs(5)).await;
    polled_again(&dari, &jobs, killed, "after SIGKILL").await;
    eprintln!(
        "{:?}: relay-2's {} jobs polled again {:?} after the kill",
        began.elapsed(),
        jobs.len(),
        killed.elapsed()
    );

    // Every job completes; collect until each one's completion is in.
    let deadline = Instant::now() + Duration::from_secs(90);
    let completed = |got: &[Received]| {
        got.iter()
            .filter(|r| r.kind() == "job.completed" && r.answered == 204)
            .map(|r| r.json()["data"]["job_id"].to_string())
            .collect::<HashSet<_>>()
            .len()
    };
    while completed(&got) < JOBS {
        if Instant::now() >= deadline {
            let counts = store.delivery_counts().await.unwrap();
            panic!("only {} of {JOBS} jobs completed; {} requests; deliveries {counts:?}", completed(&got), got.len());
        }
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(500), receiver.next()).await {
            got.push(r);
        }
    }
    eprintln!("{:?}: every job completed", began.elapsed());
    signal(&relays[1], "TERM");
    assert!(wait_exit(&mut relays[1], Duration::from_secs(15)).await.success());
    got.extend(receiver.drain());

    // Per job: the distinct notifications in order of first arrival are
    // exactly its life, each id always with the same body; and no two
    // requests of one chain overlapped (one sender at a time).
    let mut bodies: BTreeMap<String, String> = BTreeMap::new();
    let mut per_job: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut arrivals: BTreeMap<String, Vec<(Instant, String, String)>> = BTreeMap::new();
    for r in &got {
        let v = r.json();
        let job = v["data"]["job_id"].as_str().unwrap().to_owned();
        let id = r.header("webhook-id");
        arrivals.entry(job.clone()).or_default().push((r.at, id.clone(), r.kind()));
        if let Some(body) = bodies.get(&id) {
            assert_eq!(body, &r.body, "a re-send of {id} has its first body");
            continue;
        }
        bodies.insert(id.clone(), r.body.clone());
        let kind = r.kind();
        let detail = if kind == "job.event" { v["data"]["event"]["index"].to_string() } else { String::new() };
        per_job.entry(job).or_default().push((kind, detail));
    }
    let mut expected = vec![("job.event".to_owned(), "0".to_owned()), ("job.running".to_owned(), String::new())];
    expected.extend((1..STEPS).map(|i| ("job.event".to_owned(), i.to_string())));
    expected.push(("job.completed".to_owned(), String::new()));
    assert_eq!(per_job.len(), JOBS);
    for (job, life) in &per_job {
        assert_eq!(life, &expected, "job {job}: every notification once, in order");
    }
    for (job, mut at) in arrivals {
        at.sort();
        for pair in at.windows(2) {
            let gap = pair[1].0 - pair[0].0;
            assert!(
                gap + Duration::from_millis(5) >= ANSWER,
                "job {job}: two requests {gap:?} apart ({:?} at {:?}, then {:?} at {:?}, test start {began:?}), one was still being answered: two senders at once",
                (&pair[0].1, &pair[0].2),
                pair[0].0 - began,
                (&pair[1].1, &pair[1].2),
                pair[1].0 - began
            );
        }
    }
}
