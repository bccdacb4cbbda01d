//! `dari-relay db copy`: a busy database (delivered and pending deliveries,
//! a paused webhook, a live message) moved from SQLite to PostgreSQL and
//! back, then run on: the pending deliveries go out with their first
//! `webhook-id`s, nothing delivered before goes out again, and the moved
//! last-seen state means no old notification is made again. Every row
//! arrives as it left. And the refusals: a target holding watches, a
//! database a running relay uses (both engines), the same database twice;
//! a URL's password is never printed.
//!
//! The command is the real binary; the relays are the real `app::serve`
//! and `app::serve_postgres`. PostgreSQL tests skip in one line without a
//! server (`pg.rs`).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::fakes::{FakeDari, FakeReceiver, Received, Reply, config_text, env, eventually_async};
use crate::lifecycle::{JOB, answer, event, watch};
use crate::pg::TestDatabase;
use dari_relay::config::Config;
use dari_relay::metrics::Metrics;
use dari_relay::store::copy::{After, Batch, CopySource, Table};
use dari_relay::store::{LiveMessage, Postgres, PostgresCopy, RunningLock, Sqlite, SqliteCopy, Storage, Store};
use dari_relay::vocab::DeliveryState;

/// A relay on either engine, as the config's `database` says.
struct AnyRelay {
    store: Arc<dyn Storage>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), dari_relay::app::AppError>>,
}

impl AnyRelay {
    async fn start(config_text: &str) -> AnyRelay {
        let config = Arc::new(Config::from_toml(config_text, Path::new("test.toml"), &env).unwrap());
        let shutdown = CancellationToken::new();
        let (_tx, rx) = tokio::sync::watch::channel(Arc::clone(&config));
        let metrics = Arc::new(Metrics::default());
        let (store, task): (Arc<dyn Storage>, _) = match &config.postgres {
            Some(pg) => {
                let store = Arc::new(Postgres::open(pg.url()).await.unwrap());
                let task =
                    tokio::spawn(dari_relay::app::serve_postgres(rx, Arc::clone(&store), metrics, shutdown.clone()));
                (store, task)
            }
            None => {
                let store = Arc::new(Store::open(&config.database).unwrap());
                let task =
                    tokio::spawn(dari_relay::app::serve(rx, Arc::clone(&store), metrics, None, shutdown.clone()));
                (Arc::new(Sqlite(store)), task)
            }
        };
        AnyRelay { store, shutdown, task }
    }

