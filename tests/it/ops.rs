//! Issue 17, operability: the admin API's `/healthz` without a token, JSON
//! 404s, `POST /v1/reload`, `GET /v1/webhooks`, `GET /v1/deliveries/{id}`
//! and the delivery filters; and the CLI through a running daemon
//! (`--admin`), which needs neither the org secrets nor the database.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use assert_cmd::Command;
use dari_relay::admin::Listener;
use dari_relay::config::ListenAddr;
use serde_json::{Value, json};

use crate::fakes::{ADMIN_TOKEN, API_KEY, FakeDari, FakeReceiver, Relay, Reply, SECRET, config_text, watch_on};

const JOB: &str = "550e8400-e29b-41d4-a716-446655440000";
const JOB2: &str = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";
const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"ADMIN_TOKEN\"\n";

fn job(status: &str, events: usize) -> Reply {
    let events: Vec<Value> = (0..events).map(|i| json!({"event_type": "step", "message": format!("e{i}")})).collect();
    Reply::Json(json!({"status": status, "events": events}))
}

async fn listener(reload: Option<dari_relay::admin::Reload>) -> (Listener, String) {
    let token = Some(secrecy::SecretString::from(ADMIN_TOKEN));
    let listener = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()), token).await.unwrap();
    let base = format!("http://{}", listener.describe());
    (
        match reload {
            Some(r) => listener.with_reload(r),
            None => listener,
        },
        base,
    )
}

/// A request with the token (`token: false` for none); the status and the
/// body as JSON, or as a string when it is not JSON.
async fn call(method: reqwest::Method, url: String, token: bool) -> (u16, Value, String) {
    let mut request = reqwest::Client::new().request(method, url);
    if token {
        request = request.bearer_auth(ADMIN_TOKEN);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text.clone())), text)
}

async fn get(url: String) -> (u16, Value, String) {
    call(reqwest::Method::GET, url, true).await
}

