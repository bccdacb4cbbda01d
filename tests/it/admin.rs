//! Issue 6: the admin API (every route, auth, validation, start-and-watch),
//! `/metrics` in Prometheus text format, and the systemd notify protocol.

use std::time::Duration;

use dari_relay::admin::Listener;
use dari_relay::config::ListenAddr;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::fakes::{ADMIN_TOKEN, API_KEY, FakeDari, FakeReceiver, Relay, Reply, SECRET, config_text};

const JOB: &str = "550e8400-e29b-41d4-a716-446655440000";
const JOB2: &str = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";

fn job(status: &str, events: usize) -> Reply {
    let events: Vec<Value> = (0..events).map(|i| json!({"event_type": "step", "message": format!("e{i}")})).collect();
    Reply::Json(json!({"status": status, "events": events}))
}

/// A relay with its admin API on 127.0.0.1:0 (with the config's token, if
/// any); returns it and the API's base URL.
async fn relay_with_api(text: &str) -> (Relay, String) {
    let config =
        dari_relay::config::Config::from_toml(text, std::path::Path::new("t.toml"), &crate::fakes::env).unwrap();
    let token = config.admin.and_then(|a| a.token);
    let listener = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()), token).await.unwrap();
    let base = format!("http://{}", listener.describe());
    (Relay::start_with_admin(text, Some(listener)).await, base)
}

