//! Issue 17: backup and restore of the SQLite file while the relay runs, as
//! docs/operations.md gives it: `sqlite3 relay.db "VACUUM INTO '…'"`, a
//! check of the copy, and a daemon started on the restored file.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::delivery::{signal, spawn_daemon, wait_exit};
use crate::fakes::{FakeDari, FakeReceiver, Reply, config_text, watch_on};

const JOB: &str = "550e8400-e29b-41d4-a716-446655440000";
const JOB2: &str = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";

fn sqlite3(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().unwrap();
    assert!(out.status.success(), "sqlite3 {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn a_backup_taken_while_the_daemon_runs_restores() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md")).unwrap();
    assert!(docs.contains(r#"relay.db "VACUUM INTO '/var/lib/dari-relay/backup.db'""#), "the documented method");
    assert!(docs.contains(r#"backup.db "PRAGMA integrity_check""#));
    if Command::new("sqlite3").arg("--version").output().is_err() {
        // Like the browser tests: the method needs Debian's sqlite3 package.
        eprintln!("backup test skipped: sqlite3 not found");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("relay.db");
    let backup = dir.path().join("backup.db");
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    let running = |n: usize| {
        let events: Vec<_> = (0..n).map(|i| json!({"event_type": "step", "message": format!("e{i}")})).collect();
        Reply::Json(json!({"status": "running", "events": events}))
    };
    // A job that keeps changing, so the daemon writes while the copy is made.
    dari.script(JOB, (0..40).map(running).collect());
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_text(&db, &dari, &[("h", &receiver.url)], "")).unwrap();
    dari_relay::store::Store::open(&db).unwrap().add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    let log = dir.path().join("relay.log");
    let mut daemon = spawn_daemon(&config, &log);
    for _ in 0..3 {
        receiver.next().await;
    }

    assert_eq!(sqlite3(&db, &format!("VACUUM INTO '{}'", backup.display())), "");
    receiver.next().await; // still delivering after the copy
    assert_eq!(sqlite3(&backup, "PRAGMA integrity_check").trim(), "ok");
    assert!(!dir.path().join("backup.db-wal").exists(), "one self-contained file");
    let copied = dari_relay::store::Store::open(&backup).unwrap().notifications_of(JOB).unwrap();
    assert!(copied.len() >= 3, "the copy holds what was delivered before it: {}", copied.len());
    signal(&daemon, "TERM");
    assert!(wait_exit(&mut daemon, Duration::from_secs(5)).await.success());

    // Restore: the daemon stopped, its WAL removed, the copy in place.
    for leftover in ["relay.db-wal", "relay.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(leftover));
    }
    std::fs::copy(&backup, &db).unwrap();
    dari.script(JOB2, vec![Reply::Json(json!({"status": "completed", "events": []}))]);
    dari_relay::store::Store::open(&db).unwrap().add_watches(&[watch_on("acme/form", JOB2)]).unwrap();
    let log = dir.path().join("restored.log");
    let mut daemon = spawn_daemon(&config, &log);
    let mut seen = Vec::new();
    while !seen.iter().any(|r: &crate::fakes::Received| r.json()["data"]["job_id"] == JOB2) {
        seen.push(receiver.next().await);
    }
    signal(&daemon, "TERM");
    assert!(wait_exit(&mut daemon, Duration::from_secs(5)).await.success());
}
