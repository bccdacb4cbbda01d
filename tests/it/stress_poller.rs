//! Issue 10, the poller under stress: a saturated `max_in_flight`, orgs held
//! back by a 429 or a rate limit, Dari's absurd `Retry-After` values, and a
//! finished watch removed and added again.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::routing::get;
use dari_relay::config::Config;
use dari_relay::health::{Health, STALE_AFTER};
use dari_relay::metrics::Metrics;
use dari_relay::poller::Poller;
use dari_relay::store::{Sqlite, Store};
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fakes::{
    API_KEY, FakeDari, FakeReceiver, Relay, Reply, SECRET, config_text, eventually, watch_on, within_real_time,
};

fn job_id(i: usize) -> String {
    format!("{i:08x}-0000-4000-8000-0000000057e5")
}

/// A Dari that answers every status request after `delay` with the same
/// running job, and records which job each request was for.
async fn slow_dari(delay: Duration) -> (String, Arc<Mutex<Vec<String>>>) {
    async fn answer(
        State((delay, seen)): State<(Duration, Arc<Mutex<Vec<String>>>)>,
        Query(q): Query<HashMap<String, String>>,
    ) -> String {
        seen.lock().unwrap().push(q.get("job_id").cloned().unwrap_or_default());
        tokio::time::sleep(delay).await;
        json!({"status": "running", "events": []}).to_string()
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let router =
        Router::new().route("/task/{org}/{endpoint}/status", get(answer)).with_state((delay, Arc::clone(&seen)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (format!("http://{addr}"), seen)
}

/// The poller alone, on this test's runtime, with its health and turn counter.
struct Scheduler {
    store: Arc<Store>,
    health: Arc<Health>,
    turns: Arc<std::sync::atomic::AtomicU64>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), dari_relay::store::StoreError>>,
}

impl Scheduler {
    fn start(text: &str, watches: &[(&str, String)]) -> Scheduler {
        let config = Arc::new(Config::from_toml(text, Path::new("test.toml"), &crate::fakes::env).unwrap());
        let store = Arc::new(Store::open(&config.database).unwrap());
        store.hold_paused_time_while_writing();
        let added: Vec<_> = watches.iter().map(|(portal, job)| watch_on(portal, job)).collect();
        store.add_watches(&added).unwrap();
        let health = Arc::new(Health::default());
        let (_, config_rx) = tokio::sync::watch::channel(config);
        let poller = Poller::new(
            config_rx,
            Arc::new(Sqlite(Arc::clone(&store))),
            Arc::new(Metrics::default()),
            Arc::clone(&health),
            Arc::new(Notify::new()),
        )
        .unwrap();
        let turns = poller.turn_counter();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(poller.run(shutdown.clone()));
        Scheduler { store, health, turns, shutdown, task }
    }

    /// Whether the poller's heartbeat is younger than `age`: `Health::stale`
    /// asked about a moment `STALE_AFTER - age` from now. (No deliverer runs
    /// here, so its heartbeat is stale and not looked at.)
    fn beat_within(&self, age: Duration) -> bool {
        let stale = self.health.stale_at(std::time::Instant::now() + (STALE_AFTER - age));
        !stale.iter().any(|loop_| loop_.contains("poller"))
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn upstream_config(db: &Path, base_url: &str, upstream: &str, orgs: &str) -> String {
    format!(
        "database = \"{}\"\n[upstream]\nbase_url = \"{base_url}\"\nrequest_timeout = \"2s\"\n{upstream}\n{orgs}",
        db.display()
    )
}

/// Item A: with every `max_in_flight` slot busy on a slow Dari, the loop
/// sleeps until a poll finishes or the scan is due. Before the fix it spun
/// on the overdue timer (hundreds of thousands of turns a second), so the
/// scan, which came after the timer in the biased select, never ran: a new
/// watch was never picked up and the heartbeat went stale while polls were
/// being served.
#[tokio::test(start_paused = true)]
async fn a_saturated_poller_sleeps_scans_and_beats() {
    let dir = tempfile::tempdir().unwrap();
    let (url, seen) = slow_dari(Duration::from_millis(400)).await;
    let text = upstream_config(
        &dir.path().join("r.db"),
        &url,
        "poll_interval = \"100ms\"\nmax_poll_interval = \"100ms\"\nmax_in_flight = 2",
        "[orgs.acme]\napi_key_env = \"DARI_API_KEY\"",
    );
    let watches: Vec<_> = (0..6).map(|i| ("acme/form", job_id(i))).collect();
    let scheduler = Scheduler::start(&text, &watches);
    // On paused time a spinning loop stops the clock: bounded in real time.
    let spins = "the scheduler never let paused time pass (it spins)";
    within_real_time(Duration::from_secs(10), spins, tokio::time::sleep(Duration::from_millis(300))).await;
    let added = job_id(99);
    scheduler.store.add_watches(&[watch_on("acme/form", &added)]).unwrap();

    let start = Instant::now();
    let turns_before = scheduler.turns.load(Ordering::Relaxed);
    within_real_time(Duration::from_secs(10), spins, async {
        while start.elapsed() < Duration::from_millis(2500) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(scheduler.beat_within(Duration::from_millis(800)), "the heartbeat went stale while saturated");
        }
    })
    .await;
    let turns = scheduler.turns.load(Ordering::Relaxed) - turns_before;
    let requests = seen.lock().unwrap().clone();
    scheduler.stop().await;

    // 2.5 s: about 12 polls finishing and 10 scans; a spinning loop turns
    // hundreds of thousands of times.
    assert!(turns < 200, "the saturated loop turned {turns} times in 2.5 s");
    assert!(requests.len() >= 8, "polls kept being served: {}", requests.len());
    assert!(requests.contains(&added), "the watch added while saturated was never polled");
}

/// Item A's siblings: watches held back by a 429 pause or by the org's
/// `max_requests_per_second` are put off until they can go, and the loop
/// sleeps meanwhile instead of popping them again and again.
#[tokio::test(start_paused = true)]
async fn paused_and_rate_limited_orgs_do_not_spin() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut watches = Vec::new();
    for i in 0..5 {
        dari.script(&job_id(i), vec![Reply::Status(429, Some("1".into()))]);
        watches.push(("paused/form", job_id(i)));
    }
    for i in 10..15 {
        dari.script(&job_id(i), vec![Reply::Json(json!({"status": "running", "events": [], "n": i}))]);
        watches.push(("slow/form", job_id(i)));
    }
    let text = upstream_config(
        &dir.path().join("r.db"),
        &dari.url,
        "poll_interval = \"50ms\"\nmax_poll_interval = \"50ms\"",
        "[orgs.paused]\napi_key_env = \"DARI_API_KEY\"\n\
         [orgs.slow]\napi_key_env = \"DARI_API_KEY\"\nmax_requests_per_second = 4",
    );
    let scheduler = Scheduler::start(&text, &watches);
    let spins = "the scheduler never let paused time pass (it spins)";
    within_real_time(Duration::from_secs(10), spins, tokio::time::sleep(Duration::from_millis(500))).await;
    let (turns_before, requests_before) = (scheduler.turns.load(Ordering::Relaxed), dari.requests().len());
    within_real_time(Duration::from_secs(10), spins, tokio::time::sleep(Duration::from_secs(2))).await;
    let turns = scheduler.turns.load(Ordering::Relaxed) - turns_before;
    let requests = dari.requests();
    assert!(scheduler.beat_within(Duration::from_millis(800)));
    scheduler.stop().await;

    let count = |org: &str| requests[requests_before..].iter().filter(|r| r.org == org).count();
    // Paused for a second at each 429: at most about two pauses' worth of
    // requests, one per watch each time the pause ends.
    assert!(count("paused") <= 15, "paused org polled {} times in 2 s", count("paused"));
    // Four a second, plus the bucket's burst.
    assert!((6..=12).contains(&count("slow")), "rate-limited org polled {} times in 2 s", count("slow"));
    // Each turn starts a request, handles finished ones, scans or ends a
    // wait: a few per request, not thousands.
    assert!(turns < 150, "the loop turned {turns} times in 2 s for {} requests", requests.len() - requests_before);
}

/// Item B, through the real binary: Dari answering 429 with a `Retry-After`
/// of `u64::MAX` seconds (which made `now + wait` overflow and the daemon
/// exit 1, again after each restart), `9999999999` (the org silent until a
/// restart), `0` and a date in the past (thousands of requests a second).
/// The daemon stays up, the huge values pause their org for the hour (one
/// request in the window, none after), and `0` or a past date pause it for
/// a second: about one request a second, never a burst.
#[tokio::test]
async fn absurd_retry_after_values_neither_crash_nor_silence_nor_flood() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let cases = [
        ("huge", "18446744073709551615"),
        ("years", "9999999999"),
        ("zero", "0"),
        ("past", "Wed, 21 Oct 2015 07:28:00 GMT"),
    ];
    let mut orgs = String::new();
    let db = dir.path().join("r.db");
    let store = Store::open(&db).unwrap();
    for (i, (org, retry_after)) in cases.iter().enumerate() {
        dari.script(&job_id(i), vec![Reply::Status(429, Some((*retry_after).into()))]);
        orgs.push_str(&format!("[orgs.{org}]\napi_key_env = \"DARI_API_KEY\"\n"));
        store.add_watches(&[watch_on(&format!("{org}/form"), &job_id(i))]).unwrap();
    }
    drop(store);
    let text = upstream_config(&db, &dari.url, "poll_interval = \"50ms\"\nmax_poll_interval = \"200ms\"", &orgs);
    let config = dir.path().join("relay.toml");
    std::fs::write(&config, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dari-relay"))
        .args(["run", "--config"])
        .arg(&config)
        .env("DARI_API_KEY", API_KEY)
        .env("HOOK_SECRET", SECRET)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    while cases.iter().any(|(org, _)| !dari.requests().iter().any(|r| r.org == *org)) {
        assert!(child.try_wait().unwrap().is_none(), "the daemon exited before every org was polled");
        assert!(Instant::now() < deadline, "not every org was polled: {:?}", dari.requests());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let exited = child.try_wait().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(exited.is_none(), "the daemon exited: {exited:?}");

    let requests = dari.requests();
    let count = |org: &str| requests.iter().filter(|r| r.org == org).count();
    assert_eq!(count("huge"), 1, "a huge Retry-After pauses the org (for the hour)");
    assert_eq!(count("years"), 1, "a Retry-After of years pauses the org (for the hour)");
    for org in ["zero", "past"] {
        let times: Vec<Instant> = requests.iter().filter(|r| r.org == org).map(|r| r.at).collect();
        assert!((2..=4).contains(&times.len()), "{org}: {} requests in about 2.3 s", times.len());
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(gap >= Duration::from_millis(950), "{org}: the org was asked again after {gap:?}");
        }
    }
}

/// Item C: a watch whose job completed, removed and added again, is finished
/// by its first poll, which sees the terminal status again and announces
/// nothing already delivered. Before the fix the re-added watch kept the
/// hash of that same terminal answer, so every poll was "unchanged": it was
/// polled until `max_watch_age` and then got a false `watch.failed`.
#[tokio::test]
async fn a_finished_watch_added_again_finishes_without_a_false_failure() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    const JOB: &str = "550e8400-e29b-41d4-a716-446655440000";
    dari.script(JOB, vec![Reply::Json(json!({"status": "completed", "events": [{"event_type": "step"}]}))]);
    let text = config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "")
        .replace("[delivery]", "max_watch_age = \"1s\"\n[delivery]");
    let relay = Relay::start(&text).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    let first = receiver.until_delivered("job.completed").await;
    assert_eq!(first.len(), 2, "job.event and job.completed");
    let state = |relay: &Relay| relay.store.list_watches(true).unwrap()[0].state;
    eventually(Duration::from_secs(5), || "the watch never finished".to_owned(), || state(&relay) == "finished").await;

    assert!(relay.store.remove_watch(JOB).unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap().added, 1);
    let polls_at_readd = dari.polls(JOB);
    eventually(
        Duration::from_secs(5),
        || format!("the re-added watch of an ended job never finished: {}", state(&relay)),
        || state(&relay) == "finished",
    )
    .await;
    // Past max_watch_age: a watch still polled would have failed by now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let polls = dari.polls(JOB) - polls_at_readd;
    let later = receiver.drain();
    let summary = relay.store.list_watches(true).unwrap();
    relay.stop().await;
    assert_eq!(polls, 1, "one poll finishes the re-added watch");
    assert_eq!(summary[0].state, "finished", "{:?}", summary[0]);
    assert!(later.is_empty(), "nothing announced again: {:?}", later.iter().map(|r| r.kind()).collect::<Vec<_>>());
}

