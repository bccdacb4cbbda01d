//! Issue 10 ("Under stress"), the delivery side: an outcome the store
//! refuses is never a re-send, a webhook renamed away keeps its backlog, a
//! receiver's rate limit never spends a delivery's retries.

use crate::delivery::{signal, spawn_daemon};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use dari_relay::store::Store;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::fakes::{FakeDari, FakeReceiver, Relay, Reply, config_text, eventually, log_says, watch_on};
use dari_relay::vocab::{DeliveryState, NewWatch};

const JOB: &str = "550e8400-e29b-41d4-a716-446655440000";

fn job(status: &str, events: usize) -> Reply {
    let events: Vec<Value> = (0..events).map(|i| json!({"event_type": "step", "message": format!("e{i}")})).collect();
    Reply::Json(json!({"status": status, "events": events}))
}

/// Item A: while the store refuses writes, a delivered notification whose
/// attempt could not be recorded used to be re-sent every ~1.6 s. Now the
/// outcome is kept in memory and written once the store accepts it: exactly
/// one POST of that webhook-id, and then the record lands.
#[tokio::test]
async fn an_unrecorded_outcome_is_written_later_and_never_resent() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB, vec![job("completed", 0)]);
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "")).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    // The disk fills while the receiver is answering: the 2xx cannot be recorded.
    receiver.answer_after(204, Duration::from_millis(300));
    let first = receiver.next().await;
    relay.store.set_read_only(true).unwrap();
    eventually(
        Duration::from_secs(10),
        || "the refused record".to_owned(),
        || relay.metrics.delivery_faults("h", "unrecorded") == 1,
    )
    .await;
    // A few of the loop's turns; the long outage (a minute, far past the
    // old in-task retries' ~1.6 s) is `deliver::tests::an_unrecorded_outcome_is_written_later_and_never_resent`,
    // on paused time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = receiver.drain();
    assert!(
        during.is_empty(),
        "re-sent during the outage: {:?}",
        during.iter().map(|r| r.header("webhook-id")).collect::<Vec<_>>()
    );
    relay.store.set_read_only(false).unwrap();
    eventually(
        Duration::from_secs(10),
        || "the record".to_owned(),
        || relay.store.notifications_of(JOB).unwrap()[0].deliveries[0].state == DeliveryState::Delivered,
    )
    .await;
    let delivery = &relay.store.list_deliveries(None, 10).unwrap()[0];
    assert_eq!(delivery.msg_id, first.header("webhook-id"));
    let attempts = relay.store.attempts(delivery.id).unwrap();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].http_status, Some(204));
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.stop().await;
    assert!(receiver.drain().is_empty(), "nothing sent after the record landed");
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Item B: a webhook renamed by a SIGHUP reload. The notifications of a
/// watch added with `--webhook old` used to be stored with no delivery at
/// all, and renaming the webhook back brought nothing back. Now they wait,
/// pending, with a warning and a counter; when the name is configured
/// again, its backlog is delivered in order with the stored webhook-ids.
#[tokio::test]
async fn a_webhook_renamed_away_and_back_keeps_and_delivers_its_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB, vec![job("running", 0)]);
    let named = config_text(&db, &dari, &[("old", &receiver.url)], "");
    let renamed = config_text(&db, &dari, &[("new", &receiver.url)], "");
    let config = write_config(dir.path(), &named);
    let store = Store::open(&db).unwrap();
    store.add_watches(&[NewWatch { webhooks: Some(vec!["old".into()]), ..watch_on("acme/form", JOB) }]).unwrap();
    let log = dir.path().join("relay.log");
    let mut daemon = spawn_daemon(&config, &log);
    assert_eq!(receiver.next().await.kind(), "job.running");

    write_config(dir.path(), &renamed);
    signal(&daemon, "HUP");
    log_says(&log, 1, "deliverer uses the reloaded config").await;
    dari.script(JOB, vec![job("running", 1), job("completed", 1)]);
    eventually(
        Duration::from_secs(10),
        || "the later notifications".to_owned(),
        || store.notifications_of(JOB).unwrap().len() == 3,
    )
    .await;
    log_says(&log, 1, "names a webhook that is not in the config").await;
    let later = store.notifications_of(JOB).unwrap();
    for n in &later[1..] {
        assert_eq!(n.deliveries.len(), 1, "{} has a delivery for the missing webhook", n.kind);
        assert_eq!((n.deliveries[0].webhook.as_str(), n.deliveries[0].state), ("old", DeliveryState::Pending));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.drain().is_empty(), "nothing is sent while the name is unknown");

    write_config(dir.path(), &named);
    signal(&daemon, "HUP");
    log_says(&log, 2, "deliverer uses the reloaded config").await;
    let got = receiver.until_delivered("job.completed").await;
    assert_eq!(got.iter().map(|r| r.kind()).collect::<Vec<_>>(), ["job.event", "job.completed"]);
    let ids: Vec<String> = later[1..].iter().map(|n| n.deliveries[0].msg_id.clone()).collect();
    assert_eq!(got.iter().map(|r| r.header("webhook-id")).collect::<Vec<_>>(), ids);
    signal(&daemon, "TERM");
    eventually(
        Duration::from_secs(5),
        || "the daemon did not stop".to_owned(),
        || daemon.try_wait().unwrap().is_some(),
    )
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("names a webhook that is not in the config").count(), 1, "warned once per name:\n{text}");
}

