//! Issue 5, the webhook side: template bodies rendered at delivery (hostile
//! text escaped as JSON, a render error failing only its delivery), extra
//! headers, the `types`, `portals` and `labels` filters, Discord's 429 body,
//! config errors, and `send-test` against a receiver answering 200 and 500.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::fakes::{API_KEY, FakeDari, FakeReceiver, Relay, Reply, SECRET, config_text};
use dari_relay::vocab::{DeliveryState, NewWatch};

const JOB: &str = "550e8400-e29b-41d4-a716-446655440000";
const JOB2: &str = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";
const JOB3: &str = "7c9e6679-7425-40de-944b-e07fc1f098ae";

/// Text that breaks naive JSON, mrkdwn and templates alike.
const HOSTILE: &str = "quote \" backslash \\ newline \n tab \t nul \u{0} bell \u{7} <!channel> {{ data.job_id }} 😀";

fn watch(job_id: &str, portal: &str, labels: &[(&str, &str)], webhooks: Option<&[&str]>) -> NewWatch {
    NewWatch {
        job_id: job_id.into(),
        portal: portal.parse().unwrap(),
        webhooks: webhooks.map(|w| w.iter().map(|s| s.to_string()).collect()),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        from_now: false,
    }
}

/// running, then one event, then `end` with `fields`.
fn life(end: &str, fields: Value) -> Vec<Reply> {
    let event = json!({"event_type": "step_completed", "message": "Filled in the form"});
    let mut last = json!({"status": end, "events": [event]});
    last.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
    vec![
        Reply::Json(json!({"status": "running", "events": []})),
        Reply::Json(json!({"status": "running", "events": [event]})),
        Reply::Json(last),
    ]
}

/// A webhook table for `config_text`'s `extra`.
fn hook(name: &str, url: &str, rest: &str) -> String {
    format!("\n[[webhooks]]\nname = \"{name}\"\nurl = \"{url}\"\n{rest}\n")
}

/// A template body gets the job's hostile text as JSON strings, whole and
/// exact, and the webhook's literal and secret headers come with it.
#[tokio::test]
async fn template_escapes_hostile_text_as_json_and_sends_extra_headers() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB, life("failed", json!({"error": HOSTILE, "current_step": HOSTILE})));
    let extra = hook(
        "custom",
        &receiver.url,
        r#"types = ["job.failed"]
secret_env = "HOOK_SECRET"
headers = { "X-Team" = "growth" }
headers_env = { Authorization = "HOOK_SECRET" }
body_template = '''
{
  "summary": {{ "Job " ~ data.job_id ~ " failed at " ~ data.current_step ~ ": " ~ data.error }},
  "error": {{ data.error }},
  "labels": {{ data.labels }},
  "cost": {{ data.total_cost_usd }}
}'''"#,
    );
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[], &extra)).await;
    relay.store.add_watches(&[watch(JOB, "acme/form", &[("customer", "acme")], None)]).unwrap();

    let got = receiver.next().await;
    let body: Value = serde_json::from_str(&got.body).expect("the rendered body is JSON");
    assert_eq!(body["error"], HOSTILE);
    assert_eq!(body["summary"], format!("Job {JOB} failed at {HOSTILE}: {HOSTILE}"));
    assert_eq!(body["labels"], json!({"customer": "acme"}));
    assert_eq!(body["cost"], Value::Null);
    assert_eq!(got.header("content-type"), "application/json");
    assert_eq!(got.header("x-team"), "growth");
    assert_eq!(got.header("authorization"), SECRET);
    // The signature covers the bytes sent, which are the rendered template.
    let verifier = standardwebhooks::Webhook::new(SECRET).unwrap();
    verifier.verify(got.body.as_bytes(), &got.headers).expect("signed over the rendered body");
    relay.stop().await;
}

/// A template that fails to render (here a misspelt field) makes that
/// delivery `failed` at once, with the error in its attempt; the relay and
/// the job's other webhooks carry on.
#[tokio::test]
async fn template_render_error_fails_the_delivery_not_the_relay() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut plain = FakeReceiver::start().await;
    let mut typo = FakeReceiver::start().await;
    dari.script(JOB, life("failed", json!({"error": "boom"})));
    let extra = hook("typo", &typo.url, "types = [\"job.failed\"]\nbody_template = '{\"error\": {{ data.eror }}}'");
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[("plain", &plain.url)], &extra)).await;
    relay.store.add_watches(&[watch(JOB, "acme/form", &[], None)]).unwrap();

    plain.until_delivered("job.failed").await;
    relay.settle().await;
    let failed = relay.store.list_deliveries(Some(DeliveryState::Failed), 100).unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!((failed[0].webhook.as_str(), failed[0].kind.as_str()), ("typo", "job.failed"));
    let attempts = relay.store.attempts(failed[0].id).unwrap();
    assert_eq!(attempts.len(), 1, "a render error is not retried");
    let error = attempts[0].error.as_deref().unwrap();
    assert!(error.starts_with("cannot render body_template: undefined value"), "{error}");
    assert_eq!(attempts[0].http_status, None);
    assert!(typo.drain().is_empty(), "nothing was sent");
    let counts = relay.store.delivery_counts().unwrap();
    assert_eq!((counts.get("delivered"), counts.get("failed")), (Some(&3), Some(&1)), "{counts:?}");
    relay.stop().await;
}

