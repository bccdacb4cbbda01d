use super::*;
use crate::vocab::NewWatch;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.db")).unwrap();
    (dir, store)
}

/// How SQLite runs `sql`: one line per step of its plan.
fn plan(store: &Store, sql: &str) -> String {
    let conn = store.conn();
    let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
    let n = stmt.parameter_count();
    let params: Vec<rusqlite::types::Value> = (0..n).map(|_| rusqlite::types::Value::Integer(1)).collect();
    let rows = stmt.query_map(rusqlite::params_from_iter(params), |r| r.get::<_, String>(3)).unwrap();
    rows.map(Result::unwrap).collect::<Vec<_>>().join("\n")
}

/// The lookups that run per pruned row or per listed notification go
/// through an index: none of them scans the deliveries (which grow with
/// history). Before the third migration, each looked at every delivery.
#[test]
fn history_lookups_use_indexes() {
    let (_dir, store) = store();
    for sql in [
        "SELECT 1 FROM deliveries WHERE notification_id = ?1",
        "SELECT id FROM deliveries WHERE state = 'delivered' AND finished_at < ?1 ORDER BY finished_at LIMIT ?2",
        "SELECT id, created_at, answer_id FROM notifications
             WHERE created_at < ?1 AND (created_at, id) > (?2, ?3) ORDER BY created_at, id LIMIT ?4",
        "SELECT 1 FROM notifications WHERE answer_id = ?1",
        "SELECT n.id, d.id FROM notifications n LEFT JOIN deliveries d ON d.notification_id = n.id
             WHERE n.job_id = ?1 ORDER BY n.id, d.id",
        "SELECT d.id FROM deliveries d JOIN notifications n ON n.id = d.notification_id
             WHERE d.state = ?1 ORDER BY d.id DESC LIMIT ?2",
    ] {
        let plan = plan(&store, sql);
        assert!(!plan.contains("SCAN d") && !plan.contains("SCAN notifications"), "{sql}\n{plan}");
    }
}

#[test]
fn huge_limits_stay_limits() {
    assert_eq!(sql_limit(usize::MAX), i64::MAX);
    assert_eq!(sql_limit(10), 10);
}

fn add(store: &Store, job_id: &str) {
    let watch = NewWatch {
        job_id: job_id.into(),
        portal: "acme/portal".parse().unwrap(),
        webhooks: None,
        labels: BTreeMap::new(),
        from_now: false,
    };
    store.add_watches(&[watch]).unwrap();
}

/// A write that panics fails alone: the writer thread lives on and the
/// next write is stored. Before, the panic ended the thread and every
/// later write failed with "the writer thread has stopped".
#[tokio::test]
async fn a_panicking_write_leaves_the_writer_alive() {
    let (_dir, store) = store();
    add(&store, "j");
    let panicked = store.commit_poll("j".into(), Box::new(|_| panic!("boom"))).await;
    assert!(matches!(panicked, Err(StoreError::Panicked(ref m)) if m.contains("boom")), "{panicked:?}");
    let commit = PollCommit {
        job_id: "j".into(),
        seen: SeenState { status: Some("running".into()), event_fingerprints: vec![] },
        body_hash: 1,
        end: None,
        notifications: vec![],
    };
    let stored = store.commit_poll("j".into(), Box::new(move |_| Some(commit))).await.unwrap();
    assert!(matches!(stored, PollWrite::Stored { deliveries: 0, .. }), "{stored:?}");
    assert!(store.problems_at(Instant::now(), Duration::from_secs(15)).is_empty());
}

/// Writes that all fail for longer than the limit are a problem (seen
/// on the monotonic clock, scripted here); one success clears it; a
/// stopped writer thread is a problem at once.
#[tokio::test]
async fn failing_writes_and_a_dead_writer_are_problems() {
    let (_dir, store) = store();
    add(&store, "j");
    store.set_read_only(true).unwrap();
    let commit = PollCommit {
        job_id: "j".into(),
        seen: SeenState { status: Some("running".into()), event_fingerprints: vec![] },
        body_hash: 1,
        end: None,
        notifications: vec![],
    };
    let again = commit.clone();
    assert!(store.commit_poll("j".into(), Box::new(move |_| Some(commit))).await.is_err());
    let limit = Duration::from_secs(15);
    let now = Instant::now();
    assert!(store.problems_at(now, limit).is_empty(), "not yet: one failure is not a run");
    let later = store.problems_at(now + Duration::from_secs(16), limit);
    assert!(later.iter().any(|p| p.contains("every database write failed")), "{later:?}");
    assert_eq!(store.writable(Duration::from_secs(5)).map_err(|e| e.contains("readonly")), Err(true));
    store.set_read_only(false).unwrap();
    store.commit_poll("j".into(), Box::new(move |_| Some(again))).await.unwrap();
    assert!(store.problems_at(now + Duration::from_secs(16), limit).is_empty());
    assert_eq!(store.writable(Duration::from_secs(5)), Ok(()));

    store.stop_writer_for_test().unwrap();
    assert_eq!(store.problems_at(Instant::now(), limit), ["the database writer thread has stopped"]);
}

/// A lock held by another connection does not make the probe wait (nor
/// count as "not writable"), and a fresh commit answers without a check.
#[test]
fn the_readiness_check_does_not_queue_on_the_lock() {
    let (dir, store) = store();
    let other = Connection::open(dir.path().join("s.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = Instant::now();
    assert_eq!(store.writable(Duration::from_secs(5)), Ok(()));
    assert!(started.elapsed() < Duration::from_secs(1), "waited {:?}", started.elapsed());
    // Cached: the second probe does not even try.
    let started = Instant::now();
    assert_eq!(store.writable(Duration::from_secs(5)), Ok(()));
    assert!(started.elapsed() < Duration::from_millis(50));
    other.execute_batch("COMMIT").unwrap();
}

/// Processes opening a new database at once (the daemon starting while a
/// CLI command runs) each migrate it or find it migrated: none fails on a
/// table another one just created. Threads stand in for the processes:
/// each opens its own file handle, so each takes the lock as a process would.
#[test]
fn a_new_database_opened_by_many_at_once_is_migrated_once() {
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("race{round}.db"));
        let start = std::sync::Arc::new(std::sync::Barrier::new(6));
        let openers: Vec<_> = (0..6)
            .map(|_| {
                let (path, start) = (path.clone(), std::sync::Arc::clone(&start));
                std::thread::spawn(move || {
                    start.wait();
                    Store::open(&path).map(|_| ()).map_err(|e| e.to_string())
                })
            })
            .collect();
        for opener in openers {
            assert_eq!(opener.join().unwrap(), Ok(()), "round {round}");
        }
        let version: i64 =
            Store::open(&path).unwrap().conn().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }
}
