//! Issue 4, acceptance 1: the real binary through a busy scenario, killed
//! with SIGKILL at random moments over and over, loses nothing.
//!
//! 24 jobs run on a fake portal driven by the clock (not by polls, so the
//! jobs move on while the relay is dead), each emitting ten events a few a
//! second and passing through pending, running, waiting_for_input, running
//! and completed. Two webhooks receive them, one answering 500 at random. The
//! daemon is SIGKILLed 20 times at random moments and restarted each time,
//! then left to finish. The test then proves, for every job and webhook:
//! every stored notification reached the webhook, in order, any duplicate
//! carries its original's webhook-id and body, and every event and the
//! completion were stored exactly once.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::routing::get;
use dari_relay::store::Store;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::fakes::{API_KEY, Behaviour, FakeReceiver, Received, SECRET, eventually};
use dari_relay::vocab::{DeliveryState, NewWatch};

const JOBS: usize = 24;
const EVENTS: usize = 10;
const EVENT_EVERY: Duration = Duration::from_millis(250);
const STAGGER: Duration = Duration::from_millis(200);
const KILLS: usize = 20;

fn job_id(j: usize) -> String {
    format!("{j:08x}-0000-4000-8000-00000000c0de")
}

/// The job's status once `k` of its events have happened.
fn status(k: usize) -> &'static str {
    match k {
        0 => "pending",
        1..=4 => "running",
        5 => "waiting_for_input",
        6..=9 => "running",
        _ => "completed",
    }
}

