//! Issue 17: a receiver behind a private CA. Its certificate (committed in
//! `fixtures/tls/`, made by `generate.sh` there) is signed by a test CA no
//! built-in root knows: without `ca_file` every attempt fails with a TLS
//! error that is logged, counted and retried, and nothing is lost; with the
//! CA in the webhook's `ca_file` the same delivery goes through. A bad
//! `ca_file` stops the load with exit 2.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::delivery::{signal, spawn_daemon, wait_exit};
use crate::fakes::{FakeDari, FakeReceiver, Relay, Reply, config_text, eventually, log_says, watch_on};
use dari_relay::vocab::DeliveryState;

const JOB: &str = "550e8400-e29b-41d4-a716-446655440000";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/fixtures/tls").join(name)
}

/// A receiver on 127.0.0.1 with the certificate the test CA signed.
async fn private_receiver() -> FakeReceiver {
    let read = |name: &str| std::fs::read_to_string(fixture(name)).unwrap();
    FakeReceiver::start_tls(&read("receiver.pem"), &read("receiver.key")).await
}

/// The test config with one webhook `private` at `url`, `ca_file` when
/// given, and a retry schedule long enough to fix the config meanwhile.
fn config(db: &Path, dari: &FakeDari, url: &str, ca_file: Option<&Path>) -> String {
    let ca = ca_file.map(|p| format!("ca_file = \"{}\"\n", p.display())).unwrap_or_default();
    config_text(db, dari, &[("private", url)], &ca).replace(
        "retry_schedule = [\"100ms\", \"200ms\", \"300ms\"]",
        "retry_schedule = [\"50ms\", \"50ms\", \"1s\", \"10s\", \"10s\"]",
    )
}

/// Without `ca_file`, attempts fail with the TLS error, are counted as
/// retries and stored with the error; the delivery stays pending. Adding
/// `ca_file` (a reload) lets the next retry through with the same
/// webhook-id.
#[tokio::test]
async fn a_private_ca_receiver_is_refused_without_ca_file_and_reached_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let dari = FakeDari::start().await;
    dari.script(JOB, vec![Reply::Json(json!({"status": "completed", "events": []}))]);
    let mut receiver = private_receiver().await;
    let relay = Relay::start(&config(&db, &dari, &receiver.url, None)).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();

    let retries = || relay.metrics.deliveries("private", "retry");
    let stored = || {
        let delivery = relay.store.list_deliveries(None, 10).unwrap().pop();
        delivery.map_or(0, |d| relay.store.attempts(d.id).unwrap().len())
    };
    // The counter and the attempt's row are written one after the other:
    // wait for both.
    let what = || format!("{} retries counted, {} attempts stored", retries(), stored());
    eventually(Duration::from_secs(10), what, || retries() >= 2 && stored() >= 2).await;
    let delivery = relay.store.list_deliveries(None, 10).unwrap().pop().expect("one delivery");
    assert_eq!(delivery.state, "pending", "nothing is given up or lost");
    let attempts = relay.store.attempts(delivery.id).unwrap();
    for a in &attempts {
        let error = a.error.as_deref().unwrap_or_default();
        assert_eq!(a.http_status, None);
        assert!(error.contains("invalid peer certificate: UnknownIssuer"), "a clear TLS error: {error}");
        assert!(!error.contains(&receiver.url), "never the URL: {error}");
    }
    assert!(receiver.drain().is_empty(), "no request got past the handshake");

    relay.reload(&config(&db, &dari, &receiver.url, Some(&fixture("ca.pem"))));
    let got = receiver.next().await;
    assert_eq!((got.kind(), got.answered), ("job.completed".to_owned(), 204));
    assert_eq!(got.header("webhook-id"), delivery.msg_id);
    relay.settle().await;
    assert_eq!(relay.metrics.deliveries("private", "delivered"), 1);
    let stored = relay.store.notifications_of(JOB).unwrap();
    assert_eq!(stored[0].deliveries[0].state, DeliveryState::Delivered);
    relay.stop().await;
}