async fn call(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, url);
    if let Some(body) = body {
        request = request.header("content-type", "application/json").body(body.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test]
async fn watches_and_deliveries_routes_work_end_to_end() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB, vec![job("running", 1), job("completed", 1)]);
    let (relay, api) = relay_with_api(&config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "")).await;

    // Create: 201, then 200 for the same job.
    let watch = json!({"portal_id": "acme/form", "job_id": JOB, "labels": {"team": "growth"}, "webhooks": ["h"]});
    let (status, body) = call(Method::POST, format!("{api}/v1/watches"), Some(watch.clone())).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!((body["job_id"].as_str(), body["labels"]["team"].as_str()), (Some(JOB), Some("growth")));
    assert_eq!(call(Method::POST, format!("{api}/v1/watches"), Some(watch)).await.0, 200);

    // Validation errors name the field.
    let bad = [
        (json!({"portal_id": "acme/form", "job_id": "nope"}), "job_id"),
        (json!({"job_id": JOB}), "portal_id"),
        (json!({"portal_id": "acme", "job_id": JOB}), "portal_id"),
        (json!({"portal_id": "other/form", "job_id": JOB}), "portal_id"),
        (json!({"portal_id": "acme/form", "job_id": JOB, "webhooks": ["nope"]}), "webhooks"),
        (json!({"portal_id": "acme/form", "job_id": JOB, "labels": {"n": 1}}), "labels"),
        (json!({"portal_id": "acme/form", "job_id": JOB, "from_now": "yes"}), "from_now"),
        (json!([1]), "body"),
    ];
    for (body, field) in bad {
        let (status, answer) = call(Method::POST, format!("{api}/v1/watches"), Some(body.clone())).await;
        assert_eq!((status, answer["field"].as_str()), (400, Some(field)), "{body}: {answer}");
    }
    let (status, answer) =
        call(Method::POST, format!("{api}/v1/watches"), Some(json!({"portal_id": "acme/form", "job_id": JOB, "x": 1})))
            .await;
    assert_eq!(status, 400);
    assert!(answer["error"].as_str().unwrap().contains("unknown field \"x\""));
    let not_json = reqwest::Client::new()
        .post(format!("{api}/v1/watches"))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status().as_u16(), 400);
    let huge = reqwest::Client::new()
        .post(format!("{api}/v1/watches"))
        .header("content-type", "application/json")
        .body(vec![b' '; 1024 * 1024 + 10])
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status().as_u16(), 413, "bodies over 1 MiB are refused");

    // The watch created through the API is delivered end to end.
    let got = receiver.until_delivered("job.completed").await;
    assert_eq!(got.iter().map(|r| r.kind()).collect::<Vec<_>>(), ["job.event", "job.running", "job.completed"]);
    relay.settle().await;

    // One watch, with its notifications and their delivery states.
    let (status, one) = call(Method::GET, format!("{api}/v1/watches/{JOB}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(one["state"], "finished");
    let notes = one["notifications"].as_array().unwrap();
    assert_eq!(notes.len(), 3);
    assert_eq!(notes[2]["type"], "job.completed");
    assert_eq!(notes[2]["deliveries"][0]["state"], "delivered");
    assert_eq!(notes[2]["deliveries"][0]["webhook_id"], got[2].header("webhook-id").as_str());
    assert_eq!(call(Method::GET, format!("{api}/v1/watches/{JOB2}"), None).await.0, 404);

    // List, filter and paginate.
    dari.script(JOB2, vec![job("running", 0)]);
    let second = json!({"portal_id": "acme/other", "job_id": JOB2});
    assert_eq!(call(Method::POST, format!("{api}/v1/watches"), Some(second)).await.0, 201);
    let (_, page) = call(Method::GET, format!("{api}/v1/watches?limit=1"), None).await;
    assert_eq!(page["watches"].as_array().unwrap().len(), 1);
    assert_eq!(page["next_after"], JOB);
    let (_, page2) = call(Method::GET, format!("{api}/v1/watches?limit=1&after={JOB}"), None).await;
    assert_eq!(page2["watches"][0]["job_id"], JOB2);
    let (_, active) = call(Method::GET, format!("{api}/v1/watches?state=active"), None).await;
    assert_eq!(active["watches"].as_array().unwrap().iter().map(|w| w["job_id"].clone()).collect::<Vec<_>>(), [JOB2]);
    let (_, by_portal) = call(Method::GET, format!("{api}/v1/watches?portal_id=acme/form"), None).await;
    assert_eq!(by_portal["watches"].as_array().unwrap().len(), 1);
    assert_eq!(call(Method::GET, format!("{api}/v1/watches?state=odd"), None).await.0, 400);

    // Delete.
    assert_eq!(call(Method::DELETE, format!("{api}/v1/watches/{JOB2}"), None).await.0, 204);
    assert_eq!(call(Method::DELETE, format!("{api}/v1/watches/{JOB2}"), None).await.0, 404);

    // Deliveries: list, filter, retry (409 when not failed).
    let (status, list) = call(Method::GET, format!("{api}/v1/deliveries?status=delivered"), None).await;
    assert_eq!(status, 200);
    let deliveries = list["deliveries"].as_array().unwrap();
    assert!(deliveries.len() >= 3 && deliveries.iter().all(|d| d["state"] == "delivered"));
    let id = deliveries[0]["id"].as_i64().unwrap();
    assert_eq!(call(Method::POST, format!("{api}/v1/deliveries/{id}/retry"), None).await.0, 409);
    assert_eq!(call(Method::GET, format!("{api}/v1/deliveries?status=lost"), None).await.0, 400);

    // Health: alive; ready until the database refuses writes.
    assert_eq!(call(Method::GET, format!("{api}/healthz"), None).await.0, 200);
    assert_eq!(call(Method::GET, format!("{api}/readyz"), None).await, (200, json!({"status": "ready"})));
    relay.store.set_read_only(true).unwrap();
    let (status, ready) = call(Method::GET, format!("{api}/readyz"), None).await;
    assert_eq!(status, 503);
    assert!(ready["reasons"][0].as_str().unwrap().contains("not writable"), "{ready}");
    relay.store.set_read_only(false).unwrap();
    relay.stop().await;
}

#[tokio::test]
async fn failed_delivery_is_retried_through_the_api() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    receiver.answer_with(&[500, 500, 500, 500]);
    dari.script(JOB, vec![job("completed", 0)]);
    let (relay, api) = relay_with_api(&config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "")).await;
    relay.store.add_watches(&[crate::fakes::watch_on("acme/form", JOB)]).unwrap();
    for _ in 0..4 {
        receiver.next().await;
    }
    relay.settle().await;
    let (_, list) = call(Method::GET, format!("{api}/v1/deliveries?status=failed"), None).await;
    let id = list["deliveries"][0]["id"].as_i64().unwrap();
    assert_eq!(call(Method::POST, format!("{api}/v1/deliveries/{id}/retry"), None).await.0, 200);
    let again = receiver.next().await;
    assert_eq!((again.kind(), again.answered), ("job.completed".into(), 204));
    relay.stop().await;
}