#[tokio::test]
async fn deliveries_show_what_was_sent_and_filter_by_webhook_job_and_state() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    let mut chat = FakeReceiver::start().await;
    dari.script(JOB, vec![job("running", 1), job("completed", 1)]);
    // The lines after the webhook table belong to it: one literal header,
    // one from the environment (a secret).
    let extra = format!(
        "headers = {{ \"x-team\" = \"ops\" }}\nheaders_env = {{ \"x-auth\" = \"HOOK_SECRET\" }}\n\
         [[webhooks]]\nname = \"chat\"\nurl = \"{}\"\nformat = \"slack\"\n{ADMIN}",
        chat.url
    );
    let text = config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], &extra);
    let (listener, api) = listener(None).await;
    let relay = Relay::start_with_admin(&text, Some(listener)).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    let got = receiver.until_delivered("job.completed").await;
    let chat_got = [chat.next().await, chat.next().await, chat.next().await];
    relay.settle().await;

    // Liveness without the token, and nothing else without it.
    let (status, alive, _) = call(reqwest::Method::GET, format!("{api}/healthz"), false).await;
    assert_eq!((status, alive), (200, json!({"status": "alive"})));
    for path in ["/metrics", "/v1/webhooks", "/v1/deliveries/1", "/nope"] {
        assert_eq!(call(reqwest::Method::GET, format!("{api}{path}"), false).await.0, 401, "{path}");
    }
    // Unknown routes: a JSON 404 naming the path.
    for method in [reqwest::Method::GET, reqwest::Method::POST] {
        let (status, body, _) = call(method, format!("{api}/v1/nope"), true).await;
        assert_eq!(status, 404);
        assert!(body["error"].as_str().unwrap().contains("/v1/nope"), "{body}");
    }

    // Webhooks with their state and backlog.
    let (status, hooks, _) = get(format!("{api}/v1/webhooks")).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = hooks["webhooks"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["h", "chat"]);
    assert_eq!(
        (hooks["webhooks"][0]["state"].as_str(), hooks["webhooks"][0]["pending"].as_i64()),
        (Some("active"), Some(0))
    );

    // Filters, alone and together; bad values are JSON 400s naming the field.
    let list = |q: &str| {
        let url = format!("{api}/v1/deliveries?{q}");
        async move {
            let (status, body, _) = get(url.clone()).await;
            assert_eq!(status, 200, "{url}: {body}");
            body["deliveries"].as_array().unwrap().clone()
        }
    };
    let to_chat = list("webhook=chat").await;
    assert!(to_chat.len() == 3 && to_chat.iter().all(|d| d["webhook"] == "chat"), "{to_chat:?}");
    let all = list(&format!("job={JOB}&state=delivered&webhook=h")).await;
    assert_eq!(
        all.iter().map(|d| d["type"].as_str().unwrap()).collect::<Vec<_>>(),
        ["job.completed", "job.running", "job.event"]
    );
    assert!(list(&format!("job={JOB2}")).await.is_empty());
    assert!(list("state=failed").await.is_empty());
    assert_eq!(list("status=delivered").await.len(), 6);
    for (q, field) in [("job=nope", "job"), ("webhook=", "webhook"), ("state=lost", "state"), ("color=red", "query")] {
        let (status, body, _) = get(format!("{api}/v1/deliveries?{q}")).await;
        assert_eq!((status, body["field"].as_str()), (400, Some(field)), "{q}: {body}");
    }

    // One delivery: the body exactly as the receiver got it, the headers it
    // carried with secrets redacted, every attempt.
    let completed = &all[0];
    let (status, shown, raw) = get(format!("{api}/v1/deliveries/{}", completed["id"])).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["body"], got[2].json());
    assert_eq!(shown["body_rendered"], true);
    assert_eq!(shown["headers"]["webhook-id"], got[2].header("webhook-id").as_str());
    assert_eq!(shown["headers"]["webhook-signature"], "v1,<redacted>");
    assert_eq!(shown["headers"]["x-auth"], "<redacted>");
    assert_eq!(shown["headers"]["x-team"], "ops");
    assert_eq!(shown["headers"]["content-type"], "application/json");
    let attempts = shown["attempts_log"].as_array().unwrap();
    assert_eq!((attempts.len(), attempts[0]["http_status"].as_u64()), (1, Some(204)));
    assert!(!raw.contains(SECRET) && !raw.contains(&got[2].header("webhook-signature")), "{raw}");
    // Rendered for its webhook: the Slack message, not the standard body.
    let chat_completed = to_chat.iter().find(|d| d["type"] == "job.completed").unwrap();
    let (_, shown, _) = get(format!("{api}/v1/deliveries/{}", chat_completed["id"])).await;
    assert_eq!(shown["body"], serde_json::from_str::<Value>(&chat_got[2].body).unwrap());
    assert!(shown["headers"].get("webhook-signature").is_none(), "an unsigned webhook has no signature");
    assert_eq!(get(format!("{api}/v1/deliveries/999999")).await.0, 404);
    assert_eq!(get(format!("{api}/v1/deliveries/abc")).await.1["field"], "id");

    // No config file to read again here: reload says so.
    let (status, body, _) = call(reqwest::Method::POST, format!("{api}/v1/reload"), true).await;
    assert_eq!(status, 501, "{body}");

    // The OpenAPI document: every path it names is served by the router
    // (answered by its handler, not by the fallback); the unit test in
    // admin/openapi.rs checks the route table against it both ways.
    let (status, doc, _) = get(format!("{api}/v1/openapi.json")).await;
    assert_eq!((status, doc["openapi"].as_str().map(|v| v.starts_with("3."))), (200, Some(true)), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 13 && paths.contains_key("/v1/deliveries/{id}"), "{:?}", paths.keys());
    for (path, item) in paths {
        let concrete = path
            .replace("{job_id}", JOB2)
            .replace("{id}", "999999")
            .replace("{org_id}", "nope")
            .replace(['{', '}'], "");
        for method in item.as_object().unwrap().keys() {
            let method: reqwest::Method = method.to_uppercase().parse().unwrap();
            if path == "/v1/events" {
                // A live stream never ends: its answer's head is enough.
                let head = reqwest::Client::new().get(format!("{api}{path}")).bearer_auth(ADMIN_TOKEN).send().await;
                assert_eq!(head.unwrap().headers()["content-type"], "text/event-stream");
                continue;
            }
            let (status, body, _) = call(method.clone(), format!("{api}{concrete}"), true).await;
            let fallback = status == 404 && body["error"].as_str().is_some_and(|e| e.starts_with("no route"));
            assert!(!fallback && status != 405, "{method} {path}: {status} {body}");
        }
    }
    relay.stop().await;
}