    async fn pending(&self) -> usize {
        self.store.list_deliveries(Some(DeliveryState::Pending), 10_000).await.unwrap().len()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Runs `dari-relay db copy` with `args` (and `envs`); exit code, stdout, stderr.
async fn db_copy(args: &[&str], envs: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_dari-relay"));
    cmd.args(["db", "copy"]).args(args).env_remove("RUST_LOG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().await.unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.code(), text(out.stdout), text(out.stderr))
}

/// The count the summary gives for `table`.
fn summary_count(stdout: &str, table: &str) -> u64 {
    let line = stdout.lines().find(|l| l.trim_start().starts_with(&format!("{table} "))).unwrap_or_else(|| {
        panic!("the summary names no {table}: {stdout}");
    });
    line.split_whitespace().last().unwrap().parse().unwrap()
}

/// Every row of every table, read through the copy's own readers.
async fn dump(source: &mut dyn CopySource) -> Vec<Batch> {
    source.begin().await.unwrap();
    let mut out = Vec::new();
    for table in Table::ALL {
        let mut after = After::Start;
        loop {
            // Small batches, so the keyset paging is exercised too.
            let batch = source.read(table, after, 2).await.unwrap();
            if batch.is_empty() {
                break;
            }
            after = batch.last_key();
            out.push(batch);
        }
    }
    out
}

async fn dump_of(database: &str) -> Vec<Batch> {
    if database.starts_with("postgres") {
        dump(&mut PostgresCopy::open(database).await.unwrap()).await
    } else {
        dump(&mut SqliteCopy::open_source(Path::new(database)).unwrap()).await
    }
}

fn kinds(got: &[Received]) -> Vec<String> {
    got.iter().map(Received::kind).collect()
}

/// The acceptance: a relay leaves `source` busy (three deliveries to
/// `good` delivered; three to `bad` pending behind its 410, the webhook
/// paused; a live message), `db copy` moves it to `target`, and a relay on
/// `target` goes on: `bad`, resumed, gets its three with their first
/// webhook-ids, then the new ones; `good` gets only the new ones.
async fn a_busy_database_moves_and_goes_on(source: &str, target: &str) {
    let dari = FakeDari::start().await;
    let mut good = FakeReceiver::start().await;
    let mut bad = FakeReceiver::start().await;
    bad.answer_with(&[410]);
    let e: Vec<_> = (0..2).map(event).collect();
    dari.script(
        JOB,
        vec![Reply::Json(answer("pending", &[], json!({}))), Reply::Json(answer("running", &e[..1], json!({})))],
    );
    let (good_url, bad_url) = (good.url.clone(), bad.url.clone());
    let hooks = [("good", good_url.as_str()), ("bad", bad_url.as_str())];
    let relay = AnyRelay::start(&config_text(Path::new(source), &dari, &hooks, "")).await;
    relay.store.add_watches(vec![watch(JOB)]).await.unwrap();
    let before = good.until_delivered("job.running").await;
    assert_eq!(kinds(&before), ["job.pending", "job.event", "job.running"]);
    let refused = bad.next().await;
    assert_eq!((refused.kind(), refused.answered), ("job.pending".to_owned(), 410));
    let paused = async || relay.store.paused_webhooks().await.unwrap().contains_key("bad");
    eventually_async(Duration::from_secs(10), || "bad is not paused".into(), paused).await;
    let three_left = async || relay.pending().await == 3;
    eventually_async(Duration::from_secs(10), || "good's deliveries are not all recorded".into(), three_left).await;
    let live = LiveMessage { id: "msg-1".into(), channel: Some("C042".into()) };
    relay.store.save_live_message(JOB.into(), "good".into(), live).await.unwrap();
    relay.stop().await;

    let (code, stdout, stderr) = db_copy(&["--from", source, "--to", target], &[]).await;
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(summary_count(&stdout, "watches"), 1, "{stdout}");
    assert_eq!(summary_count(&stdout, "deliveries"), 6, "{stdout}");
    assert_eq!(summary_count(&stdout, "webhook_pauses"), 1, "{stdout}");
    assert_eq!(summary_count(&stdout, "live_messages"), 1, "{stdout}");
    assert!(stderr.contains("copied 6 of 6 deliveries"), "plain progress off a terminal: {stderr}");
    assert_eq!(dump_of(target).await, dump_of(source).await, "every row arrives as it left");
    if target.starts_with("postgres") {
        next_ids_start_past_the_copied(target).await;
    }

    // The job goes on: one more event, then the end.
    dari.script(JOB, vec![Reply::Json(answer("completed", &e, json!({"final_result": {"ok": true}})))]);
    let relay = AnyRelay::start(&config_text(Path::new(target), &dari, &hooks, "")).await;
    assert!(relay.store.resume_webhook("bad".into()).await.unwrap(), "the pause moved with the rest");
    let after = good.until_delivered("job.completed").await;
    let resumed = bad.until_delivered("job.completed").await;
    let settled = async || relay.pending().await == 0;
    eventually_async(Duration::from_secs(10), || "deliveries still pending".into(), settled).await;
    relay.stop().await;
    let after: Vec<_> = after.into_iter().chain(good.drain()).collect();
    let resumed: Vec<_> = resumed.into_iter().chain(bad.drain()).collect();

    assert_eq!(kinds(&after), ["job.event", "job.completed"], "good: nothing delivered before comes again");
    assert_eq!(after[0].json()["data"]["event"]["message"], "step 1", "the new event, not the moved one");
    assert_eq!(kinds(&resumed), ["job.pending", "job.event", "job.running", "job.event", "job.completed"]);
    assert_eq!(resumed[0].header("webhook-id"), refused.header("webhook-id"), "the pending one keeps its id");
    assert_eq!(resumed[0].body, refused.body, "and its body");
    let mut ids = HashSet::new();
    for r in before.iter().chain(&after).chain(&resumed[1..]) {
        assert!(
            ids.insert(r.header("webhook-id")),
            "a webhook-id sent for two notifications: {}",
            r.header("webhook-id")
        );
    }
    let same_notification = |a: &Received, b: &Received| a.json()["timestamp"] == b.json()["timestamp"];
    for (old, moved) in before.iter().zip(&resumed) {
        assert!(same_notification(old, moved), "bad's moved deliveries are the notifications good got");
    }
}

/// Each identity sequence of a PostgreSQL target hands out an id past the
/// largest copied one (taking one is harmless: ids need not be dense).
async fn next_ids_start_past_the_copied(url: &str) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    let driver = tokio::spawn(connection);
    for (table, column) in [("watches", "seq"), ("answers", "id"), ("notifications", "id"), ("deliveries", "id")] {
        let sql = format!(
            "SELECT nextval(pg_get_serial_sequence('{table}', '{column}')), (SELECT MAX({column}) FROM {table})"
        );
        let row = client.query_one(&sql, &[]).await.unwrap();
        let (next, max): (i64, Option<i64>) = (row.get(0), row.get(1));
        assert!(next > max.unwrap_or(0), "{table}: next {next}, copied up to {max:?}");
    }
    drop(client);
    driver.await.unwrap().unwrap();
}

#[tokio::test]
async fn sqlite_to_postgres_keeps_webhook_ids_and_repeats_nothing() {
    let Some(db) = TestDatabase::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("relay.db");
    a_busy_database_moves_and_goes_on(source.to_str().unwrap(), &db.url).await;
}

#[tokio::test]
async fn postgres_to_sqlite_keeps_webhook_ids_and_repeats_nothing() {
    let Some(db) = TestDatabase::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("moved/relay.db");
    a_busy_database_moves_and_goes_on(&db.url, target.to_str().unwrap()).await;
}

#[tokio::test]
async fn sqlite_to_sqlite_keeps_webhook_ids_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (source, target) = (dir.path().join("a.db"), dir.path().join("b.db"));
    a_busy_database_moves_and_goes_on(source.to_str().unwrap(), target.to_str().unwrap()).await;
}

/// A database with one watch, on either engine.
async fn with_a_watch(database: &str, job_id: &str) {
    let store: Box<dyn Storage> = if database.starts_with("postgres") {
        Box::new(Postgres::open(database).await.unwrap())
    } else {
        Box::new(Sqlite(Arc::new(Store::open(Path::new(database)).unwrap())))
    };
    store.add_watches(vec![watch(job_id)]).await.unwrap();
}

const OTHER_JOB: &str = "6fa459ea-ee8a-4ca4-894e-db77e160355e";

async fn watch_ids(database: &str) -> Vec<String> {
    let rows = dump_of(database).await;
    let watches = rows.iter().filter_map(|b| if let Batch::Watches(w) = b { Some(w) } else { None });
    watches.flatten().map(|w| w.job_id.clone()).collect()
}

#[tokio::test]
async fn a_target_holding_watches_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (source, target) = (dir.path().join("a.db"), dir.path().join("b.db"));
    let (source, target) = (source.to_str().unwrap(), target.to_str().unwrap());
    with_a_watch(source, JOB).await;
    with_a_watch(target, OTHER_JOB).await;
    let (code, stdout, stderr) = db_copy(&["--from", source, "--to", target], &[]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("already holds 1 watch:") && stderr.contains("new, empty database"), "{stderr}");
    assert_eq!(watch_ids(target).await, [OTHER_JOB]);