/// `types`, `portals` and `labels` choose the webhooks of each
/// notification; a watch that names its webhooks skips `portals` and
/// `labels`, never `types`.
#[tokio::test]
async fn filters_choose_webhooks_by_type_portal_and_label() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB, life("completed", json!({})));
    dari.script(JOB2, life("failed", json!({"error": "x"})));
    dari.script(JOB3, life("completed", json!({})));
    let url = &receiver.url;
    let extra = [
        hook("all", url, ""),
        hook("done", url, "types = [\"job.completed\"]"),
        hook("forms", url, "portals = [\"acme/form*\"]"),
        hook("growth", url, "labels = { team = \"growth\" }"),
        hook("growth-failures", url, "labels = { team = \"growth\" }\ntypes = [\"job.failed\"]"),
        hook("named-failures", url, "types = [\"job.failed\"]\nportals = [\"nobody/*\"]"),
    ]
    .concat();
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[], &extra)).await;
    relay
        .store
        .add_watches(&[
            watch(JOB, "acme/form", &[("team", "growth"), ("customer", "a")], None),
            watch(JOB2, "acme/other", &[("team", "sales")], None),
            watch(JOB3, "acme/other", &[], Some(&["growth", "named-failures"])),
        ])
        .unwrap();

    // JOB: all 3, done 1, forms 3, growth 3. JOB2: all 3. JOB3: growth 3.
    for _ in 0..16 {
        receiver.next().await;
    }
    relay.settle().await;
    let watches = relay.store.list_watches(true).unwrap();
    assert!(watches.iter().all(|w| w.state == "finished"), "{watches:?}");
    let mut got: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for d in relay.store.list_deliveries(None, 1000).unwrap().into_iter().rev() {
        got.entry((d.job_id.clone(), d.webhook.clone())).or_default().push(d.kind.clone());
    }
    let life = |end: &str| vec!["job.running".to_owned(), "job.event".to_owned(), format!("job.{end}")];
    let key = |job: &str, hook: &str| (job.to_owned(), hook.to_owned());
    let want = BTreeMap::from([
        (key(JOB, "all"), life("completed")),
        (key(JOB, "done"), vec!["job.completed".to_owned()]),
        (key(JOB, "forms"), life("completed")),
        (key(JOB, "growth"), life("completed")),
        (key(JOB2, "all"), life("failed")),
        (key(JOB3, "growth"), life("completed")),
    ]);
    assert_eq!(got, want);
    assert!(receiver.drain().is_empty());
    relay.stop().await;
}

/// A 429 from Discord without `Retry-After` is retried after the
/// `retry_after` of its JSON body, not after the (much shorter) schedule.
#[tokio::test]
async fn discord_429_waits_for_the_retry_after_in_its_body() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    dari.script(JOB, vec![Reply::Json(json!({"status": "completed", "events": []}))]);
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Value)>();
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let router = Router::new().route(
        "/api/webhooks/1/t",
        post(move |body: String| async move {
            let _ = tx.send((Instant::now(), serde_json::from_str(&body).unwrap()));
            if answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                let limited = json!({"message": "You are being rate limited.", "retry_after": 0.6, "global": false});
                (StatusCode::TOO_MANY_REQUESTS, [("content-type", "application/json")], limited.to_string())
                    .into_response()
            } else {
                StatusCode::NO_CONTENT.into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api/webhooks/1/t", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let extra = hook("discord", &url, "format = \"discord\"");
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[], &extra)).await;
    relay.store.add_watches(&[watch(JOB, "acme/form", &[], None)]).unwrap();

    let timeout = Duration::from_secs(10);
    let (first, body) = tokio::time::timeout(timeout, rx.recv()).await.unwrap().unwrap();
    assert_eq!(body["embeds"][0]["title"], "✅ Job completed");
    let (second, _) = tokio::time::timeout(timeout, rx.recv()).await.unwrap().unwrap();
    let gap = second - first;
    assert!(gap >= Duration::from_millis(600) && gap < Duration::from_secs(3), "{gap:?}");
    relay.settle().await;
    assert_eq!(relay.store.delivery_counts().unwrap().get("delivered"), Some(&1));
    relay.stop().await;
}

// ---------------------------------------------------------------------------
// The binary: config errors and send-test.