#[tokio::test]
async fn reload_route_runs_the_reload_and_reports_a_refused_config() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let reload: dari_relay::admin::Reload = Arc::new(move || match counted.fetch_add(1, Ordering::SeqCst) {
        0 => Ok(()),
        _ => Err("t.toml:3: upstream.poll_interval: not a duration".to_owned()),
    });
    let (listener, api) = listener(Some(reload)).await;
    let relay =
        Relay::start_with_admin(&config_text(&dir.path().join("r.db"), &dari, &[], ADMIN), Some(listener)).await;
    assert_eq!(call(reqwest::Method::POST, format!("{api}/v1/reload"), false).await.0, 401);
    assert_eq!(calls.load(Ordering::SeqCst), 0, "no reload without the token");
    let (status, body, _) = call(reqwest::Method::POST, format!("{api}/v1/reload"), true).await;
    assert_eq!((status, &body["reloaded"]), (200, &json!(true)), "{body}");
    let (status, body, _) = call(reqwest::Method::POST, format!("{api}/v1/reload"), true).await;
    assert_eq!(status, 422);
    assert!(body["error"].as_str().unwrap().contains("keeping the running one: t.toml:3"), "{body}");
    assert_eq!(get(format!("{api}/v1/reload")).await.0, 405, "reload is a POST");
    relay.stop().await;
}

/// The binary with none of the daemon's secrets in its environment.
fn cli(args: &[impl AsRef<std::ffi::OsStr>]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dari-relay"));
    cmd.args(args).env_remove("DARI_API_KEY").env_remove("HOOK_SECRET").env_remove("DARI_RELAY_CONFIG");
    cmd.env_remove("RUST_LOG").env("ADMIN_TOKEN", ADMIN_TOKEN);
    cmd
}