    let Some(db) = TestDatabase::create() else { return };
    with_a_watch(&db.url, OTHER_JOB).await;
    let (code, _, stderr) = db_copy(&["--from", source, "--to", &db.url], &[]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("already holds 1 watch:"), "{stderr}");
    assert_eq!(watch_ids(&db.url).await, [OTHER_JOB]);
}

/// `dari-relay run` on SQLite holds the database's running lock: a copy
/// from it is refused, naming the process, and so is a second relay on the
/// same file; once the relay stops, the copy goes through.
#[tokio::test]
async fn a_sqlite_database_a_relay_runs_on_is_refused() {
    // `app::run`'s future is not `Send`: it runs on this thread.
    tokio::task::LocalSet::new().run_until(sqlite_in_use()).await;
}

async fn sqlite_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let (source, target) = (dir.path().join("a.db"), dir.path().join("b.db"));
    let dari = FakeDari::start().await;
    dari.script(JOB, vec![Reply::Json(answer("running", &[], json!({})))]);
    with_a_watch(source.to_str().unwrap(), JOB).await;
    let text = config_text(&source, &dari, &[], "");
    let config = Arc::new(Config::from_toml(&text, Path::new("test.toml"), &env).unwrap());
    let (_tx, rx) = tokio::sync::watch::channel(Arc::clone(&config));
    let shutdown = CancellationToken::new();
    let relay = tokio::task::spawn_local(dari_relay::app::run(rx.clone(), shutdown.clone()));
    // Polling means it is serving, so it holds the lock (taken before).
    eventually_async(Duration::from_secs(10), || "the relay never polled".into(), async || dari.polls(JOB) > 0).await;

    let (source_s, target_s) = (source.to_str().unwrap(), target.to_str().unwrap());
    drop(Store::open(&target).unwrap());
    let (code, _, stderr) = db_copy(&["--from", source_s, "--to", target_s], &[]).await;
    assert_eq!(code, Some(2), "{stderr}");
    let by = format!("in use by a running relay (dari-relay run, pid {})", std::process::id());
    assert!(stderr.contains(&by) && stderr.contains("stop it first"), "{stderr}");
    let (code, _, stderr) = db_copy(&["--from", target_s, "--to", source_s], &[]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("the target database is in use by a running relay (dari-relay run"), "{stderr}");
    let second = dari_relay::app::run(rx, CancellationToken::new()).await.expect_err("a second relay is refused");
    assert!(second.to_string().contains("is in use by dari-relay run"), "{second}");

    shutdown.cancel();
    relay.await.unwrap().unwrap();
    let (code, stdout, stderr) = db_copy(&["--from", source_s, "--to", target_s], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(summary_count(&stdout, "watches"), 1, "{stdout}");
    // The copy holds the lock while it copies, and lets go after.
    drop(RunningLock::take(&target, "test").unwrap());
}

