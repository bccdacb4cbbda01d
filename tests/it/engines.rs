//! Every operator surface on both engines: the same scenario, written once
//! and run by `both!` on SQLite and on PostgreSQL (which skips in one line
//! without a server, `pg.rs`). A relay delivers a job to a webhook that
//! fails and one that answers; then the admin API's routes, the status
//! page's pages (over plain HTTP) and the commands (`watch add|import|list|rm`,
//! `deliveries list|show|retry`, `webhooks list|resume`, `start`, the real
//! binary on the same database) are checked against what it stored, with
//! `GET /v1/events` following a retry of the dead letter.
//! `operator_queries_agree` compares every operator query's rows across the
//! two engines after the same writes, word for word but for the clock.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dari_relay::admin::Listener;
use dari_relay::app::Listeners;
use dari_relay::config::{Config, ListenAddr};
use dari_relay::metrics::Metrics;
use dari_relay::store::ui::{DeliverySearch, WatchSearch};
use dari_relay::store::{DeliveryFilter, DeliveryOutcome, Postgres, Sqlite, Storage, Store, WatchQuery};
use dari_relay::vocab::DeliveryState;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::fakes::{API_KEY, FakeDari, FakeReceiver, Reply, SECRET, config_text, env, watch_on};
use crate::pg::TestDatabase;

const JOB: &str = "550e8400-e29b-41d4-a716-446655440000";
const JOB2: &str = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";
const JOB3: &str = "7ca8c921-0ebe-42e2-91c5-11d15fe541d9";
const STARTED: &str = "8db9da32-1fcf-43f3-a2d6-22e26af652ea";

/// A database of either engine, kept for the length of a test.
pub enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(TestDatabase),
}

impl Db {
    pub fn sqlite() -> Option<Db> {
        Some(Db::Sqlite(tempfile::tempdir().unwrap()))
    }

    pub fn postgres() -> Option<Db> {
        TestDatabase::create().map(Db::Postgres)
    }

    /// What `database = "..."` says for it: a file, or the URL.
    pub fn database(&self) -> String {
        match self {
            Db::Sqlite(dir) => dir.path().join("relay.db").display().to_string(),
            Db::Postgres(db) => db.url.clone(),
        }
    }

    /// The store on it, without a relay.
    async fn open(&self) -> Arc<dyn Storage> {
        match self {
            Db::Sqlite(_) => Arc::new(Sqlite(Arc::new(Store::open(Path::new(&self.database())).unwrap()))),
            Db::Postgres(pg) => Arc::new(Postgres::open(&pg.url).await.unwrap()),
        }
    }
}

/// The relay on `db` with its admin API (and the status page) on
/// 127.0.0.1:0, as `run` serves it on either engine.
struct Running {
    store: Arc<dyn Storage>,
    api: String,
    /// Push assist's `POST /v1/dari/webhook`, when the config has `[inbound]`.
    inbound: Option<String>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), dari_relay::app::AppError>>,
}

