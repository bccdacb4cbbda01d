//! Push assist: Dari's own webhook on the `[inbound]` listener triggers a
//! poll at once, against the in-process relay with a fake Dari and a fake
//! receiver on 127.0.0.1:0.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use dari_relay::app::{Listeners, serve_with};
use dari_relay::config::{Config, ListenAddr};
use dari_relay::metrics::Metrics;
use dari_relay::store::Store;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fakes::{self, ADMIN_TOKEN, FakeDari, FakeReceiver, Reply};

/// The key Dari signs its webhook with, in these tests.
const DARI_KEY: &str = "dari-webhook-key-7c41";

fn env(name: &str) -> Option<String> {
    match name {
        "DARI_WEBHOOK_KEY" => Some(DARI_KEY.to_owned()),
        other => fakes::env(other),
    }
}

/// A running relay with its inbound listener and admin API on port 0.
struct PushRelay {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    /// `http://127.0.0.1:<port>/v1/dari/webhook`.
    webhook: String,
    inbound: std::net::SocketAddr,
    /// `http://127.0.0.1:<port>` of the admin API.
    admin: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), dari_relay::app::AppError>>,
    http: reqwest::Client,
}

impl PushRelay {
    /// `upstream`: the `[upstream]` keys besides base_url; `inbound`: the
    /// `[inbound]` keys besides listen.
    async fn start(dir: &Path, dari: &FakeDari, hook: &str, upstream: &str, inbound: &str) -> PushRelay {
        let text = format!(
            r#"
database = "{db}"
[upstream]
base_url = "{dari}"
request_timeout = "2s"
{upstream}
[delivery]
retry_schedule = ["100ms"]
[orgs.acme]
api_key_env = "DARI_API_KEY"
[admin]
listen = "127.0.0.1:0"
token_env = "ADMIN_TOKEN"
[inbound]
listen = "127.0.0.1:0"
{inbound}
[[webhooks]]
name = "backend"
url = "{hook}"
secret_env = "HOOK_SECRET"
"#,
            db = dir.join("relay.db").display(),
            dari = dari.url,
        );
        let config = Arc::new(Config::from_toml(&text, Path::new("test.toml"), &env).unwrap());
        let store = Arc::new(Store::open(&config.database).unwrap());
        let metrics = Arc::new(Metrics::default());
        let admin = dari_relay::admin::Listener::bind(
            &ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()),
            config.admin.as_ref().unwrap().token.clone(),
        )
        .await
        .unwrap();
        let admin_url = format!("http://{}", admin.describe());
        let inbound_listener =
            dari_relay::inbound::Listener::bind(config.inbound.as_ref().unwrap().listen).await.unwrap();
        let inbound_addr = inbound_listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let (_tx, rx) = tokio::sync::watch::channel(config);
        // The sender is leaked into the task so the channel stays open.
        let task = tokio::spawn({
            let (store, metrics, shutdown) = (Arc::clone(&store), Arc::clone(&metrics), shutdown.clone());
            async move {
                let _keep = _tx;
                serve_with(
                    rx,
                    store,
                    metrics,
                    Listeners { admin: Some(admin), inbound: Some(inbound_listener) },
                    shutdown,
                )
                .await
            }
        });
        PushRelay {
            store,
            metrics,
            webhook: format!("http://{inbound_addr}/v1/dari/webhook"),
            inbound: inbound_addr,
            admin: admin_url,
            shutdown,
            task,
            http: reqwest::Client::new(),
        }
    }

    /// Posts `body` as Dari would, with `signature` in X-Webhook-Signature
    /// (none if `None`), to the webhook URL plus `query`.
    async fn post(&self, query: &str, body: &str, signature: Option<&str>) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}{query}", self.webhook))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(sig) = signature {
            request = request.header("x-webhook-signature", sig);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Posts `body` signed in hex.
    async fn post_signed(&self, body: &str) -> (u16, Value) {
        self.post("", body, Some(&hex(&mac(body)))).await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn mac(body: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(DARI_KEY.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn running(job_id: &str) -> Value {
    json!({"job_id": job_id, "status": "running", "events": [{"event_type": "started", "message": "go"}],
           "final_result": null})
}

fn completed(job_id: &str, answer: &str) -> Value {
    json!({"job_id": job_id, "status": "completed",
           "events": [{"event_type": "started", "message": "go"}, {"event_type": "done", "message": "ok"}],
           "final_result": {"answer": answer}})
}

/// The body Dari posts: the status body plus `event_type` and `timestamp`.
fn dari_body(job_id: &str, answer: &str) -> String {
    let mut body = completed(job_id, answer);
    body["event_type"] = "job.completed".into();
    body["timestamp"] = "2026-12-02T10:00:00Z".into();
    body.to_string()
}

async fn watch(relay: &PushRelay, job_id: &str) {
    relay.store.add_watches(&[fakes::watch_on("acme/form", job_id)]).unwrap();
}

/// Acceptance 1: with `max_poll_interval = "60s"`, a job's completion
/// reaches the receiver within 500 ms of Dari's webhook, with what the poll
/// served, not what the webhook's body said.
#[tokio::test]
async fn a_dari_webhook_brings_the_completion_within_500ms_with_the_polled_result() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut hook = FakeReceiver::start().await;
    let job = "7a1c3a7e-5b1d-4c53-9a43-0c5d8a1e0001";
    dari.script(job, vec![Reply::Json(running(job))]);
    let relay =
        PushRelay::start(dir.path(), &dari, &hook.url, "poll_interval = \"60s\"\nmax_poll_interval = \"60s\"", "")
            .await;
    watch(&relay, job).await;
    hook.until_delivered("job.running").await;
    assert_eq!(dari.polls(job), 1);

    dari.script(job, vec![Reply::Json(completed(job, "from the poll"))]);
    let posted = Instant::now();
    let (status, answer) = relay.post("", &dari_body(job, "forged in the webhook body"), None).await;
    assert_eq!((status, answer["outcome"].as_str()), (202, Some("triggered")));
    let got = hook.until_delivered("job.completed").await;
    let done = got.last().unwrap();
    let latency = done.at.duration_since(posted);
    println!("push assist: POST to job.completed at the receiver: {} ms", latency.as_secs_f64() * 1000.0);
    assert!(latency < Duration::from_millis(500), "took {latency:?}");
    assert_eq!(done.json()["data"]["final_result"], json!({"answer": "from the poll"}));
    assert_eq!(dari.polls(job), 2, "one poll for the webhook");
    assert_eq!(relay.metrics.inbound_count("triggered"), 1);
    relay.stop().await;
}

/// Acceptance 2: each answer of the listener, with a key set.
#[tokio::test]
async fn each_answer_of_the_listener() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut hook = FakeReceiver::start().await;
    let job = "7a1c3a7e-5b1d-4c53-9a43-0c5d8a1e0002";
    dari.script(job, vec![Reply::Json(running(job))]);
    let inbound = "dari_webhook_key_env = \"DARI_WEBHOOK_KEY\"\nauto_watch = [\"acme/auto-*\"]";
    let relay =
        PushRelay::start(dir.path(), &dari, &hook.url, "poll_interval = \"60s\"\nmax_poll_interval = \"60s\"", inbound)
            .await;
    watch(&relay, job).await;
    hook.until_delivered("job.running").await;
    let body = dari_body(job, "x");

    // A bad signature, or none: 401 and no poll.
    let mut wrong = mac(&body);
    wrong[5] ^= 0x40;
    for sig in [Some(hex(&wrong)), Some("sha256=".to_owned()), None] {
        let (status, answer) = relay.post("", &body, sig.as_deref()).await;
        assert_eq!((status, answer["outcome"].as_str()), (401, Some("bad_signature")), "{sig:?}");
    }
    // Signed for another body.
    assert_eq!(relay.post("", &body, Some(&hex(&mac("{}")))).await.0, 401);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(dari.polls(job), 1, "a bad signature causes no poll");

    // No UUID job_id: 400.
    for bad in [r#"{"job_id":"not-a-uuid","status":"completed"}"#, r#"{"status":"completed"}"#, "[1,2]", "nope"] {
        let (status, answer) = relay.post_signed(bad).await;
        assert_eq!((status, answer["outcome"].as_str()), (400, Some("bad_body")), "{bad}");
    }

    // Over 256 KiB: 413 from Content-Length, before a byte of the body.
    let mut tcp = tokio::net::TcpStream::connect(relay.inbound).await.unwrap();
    let head = format!(
        "POST /v1/dari/webhook HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        relay.inbound,
        300 * 1024
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0; 512];
    let n = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut answer))
        .await
        .expect("answered without the body being sent")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    // Chunked, with no Content-Length: 413 once the read passes the limit.
    let mut tcp = tokio::net::TcpStream::connect(relay.inbound).await.unwrap();
    let head = format!(
        "POST /v1/dari/webhook HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
        relay.inbound
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "a".repeat(64 * 1024));
    for _ in 0..5 {
        if tcp.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let mut answer = vec![0; 512];
    let n = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut answer)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 413"));

    // An unknown job: 202, ignored, no poll.
    let unknown = "7a1c3a7e-5b1d-4c53-9a43-0c5d8a1e0003";
    dari.script(unknown, vec![Reply::Json(completed(unknown, "u"))]);
    let (status, answer) = relay.post_signed(&dari_body(unknown, "u")).await;
    assert_eq!((status, answer["outcome"].as_str()), (202, Some("ignored")));
    // A portal that does not match auto_watch: ignored too.
    let (status, answer) =
        relay.post("?portal=acme/form", &dari_body(unknown, "u"), Some(&hex(&mac(&dari_body(unknown, "u"))))).await;
    assert_eq!((status, answer["outcome"].as_str()), (202, Some("ignored")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dari.polls(unknown), 0, "an unknown job is not polled");
    assert!(relay.store.list_watches(true).unwrap().iter().all(|w| w.job_id != unknown));

    // hex, sha256=hex and base64 signatures are accepted.
    let b64 = base64::engine::general_purpose::STANDARD.encode(mac(&body));
    for sig in [hex(&mac(&body)), format!("sha256={}", hex(&mac(&body))), b64.clone(), format!("sha256={b64}")] {
        let (status, answer) = relay.post("", &body, Some(&sig)).await;
        assert_eq!((status, answer["outcome"].as_str()), (202, Some("triggered")), "{sig}");
    }

    // auto_watch: a job on a matching portal is watched, its whole history delivered.
    let auto = "7a1c3a7e-5b1d-4c53-9a43-0c5d8a1e0004";
    dari.script(auto, vec![Reply::Json(completed(auto, "auto"))]);
    let auto_body = dari_body(auto, "auto");
    let (status, answer) = relay.post("?portal=acme/auto-form", &auto_body, Some(&hex(&mac(&auto_body)))).await;
    assert_eq!((status, answer["outcome"].as_str()), (202, Some("auto_watched")));
    let mut kinds = Vec::new();
    loop {
        let r = hook.next().await;
        if r.json()["data"]["job_id"] == auto {
            kinds.push(r.kind());
            if r.kind() == "job.completed" {
                break;
            }
        }
    }
    assert_eq!(kinds, ["job.event", "job.event", "job.completed"], "the whole history, events first");
    let watched = relay.store.list_watches(true).unwrap();
    let row = watched.iter().find(|w| w.job_id == auto).expect("auto-watched");
    assert_eq!(row.portal_id, "acme/auto-form");
    // The portal may also come from the body.
    let other = "7a1c3a7e-5b1d-4c53-9a43-0c5d8a1e0005";
    dari.script(other, vec![Reply::Json(completed(other, "o"))]);
    let mut other_body: Value = serde_json::from_str(&dari_body(other, "o")).unwrap();
    other_body["portal_id"] = "acme/auto-other".into();
    let (status, answer) = relay.post_signed(&other_body.to_string()).await;
    assert_eq!((status, answer["outcome"].as_str()), (202, Some("auto_watched")));

    let metrics = reqwest::Client::new()
        .get(format!("{}/metrics", relay.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "dari_relay_inbound_total{outcome=\"bad_signature\"} 4",
        "dari_relay_inbound_total{outcome=\"bad_body\"} 4",
        "dari_relay_inbound_total{outcome=\"too_large\"} 2",
        "dari_relay_inbound_total{outcome=\"auto_watched\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    relay.stop().await;
}

/// A burst from one source past 50 requests a second is answered 429.
#[tokio::test]
async fn a_burst_from_one_source_is_answered_429() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let hook = FakeReceiver::start().await;
    let relay = PushRelay::start(dir.path(), &dari, &hook.url, "", "").await;
    let body = dari_body("7a1c3a7e-5b1d-4c53-9a43-0c5d8a1e0006", "b");
    let started = Instant::now();
    let mut answers = Vec::new();
    for _ in 0..80 {
        answers.push(relay.post("", &body, None).await.0);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let accepted = answers.iter().filter(|&&s| s == 202).count();
    let limited = answers.iter().filter(|&&s| s == 429).count();
    assert_eq!(accepted + limited, 80, "{answers:?}");
    assert!(accepted >= 50, "the first second's worth passes: {accepted}");
    // 50 at once plus 50 a second refilled while the burst was sent.
    assert!(accepted as f64 <= 50.0 + 50.0 * elapsed + 1.0, "{accepted} in {elapsed} s");
    assert!(limited > 0, "a burst is limited: {answers:?}");
    assert_eq!(relay.metrics.inbound_count("rate_limited"), limited as u64);
    relay.stop().await;
}

/// Ten webhooks for one job in a second make at most two polls.
#[tokio::test]
async fn ten_webhooks_in_a_second_make_at_most_two_polls() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut hook = FakeReceiver::start().await;
    let job = "7a1c3a7e-5b1d-4c53-9a43-0c5d8a1e0007";
    dari.script(job, vec![Reply::Json(running(job))]);
    let relay =
        PushRelay::start(dir.path(), &dari, &hook.url, "poll_interval = \"60s\"\nmax_poll_interval = \"60s\"", "")
            .await;
    watch(&relay, job).await;
    hook.until_delivered("job.running").await;
    assert_eq!(dari.polls(job), 1);
    let body = dari_body(job, "r");
    let started = Instant::now();
    for i in 0..10 {
        tokio::time::sleep_until(started + Duration::from_millis(100) * i).await;
        assert_eq!(relay.post("", &body, None).await.0, 202);
    }
    // Past the coalescing window of the last trigger.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let polls = dari.polls(job) - 1;
    println!("ten webhooks in a second: {polls} polls");
    assert!((1..=2).contains(&polls), "{polls} polls");
    relay.stop().await;
}

/// `POST /v1/watches/{job_id}/poll` on the admin API: authenticated, 202
/// and a poll for an active watch, 404 for none, 400 for a bad id.
#[tokio::test]
async fn the_admin_poll_route_polls_now_and_is_authenticated() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut hook = FakeReceiver::start().await;
    let job = "7a1c3a7e-5b1d-4c53-9a43-0c5d8a1e0008";
    dari.script(job, vec![Reply::Json(running(job))]);
    let relay =
        PushRelay::start(dir.path(), &dari, &hook.url, "poll_interval = \"60s\"\nmax_poll_interval = \"60s\"", "")
            .await;
    watch(&relay, job).await;
    hook.until_delivered("job.running").await;
    let http = reqwest::Client::new();
    let url = |id: &str| format!("{}/v1/watches/{id}/poll", relay.admin);
    assert_eq!(http.post(url(job)).send().await.unwrap().status(), 401, "no token");
    assert_eq!(http.post(url(job)).bearer_auth("wrong").send().await.unwrap().status(), 401);
    assert_eq!(dari.polls(job), 1);

    dari.script(job, vec![Reply::Json(completed(job, "admin"))]);
    let answer = http.post(url(job)).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(answer.status(), 202);
    let got = hook.until_delivered("job.completed").await;
    assert_eq!(got.last().unwrap().json()["data"]["final_result"], json!({"answer": "admin"}));
    assert_eq!(dari.polls(job), 2);

    // The job is finished now: 409. No such job: 404. Not a UUID: 400.
    let finished = || relay.store.list_watches(true).unwrap().iter().any(|w| w.job_id == job && w.state == "finished");
    crate::fakes::eventually(Duration::from_secs(5), || "the watch never finished".to_owned(), finished).await;
    assert_eq!(http.post(url(job)).bearer_auth(ADMIN_TOKEN).send().await.unwrap().status(), 409);
    let none = "7a1c3a7e-5b1d-4c53-9a43-0c5d8a1e0009";
    assert_eq!(http.post(url(none)).bearer_auth(ADMIN_TOKEN).send().await.unwrap().status(), 404);
    assert_eq!(http.post(url("nope")).bearer_auth(ADMIN_TOKEN).send().await.unwrap().status(), 400);
    relay.stop().await;
}