/// A portal whose jobs move with the clock.
async fn timeline_portal(start: Instant) -> String {
    async fn answer(State(start): State<Instant>, Query(q): Query<HashMap<String, String>>) -> String {
        let j = usize::from_str_radix(&q["job_id"][..8], 16).unwrap();
        let elapsed = start.elapsed().saturating_sub(STAGGER * j as u32);
        let k = ((elapsed.as_millis() / EVENT_EVERY.as_millis()) as usize).min(EVENTS);
        let events: Vec<Value> = (0..k)
            .map(|i| match i {
                4 => {
                    json!({"event_type": "question", "message": "Approve?", "data": {"question_id": format!("q-{j}")}})
                }
                _ => json!({"event_type": "step_completed", "message": format!("job {j} step {i}"), "data": {"i": i}}),
            })
            .collect();
        let final_result = if k == EVENTS { json!({"job": j}) } else { Value::Null };
        json!({"status": status(k), "events": events, "current_step": k, "final_result": final_result}).to_string()
    }
    let router = Router::new().route("/task/{org}/{endpoint}/status", get(answer)).with_state(start);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

fn spawn(config: &std::path::Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dari-relay"))
        .args(["run", "--config"])
        .arg(config)
        .env("DARI_API_KEY", API_KEY)
        .env("HOOK_SECRET", SECRET)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("relay.db");
    let start = Instant::now();
    let portal = timeline_portal(start).await;
    let mut steady = FakeReceiver::start().await;
    let mut flaky = FakeReceiver::start().await;
    flaky.behave(Behaviour { flaky: 0.3, delay: Duration::ZERO });
    let schedule = vec!["\"50ms\""; 40].join(", ");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
database = "{db}"
[upstream]
base_url = "{portal}"
poll_interval = "50ms"
max_poll_interval = "200ms"
[delivery]
retry_schedule = [{schedule}]
[orgs.acme]
api_key_env = "DARI_API_KEY"
[[webhooks]]
name = "steady"
url = "{steady}"
secret_env = "HOOK_SECRET"
[[webhooks]]
name = "flaky"
url = "{flaky}"
secret_env = "HOOK_SECRET"
"#,
            db = db.display(),
            steady = steady.url,
            flaky = flaky.url,
        ),
    )
    .unwrap();
    let store = Store::open(&db).unwrap();
    let watches: Vec<NewWatch> = (0..JOBS)
        .map(|j| NewWatch {
            job_id: job_id(j),
            portal: "acme/busy".parse().unwrap(),
            webhooks: None,
            labels: Default::default(),
            from_now: false,
        })
        .collect();
    store.add_watches(&watches).unwrap();

    for _ in 0..KILLS {
        let mut daemon = spawn(&config);
        tokio::time::sleep(Duration::from_millis(fastrand::u64(120..420))).await;
        daemon.kill().unwrap(); // SIGKILL
        daemon.wait().unwrap();
    }
    // Let the last run finish everything, then stop it cleanly.
    let mut daemon = spawn(&config);
    let left = || {
        let active = store.list_watches(false).unwrap().len();
        let pending = store.delivery_counts().unwrap().get("pending").copied().unwrap_or(0);
        (active, pending)
    };
    let what = || format!("(watches active, deliveries pending) = {:?}", left());
    eventually(Duration::from_secs(60), what, || left() == (0, 0)).await;
    Command::new("kill").arg("-TERM").arg(daemon.id().to_string()).status().unwrap();
    assert!(daemon.wait().unwrap().success());

    let received = [("steady", steady.drain()), ("flaky", flaky.drain())];
    let mut duplicates = 0;
    for j in 0..JOBS {
        let job = job_id(j);
        let stored = store.notifications_of(&job).unwrap();
        // Every event and the completion were stored exactly once, in order.
        let events: Vec<u64> = stored
            .iter()
            .filter(|n| n.kind == "job.event")
            .map(|n| serde_json::from_str::<Value>(&n.body).unwrap()["data"]["event"]["index"].as_u64().unwrap())
            .collect();
        assert_eq!(events, (0..EVENTS as u64).collect::<Vec<_>>(), "job {j}");
        assert_eq!(stored.last().unwrap().kind, "job.completed", "job {j}");
        assert_eq!(stored.iter().filter(|n| n.kind == "job.completed").count(), 1);
        // Statuses follow one another: each names the one before it.
        let mut previous = Value::Null;
        for n in stored.iter().filter(|n| n.kind != "job.event") {
            let body: Value = serde_json::from_str(&n.body).unwrap();
            assert_eq!(body["data"]["previous_status"], previous, "job {j}: {}", n.kind);
            previous = body["data"]["status"].clone();
        }
        for (webhook, got) in &received {
            let expected: Vec<&str> = stored
                .iter()
                .map(|n| {
                    let d = n.deliveries.iter().find(|d| d.webhook == *webhook).unwrap();
                    assert_eq!(d.state, DeliveryState::Delivered, "job {j} {webhook} {}", n.kind);
                    d.msg_id.as_str()
                })
                .collect();
            let mine: Vec<&Received> = got.iter().filter(|r| r.json()["data"]["job_id"] == job.as_str()).collect();
            // A duplicate carries its original's id and body.
            let mut bodies: HashMap<String, &str> = HashMap::new();
            for r in &mine {
                let first = bodies.entry(r.header("webhook-id")).or_insert(&r.body);
                assert_eq!(*first, r.body, "job {j} {webhook}: same id, different body");
            }
            // In order: the 2xx-answered ids, with repeats collapsed, are exactly the stored order.
            let mut delivered: Vec<String> =
                mine.iter().filter(|r| (200..300).contains(&r.answered)).map(|r| r.header("webhook-id")).collect();
            let before = delivered.len();
            delivered.dedup();
            duplicates += before - delivered.len();
            assert_eq!(delivered, expected, "job {j} {webhook}: order or completeness");
        }
    }
    let verifier = standardwebhooks::Webhook::new(SECRET).unwrap();
    for (_, got) in &received {
        for r in got.iter().take(50) {
            verifier.verify(r.body.as_bytes(), &r.headers).unwrap();
        }
    }
    eprintln!(
        "crash test: {KILLS} SIGKILLs, {JOBS} jobs, {} requests received, {duplicates} duplicate deliveries (same id), {:.1}s",
        received.iter().map(|(_, g)| g.len()).sum::<usize>(),
        start.elapsed().as_secs_f64()
    );
}