impl Running {
    async fn start(db: &Db, text: &str) -> Running {
        let config = Arc::new(Config::from_toml(text, Path::new("test.toml"), &push_env).unwrap());
        let listener = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()), None).await.unwrap();
        let api = format!("http://{}", listener.describe());
        let inbound = match &config.inbound {
            Some(i) => Some(dari_relay::inbound::Listener::bind(i.listen).await.unwrap()),
            None => None,
        };
        let url = inbound.as_ref().map(|l| format!("http://{}/v1/dari/webhook", l.local_addr().unwrap()));
        let listeners = Listeners { admin: Some(listener), inbound };
        let (_tx, rx) = tokio::sync::watch::channel(config);
        let (shutdown, metrics) = (CancellationToken::new(), Arc::new(Metrics::default()));
        let (store, task): (Arc<dyn Storage>, _) = match db {
            Db::Sqlite(_) => {
                let store = Arc::new(Store::open(Path::new(&db.database())).unwrap());
                let task = dari_relay::app::serve_with(rx, Arc::clone(&store), metrics, listeners, shutdown.clone());
                (Arc::new(Sqlite(store)), tokio::spawn(task))
            }
            Db::Postgres(pg) => {
                let store = Arc::new(Postgres::open(&pg.url).await.unwrap());
                let task =
                    dari_relay::app::serve_postgres_with(rx, Arc::clone(&store), metrics, listeners, shutdown.clone());
                (store, tokio::spawn(task))
            }
        };
        Running { store, api, inbound: url, shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("{}{path}", self.api)).await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    async fn get_json(&self, path: &str) -> Value {
        let (status, text) = self.get(path).await;
        assert_eq!(status, 200, "{path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    async fn post(&self, path: &str) -> (u16, Value) {
        let response = reqwest::Client::new().post(format!("{}{path}", self.api)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, serde_json::from_str(&response.text().await.unwrap()).unwrap_or(Value::Null))
    }

    async fn post_json(&self, path: &str, body: Value) -> (u16, Value) {
        let request =
            reqwest::Client::new().post(format!("{}{path}", self.api)).header("content-type", "application/json");
        let response = request.body(body.to_string()).send().await.unwrap();
        let status = response.status().as_u16();
        (status, serde_json::from_str(&response.text().await.unwrap()).unwrap_or(Value::Null))
    }

    /// `GET /v1/events`, its answer's head read: the stream is open.
    async fn events(&self) -> tokio::net::TcpStream {
        use tokio::io::AsyncWriteExt;
        let addr = self.api.trim_start_matches("http://");
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET /v1/events HTTP/1.1\r\nhost: {addr}\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.unwrap();
        let head = read_until(&mut tcp, "\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200") && head.contains("text/event-stream"), "{head}");
        tcp
    }

    async fn counts(&self) -> (i64, i64) {
        let counts = self.store.delivery_counts().await.unwrap();
        (counts.get("pending").copied().unwrap_or(0), counts.get("failed").copied().unwrap_or(0))
    }
}

/// The key Dari signs its webhook calls with, in the push assist scenario.
const DARI_KEY: &str = "dari-webhook-key-3b7e";

/// The fakes' environment, and push assist's key.
fn push_env(name: &str) -> Option<String> {
    if name == "DARI_WEBHOOK_KEY" { Some(DARI_KEY.to_owned()) } else { env(name) }
}

/// Dari's webhook call for `job_id`, signed (hex HMAC-SHA256 of the body).
async fn announce(relay: &Running, query: &str, job_id: &str) -> (u16, Value) {
    use hmac::Mac;
    let body = json!({"job_id": job_id, "status": "completed"}).to_string();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(DARI_KEY.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    let signature: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let url = format!("{}{query}", relay.inbound.as_deref().expect("an [inbound] listener"));
    let response = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("x-webhook-signature", signature)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, serde_json::from_str(&response.text().await.unwrap()).unwrap_or(Value::Null))
}