fn stdout(mut cmd: Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn daemon_config(dir: &Path, dari: &FakeDari, port: u16, hooks: &[(&str, &str)]) -> String {
    let admin = format!("[admin]\nlisten = \"127.0.0.1:{port}\"\ntoken_env = \"ADMIN_TOKEN\"\n");
    config_text(&dir.join("state/r.db"), dari, hooks, &admin)
}

async fn wait_until(what: &str, done: impl AsyncFnMut() -> bool) {
    crate::fakes::eventually_async(Duration::from_secs(10), || what.to_owned(), done).await;
}

/// Issue 17 item 3: with `--admin`, `watch`, `deliveries` and `webhooks`
/// go through the running daemon's API with its token: no org secret, no
/// database access (the config file need not even exist). Without it,
/// `watch list` reads the database and still asks for no secret. And
/// `POST /v1/reload` reloads the running daemon's config as SIGHUP does.
#[tokio::test]
async fn the_cli_works_through_the_running_daemon_without_the_org_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB, vec![job("running", 1), job("completed", 1)]);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, daemon_config(dir.path(), &dari, port, &[("h", &receiver.url)])).unwrap();
    let mut daemon = std::process::Command::new(env!("CARGO_BIN_EXE_dari-relay"))
        .args(["run", "-c"])
        .arg(&config)
        .env("DARI_API_KEY", API_KEY)
        .env("HOOK_SECRET", SECRET)
        .env("ADMIN_TOKEN", ADMIN_TOKEN)
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let api = format!("http://127.0.0.1:{port}");
    let health = format!("{api}/healthz");
    wait_until("the daemon answers", async || reqwest::get(&health).await.is_ok_and(|r| r.status().is_success())).await;
    let addr = format!("127.0.0.1:{port}");
    let cfg = config.to_str().unwrap();
    // `--admin` alone before the subcommand is not read as an address.
    let listed = stdout(cli(&["--admin", "watch", "list", "-c", cfg]));
    assert!(listed.starts_with("JOB_ID"), "{listed}");

    // `--admin` alone takes [admin] listen and token_env from the config.
    let added = stdout(cli(&["--admin", "-c", cfg, "watch", "add", "acme/form", JOB, "--label", "team=ops"]));
    assert_eq!(added, format!("watching job {JOB} on acme/form\n"));
    let again = cli(&["watch", "add", "acme/form", JOB, "--label", "team=web", "--admin", "-c", cfg]).output().unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--label team=web (it keeps team=ops)"));
    let got = receiver.until_delivered("job.completed").await;

    // With an address and a token variable, no config file at all.
    let admin = format!("--admin={addr}");
    let remote = [admin.as_str(), "--admin-token-env", "ADMIN_TOKEN", "-c", "/nonexistent/config.toml"];
    let with = |args: &[&str]| -> Vec<String> { remote.iter().chain(args).map(|a| a.to_string()).collect() };
    let mut rows: Vec<Value> = vec![];
    wait_until("three deliveries delivered", async || {
        let out = stdout(cli(&with(&["deliveries", "list", "--webhook", "h", "--state", "delivered", "--json"])));
        rows = serde_json::from_str(&out).unwrap();
        rows.len() == 3
    })
    .await;
    assert!(stdout(cli(&with(&["deliveries", "list", "--job", JOB2, "--json"]))).trim() == "[]");
    let table = stdout(cli(&with(&["deliveries", "list", "--job", JOB])));
    assert_eq!(table.lines().count(), 4, "{table}");
    let id = rows[0]["id"].to_string();
    let shown = stdout(cli(&with(&["deliveries", "show", &id])));
    assert!(shown.contains("webhook-signature: v1,<redacted>"), "{shown}");
    assert!(shown.contains(&format!("webhook-id: {}", got[2].header("webhook-id"))), "{shown}");
    assert!(shown.contains("\"type\": \"job.completed\"") && shown.contains("1 attempt:"), "{shown}");
    assert!(!shown.contains(SECRET), "{shown}");
    let json: Value = serde_json::from_str(&stdout(cli(&with(&["deliveries", "show", &id, "--json"])))).unwrap();
    assert_eq!(json["body"], got[2].json());
    let missing = cli(&with(&["deliveries", "show", "999999"])).output().unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("there is no delivery 999999"));
    let watches: Value = serde_json::from_str(&stdout(cli(&with(&["watch", "list", "--all", "--json"])))).unwrap();
    assert_eq!((watches[0]["job_id"].as_str(), watches[0]["labels"]["team"].as_str()), (Some(JOB), Some("ops")));
    let hooks = stdout(cli(&with(&["webhooks", "list"])));
    assert!(hooks.lines().nth(1).is_some_and(|l| l.starts_with("h ") && l.contains("active")), "{hooks}");
    let resume = cli(&with(&["webhooks", "resume", "h"])).output().unwrap();
    assert_eq!(resume.status.code(), Some(2), "h is not paused");

    // A wrong token: refused, said plainly, exit 1.
    let wrong = cli(&with(&["watch", "list"])).env("ADMIN_TOKEN", "not-the-token").output().unwrap();
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("refused the token"), "{wrong:?}");

    // Locally, `watch list` reads the database and needs no secret either.
    let local = stdout(cli(&["watch", "list", "--all", "-c", cfg]));
    assert!(local.contains(JOB) && local.contains("team=ops"), "{local}");

    // POST /v1/reload: a new webhook appears; an invalid file is refused
    // and the running config kept.
    let client = reqwest::Client::new();
    let reload = || client.post(format!("{api}/v1/reload")).bearer_auth(ADMIN_TOKEN).send();
    std::fs::write(&config, daemon_config(dir.path(), &dari, port, &[("h", &receiver.url), ("h2", &receiver.url)]))
        .unwrap();
    assert_eq!(reload().await.unwrap().status().as_u16(), 200);
    let hooks: Value = serde_json::from_str(&stdout(cli(&with(&["webhooks", "list", "--json"])))).unwrap();
    assert_eq!(hooks.as_array().unwrap().iter().map(|h| h["name"].as_str().unwrap()).collect::<Vec<_>>(), ["h", "h2"]);
    std::fs::write(&config, "database = 1\n").unwrap();
    let refused = reload().await.unwrap();
    assert_eq!(refused.status().as_u16(), 422);
    assert_eq!(stdout(cli(&with(&["webhooks", "list", "--json"]))).matches("\"name\"").count(), 2);

    assert_eq!(stdout(cli(&with(&["watch", "rm", JOB]))), format!("stopped watching job {JOB}\n"));
    let gone = cli(&with(&["watch", "rm", JOB])).output().unwrap();
    assert_eq!(gone.status.code(), Some(2));
    std::process::Command::new("kill").arg("-TERM").arg(daemon.id().to_string()).status().unwrap();
    assert!(daemon.wait().unwrap().success());
}