/// A receiver on 127.0.0.1:0 that gives these answers (status, Retry-After)
/// in turn, the last one forever, and notes when each request came.
async fn scripted_receiver(answers: Vec<(u16, Option<&'static str>)>) -> (String, Arc<Mutex<Vec<Instant>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let noted = Arc::clone(&seen);
    let router = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let noted = Arc::clone(&noted);
            let answers = answers.clone();
            async move {
                let n = {
                    let mut noted = noted.lock().unwrap();
                    noted.push(Instant::now());
                    noted.len() - 1
                };
                let (status, retry_after) = answers[n.min(answers.len() - 1)];
                let mut headers = HeaderMap::new();
                if let Some(v) = retry_after {
                    headers.insert("retry-after", v.parse().unwrap());
                }
                (StatusCode::from_u16(status).unwrap(), headers)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (url, seen)
}

/// Item C: `Retry-After: 0` used to spend the whole schedule in moments,
/// making the delivery `failed`. Now three 429s each wait the 1 s minimum
/// without spending a retry, and the 2xx after them delivers it.
#[tokio::test]
async fn a_rate_limit_answer_never_spends_a_retry() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let limited = (429, Some("0"));
    let (url, seen) = scripted_receiver(vec![limited, limited, limited, (204, None)]).await;
    dari.script(JOB, vec![job("completed", 0)]);
    // Two retries only: the old code spent them on the first two 429s.
    let text = config_text(&dir.path().join("r.db"), &dari, &[("h", &url)], "")
        .replace(r#"retry_schedule = ["100ms", "200ms", "300ms"]"#, r#"retry_schedule = ["10s", "20s"]"#);
    let relay = Relay::start(&text).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    eventually(
        Duration::from_secs(10),
        || "the delivery to end".to_owned(),
        || {
            let counts = relay.store.delivery_counts().unwrap();
            counts.contains_key("delivered") || counts.contains_key("failed")
        },
    )
    .await;
    let (store, metrics) = (Arc::clone(&relay.store), Arc::clone(&relay.metrics));
    relay.stop().await;
    let delivery = &store.list_deliveries(None, 10).unwrap()[0];
    assert_eq!(delivery.state, "delivered", "{delivery:?}");
    assert_eq!(delivery.attempts, 1, "only the 2xx is counted: no retry of the schedule was spent");
    let attempts = store.attempts(delivery.id).unwrap();
    let statuses: Vec<Option<u16>> = attempts.iter().map(|a| a.http_status).collect();
    assert_eq!(statuses, [Some(429), Some(429), Some(429), Some(204)]);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 4);
    for pair in seen.windows(2) {
        assert!(pair[1] - pair[0] >= Duration::from_millis(950), "Retry-After: 0 waits the 1 s minimum");
    }
    assert_eq!(metrics.deliveries("h", "rate_limited"), 3);
}

/// The sibling of item C: a receiver that answers 429 forever does not keep
/// the delivery pending forever. Rate-limit waits are free only for the
/// schedule's total time (here 600 ms) from the first attempt; the next one
/// after that gives the delivery up, `failed`, like any other.
#[tokio::test]
async fn a_receiver_rate_limiting_forever_is_given_up_after_the_schedules_time() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let (url, seen) = scripted_receiver(vec![(429, Some("0"))]).await;
    dari.script(JOB, vec![job("completed", 0)]);
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[("h", &url)], "")).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    eventually(
        Duration::from_secs(10),
        || "the give-up".to_owned(),
        || relay.store.delivery_counts().unwrap().get("failed") == Some(&1),
    )
    .await;
    let store = Arc::clone(&relay.store);
    relay.stop().await;
    let delivery = &store.list_deliveries(None, 10).unwrap()[0];
    assert!(delivery.last_error.as_deref().is_some_and(|e| e.contains("still rate limited")), "{delivery:?}");
    assert_eq!(seen.lock().unwrap().len(), 2, "one wait of 1 s, then past the 600 ms budget");
}