/// Reads `stream` until `want` has come, within 10 s; what was read.
async fn read_until(stream: &mut tokio::net::TcpStream, want: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buffer = [0; 4096];
    while !String::from_utf8_lossy(&seen).contains(want) {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await;
        let n = read.unwrap_or_else(|_| panic!("no {want:?} within 10 s: {}", String::from_utf8_lossy(&seen))).unwrap();
        assert!(n > 0, "the stream ended: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buffer[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// The real binary on `config`, with the fakes' secrets in its environment.
fn relay(config: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_dari-relay"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("DARI_API_KEY", API_KEY)
        .env("HOOK_SECRET", SECRET)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// Runs the binary, asserts it succeeded and returns its stdout.
fn ok(config: &Path, args: &[&str]) -> String {
    let out = relay(config, args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn status(events: usize, status: &str) -> Reply {
    let events: Vec<Value> = (0..events).map(|i| json!({"event_type": "step", "message": format!("e{i}")})).collect();
    Reply::Json(json!({"status": status, "events": events}))
}

/// The scenario: a job whose first delivery to `h` fails twice (a dead
/// letter) while `ok` gets everything; then every surface reads and
/// changes it.
async fn operator_surfaces(db: Db) {
    let dari = FakeDari::start().await;
    let failing = FakeReceiver::start().await;
    let answering = FakeReceiver::start().await;
    failing.answer_with(&[500, 500]);
    dari.script(JOB, vec![status(1, "completed")]);
    let text = config_text(Path::new(&db.database()), &dari, &[("h", &failing.url), ("ok", &answering.url)], "")
        .replace("retry_schedule = [\"100ms\", \"200ms\", \"300ms\"]", "retry_schedule = [\"20ms\"]");
    let files = tempfile::tempdir().unwrap();
    let config = files.path().join("config.toml");
    std::fs::write(&config, &text).unwrap();

    let relay_ = Running::start(&db, &text).await;
    relay_.store.add_watches(vec![watch_on("acme/form", JOB)]).await.unwrap();
    let settled = async || {
        let watches = relay_.store.watch_counts().await.unwrap();
        relay_.counts().await == (0, 1) && watches.get("finished") == Some(&1)
    };
    crate::fakes::eventually_async(Duration::from_secs(15), || "no dead letter yet".into(), settled).await;

    // The admin API. `/v1/cluster` only exists on PostgreSQL (this relay
    // runs the loops without joining, so no instance is listed).
    let (code, body) = relay_.get("/v1/cluster").await;
    match db {
        Db::Sqlite(_) => assert!(code == 404 && body.contains("SQLite"), "{code} {body}"),
        Db::Postgres(_) => {
            assert_eq!((code, serde_json::from_str::<Value>(&body).unwrap()["instances"].clone()), (200, json!([])))
        }
    }
    let watches = relay_.get_json("/v1/watches").await;
    assert_eq!(
        (watches["watches"][0]["job_id"].as_str(), watches["watches"][0]["state"].as_str()),
        (Some(JOB), Some("finished"))
    );
    let watch = relay_.get_json(&format!("/v1/watches/{JOB}")).await;
    let kinds: Vec<&str> =
        watch["notifications"].as_array().unwrap().iter().filter_map(|n| n["type"].as_str()).collect();
    assert_eq!(kinds, ["job.event", "job.completed"], "{watch}");
    let failed = relay_.get_json("/v1/deliveries?state=failed").await;
    let dead = &failed["deliveries"][0];
    assert_eq!((dead["webhook"].as_str(), dead["job_id"].as_str()), (Some("h"), Some(JOB)), "{failed}");
    assert_eq!(dead["attempts_log"].as_array().map(Vec::len), Some(2), "{dead}");
    let id = dead["id"].as_i64().unwrap();
    let by_webhook = relay_.get_json(&format!("/v1/deliveries?webhook=ok&job={JOB}")).await;
    assert_eq!(by_webhook["deliveries"].as_array().map(Vec::len), Some(2), "{by_webhook}");
    let detail = relay_.get_json(&format!("/v1/deliveries/{id}")).await;
    assert_eq!(detail["attempts_log"][0]["http_status"], 500, "{detail}");
    assert!(detail["headers"]["webhook-id"].as_str().is_some_and(|h| h.starts_with("msg_")), "{detail}");
    assert_eq!(relay_.get(&format!("/v1/deliveries/{}", id + 100)).await.0, 404);
    let hooks = relay_.get_json("/v1/webhooks").await;
    let names: Vec<(&str, i64)> = hooks["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["name"].as_str().unwrap(), w["failed"].as_i64().unwrap()))
        .collect();
    assert_eq!(names, [("h", 1), ("ok", 0)]);
    let (code, metrics) = relay_.get("/metrics").await;
    assert_eq!(code, 200);
    assert!(metrics.contains("dari_relay_watches{state=\"finished\"} 1"), "{metrics}");
    assert!(metrics.contains("dari_relay_deliveries_failed{webhook=\"h\"} 1"), "{metrics}");
    assert_eq!(relay_.get("/readyz").await, (200, json!({"status": "ready"}).to_string()));
    assert_eq!(relay_.post(&format!("/v1/watches/{JOB}/poll")).await.0, 409, "a finished watch is not polled");
    let (code, added) = relay_.post_json("/v1/watches", json!({"portal_id": "acme/form", "job_id": JOB3})).await;
    assert_eq!((code, added["job_id"].as_str()), (201, Some(JOB3)), "{added}");
    assert_eq!(relay_.post_json("/v1/watches", json!({"portal_id": "acme/form", "job_id": JOB3})).await.0, 200);
    let deleted = reqwest::Client::new().delete(format!("{}/v1/watches/{JOB3}", relay_.api)).send().await.unwrap();
    assert_eq!(deleted.status().as_u16(), 204);

    // The event stream follows a retry of the dead letter, which fails again.
    let mut events = relay_.events().await;
    failing.answer_with(&[500, 500]);
    assert_eq!(relay_.post(&format!("/v1/deliveries/{id}/retry")).await, (200, json!({"requeued": id})));
    let seen = read_until(&mut events, "\"state\":\"failed\"").await;
    assert!(seen.contains("event: delivery") && seen.contains(&format!("\"delivery_id\":{id}")), "{seen}");
    let failed_again = async || relay_.store.attempts(id).await.unwrap().len() == 4 && relay_.counts().await == (0, 1);
    crate::fakes::eventually_async(Duration::from_secs(10), || "the retry never failed".into(), failed_again).await;

    // The status page, over plain HTTP (no token: each GET opens a session).
    let (code, overview) = relay_.get("/ui/").await;
    assert_eq!(code, 200, "{overview}");
    let dead_letters = "href=\"/ui/deliveries?status=failed&amp;webhook=h\"";
    assert!(overview.contains(dead_letters) && overview.contains("scope=\"row\">ok"), "the webhooks: {overview}");
    let (code, page) = relay_.get("/ui/watches?q=acme%2Fform").await;
    assert!(code == 200 && page.contains(JOB), "{page}");
    let (code, page) = relay_.get(&format!("/ui/jobs/{JOB}")).await;
    let attempts = page.contains("<b class=\"bad\">500</b>") && page.contains("<b class=\"ok\">204</b>");
    assert!(code == 200 && page.contains("<span class=\"type\">job.completed</span>") && attempts, "{page}");
    let (code, page) = relay_.get("/ui/deliveries?status=failed").await;
    assert!(code == 200 && page.contains(JOB) && page.contains("HTTP 500"), "{page}");
    relay_.stop().await;

    // The commands, on the same database (the daemon stopped).
    let cfg = config.as_path();
    let list = ok(cfg, &["deliveries", "list", "--status", "failed", "--json"]);
    let rows: Value = serde_json::from_str(&list).unwrap();
    assert_eq!((rows[0]["id"].as_i64(), rows[0]["attempts_log"].as_array().map(Vec::len)), (Some(id), Some(4)));
    let text = ok(cfg, &["deliveries", "list", "--status", "failed"]);
    assert_eq!(text.lines().filter(|l| l.contains("attempt at") && l.contains("status 500")).count(), 4, "{text}");
    let shown = ok(cfg, &["deliveries", "show", &id.to_string()]);
    assert!(shown.starts_with(&format!("delivery {id}  job.event  to h  job {JOB}\n")), "{shown}");
    let hooks: Value = serde_json::from_str(&ok(cfg, &["webhooks", "list", "--json"])).unwrap();
    assert_eq!((hooks[0]["name"].as_str(), hooks[0]["failed"].as_i64()), (Some("h"), Some(1)), "{hooks}");
    assert_eq!(
        ok(cfg, &["deliveries", "retry", &id.to_string()]),
        "requeued 1 failed delivery; a running daemon sends it within a second\n"
    );
    assert_eq!(relay(cfg, &["deliveries", "retry", &id.to_string()]).status.code(), Some(2), "no longer failed");
    db.open().await.pause_webhook("h".into(), "HTTP 410 Gone".into()).await.unwrap();
    assert_eq!(
        ok(cfg, &["webhooks", "resume", "h"]),
        "resumed webhook h; a running daemon sends its backlog within a second\n"
    );
    assert_eq!(relay(cfg, &["webhooks", "resume", "h"]).status.code(), Some(2), "not paused any more");

    let add = ["watch", "add", "acme/form", JOB2, "--label", "team=a"];
    assert_eq!(ok(cfg, &add), format!("watching job {JOB2} on acme/form\n"));
    assert_eq!(ok(cfg, &add), format!("already watching job {JOB2} on acme/form\n"));
    let mut import = std::process::Command::new(env!("CARGO_BIN_EXE_dari-relay"))
        .args(["watch", "import", "-", "--config"])
        .arg(cfg)
        .env("DARI_API_KEY", API_KEY)
        .env("HOOK_SECRET", SECRET)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let line = format!("{{\"portal_id\":\"acme/form\",\"job_id\":\"{JOB3}\"}}\n");
    std::io::Write::write_all(&mut import.stdin.take().unwrap(), line.as_bytes()).unwrap();
    let out = import.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "imported 1 watch (1 new, 0 already watched)\n");
    let body = files.path().join("body.json");
    std::fs::write(&body, "{\"inputs\": {}}").unwrap();
    dari.on_start(STARTED, vec![status(0, "pending")]);
    let started = ok(cfg, &["start", "acme/form", "--body", body.to_str().unwrap()]);
    assert_eq!(started, format!("started job {STARTED} on acme/form; watching it\n"));
    let active: Value = serde_json::from_str(&ok(cfg, &["watch", "list", "--json"])).unwrap();
    let jobs: Vec<&str> = active.as_array().unwrap().iter().filter_map(|w| w["job_id"].as_str()).collect();
    // JOB3 keeps its place from the API's add: a removed watch added again is the same row.
    assert_eq!(jobs, [JOB3, JOB2, STARTED]);
    assert_eq!(active[1]["labels"], json!({"team": "a"}));
    assert_eq!(ok(cfg, &["watch", "rm", JOB2]), format!("stopped watching job {JOB2}\n"));
    assert_eq!(relay(cfg, &["watch", "rm", JOB2]).status.code(), Some(2));
    let all = ok(cfg, &["watch", "list", "--all"]);
    assert_eq!(all.lines().count(), 5, "a header and four watches: {all}");
    assert!(all.lines().any(|l| l.starts_with(JOB3) && l.contains("active")), "imported again: {all}");
    assert!(all.lines().any(|l| l.starts_with(JOB2) && l.contains("removed")), "{all}");
}

/// Push assist on the engine: an announced job on an `auto_watch` portal is
/// watched and delivered; a watched active job is polled now; a finished
/// one is ignored.
async fn push_assist(db: Db) {
    let dari = FakeDari::start().await;
    let mut answering = FakeReceiver::start().await;
    dari.script(JOB, vec![status(0, "running")]);
    dari.script(JOB2, vec![status(1, "completed")]);
    let inbound = "[inbound]\nlisten = \"127.0.0.1:0\"\ndari_webhook_key_env = \"DARI_WEBHOOK_KEY\"\n\
                   auto_watch = [\"acme/auto-*\"]\n";
    let text = config_text(Path::new(&db.database()), &dari, &[("ok", &answering.url)], inbound);
    let relay_ = Running::start(&db, &text).await;

    let (code, answer) = announce(&relay_, "?portal=acme/auto-form", JOB2).await;
    assert_eq!((code, answer["outcome"].as_str()), (202, Some("auto_watched")), "{answer}");
    let kinds: Vec<String> = answering.until_delivered("job.completed").await.iter().map(|r| r.kind()).collect();
    assert_eq!(kinds, ["job.event", "job.completed"]);
    let rows = relay_.store.query_watches(WatchQuery { job_id: Some(JOB2.into()), ..WatchQuery::default() });
    assert_eq!(rows.await.unwrap()[0].portal_id, "acme/auto-form");
    let finished = async || relay_.store.watch_counts().await.unwrap().get("finished") == Some(&1);
    crate::fakes::eventually_async(Duration::from_secs(10), || "the auto-watch never ended".into(), finished).await;
    let (code, answer) = announce(&relay_, "", JOB2).await;
    assert_eq!((code, answer["outcome"].as_str()), (202, Some("ignored")), "{answer}");

    relay_.store.add_watches(vec![watch_on("acme/form", JOB)]).await.unwrap();
    let (code, answer) = announce(&relay_, "", JOB).await;
    assert_eq!((code, answer["outcome"].as_str()), (202, Some("triggered")), "{answer}");
    relay_.stop().await;
}

/// The same writes on both engines, then every operator query: the same
/// rows back, but for the times (each engine wrote at its own moment).
#[tokio::test]
async fn operator_queries_agree() {
    let Some(pg) = crate::store_conformance::postgres() else { return };
    let sqlite = crate::store_conformance::sqlite();
    let (a, b) = (transcript(&*sqlite.store).await, transcript(&*pg.store).await);
    for (key, value) in a.as_object().unwrap() {
        assert_eq!(value, &b[key], "{key} differs between SQLite and PostgreSQL");
    }
    assert_eq!(a, b);
}

/// What the operator queries answer after a fixed series of writes, times
/// blanked; the facts that do not depend on the engine are asserted too.
async fn transcript(store: &dyn Storage) -> Value {
    let mut labelled = watch_on("acme/form", JOB);
    labelled.labels.insert("team".into(), "a.b\"c".into());
    store.add_watches(vec![labelled, watch_on("acme/other", JOB2), watch_on("acme/form", JOB3)]).await.unwrap();
    crate::store_conformance::commit(store, JOB, "running", 3, &["h", "ok"]).await;
    crate::store_conformance::commit(store, JOB2, "running", 1, &["h"]).await;
    store.remove_watch(JOB3.into()).await.unwrap();
    // `ok` delivers JOB's chain; `h` fails its head once and gives up, then
    // a 410 pauses it on JOB2's.
    for d in store.pending_chain(JOB.into(), "ok".into(), 10).await.unwrap() {
        let outcome = DeliveryOutcome::Delivered { status: 204 };
        store.record_attempt(d.id, crate::store_conformance::attempt(Some(204), None), outcome).await.unwrap();
    }
    let head = store.pending_chain(JOB.into(), "h".into(), 1).await.unwrap().remove(0);
    let error = || crate::store_conformance::attempt(Some(500), Some("HTTP 500"));
    let retry = DeliveryOutcome::RetryAt { at_ms: 1, error: "HTTP 500".into() };
    store.record_attempt(head.id, error(), retry).await.unwrap();
    store.record_attempt(head.id, error(), DeliveryOutcome::GaveUp { error: "HTTP 500".into() }).await.unwrap();
    let gone = store.pending_chain(JOB2.into(), "h".into(), 1).await.unwrap().remove(0);
    let paused = crate::store_conformance::attempt(Some(410), None);
    store.record_attempt(gone.id, paused, DeliveryOutcome::Paused).await.unwrap();
    store.pause_webhook("h".into(), "HTTP 410 Gone".into()).await.unwrap();

    let all = |state| WatchQuery { state, ..WatchQuery::default() };
    let filter = |webhook: Option<&str>, job: Option<&str>, state| DeliveryFilter {
        webhook: webhook.map(str::to_owned),
        job_id: job.map(str::to_owned),
        state,
        limit: 100,
    };
    let search = |webhook: Option<&str>, job: Option<&str>, state, before| DeliverySearch {
        state,
        webhook: webhook.map(str::to_owned),
        job_id: job.map(str::to_owned),
        before,
        limit: 100,
    };
    let watches = WatchSearch { limit: 100, ..WatchSearch::default() };
    let (tail_n, tail_a) = store.tail_start().await.unwrap();
    assert_eq!((tail_n, tail_a), (4, 6), "four notifications, six attempts");
    let detail = store.delivery(head.id).await.unwrap().unwrap();
    let timeline = store.job_timeline(JOB.into(), 1, 2).await.unwrap();
    assert_eq!(timeline.iter().map(|n| n.id).collect::<Vec<_>>(), [2, 3], "after 1, at most 2");
    let activity = store.activity(dari_relay::vocab::now_ms(), 60).await.unwrap();
    assert_eq!(activity.notifications.iter().map(|m| m.1).sum::<u64>(), 4);
    assert_eq!((activity.delivered.iter().map(|m| m.1).sum::<u64>(), activity.latencies.len()), (3, 3));
    let after = WatchQuery { after: Some(JOB.into()), limit: Some(1), ..WatchQuery::default() };
    let detail = json!([detail.summary, detail.body, detail.attempts]);
    let notifications: Vec<Value> = store
        .notifications_of(JOB.into())
        .await
        .unwrap()
        .iter()
        .map(|n| {
            let deliveries: Vec<Value> =
                n.deliveries.iter().map(|d| json!([d.webhook, d.msg_id, d.state.as_str(), d.attempts])).collect();
            json!([n.id, n.kind, n.body, deliveries])
        })
        .collect();
    let pauses: std::collections::BTreeMap<String, String> =
        store.webhook_pauses().await.unwrap().into_iter().map(|(k, (reason, _))| (k, reason)).collect();
    let label = WatchSearch { label: Some(("team".into(), "a.b\"c".into())), ..watches.clone() };
    let portal_state =
        WatchSearch { portal_id: Some("acme/form".into()), state: Some("active".into()), ..watches.clone() };
    let mut out = json!({
        "watches": store.query_watches(all(None)).await.unwrap(),
        "active": store.query_watches(all(Some(dari_relay::vocab::WatchState::Active))).await.unwrap(),
        "after": store.query_watches(after).await.unwrap(),
        "watch_counts": store.watch_counts().await.unwrap(),
        "list": store.list_deliveries(None, 100).await.unwrap(),
        "list_failed": store.list_deliveries(Some(DeliveryState::Failed), 100).await.unwrap(),
        "query_all": store.query_deliveries(filter(None, None, None)).await.unwrap(),
        "query_webhook": store.query_deliveries(filter(Some("h"), None, None)).await.unwrap(),
        "query_job_state":
            store.query_deliveries(filter(None, Some(JOB), Some(DeliveryState::Pending))).await.unwrap(),
        "query_all_three":
            store.query_deliveries(filter(Some("ok"), Some(JOB), Some(DeliveryState::Delivered))).await.unwrap(),
        "detail": detail,
        "no_detail": store.delivery(999).await.unwrap().is_none(),
        "attempts": store.attempts(head.id).await.unwrap(),
        "notifications": notifications,
        "backlog": store.backlog().await.unwrap(),
        "webhook_backlog": store.webhook_backlog().await.unwrap(),
        "pauses": pauses,
        "tail": store.tail_after(1, 2, 2).await.unwrap(),
        "tail_rest": store.tail_after(tail_n, tail_a, 10).await.unwrap(),
        "search_watches": store.search_watches(watches.clone()).await.unwrap(),
        "by_label": store.search_watches(label).await.unwrap(),
        "by_portal_state": store.search_watches(portal_state).await.unwrap(),
        "by_cursor": store.search_watches(WatchSearch { after: Some(1), limit: 1, ..watches.clone() }).await.unwrap(),
        "search_deliveries": store.search_deliveries(search(None, None, None, None)).await.unwrap(),
        "search_failed":
            store.search_deliveries(search(None, None, Some(DeliveryState::Failed), None)).await.unwrap(),
        "search_before":
            store.search_deliveries(search(Some("h"), Some(JOB), None, Some(head.id + 2))).await.unwrap(),
        "last_errors": store.last_errors().await.unwrap(),
        "timeline": timeline.iter().map(|n| json!([n.id, n.kind, n.body, n.deliveries])).collect::<Vec<_>>(),
        "notification_count": store.notification_count(JOB.into()).await.unwrap(),
        "minutes": activity.notifications.len(),
        "writable": store.writable(Duration::from_secs(5)).await.unwrap().is_ok(),
    });
    assert_eq!(out["last_errors"]["h"]["http_status"], 410, "the newest failure: {}", out["last_errors"]);
    assert_eq!(out["by_label"].as_array().map(Vec::len), Some(1));
    // Changes, after the reads above.
    out["resumed"] =
        json!([store.resume_webhook("h".into()).await.unwrap(), store.resume_webhook("h".into()).await.unwrap()]);
    out["retried_of_webhook"] = json!([
        store.retry_failed_of_webhook("h".into()).await.unwrap(),
        store.retry_failed_of_webhook("h".into()).await.unwrap()
    ]);
    out["counts"] = json!(store.delivery_counts().await.unwrap());
    assert_eq!(out["retried_of_webhook"], json!([1, 0]));
    blank_times(&mut out);
    out
}

/// Replaces every time (each engine wrote at its own moment) by whether it was set.
fn blank_times(value: &mut Value) {
    const TIMES: [&str; 6] = ["created_at", "updated_at", "next_attempt_at", "finished_at", "at", "attempted_at"];
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if TIMES.contains(&key.as_str()) || key == "oldest_pending" {
                    *v = json!(!v.is_null());
                } else {
                    blank_times(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(blank_times),
        _ => {}
    }
}

/// A command on a PostgreSQL server that does not answer fails (exit 1)
/// naming the database without its password; a password written in the
/// file is refused (exit 2) naming the key, before anything is tried.
#[test]
fn an_unreachable_postgres_is_a_runtime_error_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "database_url_env = \"TEST_DB_URL\"\n[orgs.acme]\napi_key_env = \"DARI_API_KEY\"\n")
        .unwrap();
    for args in
        [&["watch", "list"][..], &["deliveries", "list"], &["webhooks", "list"], &["watch", "add", "acme/form", JOB]]
    {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dari-relay"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .env("DARI_API_KEY", API_KEY)
            .env("TEST_DB_URL", "postgres://relay:s3cr3t-pw@127.0.0.1:1/relay")
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("cannot open database postgres://relay:***@127.0.0.1:1/relay"), "{args:?}: {stderr}");
        assert!(!stderr.contains("s3cr3t") && out.stdout.is_empty(), "{args:?}: {stderr}");
    }
    assert!(std::fs::read_dir(dir.path()).unwrap().count() == 1, "no SQLite file named after the URL");
    std::fs::write(&config, "database = \"postgres://relay:s3cr3t-pw@127.0.0.1:1/relay\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dari-relay"))
        .args(["watch", "list", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("database: a password must not be written") && !stderr.contains("s3cr3t"), "{stderr}");
}

/// Runs each scenario on SQLite and on PostgreSQL, on two worker threads:
/// the fakes keep answering while the test waits for a command.
macro_rules! both {
    ($($scenario:ident),*) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                super::$scenario(super::Db::sqlite().unwrap()).await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                if let Some(db) = super::Db::postgres() {
                    super::$scenario(db).await;
                }
            })*
        }
    };
}

both!(operator_surfaces, push_assist);