/// Writes `body` as a config file with a database in `dir`.
fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("config.toml");
    let db = dir.join("relay.db");
    std::fs::write(
        &path,
        format!("database = \"{}\"\n[orgs.acme]\napi_key_env = \"DARI_API_KEY\"\n{body}", db.display()),
    )
    .unwrap();
    path
}

/// Runs the binary on a blocking thread, so the test's fake servers keep
/// answering.
async fn run(config: &Path, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dari-relay"));
    cmd.args(args).arg("--config").arg(config);
    cmd.env("DARI_API_KEY", API_KEY).env("HOOK_SECRET", SECRET).env_remove("RUST_LOG");
    tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn config_refuses_a_template_that_does_not_compile_and_hides_secret_headers() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write_config(
        dir.path(),
        &hook("x", "http://127.0.0.1:9/h", "body_template = \"{ \\\"a\\\": {{ data.job_id \""),
    );
    let out = run(&bad, &["check-config"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains("config.toml:8: webhooks[0] (x).body_template: the template does not compile: syntax error"),
        "{err}"
    );

    let reserved =
        write_config(dir.path(), &hook("x", "http://127.0.0.1:9/h", "headers = { \"webhook-id\" = \"mine\" }"));
    let out = run(&reserved, &["check-config"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("webhooks[0] (x).headers.webhook-id: webhook-id is set by the relay itself"));

    let good = write_config(
        dir.path(),
        &hook(
            "x",
            "http://127.0.0.1:9/h",
            "headers = { \"X-Team\" = \"growth\" }\nheaders_env = { \"X-Token\" = \"HOOK_SECRET\" }",
        ),
    );
    let out = run(&good, &["check-config"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("headers_env = { \"x-token\" = \"<redacted, from $HOOK_SECRET>\" }"), "{text}");
    assert!(text.contains("headers = { \"x-team\" = \"growth\" }") && !text.contains("MfKQ9r8"), "{text}");
}

/// `send-test` sends a sample of each common type the webhook's `types`
/// accept, in its format, prints each answer, and exits 0 only if all were
/// 2xx; `--type` picks one type; an unknown webhook or type is exit 2.
#[tokio::test]
async fn send_test_prints_each_answer_and_exits_by_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = FakeReceiver::start().await;
    let types = "types = [\"job.completed\", \"job.failed\", \"job.waiting_for_input\"]";
    let config = write_config(
        dir.path(),
        &hook("ops", &receiver.url, &format!("format = \"slack\"\nsecret_env = \"HOOK_SECRET\"\n{types}")),
    );

    receiver.answer_with(&[200, 200, 200]);
    let out = run(&config, &["send-test", "ops"]).await;
    assert_eq!(out.status.code(), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(stdout(&out), "job.waiting_for_input: HTTP 200\njob.completed: HTTP 200\njob.failed: HTTP 200\n");
    let got: Vec<Value> = receiver.drain().iter().map(|r| r.json()).collect();
    assert_eq!(got.len(), 3);
    // Marked as tests in the headline (issue 17), so nobody takes them for real alerts.
    assert_eq!(got[0]["blocks"][0]["text"]["text"], "🧪 Test: 🙋 Job needs a human");
    assert!(got[0].to_string().contains("Which plan should the quote be for"));
    assert_eq!(got[1]["blocks"][0]["text"]["text"], "🧪 Test: ✅ Job completed");
    assert_eq!(got[2]["blocks"][0]["text"]["text"], "🧪 Test: ❌ Job failed");

    receiver.answer_with(&[200, 500, 200]);
    let out = run(&config, &["send-test", "ops"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stdout(&out), "job.waiting_for_input: HTTP 200\njob.completed: HTTP 500\njob.failed: HTTP 200\n");
    assert!(stderr(&out).contains("1 of 3 samples to webhook ops did not get a 2xx answer"), "{}", stderr(&out));
    assert_eq!(receiver.drain().len(), 3);

    receiver.answer_with(&[204]);
    let out = run(&config, &["send-test", "ops", "--type", "job.archived"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "job.archived: HTTP 204\n");
    assert!(stderr(&out).contains("the types filter of webhook ops leaves out job.archived; sending it anyway"));
    let got = receiver.drain();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].json()["blocks"][0]["text"]["text"], "🧪 Test: 🔄 Job is now archived");
    assert!(!got[0].header("webhook-signature").is_empty());

    for args in [&["send-test", "nope"][..], &["send-test", "ops", "--type", "Job.Done"]] {
        let out = run(&config, args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    assert!(receiver.drain().is_empty());

    // A receiver that is not there is a runtime failure, reported per type.
    let gone = write_config(dir.path(), &hook("gone", "http://127.0.0.1:9/h", "types = [\"watch.failed\"]"));
    let out = run(&gone, &["send-test", "gone"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).starts_with("watch.failed: no answer: "), "{}", stdout(&out));
}
