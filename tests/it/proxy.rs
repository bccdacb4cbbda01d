//! Issue 17: `HTTP_PROXY` / `HTTPS_PROXY` / `NO_PROXY` for both clients.
//! Each case runs the real binary as a child process, so the variables are
//! that process's only. The "proxies" are the fakes themselves: a proxy
//! receives a plain-HTTP request in absolute form (`POST http://host/path`),
//! which the fakes route by its path. The target hosts are `.invalid`
//! names that never resolve, so a request that arrives went through the
//! proxy; with `NO_PROXY` the proxy is a closed port, so a request that
//! arrives went around it. For an https receiver `HTTPS_PROXY` opens a
//! `CONNECT` tunnel instead, through [`connect_proxy`].

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::fakes::{API_KEY, FakeDari, FakeReceiver, Reply, SECRET};

const JOB: &str = "550e8400-e29b-41d4-a716-446655440000";

/// The binary with the test secrets and no proxy variable but `proxy`.
fn relay(config: &Path, args: &[&str], proxy: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dari-relay"));
    cmd.args(args).arg("-c").arg(config).env("DARI_API_KEY", API_KEY).env("HOOK_SECRET", SECRET);
    for var in
        ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy"]
    {
        cmd.env_remove(var);
    }
    cmd.envs(proxy.iter().copied()).output().unwrap()
}

fn config(dir: &Path, base_url: &str, hook: &str) -> std::path::PathBuf {
    let path = dir.join("config.toml");
    let text = format!(
        "database = \"{}\"\n[upstream]\nbase_url = \"{base_url}\"\n[orgs.acme]\napi_key_env = \"DARI_API_KEY\"\n\
         [[webhooks]]\nname = \"h\"\nurl = \"{hook}\"\nsecret_env = \"HOOK_SECRET\"\ntypes = [\"job.completed\"]\n",
        dir.join("r.db").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A closed port on 127.0.0.1: a proxy there refuses every connection.
fn closed_port() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("http://127.0.0.1:{port}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_are_reached_through_http_proxy_unless_no_proxy_exempts_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut proxy = FakeReceiver::start().await;
    let proxy_url = proxy.url.trim_end_matches("/hook").to_owned();
    let cfg = config(dir.path(), "http://dari.invalid", "http://receiver.invalid/hook");
    let out = relay(&cfg, &["send-test", "h"], &[("HTTP_PROXY", &proxy_url)]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let got = proxy.next().await;
    assert_eq!(got.header("host"), "receiver.invalid", "the request was for the receiver, sent to the proxy");
    assert_eq!(got.kind(), "job.completed");
    standardwebhooks::Webhook::new(SECRET).unwrap().verify(got.body.as_bytes(), &got.headers).unwrap();

    // NO_PROXY: the receiver on 127.0.0.1 is reached directly, the dead proxy unused.
    let mut receiver = FakeReceiver::start().await;
    let cfg = config(dir.path(), "http://dari.invalid", &receiver.url);
    let dead = closed_port();
    let out = relay(&cfg, &["send-test", "h"], &[("HTTP_PROXY", &dead), ("NO_PROXY", "127.0.0.1,localhost")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(receiver.next().await.kind(), "job.completed");
    // Without NO_PROXY the dead proxy is used, and the attempt fails.
    let out = relay(&cfg, &["send-test", "h"], &[("HTTP_PROXY", &dead)]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("no answer"), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(receiver.drain().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dari_is_reached_through_http_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    dari.on_start(JOB, vec![Reply::Json(json!({"status": "completed", "events": []}))]);
    let cfg = config(dir.path(), "http://dari.invalid", "http://127.0.0.1:9/hook");
    let body = dir.path().join("body.json");
    std::fs::write(&body, r#"{"input": {"name": "Ada"}}"#).unwrap();
    let body = body.to_str().unwrap();
    let out = relay(&cfg, &["start", "acme/form", "--body", body], &[("HTTP_PROXY", &dari.url)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("started job {JOB}")));
    assert_eq!(
        dari.starts(),
        [json!({"input": {"name": "Ada"}})],
        "Dari's start endpoint was reached through the proxy"
    );

    // NO_PROXY=* : the proxy is not used, and dari.invalid does not resolve.
    dari.on_start(JOB, vec![]);
    let out = relay(&cfg, &["start", "acme/form", "--body", body], &[("HTTP_PROXY", &dari.url), ("NO_PROXY", "*")]);
    assert!(!out.status.success());
    assert_eq!(dari.starts().len(), 1, "the proxy was not used");
}

/// A CONNECT proxy on 127.0.0.1, which is what `HTTPS_PROXY` speaks for an
/// https URL: it records each CONNECT's target, answers 200 and tunnels
/// the bytes, still encrypted, to `upstream`.
async fn connect_proxy(upstream: std::net::SocketAddr) -> (String, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let targets = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let targets = Arc::clone(&targets);
            tokio::spawn(async move {
                // The request head, at most 8 KiB.
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                    if client.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let mut line = head.lines().next().unwrap_or_default().split(' ');
                let (Some("CONNECT"), Some(target)) = (line.next(), line.next()) else { return };
                targets.lock().unwrap().push(target.to_owned());
                let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else { return };
                if client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    (url, seen)
}

/// `HTTPS_PROXY` for an https receiver: the request goes through a CONNECT
/// tunnel (TLS end to end, verified against the webhook's `ca_file`), and
/// the proxy sees only the host and port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_receivers_are_reached_through_a_connect_tunnel_of_https_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/fixtures/tls");
    let read = |name: &str| std::fs::read_to_string(fixtures.join(name)).unwrap();
    let mut receiver = FakeReceiver::start_tls(&read("receiver.pem"), &read("receiver.key")).await;
    let addr: std::net::SocketAddr = receiver.url["https://".len()..].trim_end_matches("/hook").parse().unwrap();
    // By name (the certificate is for localhost and 127.0.0.1), through the proxy.
    let url = format!("https://localhost:{}/hook", addr.port());
    let (proxy_url, targets) = connect_proxy(addr).await;
    let cfg = config(dir.path(), "http://dari.invalid", &url);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!("ca_file = \"{}\"\n", fixtures.join("ca.pem").display()));
    std::fs::write(&cfg, text).unwrap();

    let out = relay(&cfg, &["send-test", "h"], &[("HTTPS_PROXY", &proxy_url)]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let got = receiver.next().await;
    assert_eq!(got.kind(), "job.completed");
    standardwebhooks::Webhook::new(SECRET).unwrap().verify(got.body.as_bytes(), &got.headers).unwrap();
    assert_eq!(*targets.lock().unwrap(), [format!("localhost:{}", addr.port())], "one tunnel, to the receiver");
}
