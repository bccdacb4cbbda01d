//! Issue 4: deliveries that survive anything. Dead letters and replay, 410
//! pausing, isolation from slow receivers, graceful shutdown, reload,
//! pruning and storage faults.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::fakes::{
    API_KEY, Behaviour, FakeDari, FakeReceiver, Relay, Reply, SECRET, config_text, eventually, log_says, watch_on,
};
use dari_relay::vocab::{DeliveryState, NewWatch};

const JOB: &str = "550e8400-e29b-41d4-a716-446655440000";
const JOB2: &str = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";
const JOB3: &str = "7c9e6679-7425-40de-944b-e07fc1f098ae";

fn watch(job_id: &str) -> NewWatch {
    watch_on("acme/form", job_id)
}

fn job(status: &str, events: usize) -> Reply {
    let events: Vec<Value> = (0..events).map(|i| json!({"event_type": "step", "message": format!("e{i}")})).collect();
    Reply::Json(json!({"status": status, "events": events}))
}

/// A three-step life: job.running, job.event, job.completed.
fn short_life() -> Vec<Reply> {
    vec![job("running", 0), job("running", 1), job("completed", 1)]
}

/// Runs the CLI against a config file, with the test secrets in its environment.
fn cli(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dari-relay"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("DARI_API_KEY", API_KEY)
        .env("HOOK_SECRET", SECRET)
        .output()
        .unwrap()
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A failed delivery keeps every attempt; `deliveries retry` sends it again
/// with the same webhook-id and a valid signature, ahead of the job's later
/// notifications that are still waiting.
#[tokio::test]
async fn failed_delivery_is_kept_with_attempts_and_replayed_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB, short_life());
    // job.running fails all three attempts; job.event fails once, so it is
    // waiting for its retry when job.running is replayed.
    receiver.answer_with(&[500, 502, 503, 500]);
    let text = config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "")
        .replace("retry_schedule = [\"100ms\", \"200ms\", \"300ms\"]", "retry_schedule = [\"50ms\", \"50ms\"]");
    let config = write_config(dir.path(), &text);
    let relay = Relay::start(&text).await;
    relay.store.add_watches(&[watch(JOB)]).unwrap();

    let mut got = vec![receiver.next().await, receiver.next().await, receiver.next().await, receiver.next().await];
    assert_eq!(
        got.iter().map(|r| r.kind()).collect::<Vec<_>>(),
        ["job.running", "job.running", "job.running", "job.event"]
    );
    let failed_id = got[0].header("webhook-id");
    // The dead letter, with every attempt, as the operator sees it.
    let out = cli(&config, &["deliveries", "list", "--status", "failed", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let failed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(failed.as_array().unwrap().len(), 1);
    assert_eq!(failed[0]["msg_id"], failed_id.as_str());
    let statuses: Vec<u64> =
        failed[0]["attempts_log"].as_array().unwrap().iter().map(|a| a["http_status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [500, 502, 503]);
    // Replay it while job.event waits for its retry.
    let id = failed[0]["id"].as_i64().unwrap().to_string();
    let out = cli(&config, &["deliveries", "retry", &id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    got.extend(receiver.until_delivered("job.completed").await);
    relay.settle().await;
    relay.stop().await;

    let after: Vec<(String, u16)> = got[4..].iter().map(|r| (r.kind(), r.answered)).collect();
    assert_eq!(after, [("job.running".into(), 204), ("job.event".into(), 204), ("job.completed".into(), 204)]);
    assert_eq!(got[4].header("webhook-id"), failed_id, "a replay keeps the webhook-id");
    assert_eq!(got[4].body, got[0].body, "and the body");
    standardwebhooks::Webhook::new(SECRET).unwrap().verify(got[4].body.as_bytes(), &got[4].headers).unwrap();
    assert_eq!(cli(&config, &["deliveries", "retry", &id]).status.code(), Some(2), "no longer failed");
}

/// A 410 pauses the webhook: nothing more is sent to it, its deliveries
/// wait, `webhooks list` shows it; `webhooks resume` sends the backlog in
/// order, starting with the very delivery that got the 410.
#[tokio::test]
async fn gone_pauses_the_webhook_until_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut gone = FakeReceiver::start().await;
    let mut other = FakeReceiver::start().await;
    dari.script(JOB, short_life());
    gone.answer_with(&[410]);
    let text = config_text(&dir.path().join("r.db"), &dari, &[("gone", &gone.url), ("other", &other.url)], "");
    let config = write_config(dir.path(), &text);
    let relay = Relay::start(&text).await;
    relay.store.add_watches(&[watch(JOB)]).unwrap();

    let first = gone.next().await;
    assert_eq!((first.kind(), first.answered), ("job.running".into(), 410));
    // The other webhook is not affected.
    let to_other = other.until_delivered("job.completed").await;
    assert_eq!(to_other.len(), 3);
    let out = cli(&config, &["webhooks", "list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = list.as_array().unwrap().iter().find(|w| w["name"] == "gone").unwrap().clone();
    assert_eq!((row["state"].as_str(), row["pending"].as_i64()), (Some("paused"), Some(3)), "{list}");
    assert_eq!(row["paused_reason"], "receiver answered 410 Gone");
    assert!(gone.drain().is_empty(), "nothing sent to a paused webhook");

    let out = cli(&config, &["webhooks", "resume", "gone"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resumed = gone.until_delivered("job.completed").await;
    relay.settle().await;
    relay.stop().await;
    assert_eq!(resumed.iter().map(|r| r.kind()).collect::<Vec<_>>(), ["job.running", "job.event", "job.completed"]);
    assert_eq!(resumed[0].header("webhook-id"), first.header("webhook-id"));
    assert_eq!(cli(&config, &["webhooks", "resume", "gone"]).status.code(), Some(2), "not paused any more");
    // The 410 did not spend one of the delivery's attempts.
    let stored = relay_notifications(dir.path(), JOB);
    assert!(stored.iter().flat_map(|n| &n.deliveries).all(|d| d.state == DeliveryState::Delivered));
    assert_eq!(stored[0].deliveries.iter().find(|d| d.webhook == "gone").unwrap().attempts, 1);
}

fn relay_notifications(dir: &Path, job_id: &str) -> Vec<dari_relay::store::StoredNotification> {
    dari_relay::store::Store::open(&dir.join("r.db")).unwrap().notifications_of(job_id).unwrap()
}

/// A receiver that never answers delays neither another webhook nor the polls.
#[tokio::test]
async fn a_hung_receiver_delays_nobody_else() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let hung = FakeReceiver::start().await;
    let mut fine = FakeReceiver::start().await;
    hung.behave(Behaviour { flaky: 0.0, delay: Duration::from_secs(60) });
    let jobs: Vec<String> = (0..6).map(|i| format!("{i:08x}-0000-4000-8000-000000000000")).collect();
    for j in &jobs {
        dari.script(j, short_life());
    }
    let text = config_text(&dir.path().join("r.db"), &dari, &[("hung", &hung.url), ("fine", &fine.url)], "")
        .replace("request_timeout = \"2s\"\n[orgs", "request_timeout = \"30s\"\nshutdown_timeout = \"100ms\"\n[orgs");
    let relay = Relay::start(&text).await;
    let started = Instant::now();
    relay.store.add_watches(&jobs.iter().map(|j| watch(j)).collect::<Vec<_>>()).unwrap();
    let mut completed = 0;
    while completed < jobs.len() {
        if fine.next().await.kind() == "job.completed" {
            completed += 1;
        }
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "the healthy webhook got every job's notifications in {took:?}");
    // Every job was polled to its end while the hung receiver held its slots.
    assert!(jobs.iter().all(|j| dari.polls(j) >= 3));
    let watches = relay.store.list_watches(true).unwrap();
    assert!(watches.iter().all(|w| w.state == "finished"));
    relay.stop().await;
}

/// The binary, with the test secrets, logging to a file.
pub(crate) fn spawn_daemon(config: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dari-relay"))
        .args(["run", "--config"])
        .arg(config)
        .env("DARI_API_KEY", API_KEY)
        .env("HOOK_SECRET", SECRET)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

pub(crate) fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill").arg(format!("-{sig}")).arg(child.id().to_string()).status().unwrap().success());
}

/// Waits for the child to exit, at most `limit`.
pub(crate) async fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let mut status = None;
    let exited = || {
        status = child.try_wait().unwrap();
        status.is_some()
    };
    eventually(limit, || "the daemon did not exit".to_owned(), exited).await;
    status.expect("exited")
}

/// SIGTERM with a delivery in flight: the daemon lets it finish, records
/// it, and exits 0. One that outlasts shutdown_timeout stays pending and is
/// delivered after the next start with the same webhook-id.
#[tokio::test]
async fn sigterm_lets_deliveries_in_flight_finish() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB, vec![job("completed", 0)]);
    dari.script(JOB2, vec![job("completed", 0)]);
    let text = config_text(&db, &dari, &[("h", &receiver.url)], "")
        .replace("request_timeout = \"2s\"\n[orgs", "request_timeout = \"10s\"\nshutdown_timeout = \"1s\"\n[orgs");
    let config = write_config(dir.path(), &text);
    let store = dari_relay::store::Store::open(&db).unwrap();
    store.add_watches(&[watch(JOB)]).unwrap();

    // 1. The answer comes within shutdown_timeout: delivered, exit 0.
    receiver.answer_after(204, Duration::from_millis(600));
    let log = dir.path().join("first.log");
    let mut daemon = spawn_daemon(&config, &log);
    let in_flight = receiver.next().await;
    let sent_at = Instant::now();
    signal(&daemon, "TERM");
    let status = wait_exit(&mut daemon, Duration::from_secs(5)).await;
    assert!(status.success(), "{status:?}");
    assert!(sent_at.elapsed() >= Duration::from_millis(450), "it waited for the answer");
    assert_eq!(store.notifications_of(JOB).unwrap()[0].deliveries[0].state, DeliveryState::Delivered);
    assert_eq!(in_flight.kind(), "job.completed");

    // 2. The answer outlasts shutdown_timeout: exit 0 anyway, still pending.
    store.add_watches(&[watch(JOB2)]).unwrap();
    receiver.answer_after(204, Duration::from_secs(8));
    let log = dir.path().join("second.log");
    let mut daemon = spawn_daemon(&config, &log);
    let cut = receiver.next().await;
    let signalled = Instant::now();
    signal(&daemon, "TERM");
    let status = wait_exit(&mut daemon, Duration::from_secs(5)).await;
    assert!(status.success(), "{status:?}");
    assert!(signalled.elapsed() < Duration::from_secs(3), "shutdown_timeout bounds the wait");
    assert_eq!(store.notifications_of(JOB2).unwrap()[0].deliveries[0].state, DeliveryState::Pending);

    // 3. The next start delivers it, same webhook-id.
    let log = dir.path().join("third.log");
    let mut daemon = spawn_daemon(&config, &log);
    let again = receiver.next().await;
    assert_eq!(again.header("webhook-id"), cut.header("webhook-id"));
    assert_eq!(again.body, cut.body);
    log_says(&log, 1, "delivered").await;
    signal(&daemon, "TERM");
    assert!(wait_exit(&mut daemon, Duration::from_secs(5)).await.success());
}

/// SIGHUP with a valid config applies it (a new webhook gets new
/// notifications); with an invalid one, the error is logged and the running
/// config kept.
#[tokio::test]
async fn sighup_reloads_a_valid_config_and_keeps_the_old_one_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let dari = FakeDari::start().await;
    let mut first = FakeReceiver::start().await;
    let mut second = FakeReceiver::start().await;
    for j in [JOB, JOB2, JOB3] {
        dari.script(j, vec![job("completed", 0)]);
    }
    let config = write_config(dir.path(), &config_text(&db, &dari, &[("first", &first.url)], ""));
    let store = dari_relay::store::Store::open(&db).unwrap();
    store.add_watches(&[watch(JOB)]).unwrap();
    let log = dir.path().join("relay.log");
    let mut daemon = spawn_daemon(&config, &log);
    assert_eq!(first.next().await.json()["data"]["job_id"], JOB);

    write_config(dir.path(), &config_text(&db, &dari, &[("first", &first.url), ("second", &second.url)], ""));
    signal(&daemon, "HUP");
    log_says(&log, 1, "SIGHUP: config reloaded").await;
    log_says(&log, 1, "deliverer uses the reloaded config").await;
    store.add_watches(&[watch(JOB2)]).unwrap();
    assert_eq!(first.next().await.json()["data"]["job_id"], JOB2);
    assert_eq!(second.next().await.json()["data"]["job_id"], JOB2);

    std::fs::write(&config, "[upstream]\npoll_interval = \"never\"\n").unwrap();
    signal(&daemon, "HUP");
    log_says(&log, 1, "SIGHUP: the new config is invalid; keeping the running one").await;
    store.add_watches(&[watch(JOB3)]).unwrap();
    assert_eq!(first.next().await.json()["data"]["job_id"], JOB3);
    assert_eq!(second.next().await.json()["data"]["job_id"], JOB3);
    signal(&daemon, "TERM");
    assert!(wait_exit(&mut daemon, Duration::from_secs(5)).await.success(), "still running after the bad reload");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("invalid duration \"never\""), "the log says what is wrong:\n{text}");
}

/// Pruning deletes delivered deliveries past retention with their attempts,
/// notifications left without deliveries, and ended watches with nothing
/// left; it keeps pending and failed work and active watches.
#[tokio::test]
async fn prune_keeps_unfinished_work_and_bounds_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut ok = FakeReceiver::start().await;
    let mut failing = FakeReceiver::start().await;
    failing.answer_with(&[500, 500, 500, 500]);
    dari.script(JOB, vec![job("completed", 1)]);
    dari.script(JOB2, vec![job("running", 0)]);
    let text = config_text(&dir.path().join("r.db"), &dari, &[("ok", &ok.url), ("failing", &failing.url)], "");
    let relay = Relay::start(&text).await;
    // Only JOB goes to the failing webhook, so its answers are JOB's.
    let only_ok = NewWatch { webhooks: Some(vec!["ok".into()]), ..watch(JOB2) };
    relay.store.add_watches(&[watch(JOB), only_ok]).unwrap();
    ok.until_delivered("job.completed").await;
    relay.settle().await;
    assert!(failing.drain().len() >= 4);
    let _ = ok.drain();
    relay.stop().await;

    let store = dari_relay::store::Store::open(&dir.path().join("r.db")).unwrap();
    let before = store.delivery_counts().unwrap();
    let future = dari_relay::vocab::now_ms() + 60_000;
    let pruned = store.prune(future).unwrap();
    let after = store.delivery_counts().unwrap();
    assert_eq!(pruned.deliveries as i64, before["delivered"]);
    assert!(pruned.attempts >= pruned.deliveries);
    assert_eq!(after.get("delivered"), None);
    assert_eq!(after.get("failed"), before.get("failed"), "failed deliveries are kept for replay");
    // JOB is finished but still has failed deliveries: kept. JOB2 is active: kept.
    assert_eq!(store.list_watches(true).unwrap().len(), 2);
    // Once its dead letters are dealt with, the finished watch goes too.
    store.retry_failed(None).unwrap();
    let relay = Relay::start(&text).await;
    relay.settle().await;
    relay.stop().await;
    store.prune(dari_relay::vocab::now_ms() + 60_000).unwrap();
    let left: Vec<String> = store.list_watches(true).unwrap().into_iter().map(|w| w.job_id).collect();
    assert_eq!(left, [JOB2]);
    assert!(store.notifications_of(JOB).unwrap().is_empty());
}

/// Storage faults: while SQLite refuses writes, polls that saw a change are
/// not acknowledged (nothing stored, nothing sent); once writes succeed the
/// change is stored and delivered exactly once.
#[tokio::test]
async fn refused_writes_lose_nothing_and_acknowledge_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB, vec![job("running", 2)]);
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "")).await;
    relay.store.add_watches(&[watch(JOB)]).unwrap();
    relay.store.set_read_only(true).unwrap();
    eventually(
        Duration::from_secs(10),
        || "no store error counted".to_owned(),
        || relay.metrics.polls("acme", "store_error") >= 2,
    )
    .await;
    assert!(receiver.drain().is_empty(), "nothing is sent for a change that was not stored");
    assert!(relay.store.notifications_of(JOB).unwrap().is_empty());
    relay.store.set_read_only(false).unwrap();
    let got = receiver.until_delivered("job.running").await;
    relay.settle().await;
    relay.stop().await;
    assert_eq!(got.iter().map(|r| r.kind()).collect::<Vec<_>>(), ["job.event", "job.event", "job.running"]);
    assert!(receiver.drain().is_empty());
    assert_eq!(relay_notifications(dir.path(), JOB).len(), 3);
}

