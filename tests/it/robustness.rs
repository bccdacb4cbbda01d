//! Issue 3: every kind of answer the Dari API can give, handled on purpose.
//! One test per row of the table in the issue, plus the 429 pause, the
//! per-org rate limit, the watch age limit and the open set of statuses.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::fakes::{FakeDari, FakeReceiver, Relay, Reply, config_text, eventually, watch_on};

const JOB: &str = "550e8400-e29b-41d4-a716-446655440000";
const JOB2: &str = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";

fn job(status: &str, events: usize) -> Reply {
    let events: Vec<Value> = (0..events).map(|i| json!({"event_type": "step", "message": format!("e{i}")})).collect();
    Reply::Json(json!({"status": status, "events": events}))
}

fn kinds(got: &[crate::fakes::Received]) -> Vec<String> {
    got.iter().filter(|r| (200..300).contains(&r.answered)).map(|r| r.kind()).collect()
}

/// Row 1: unknown fields ignored (passed through), missing optional ones null.
#[tokio::test(start_paused = true)]
async fn valid_answer_with_unknown_and_missing_fields() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB, vec![Reply::Json(json!({"status": "completed", "brand_new": [1], "final_result": null}))]);
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "")).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    let got = receiver.next().await;
    relay.stop().await;
    let data = &got.json()["data"];
    assert_eq!(got.kind(), "job.completed");
    assert_eq!(data["brand_new"], json!([1]));
    assert_eq!(data["current_step"], Value::Null);
    assert_eq!(data["browser_url"], Value::Null);
}

/// Row 2: malformed 200 bodies are transient errors: counted, retried, and
/// the last-seen state untouched (nothing announced from them).
#[tokio::test(start_paused = true)]
async fn malformed_bodies_are_retried_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(
        JOB,
        vec![
            job("pending", 0),
            Reply::Raw("<html>Bad gateway</html>".into()),
            Reply::Raw("{\"events\": []}".into()),
            Reply::Raw("{\"status\": 7}".into()),
            Reply::Raw("{\"status\": \"running\", \"events\": {\"0\": 1}}".into()),
            Reply::Raw("{\"status\": \"runn".into()),
            job("running", 1),
            job("completed", 1),
        ],
    );
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "")).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    let got = receiver.until_delivered("job.completed").await;
    assert_eq!(kinds(&got), ["job.pending", "job.event", "job.running", "job.completed"]);
    assert_eq!(got[2].json()["data"]["previous_status"], "pending", "no malformed answer became state");
    assert_eq!(relay.metrics.polls("acme", "malformed"), 5);
    relay.stop().await;
}

/// Row 3: a body over max_response_bytes is refused (a transient error).
#[tokio::test(start_paused = true)]
async fn oversized_body_is_refused_then_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    let big = json!({"status": "running", "final_result": "x".repeat(5000)});
    dari.script(JOB, vec![Reply::Json(big), job("completed", 0)]);
    let extra = "";
    let text = config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], extra)
        .replace("[upstream]\n", "[upstream]\nmax_response_bytes = 2048\n");
    let relay = Relay::start(&text).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    let got = receiver.until_delivered("job.completed").await;
    assert_eq!(kinds(&got), ["job.completed"]);
    assert_eq!(relay.metrics.polls("acme", "too_large"), 1);
    relay.stop().await;
}

/// Row 4: 404 keeps polling with backoff; a job that appears late is
/// announced normally; one that never appears gets `watch.failed` after
/// not_found_grace and is no longer polled. (The grace period's timing is
/// checked on a scripted clock: `poller::tests::a_job_not_found_is_given_up_only_after_its_grace_period`.)
#[tokio::test(start_paused = true)]
async fn not_found_waits_for_the_grace_period_then_fails_the_watch() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB2, vec![Reply::Status(404, None), Reply::Status(404, None), job("completed", 0)]);
    let text = config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "")
        .replace("[upstream]\n", "[upstream]\nnot_found_grace = \"700ms\"\n");
    let relay = Relay::start(&text).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB), watch_on("acme/form", JOB2)]).unwrap();
    let mut got = [receiver.next().await, receiver.next().await];
    got.sort_by_key(|r| r.kind());
    assert_eq!(got[0].kind(), "job.completed");
    assert_eq!(got[0].json()["data"]["job_id"], JOB2);
    let failed = &got[1];
    assert_eq!(failed.kind(), "watch.failed");
    assert_eq!(failed.json()["data"]["job_id"], JOB);
    assert_eq!(failed.json()["data"]["reason"], "job_not_found");
    let polls = dari.polls(JOB);
    assert!(polls >= 3, "kept polling during the grace period: {polls}");
    let watches = relay.store.list_watches(true).unwrap();
    let state = watches.iter().find(|w| w.job_id == JOB).unwrap().state;
    assert_eq!(state, "failed");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dari.polls(JOB), polls, "no polls after watch.failed");
    relay.stop().await;
}