/// On PostgreSQL a running relay is a live instance of the database's
/// cluster: a copy from or to that database is refused, naming it.
#[tokio::test]
async fn a_postgres_database_a_relay_runs_on_is_refused() {
    let Some(db) = TestDatabase::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sqlite = dir.path().join("a.db");
    let sqlite = sqlite.to_str().unwrap();
    with_a_watch(sqlite, JOB).await;
    let store = Postgres::open(&db.url).await.unwrap();
    let member = dari_relay::store::postgres::join(&store, "relay-a", Duration::from_secs(30), Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(store.relay_in_use().await.unwrap().as_deref(), Some("instance relay-a"));
    let empty = dir.path().join("b.db");
    let (code, _, stderr) = db_copy(&["--from", &db.url, "--to", empty.to_str().unwrap()], &[]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("the source database is in use by a running relay (instance relay-a)"), "{stderr}");
    let (code, _, stderr) = db_copy(&["--from", sqlite, "--to", &db.url], &[]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("the target database is in use by a running relay (instance relay-a)"), "{stderr}");
    member.leave(&store).await.unwrap();
    assert_eq!(store.relay_in_use().await.unwrap(), None);
    let (code, _, stderr) = db_copy(&["--from", sqlite, "--to", &db.url], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
}

const PASSWORD: &str = "Sup3rSecretPw";

/// A URL's password is never printed: not in a connection error, not in
/// the summary, whether it came on the command line or from `--to-env`.
#[tokio::test]
async fn a_url_password_is_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("a.db");
    let source = source.to_str().unwrap();
    with_a_watch(source, JOB).await;
    // Nothing listens on port 1: the connection fails.
    let nowhere = format!("postgres://relay:{PASSWORD}@127.0.0.1:1/relay");
    for (args, envs) in [
        (vec!["--from", source, "--to", &nowhere], vec![]),
        (vec!["--from", source, "--to-env", "TARGET_URL"], vec![("TARGET_URL", nowhere.as_str())]),
        (vec!["--from", &nowhere, "--to", source], vec![]),
    ] {
        let (code, stdout, stderr) = db_copy(&args, &envs).await;
        assert_eq!(code, Some(1), "{stderr}");
        assert!(!stdout.contains(PASSWORD) && !stderr.contains(PASSWORD), "{stdout}{stderr}");
        assert!(stderr.contains("postgres://relay:***@127.0.0.1:1/relay"), "{stderr}");
        assert!(stderr.contains("cannot open the"), "{stderr}");
    }

    let Some(db) = TestDatabase::create() else { return };
    // The test server trusts local connections, so the password is unused.
    let with_password = db.url.replacen("://postgres@", &format!("://postgres:{PASSWORD}@"), 1);
    assert_ne!(with_password, db.url);
    let (code, stdout, stderr) = db_copy(&["--from", source, "--to", &with_password], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stdout.contains(PASSWORD) && !stderr.contains(PASSWORD), "{stdout}{stderr}");
    assert!(stdout.contains("postgres:***@"), "{stdout}");
}

#[tokio::test]
async fn the_same_database_twice_and_a_missing_source_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("a.db");
    with_a_watch(source.to_str().unwrap(), JOB).await;
    let other_path = format!("{}/./a.db", dir.path().display());
    let (code, _, stderr) = db_copy(&["--from", source.to_str().unwrap(), "--to", &other_path], &[]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("name the same database"), "{stderr}");
    let missing = dir.path().join("nope.db");
    let target = dir.path().join("b.db");
    let (code, _, stderr) =
        db_copy(&["--from", missing.to_str().unwrap(), "--to", target.to_str().unwrap()], &[]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("there is no SQLite database at"), "{stderr}");
    assert!(!missing.exists(), "a mistyped source is not created");
    let (code, _, stderr) = db_copy(&["--from", source.to_str().unwrap()], &[]).await;
    assert_eq!(code, Some(2), "{stderr}");
}