/// A reload takes effect for orgs too: a rotated API key is used from the
/// next poll, without a restart, and the watches carry on where they were.
#[tokio::test]
async fn reloaded_org_key_is_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB, vec![job("running", 1)]);
    let good = config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "");
    let revoked = good.replace("api_key_env = \"DARI_API_KEY\"", "api_key_env = \"OLD_DARI_API_KEY\"");
    let relay = Relay::start(&revoked).await;
    relay.store.add_watches(&[watch(JOB)]).unwrap();
    eventually(
        Duration::from_secs(5),
        || "no 401 was seen".to_owned(),
        || relay.metrics.polls("acme", "unauthorized") > 0,
    )
    .await;
    relay.reload(&good);
    let got = receiver.until_delivered("job.running").await;
    relay.stop().await;
    assert_eq!(got.iter().map(|r| r.kind()).collect::<Vec<_>>(), ["job.event", "job.running"]);
    assert_eq!(dari.requests().last().unwrap().api_key, API_KEY);
}

/// Only a 2xx counts and redirects are not followed: a receiver answering
/// 307 to another URL gets its delivery retried, and the other URL hears
/// nothing.
#[tokio::test]
async fn redirects_are_not_followed() {
    use axum::http::StatusCode;
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut elsewhere = FakeReceiver::start().await;
    let target = elsewhere.url.clone();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&hits);
    let redirecting = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let (target, counted) = (target.clone(), std::sync::Arc::clone(&counted));
            async move {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                (StatusCode::TEMPORARY_REDIRECT, [("location", target)])
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, redirecting).await.unwrap() });
    dari.script(JOB, vec![job("completed", 0)]);
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[("h", &url)], "")).await;
    relay.store.add_watches(&[watch(JOB)]).unwrap();
    // The schedule is 100, 200, 300 ms: four attempts, then failed.
    eventually(
        Duration::from_secs(10),
        || "the delivery never gave up".to_owned(),
        || relay.store.delivery_counts().unwrap().get("failed").copied().unwrap_or(0) > 0,
    )
    .await;
    relay.stop().await;
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 4, "one request per attempt, none followed");
    assert!(elsewhere.drain().is_empty(), "the redirect target heard nothing");
    let failed = dari_relay::store::Store::open(&dir.path().join("r.db")).unwrap().list_deliveries(None, 10).unwrap();
    assert_eq!(failed[0].last_error.as_deref(), Some("HTTP 307"));
}