/// Item C's sibling: a running job's watch removed and added again within
/// one scan interval stays in the scheduler, and must take the row's fresh
/// age. Before, it kept the old `created_at`, so `max_watch_age` gave up on
/// it (a false `watch.failed`) counting from the first add.
#[tokio::test]
async fn a_watch_re_added_between_two_scans_takes_its_fresh_age() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    const JOB: &str = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";
    dari.script(JOB, vec![Reply::Json(json!({"status": "running", "events": []}))]);
    let text = config_text(&dir.path().join("r.db"), &dari, &[], "")
        .replace("[delivery]", "max_watch_age = \"1s\"\n[delivery]");
    let relay = Relay::start(&text).await;
    let start = Instant::now();
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(dari.polls(JOB) > 0);
    // Both in one go: the next scan sees the watch active, as it was.
    assert!(relay.store.remove_watch(JOB).unwrap());
    assert_eq!(relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap().added, 1);
    tokio::time::sleep_until(start + Duration::from_millis(1400)).await;
    let state = relay.store.list_watches(true).unwrap()[0].state;
    assert_eq!(state, "active", "given up on by the age of its first add");
    let ended = || relay.store.list_watches(true).unwrap()[0].state != "active";
    eventually(Duration::from_secs(4), || "the re-added watch never reached its own max_watch_age".to_owned(), ended)
        .await;
    assert!(start.elapsed() >= Duration::from_millis(1650), "gave up after {:?}", start.elapsed());
    relay.stop().await;
}