/// Spawns `dari-relay tail` against `addr`, its stdout lines sent on a channel.
fn spawn_tail(addr: &str, json: bool) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dari-relay"));
    cmd.arg("tail").arg(format!("--admin={addr}")).args(["--admin-token-env", "ADMIN_TOKEN", "-c", "/nonexistent"]);
    if json {
        cmd.arg("--json");
    }
    cmd.env("ADMIN_TOKEN", ADMIN_TOKEN).env_remove("DARI_API_KEY").env_remove("RUST_LOG");
    let mut child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Lines from `rx` until one satisfies `done` (10 s at most).
fn lines_until(rx: &std::sync::mpsc::Receiver<String>, done: impl Fn(&str) -> bool) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let line = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("no such line in {seen:#?}"));
        let stop = done(&line);
        seen.push(line);
        if stop {
            return seen;
        }
    }
}

/// Issue 17 item 6: `dari-relay tail` follows a running relay's
/// notifications and delivery outcomes live (`GET /v1/events`), readable in
/// a terminal or one JSON object a line with `--json`; and the stream is
/// behind the token.
#[tokio::test]
async fn tail_follows_notifications_and_deliveries_live() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    receiver.answer_with(&[500]);
    dari.script(JOB, vec![job("running", 1), job("completed", 1)]);
    let (listener, api) = listener(None).await;
    let text = config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], ADMIN);
    let relay = Relay::start_with_admin(&text, Some(listener)).await;
    assert_eq!(call(reqwest::Method::GET, format!("{api}/v1/events"), false).await.0, 401);
    let addr = api.trim_start_matches("http://").to_owned();
    let (mut json_tail, json_lines) = spawn_tail(&addr, true);
    let (mut text_tail, text_lines) = spawn_tail(&addr, false);
    // Both streams are open before anything happens (the stream starts at
    // "now"): wait until the relay has answered them once.
    tokio::time::sleep(Duration::from_millis(600)).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    receiver.until_delivered("job.completed").await;

    let seen = tokio::task::spawn_blocking(move || {
        lines_until(&json_lines, |l| l.contains("\"event\":\"delivery\"") && l.contains("job.completed"))
    })
    .await
    .unwrap();
    let events: Vec<Value> = seen.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let notified: Vec<&str> =
        events.iter().filter(|e| e["event"] == "notification").map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(notified, ["job.event", "job.running", "job.completed"], "{seen:#?}");
    assert!(events.iter().all(|e| e["job_id"] == JOB));
    let first_try = events.iter().find(|e| e["event"] == "delivery").unwrap();
    assert_eq!((first_try["type"].as_str(), first_try["http_status"].as_u64()), (Some("job.event"), Some(500)));
    assert_eq!(events.last().unwrap()["state"], "delivered");

    let seen = tokio::task::spawn_blocking(move || {
        lines_until(&text_lines, |l| l.contains("job.completed") && l.contains("to h"))
    })
    .await
    .unwrap();
    assert!(
        seen.iter().any(|l| l.contains("job.completed") && l.contains(&format!("job {JOB} on acme/form"))),
        "{seen:#?}"
    );
    assert!(seen.iter().any(|l| l.contains("to h (will retry, HTTP 500")), "{seen:#?}");
    assert!(seen.last().unwrap().contains("to h (delivered, HTTP 204"), "{seen:#?}");
    for child in [&mut json_tail, &mut text_tail] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    // The relay stops although a stream may still be open.
    let (mut open, _lines) = spawn_tail(&addr, true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::time::timeout(Duration::from_secs(10), relay.stop()).await.expect("shutdown is not held by a stream");
    let status = crate::delivery::wait_exit(&mut open, Duration::from_secs(10)).await;
    assert!(status.success(), "tail ends cleanly when the relay stops: {status:?}");
}