/// The real binary: the TLS failure is in its log as a retried delivery,
/// and after a SIGHUP that adds `ca_file` the delivery is made.
#[tokio::test]
async fn the_daemon_logs_the_tls_error_and_delivers_after_a_reload_with_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.db");
    let dari = FakeDari::start().await;
    dari.script(JOB, vec![Reply::Json(json!({"status": "completed", "events": []}))]);
    let mut receiver = private_receiver().await;
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config(&db, &dari, &receiver.url, None)).unwrap();
    dari_relay::store::Store::open(&db).unwrap().add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    let log = dir.path().join("relay.log");
    let mut daemon = spawn_daemon(&path, &log);
    log_says(&log, 2, "delivery failed; will retry").await;
    log_says(&log, 2, "invalid peer certificate: UnknownIssuer").await;

    // Relative to the config file's folder, as documented.
    std::fs::copy(fixture("ca.pem"), dir.path().join("private-ca.pem")).unwrap();
    std::fs::write(&path, config(&db, &dari, &receiver.url, Some(Path::new("private-ca.pem")))).unwrap();
    signal(&daemon, "HUP");
    log_says(&log, 1, "SIGHUP: config reloaded").await;
    let got = receiver.next().await;
    assert_eq!(got.answered, 204);
    log_says(&log, 1, "delivered").await;
    signal(&daemon, "TERM");
    assert!(wait_exit(&mut daemon, Duration::from_secs(5)).await.success());
}

/// `check-config` on a webhook with `ca_file = value`, in `dir`.
fn check(dir: &Path, value: &str) -> (Option<i32>, String, String) {
    let path = dir.join("config.toml");
    let text = format!(
        "database = \"{}\"\n[orgs.acme]\napi_key_env = \"DARI_API_KEY\"\n\
         [[webhooks]]\nname = \"private\"\nurl = \"https://127.0.0.1:9/hook\"\nca_file = \"{value}\"\n",
        dir.join("r.db").display()
    );
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dari-relay"))
        .args(["check-config", "-c"])
        .arg(&path)
        .env_clear()
        .env("DARI_API_KEY", "sk-x")
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn check_config_shows_the_ca_file_and_refuses_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("ca.pem"), dir.path().join("ca.pem")).unwrap();
    let (code, stdout, stderr) = check(dir.path(), "ca.pem");
    assert_eq!(code, Some(0), "{stderr}");
    let shown = format!("ca_file = \"{}\"  # 1 certificates", dir.path().join("ca.pem").display());
    assert!(stdout.contains(&shown), "{stdout}");

    let (code, stdout, stderr) = check(dir.path(), "missing.pem");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stdout.is_empty());
    assert!(stderr.contains("webhooks[0] (private).ca_file"), "names the webhook and the key: {stderr}");
    assert!(stderr.contains("cannot read") && stderr.contains("missing.pem"), "{stderr}");
    assert_eq!(stderr.matches("(os error 2)").count(), 1, "the OS error once: {stderr}");

    // A key is PEM, but no certificate.
    std::fs::copy(fixture("receiver.key"), dir.path().join("key.pem")).unwrap();
    let (code, _, stderr) = check(dir.path(), "key.pem");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("webhooks[0] (private).ca_file") && stderr.contains("holds no certificate"), "{stderr}");

    // A certificate block whose contents are not a certificate.
    std::fs::write(dir.path().join("junk.pem"), "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        .unwrap();
    let (code, _, stderr) = check(dir.path(), "junk.pem");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("webhooks[0] (private).ca_file") && stderr.contains("not a usable CA certificate"),
        "{stderr}"
    );
}

/// The status poll's own client (hyper driven directly, issue 18) speaks
/// TLS to an `https` Dari and checks its certificate against the built-in
/// roots, as reqwest did: a server signed by the private test CA is refused
/// with the TLS error, a transport error retried like any other.
#[tokio::test]
async fn status_polls_check_the_certificate_of_an_https_dari() {
    let receiver = private_receiver().await;
    let origin = receiver.url.trim_end_matches("/hook");
    let text = format!("[upstream]\nbase_url = \"{origin}\"\nrequest_timeout = \"2s\"\n");
    let config = dari_relay::config::Config::from_toml(&text, Path::new("t.toml"), &|_| None).unwrap();
    let client = dari_relay::upstream::UpstreamClient::new(&config.upstream).unwrap();
    let key = secrecy::SecretString::from("k".to_owned());
    let err = client.fetch_status(&"acme/form".parse().unwrap(), JOB, &key).await.unwrap_err();
    assert_eq!(err.label(), "transport_error", "{err}");
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    // The test is about the direct client: with a proxy in the environment
    // polls would go through reqwest and this would test that instead.
    assert!(client.polls_directly(), "run the tests without HTTP_PROXY, HTTPS_PROXY or ALL_PROXY set");
}