#[tokio::test]
async fn bearer_token_is_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let extra = "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"ADMIN_TOKEN\"\n";
    let (relay, api) = relay_with_api(&config_text(&dir.path().join("r.db"), &dari, &[], extra)).await;
    let client = reqwest::Client::new();
    // `/healthz` is liveness only and needs no token (tests/it/ops.rs).
    for path in ["/metrics", "/v1/watches", "/v1/deliveries"] {
        let none = client.get(format!("{api}{path}")).send().await.unwrap();
        assert_eq!(none.status().as_u16(), 401, "{path}");
        assert_eq!(none.headers()["www-authenticate"], "Bearer");
        let wrong = client.get(format!("{api}{path}")).bearer_auth("admin-token-5e1e").send().await.unwrap();
        assert_eq!(wrong.status().as_u16(), 401, "{path}");
        let right = client.get(format!("{api}{path}")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
        assert_eq!(right.status().as_u16(), 200, "{path}");
    }
    relay.stop().await;
}

#[tokio::test]
async fn start_and_watch_in_one_call() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.on_start(JOB, vec![job("pending", 0), job("completed", 1)]);
    let (relay, api) = relay_with_api(&config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "")).await;
    let inputs = json!({"inputs": {"name": "Ada", "email": "ada@example.com"}});
    let (status, answer) = call(
        reqwest::Method::POST,
        format!("{api}/v1/jobs/acme/contact_form/start?label=customer=acme"),
        Some(inputs.clone()),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["job_id"], JOB);
    assert_eq!(answer["dari"]["status"], "pending");
    assert_eq!(answer["watch"]["labels"]["customer"], "acme");
    assert_eq!(dari.starts(), [inputs], "the body reached Dari unchanged");
    let got = receiver.until_delivered("job.completed").await;
    assert_eq!(got[0].kind(), "job.pending");
    assert_eq!(got[0].json()["data"]["labels"]["customer"], "acme");
    // Bad watch options are refused before a paid job is started.
    let (status, answer) =
        call(reqwest::Method::POST, format!("{api}/v1/jobs/acme/contact_form/start?webhook=nope"), Some(json!({})))
            .await;
    assert_eq!((status, answer["field"].as_str()), (400, Some("webhooks")));
    assert_eq!(dari.starts().len(), 1);
    // Dari refusing is a 502 that says so.
    let (status, answer) =
        call(reqwest::Method::POST, format!("{api}/v1/jobs/acme/contact_form/start"), Some(json!({}))).await;
    assert_eq!(status, 502, "{answer}");
    relay.stop().await;
}

#[tokio::test]
async fn start_command_starts_and_watches() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let dari = FakeDari::start().await;
    dari.on_start(JOB2, vec![job("pending", 0)]);
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_text(&db, &dari, &[], "")).unwrap();
    let body = dir.path().join("body.json");
    std::fs::write(&body, "{\"inputs\": {\"x\": 1}}").unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_dari-relay"))
        .args(["start", "acme/contact_form", "--label", "k=v", "--body"])
        .arg(&body)
        .arg("--config")
        .arg(&config)
        .env("DARI_API_KEY", API_KEY)
        .env("HOOK_SECRET", SECRET)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("started job {JOB2} on acme/contact_form; watching it\n"));
    assert_eq!(dari.starts(), [json!({"inputs": {"x": 1}})]);
    let watches = dari_relay::store::Store::open(&db).unwrap().list_watches(false).unwrap();
    assert_eq!((watches[0].job_id.as_str(), watches[0].labels["k"].as_str()), (JOB2, Some("v")));
}