/// Row 6 and acceptance 3: a 429 with `Retry-After: 2` pauses every poll of
/// that org for 2 seconds, while another org keeps being polled.
#[tokio::test(start_paused = true)]
async fn rate_limited_org_pauses_while_others_continue() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let receiver = FakeReceiver::start().await;
    let other = "7c9e6679-7425-40de-944b-e07fc1f098ae";
    dari.script(JOB, vec![job("running", 0), Reply::Status(429, Some("2".into())), job("running", 0)]);
    dari.script(JOB2, vec![job("running", 0)]);
    dari.script(other, vec![job("running", 0)]);
    let text = config_text(
        &dir.path().join("r.db"),
        &dari,
        &[("h", &receiver.url)],
        "[orgs.beta]\napi_key_env = \"DARI_API_KEY\"\n",
    );
    let relay = Relay::start(&text).await;
    relay
        .store
        .add_watches(&[watch_on("acme/form", JOB), watch_on("acme/form", JOB2), watch_on("beta/form", other)])
        .unwrap();
    // Wait for the 429, then for the org's next request.
    let pause = || {
        let reqs = dari.requests();
        let acme: Vec<_> = reqs.iter().filter(|r| r.org == "acme").collect();
        let job_polls: Vec<_> = acme.iter().filter(|r| r.job_id == JOB).collect();
        let limited_at = job_polls.get(1)?.at;
        // A request already on the wire when the 429 came back cannot be
        // recalled: count only those sent after the relay could know.
        let next = acme.iter().find(|r| r.at > limited_at + Duration::from_millis(20))?;
        Some((limited_at, next.at))
    };
    eventually(Duration::from_secs(8), || "no request after the pause".into(), || pause().is_some()).await;
    let (limited_at, resumed_at) = pause().unwrap();
    relay.stop().await;
    let paused = resumed_at - limited_at;
    assert!(paused >= Duration::from_millis(1950), "acme polled again after {paused:?}");
    let beta_during = dari
        .requests()
        .iter()
        .filter(|r| r.org == "beta" && r.at > limited_at && r.at < limited_at + Duration::from_secs(2))
        .count();
    assert!(beta_during >= 4, "beta was polled {beta_during} times during acme's pause");
}

/// Row 7: 5xx, timeouts and broken connections back off and recover, each
/// counted under its own outcome; nothing is lost or announced twice.
#[tokio::test(start_paused = true)]
async fn server_errors_timeouts_and_resets_back_off_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(
        JOB,
        vec![
            job("running", 1),
            Reply::Status(500, None),
            Reply::Status(503, None),
            Reply::Hang,
            Reply::Truncated,
            job("running", 2),
            Reply::Status(502, None),
            job("completed", 3),
        ],
    );
    let text = config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "")
        .replace("request_timeout = \"2s\"\n[delivery]", "request_timeout = \"300ms\"\n[delivery]");
    let relay = Relay::start(&text).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    let got = receiver.until_delivered("job.completed").await;
    assert_eq!(kinds(&got), ["job.event", "job.running", "job.event", "job.event", "job.completed"]);
    let m = &relay.metrics;
    assert_eq!(
        (m.polls("acme", "http_error"), m.polls("acme", "timeout"), m.polls("acme", "transport_error")),
        (3, 1, 1)
    );
    relay.stop().await;
}

/// A connection refused is a transport error, as the client classifies it.
#[tokio::test]
async fn refused_connection_is_a_transport_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = listener.local_addr().unwrap();
    drop(listener);
    let text = format!("[upstream]\nbase_url = \"http://{closed}\"\nrequest_timeout = \"1s\"\n");
    let config = dari_relay::config::Config::from_toml(&text, std::path::Path::new("t.toml"), &|_| None).unwrap();
    let client = dari_relay::upstream::UpstreamClient::new(&config.upstream).unwrap();
    let key = secrecy::SecretString::from("k".to_owned());
    let err = client.fetch_status(&"acme/form".parse().unwrap(), JOB, &key).await.unwrap_err();
    assert_eq!(err.label(), "transport_error", "{err}");
}

