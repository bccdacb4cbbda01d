//! Issue 17: the README's quick start, run as written. The config block and
//! the shell blocks marked `<!-- quickstart:… -->` are read from README.md,
//! so a change there changes what runs here. Only three things are
//! replaced: `base_url` points at a fake Dari on 127.0.0.1, the webhook's
//! `url` at a fake receiver, and the `DARI_API_KEY` value is the fake's
//! key; `./target/release/dari-relay` is the binary under test. Everything
//! else (the `export` lines, `openssl rand`, the relative database path, the
//! commands and their order) runs as a user would run it, in a fresh folder.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::delivery::{signal, wait_exit};
use crate::fakes::{API_KEY, FakeDari, FakeReceiver, Reply, log_says};

/// The fenced block after the marker `<!-- quickstart:{name} -->`.
fn block(readme: &str, name: &str) -> String {
    let marker = format!("<!-- quickstart:{name} -->");
    let after = &readme[readme.find(&marker).unwrap_or_else(|| panic!("README.md has no {marker}")) + marker.len()..];
    let start = after.find("```").expect("a fenced block after the marker");
    let body = &after[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    body[..body.find("```").expect("the block ends")].to_owned()
}

/// `text` with the value of the line `key = "..."` (TOML) replaced, once.
fn set_toml(text: &str, key: &str, value: &str) -> String {
    let prefix = format!("\n{key} = \"");
    let at = text.find(&prefix).unwrap_or_else(|| panic!("the quick start config has no {key}"));
    let end = at + prefix.len() + text[at + prefix.len()..].find('"').unwrap();
    format!("{}{value}{}", &text[..at + prefix.len()], &text[end..])
}

/// A shell block as it runs here: the binary under test for the path the
/// README builds, and the fake's key for the user's own.
fn shell(text: &str) -> String {
    text.lines()
        .map(|line| {
            let line = line.replace("./target/release/dari-relay", env!("CARGO_BIN_EXE_dari-relay"));
            match line.strip_prefix("export DARI_API_KEY=") {
                Some(_) => format!("export DARI_API_KEY={API_KEY}"),
                None => line,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn sh(dir: &Path, script: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-ec").arg(script).current_dir(dir).env_remove("DARI_RELAY_CONFIG");
    cmd
}

// Multi-threaded: step 5 runs to its end (a blocking wait) while the fake
// receiver answers send-test on another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quick_start_delivers_a_notification() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;

    // 1 and 2: the build is the test's own; the config goes in the folder.
    assert!(readme.contains("cargo build --release --locked"));
    let config = block(&readme, "config");
    assert!(config.contains("database = \"./relay.db\""), "the database stays in the current folder");
    let config = set_toml(&set_toml(&config, "base_url", &dari.url), "url", &receiver.url);
    std::fs::write(dir.path().join("config.toml"), config).unwrap();

    // 3: the exports and check-config; what the exports set is kept for
    // the next steps (the README's "same two export lines").
    let setup = shell(&block(&readme, "setup"));
    let out = sh(dir.path(), &format!("{setup}\nenv -0 > quickstart.env")).output().unwrap();
    assert!(out.status.success(), "step 3 failed:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("[[webhooks]]"), "check-config printed the config");
    let exported: Vec<(String, String)> = std::fs::read(dir.path().join("quickstart.env"))
        .unwrap()
        .split(|&b| b == 0)
        .filter_map(|kv| String::from_utf8(kv.to_vec()).ok())
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .filter(|(k, _)| setup.contains(&format!("export {k}=")))
        .collect();
    assert_eq!(exported.len(), 2, "{exported:?}");
    let secret = exported.iter().find(|(k, _)| k == "HOOK_SECRET").map(|(_, v)| v.clone()).unwrap();
    assert!(secret.starts_with("whsec_") && secret.len() > 40, "openssl made the secret");

    // 4: the daemon, in its own "terminal".
    let run = shell(&block(&readme, "run"));
    let log = dir.path().join("relay.log");
    let mut daemon = sh(dir.path(), &format!("exec {}", run.trim()))
        .envs(exported.iter().cloned())
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // A user opens the second terminal once the first says it runs. (Not
    // waiting is a known race: a `watch add` that creates the database
    // while the daemon migrates it can fail with "table meta already
    // exists"; see the report of this branch.)
    log_says(&log, 1, "dari-relay running").await;

    // 5: the second terminal. The watched job is the README's, on its portal.
    let try_it = shell(&block(&readme, "try"));
    let watch_line = try_it.lines().find(|l| l.contains(" watch add ")).expect("step 5 watches a job");
    let job_id = watch_line.split_whitespace().last().unwrap().to_owned();
    let portal = watch_line.split_whitespace().rev().nth(1).unwrap().to_owned();
    assert_eq!(portal.split('/').count(), 2, "{portal}");
    dari.script(&job_id, vec![Reply::Json(json!({"status": "completed", "events": []}))]);
    let out = sh(dir.path(), &try_it).envs(exported.iter().cloned()).output().unwrap();
    assert!(
        out.status.success(),
        "step 5 failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The samples of send-test, then the watched job's completion, signed
    // with the secret step 3 made.
    let mut got = Vec::new();
    while !got.iter().any(|r: &crate::fakes::Received| r.json()["data"]["job_id"] == job_id.as_str()) {
        got.push(receiver.next().await);
    }
    let delivered = got.last().unwrap();
    assert_eq!(delivered.kind(), "job.completed");
    assert_eq!(delivered.json()["data"]["portal_id"], portal.as_str());
    standardwebhooks::Webhook::new(&secret).unwrap().verify(delivered.body.as_bytes(), &delivered.headers).unwrap();
    assert!(got.len() > 1, "send-test's samples came first");
    assert!(dir.path().join("relay.db").exists(), "the database is in the current folder");
    signal(&daemon, "INT");
    assert!(wait_exit(&mut daemon, Duration::from_secs(5)).await.success(), "Ctrl-C stops it cleanly");
}