/// `/metrics` parses as Prometheus text (by an independent parser) and its
/// counters move as a scenario runs.
#[tokio::test]
async fn metrics_parse_and_move() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB, vec![job("running", 2), job("completed", 2)]);
    let (relay, api) = relay_with_api(&config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "")).await;
    let scrape = || async {
        let text = reqwest::get(format!("{api}/metrics")).await.unwrap().text().await.unwrap();
        let lines = text.lines().map(|l| Ok(l.to_owned()));
        let parsed = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text format");
        let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
            parsed
                .samples
                .iter()
                .filter(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
                .map(|s| match s.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    prometheus_parse::Value::Histogram(ref h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
                    _ => 0.0,
                })
                .sum()
        };
        (
            value("dari_relay_polls_total", None),
            value("dari_relay_notifications_total", Some(("type", "job.completed"))),
            value("dari_relay_delivery_attempts_total", Some(("outcome", "delivered"))),
            value("dari_relay_delivery_latency_seconds_count", Some(("webhook", "h"))),
            value("dari_relay_watches", Some(("state", "finished"))),
            value("dari_relay_build_info", None),
        )
    };
    let before = scrape().await;
    assert_eq!(before, (0.0, 0.0, 0.0, 0.0, 0.0, 1.0));
    relay.store.add_watches(&[crate::fakes::watch_on("acme/form", JOB)]).unwrap();
    receiver.until_delivered("job.completed").await;
    relay.settle().await;
    let (polls, completed, delivered, latency, finished, _) = scrape().await;
    assert!(polls >= 2.0);
    assert_eq!((completed, delivered, latency, finished), (1.0, 4.0, 4.0, 1.0));
    let text = reqwest::get(format!("{api}/metrics")).await.unwrap().text().await.unwrap();
    for family in [
        "dari_relay_poll_duration_seconds_bucket",
        "dari_relay_deliveries_pending",
        "dari_relay_oldest_pending_delivery_age_seconds",
    ] {
        assert!(text.contains(family), "{family} missing:\n{text}");
    }
    relay.stop().await;
}

/// The API also listens on a Unix socket, where no token is needed.
#[tokio::test]
async fn admin_api_on_a_unix_socket() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let socket = dir.path().join("admin.sock");
    let listener = Listener::bind(&ListenAddr::Unix(socket.clone()), None).await.unwrap();
    let relay = Relay::start_with_admin(&config_text(&dir.path().join("r.db"), &dari, &[], ""), Some(listener)).await;
    let mut stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("{\"status\":\"alive\"}"), "{answer}");
    relay.stop().await;
}

/// The notify protocol against a fake NOTIFY_SOCKET: READY once the
/// database is open, WATCHDOG pings at half of WATCHDOG_USEC, STOPPING on
/// SIGTERM.
#[tokio::test]
async fn systemd_notify_ready_watchdog_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_text(&dir.path().join("r.db"), &dari, &[], "")).unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    // systemd sets WATCHDOG_PID to the service's pid; `exec` keeps the shell's.
    let mut child = std::process::Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" run --config \"$1\"", env!("CARGO_BIN_EXE_dari-relay")])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .env("DARI_API_KEY", API_KEY)
        .env("HOOK_SECRET", SECRET)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let next = || {
        let socket = &socket;
        async move {
            let n =
                tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf)).await.expect("a message").unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        }
    };
    assert_eq!(next().await, "READY=1\n");
    let first = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        assert_eq!(next().await, "WATCHDOG=1\n");
        pings += 1;
    }
    let took = first.elapsed();
    assert!(took >= Duration::from_millis(150) && took < Duration::from_secs(2), "3 pings in {took:?}");
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let mut stopping = false;
    for _ in 0..5 {
        if next().await == "STOPPING=1\n" {
            stopping = true;
            break;
        }
    }
    assert!(stopping);
    assert!(child.wait().unwrap().success());
}

/// A reload may rotate the admin token but never remove it: the listener
/// stays bound, so dropping auth would expose it.
#[tokio::test]
async fn a_reload_cannot_switch_auth_off() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let db = dir.path().join("r.db");
    let extra = "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"ADMIN_TOKEN\"\n";
    let (relay, api) = relay_with_api(&config_text(&db, &dari, &[], extra)).await;
    relay.reload(&config_text(&db, &dari, &[], ""));
    let client = reqwest::Client::new();
    assert_eq!(client.get(format!("{api}/v1/watches")).send().await.unwrap().status().as_u16(), 401);
    let right = client.get(format!("{api}/v1/watches")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(right.status().as_u16(), 200);
    relay.stop().await;
}