/// A redirect from Dari is never followed: it would carry `X-API-Key` to
/// wherever `Location` points. It is an unexpected status (retried with
/// backoff), and the other host hears nothing.
#[tokio::test]
async fn a_redirect_from_dari_is_not_followed() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    let elsewhere = axum::Router::new().fallback(move || {
        let counted = Arc::clone(&counted);
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            "{\"status\": \"running\"}"
        }
    });
    let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = format!("http://{}/stolen", other.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(other, elsewhere).await.unwrap() });
    let portal = axum::Router::new().route(
        "/task/{org}/{endpoint}/status",
        axum::routing::get(move || {
            let target = target.clone();
            async move { (axum::http::StatusCode::TEMPORARY_REDIRECT, [(axum::http::header::LOCATION, target)]) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, portal).await.unwrap() });

    let text = format!("[upstream]\nbase_url = \"{base}\"\nrequest_timeout = \"2s\"\n");
    let config = dari_relay::config::Config::from_toml(&text, std::path::Path::new("t.toml"), &|_| None).unwrap();
    let client = dari_relay::upstream::UpstreamClient::new(&config.upstream).unwrap();
    let key = secrecy::SecretString::from("sk-never-elsewhere".to_owned());
    let err = client.fetch_status(&"acme/form".parse().unwrap(), JOB, &key).await.unwrap_err();
    assert!(matches!(err, dari_relay::upstream::UpstreamError::Status(307)), "{err}");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect was followed");
}

/// `max_requests_per_second` caps one org's requests on top of max_in_flight.
#[tokio::test(start_paused = true)]
async fn per_org_rate_limit_holds() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let receiver = FakeReceiver::start().await;
    let jobs: Vec<String> = (0..8).map(|i| format!("{i:08x}-0000-4000-8000-000000000000")).collect();
    for j in &jobs {
        dari.script(j, vec![job("running", 0)]);
    }
    let text = config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "")
        .replace("api_key_env = \"DARI_API_KEY\"\n", "api_key_env = \"DARI_API_KEY\"\nmax_requests_per_second = 10\n");
    let relay = Relay::start(&text).await;
    relay.store.add_watches(&jobs.iter().map(|j| watch_on("acme/form", j)).collect::<Vec<_>>()).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    relay.stop().await;
    let reqs = dari.requests();
    let first = reqs.iter().map(|r| r.at).min().unwrap();
    let last = reqs.iter().map(|r| r.at).max().unwrap();
    let allowed = 10.0 * (last - first).as_secs_f64() + 10.0 + 1.0; // the rate, plus a full bucket
    assert!((reqs.len() as f64) <= allowed, "{} requests in {:?}", reqs.len(), last - first);
    // Without the limit, 8 watches at a 50 ms interval make far more.
    assert!(reqs.len() >= 12, "the limit still lets requests through: {}", reqs.len());
}

/// `max_watch_age`: an older watch gets `watch.failed` and stops.
#[tokio::test(start_paused = true)]
async fn watch_older_than_max_age_fails() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB, vec![job("running", 0)]);
    let text = config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "")
        .replace("[upstream]\n", "[upstream]\nmax_watch_age = \"600ms\"\n");
    let relay = Relay::start(&text).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    let got = receiver.until_delivered("watch.failed").await;
    assert_eq!(kinds(&got), ["job.running", "watch.failed"]);
    assert_eq!(got[1].json()["data"]["reason"], "max_watch_age");
    assert_eq!(got[1].json()["data"]["status"], "running");
    relay.stop().await;
}

/// Statuses are an open set: any value becomes `job.<normalised>`; only the
/// configured terminal statuses end polling.
#[tokio::test(start_paused = true)]
async fn unknown_statuses_are_announced_and_configured_terminals_end_polling() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB, vec![job("Needs Review!", 0), job("archived", 0)]);
    let text = config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "")
        .replace("[upstream]\n", "[upstream]\nterminal_statuses = [\"archived\"]\n");
    let relay = Relay::start(&text).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    let got = receiver.until_delivered("job.archived").await;
    assert_eq!(kinds(&got), ["job.needs_review_", "job.archived"]);
    assert_eq!(got[0].json()["data"]["status"], "Needs Review!");
    let polls = dari.polls(JOB);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dari.polls(JOB), polls, "a terminal status ends polling");
    relay.stop().await;
}