/// A copy that fails on the way (here a target that holds no watch but a
/// pause of the same webhook, so the pauses clash after the watches went
/// in) is rolled back whole: the target holds none of the copy, and the
/// error says so (exit 1).
#[tokio::test]
async fn a_copy_failing_on_the_way_leaves_the_target_empty() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("a.db");
    let source = source.to_str().unwrap();
    with_a_watch(source, JOB).await;
    let paused = async |database: &str| {
        let store: Box<dyn Storage> = if database.starts_with("postgres") {
            Box::new(Postgres::open(database).await.unwrap())
        } else {
            Box::new(Sqlite(Arc::new(Store::open(Path::new(database)).unwrap())))
        };
        store.pause_webhook("bad".into(), "410 Gone".into()).await.unwrap();
    };
    paused(source).await;
    let target = dir.path().join("b.db");
    let target = target.to_str().unwrap().to_owned();
    let db = TestDatabase::create();
    let targets: Vec<String> = [Some(target), db.as_ref().map(|d| d.url.clone())].into_iter().flatten().collect();
    for target in &targets {
        paused(target).await;
        let (code, stdout, stderr) = db_copy(&["--from", source, "--to", target], &[]).await;
        assert_eq!(code, Some(1), "{stdout}{stderr}");
        assert!(stdout.is_empty(), "no summary for a failed copy: {stdout}");
        assert!(stderr.contains("the copy was rolled back, so it holds none of it"), "{stderr}");
        assert!(watch_ids(target).await.is_empty(), "the watches written before the failure are rolled back");
    }
}

/// More rows than one batch holds, there and back: every batch lands, in
/// order, and the watch order (SQLite's rowid, PostgreSQL's seq) is kept.
#[tokio::test]
async fn many_batches_arrive_whole_and_in_order() {
    let Some(db) = TestDatabase::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (source, back) = (dir.path().join("a.db"), dir.path().join("back.db"));
    let (source, back) = (source.to_str().unwrap(), back.to_str().unwrap());
    let watches: Vec<_> = (0..2_500).map(|_| watch(&uuid::Uuid::new_v4().to_string())).collect();
    let jobs: Vec<String> = watches.iter().map(|w| w.job_id.clone()).collect();
    let store: Box<dyn Storage> = Box::new(Sqlite(Arc::new(Store::open(Path::new(source)).unwrap())));
    // Three adds, so the revision moves too.
    for chunk in watches.chunks(1_000) {
        store.add_watches(chunk.to_vec()).await.unwrap();
    }
    let (code, stdout, stderr) = db_copy(&["--from", source, "--to", &db.url], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(summary_count(&stdout, "watches"), 2_500, "{stdout}");
    assert_eq!(summary_count(&stdout, "watch revision"), 3, "{stdout}");
    let (code, _, stderr) = db_copy(&["--from", &db.url, "--to", back], &[]).await;
    assert_eq!(code, Some(0), "{stderr}");
    // Compared as a whole (not printed: 2,500 ids).
    assert!(watch_ids(back).await == jobs, "every watch, in the order it was added");
    assert!(dump_of(back).await == dump_of(source).await, "every row arrives as it left");
}