/// Issue 17: `watch import --admin` sends one request per line to the
/// running daemon (no config file, no org secret), reports each line it
/// could not import with its number and the reason, imports the others,
/// and exits 2 when any was refused; a daemon that cannot be reached stops
/// it with exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_import_through_the_daemon_reports_each_refused_line() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let receiver = FakeReceiver::start().await;
    let text = config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], ADMIN);
    let (admin, base) = listener(None).await;
    let relay = Relay::start_with_admin(&text, Some(admin)).await;
    let addr = base.trim_start_matches("http://").to_owned();
    let lines = [
        json!({"portal_id": "acme/form", "job_id": JOB, "labels": {"team": "ops"}}).to_string(),
        json!({"portal_id": "acme/form", "job_id": JOB}).to_string(),
        "{not json".to_owned(),
        String::new(),
        json!({"portal_id": "acme/form", "job_id": JOB2, "webhooks": ["nope"]}).to_string(),
        json!({"portal_id": "acme/form", "job_id": "not-a-uuid"}).to_string(),
        json!({"portal_id": "acme/form", "job_id": JOB2, "from_now": true}).to_string(),
    ];
    let file = dir.path().join("watches.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let import = |addr: &str| {
        let admin = format!("--admin={addr}");
        let args = [admin.as_str(), "--admin-token-env", "ADMIN_TOKEN", "-c", "/nonexistent/config.toml"];
        cli(&args).args(["watch", "import"]).arg(&file).output().unwrap()
    };

    let out = import(&addr);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert_eq!(stdout, "imported 3 of 6 lines (2 new, 1 already watched); 3 refused\n");
    let name = file.display().to_string();
    let reported: Vec<&str> = stderr.lines().filter(|l| l.starts_with(&name)).collect();
    assert_eq!(reported.len(), 3, "{stderr}");
    assert!(reported[0].starts_with(&format!("{name}:3: not JSON")), "{stderr}");
    assert!(reported[1].starts_with(&format!("{name}:5: ")) && reported[1].contains("nope"), "{stderr}");
    assert!(reported[2].starts_with(&format!("{name}:6: ")) && reported[2].contains("not-a-uuid"), "{stderr}");
    assert!(stderr.contains("error: 3 of 6 lines not imported"), "{stderr}");
    let watches = relay.store.list_watches(true).unwrap();
    let mut jobs: Vec<&str> = watches.iter().map(|w| w.job_id.as_str()).collect();
    jobs.sort();
    assert_eq!(jobs, [JOB, JOB2]);

    // Every line good: exit 0.
    std::fs::write(&file, lines[0].clone() + "\n").unwrap();
    let out = import(&addr);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "imported 1 of 1 line (0 new, 1 already watched); 0 refused\n");
    relay.stop().await;

    // No daemon: stopped at the first line, said plainly, exit 1.
    let out = import(&addr);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("line 1: import stopped; 0 new and 0 already watched before it"), "{stderr}");
    assert!(stderr.contains("cannot reach the admin API"), "{stderr}");
}