/// Row 5 and acceptance 4, through the real binary: with a rejected key the
/// relay logs the rejection once per org (never the key), sends at most one
/// request per watch per max_poll_interval, fails each watch after
/// auth_grace, and stops cleanly (exit 0) on SIGTERM.
#[tokio::test]
async fn rejected_key_is_logged_once_polled_slowly_and_never_leaked() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    let text = config_text(&db, &dari, &[("h", &receiver.url)], "")
        .replace("max_poll_interval = \"400ms\"", "max_poll_interval = \"300ms\"\nauth_grace = \"1s\"");
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, text).unwrap();
    let store = dari_relay::store::Store::open(&db).unwrap();
    store.add_watches(&[watch_on("acme/form", JOB), watch_on("acme/form", JOB2)]).unwrap();
    drop(store);

    let wrong_key = "sk-wrong-9f8e7d6c5b4a";
    let log_path = dir.path().join("stderr.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dari-relay"))
        .args(["run", "--config"])
        .arg(&config_path)
        .env("DARI_API_KEY", wrong_key)
        .env("HOOK_SECRET", crate::fakes::SECRET)
        .env("RUST_LOG", "debug")
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let got = [receiver.next().await, receiver.next().await];
    let ended = std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(ended.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM ends the daemon with exit 0: {status:?}");

    for r in &got {
        assert_eq!(r.kind(), "watch.failed");
        assert_eq!(r.json()["data"]["reason"], "api_key_rejected");
    }
    for job in [JOB, JOB2] {
        let times: Vec<Instant> = dari.requests().iter().filter(|r| r.job_id == job).map(|r| r.at).collect();
        assert!(times.len() >= 3, "{job}: {} requests", times.len());
        for pair in times.windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_millis(290), "{job}: requests {:?} apart", pair[1] - pair[0]);
        }
    }
    assert!(dari.requests().iter().all(|r| r.api_key == wrong_key));
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(!log.contains(wrong_key) && !log.contains("sk-wrong"), "the key leaked into the log:\n{log}");
    assert_eq!(log.matches("rejected the org's API key").count(), 1, "{log}");
}

/// Polite upstream: never more than `max_in_flight` status requests at once,
/// all orgs together.
#[tokio::test(start_paused = true)]
async fn never_more_than_max_in_flight_requests_at_once() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let receiver = FakeReceiver::start().await;
    let (now, peak, served) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let state = (Arc::clone(&now), Arc::clone(&peak), Arc::clone(&served));
    // A slow portal that counts the requests it is answering at once.
    let portal = axum::Router::new().route(
        "/task/{org}/{endpoint}/status",
        axum::routing::get(move || {
            let (now, peak, served) = state.clone();
            async move {
                let current = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(current, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                served.fetch_add(1, Ordering::SeqCst);
                "{\"status\": \"running\"}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, portal).await.unwrap() });
    let text = format!(
        "database = \"{}\"\n[upstream]\nbase_url = \"{base}\"\npoll_interval = \"10ms\"\nmax_poll_interval = \"10ms\"\nmax_in_flight = 3\n\
         [orgs.acme]\napi_key_env = \"DARI_API_KEY\"\n[orgs.beta]\napi_key_env = \"DARI_API_KEY\"\n\
         [[webhooks]]\nname = \"h\"\nurl = \"{}\"\n",
        dir.path().join("r.db").display(),
        receiver.url
    );
    let relay = Relay::start(&text).await;
    let watches: Vec<_> = (0..10)
        .map(|i| {
            watch_on(
                if i % 2 == 0 { "acme/form" } else { "beta/form" },
                &format!("{i:08x}-0000-4000-8000-000000000000"),
            )
        })
        .collect();
    relay.store.add_watches(&watches).unwrap();
    eventually(Duration::from_secs(10), || "polling stalled".to_owned(), || served.load(Ordering::SeqCst) >= 30).await;
    relay.stop().await;
    assert_eq!(peak.load(Ordering::SeqCst), 3, "at most max_in_flight at once, and the limit is used");
}
