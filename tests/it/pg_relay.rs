//! The relay on PostgreSQL: the lifecycle tests' job through the real
//! `app::serve_postgres` (delivery in order, once, signed; a retry with the
//! same id holding the chain; a restart that neither repeats nor misses),
//! migrations racing at start, and `run` serving the admin API on PostgreSQL.
//! Each test takes a fresh database (`pg.rs`) and skips without a server.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::fakes::{FakeDari, FakeReceiver, Reply, SECRET, config_text, env, eventually_async};
use crate::lifecycle::{FULL_LIFE_TYPES, JOB, answer, event, full_life, watch};
use crate::pg::TestDatabase;
use dari_relay::config::Config;
use dari_relay::metrics::Metrics;
use dari_relay::store::{OperatorStore, Postgres};

/// A relay running on a PostgreSQL database.
struct PgRelay {
    store: Arc<Postgres>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), dari_relay::app::AppError>>,
}

impl PgRelay {
    async fn start(config_text: &str) -> PgRelay {
        let config = Arc::new(Config::from_toml(config_text, Path::new("test.toml"), &env).unwrap());
        let url = config.postgres.as_ref().expect("a PostgreSQL config").url().to_owned();
        let store = Arc::new(Postgres::open(&url).await.unwrap());
        let shutdown = CancellationToken::new();
        let (_tx, config_rx) = tokio::sync::watch::channel(config);
        let task = tokio::spawn(dari_relay::app::serve_postgres(
            config_rx,
            Arc::clone(&store),
            Arc::new(Metrics::default()),
            shutdown.clone(),
        ));
        PgRelay { store, shutdown, task }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }

    /// (delivered, pending, failed).
    async fn counts(&self) -> (i64, i64, i64) {
        let c = self.store.delivery_counts().await.unwrap();
        let get = |k: &str| c.get(k).copied().unwrap_or(0);
        (get("delivered"), get("pending"), get("failed"))
    }

    /// Waits until no delivery is pending.
    async fn settle(&self) {
        let settled = async || self.counts().await.1 == 0;
        crate::fakes::eventually_async(Duration::from_secs(10), || "deliveries still pending".to_owned(), settled)
            .await;
    }
}

/// The lifecycle's acceptance 1 on PostgreSQL: the exact notifications in
/// order, each delivered once and signed, distinct webhook-ids, polling
/// ended by the terminal status.
#[tokio::test]
async fn full_life_is_delivered_in_order_once_and_signed() {
    let Some(db) = TestDatabase::create() else { return };
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    dari.script(JOB, full_life());
    let relay = PgRelay::start(&config_text(Path::new(&db.url), &dari, &[("backend", &receiver.url)], "")).await;
    relay.store.add_watches(vec![watch(JOB)]).await.unwrap();

    let got = receiver.until_delivered("job.completed").await;
    relay.settle().await;
    let counts = relay.counts().await;
    relay.stop().await;
    let got: Vec<_> = got.into_iter().chain(receiver.drain()).collect();
    let kinds: Vec<String> = got.iter().map(|r| r.kind()).collect();
    assert_eq!(kinds, FULL_LIFE_TYPES);
    let verifier = standardwebhooks::Webhook::new(SECRET).unwrap();
    let mut ids = HashSet::new();
    for r in &got {
        verifier.verify(r.body.as_bytes(), &r.headers).expect("signature verifies");
        assert!(ids.insert(r.header("webhook-id")), "webhook-id reused across notifications");
    }
    let done = &got[9].json()["data"];
    assert_eq!(done["final_result"], json!({"confirmation": "CF-1", "rows": [1, 2]}));
    assert_eq!(done["labels"], json!({"customer": "acme"}));
    assert_eq!(counts, (10, 0, 0));
    let watches = relay_watch_state(&db.url).await;
    assert_eq!(watches, "finished");
}

async fn relay_watch_state(url: &str) -> String {
    let store = Postgres::open(url).await.unwrap();
    let rows = store.query_watches(&Default::default()).await.unwrap();
    rows[0].state.to_owned()
}

/// The lifecycle's acceptance 3: a 500 and a 503, then a 204, all with the
/// same webhook-id and body; the job's later notifications wait for it.
#[tokio::test]
async fn failed_delivery_is_retried_with_the_same_id_and_blocks_later_ones() {
    let Some(db) = TestDatabase::create() else { return };
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    receiver.answer_with(&[500, 503]);
    dari.script(JOB, full_life());
    let relay = PgRelay::start(&config_text(Path::new(&db.url), &dari, &[("backend", &receiver.url)], "")).await;
    relay.store.add_watches(vec![watch(JOB)]).await.unwrap();

    let got = receiver.until_delivered("job.completed").await;
    relay.settle().await;
    relay.stop().await;
    let first_id = got[0].header("webhook-id");
    assert_eq!((got[0].kind(), got[0].answered), ("job.pending".into(), 500));
    assert_eq!((got[1].header("webhook-id"), got[1].answered), (first_id.clone(), 503));
    assert_eq!((got[2].header("webhook-id"), got[2].answered), (first_id, 204));
    assert_eq!(got[0].body, got[2].body, "the body is the same on every retry");
    let after: Vec<String> = got[3..].iter().map(|r| r.kind()).collect();
    assert_eq!(after, FULL_LIFE_TYPES[1..]);
}

/// The lifecycle's acceptance 4: a restart re-announces nothing, and what
/// happened while the relay was down is announced after it.
#[tokio::test]
async fn restart_neither_repeats_nor_misses() {
    let Some(db) = TestDatabase::create() else { return };
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    let e: Vec<_> = (0..3).map(event).collect();
    dari.script(
        JOB,
        vec![Reply::Json(answer("pending", &[], json!({}))), Reply::Json(answer("running", &e[..1], json!({})))],
    );
    let config = config_text(Path::new(&db.url), &dari, &[("backend", &receiver.url)], "");
    let relay = PgRelay::start(&config).await;
    relay.store.add_watches(vec![watch(JOB)]).await.unwrap();
    let first: Vec<String> = receiver.until_delivered("job.running").await.iter().map(|r| r.kind()).collect();
    assert_eq!(first, ["job.pending", "job.event", "job.running"]);
    relay.settle().await;
    relay.stop().await;

    dari.script(JOB, vec![Reply::Json(answer("completed", &e, json!({"final_result": {"ok": true}})))]);
    let relay = PgRelay::start(&config).await;
    let second = receiver.until_delivered("job.completed").await;
    relay.settle().await;
    relay.stop().await;
    let kinds: Vec<String> = second.iter().chain(receiver.drain().iter()).map(|r| r.kind()).collect();
    assert_eq!(kinds, ["job.event", "job.event", "job.completed"]);

    let polls_done = dari.polls(JOB);
    let relay = PgRelay::start(&config).await;
    relay.settle().await;
    relay.stop().await;
    assert!(receiver.drain().is_empty());
    assert_eq!(dari.polls(JOB), polls_done, "a finished job is not polled again");
}

/// Several instances opening one fresh database at once migrate it once:
/// every open succeeds and the schema holds one row per version.
#[tokio::test]
async fn instances_starting_together_migrate_once() {
    let Some(db) = TestDatabase::create() else { return };
    let opens = (0..6).map(|_| {
        let url = db.url.clone();
        tokio::spawn(async move { Postgres::open(&url).await.map(|_| ()) })
    });
    for open in opens.collect::<Vec<_>>() {
        open.await.unwrap().expect("every instance opens the database");
    }
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    let driver = tokio::spawn(connection);
    let rows = client.query("SELECT version FROM schema_migrations ORDER BY version", &[]).await.unwrap();
    let versions: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(versions, [1, 2, 3, 4], "each migration applied once");
    drop(client);
    driver.await.unwrap().unwrap();
}

/// `run` on PostgreSQL serves `[admin]` (it used to refuse it), with
/// `GET /v1/cluster` listing this instance and its watches and the cluster
/// metrics, and stops cleanly.
#[tokio::test]
async fn run_serves_the_admin_api_on_postgres() {
    let Some(db) = TestDatabase::create() else { return };
    let dari = FakeDari::start().await;
    dari.script(JOB, vec![Reply::Json(answer("running", &[event(0)], json!({})))]);
    let seed = Postgres::open(&db.url).await.unwrap();
    seed.add_watches(vec![watch(JOB)]).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let extra =
        format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n[cluster]\ninstance = \"relay-t\"\nlease_ttl = \"3s\"\n");
    let text = config_text(Path::new(&db.url), &dari, &[], &extra);
    let config = Arc::new(Config::from_toml(&text, Path::new("test.toml"), &env).unwrap());
    let (_tx, rx) = tokio::sync::watch::channel(config);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(dari_relay::app::run(rx, shutdown.clone()));
    let url = format!("http://127.0.0.1:{port}/v1/watches");
    let answered = async || reqwest::get(&url).await.is_ok_and(|r| r.status() == 200);
    crate::fakes::eventually_async(Duration::from_secs(10), || format!("no 200 from {url}"), answered).await;
    let body: serde_json::Value =
        serde_json::from_str(&reqwest::get(&url).await.unwrap().text().await.unwrap()).unwrap();
    assert_eq!(body["watches"].as_array().map(Vec::len), Some(1));
    // After a renewal (every second here) the row says how many it owns.
    let cluster_url = format!("http://127.0.0.1:{port}/v1/cluster");
    let listed = async || {
        let Ok(r) = reqwest::get(&cluster_url).await else { return false };
        let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        v["instance"] == "relay-t" && v["instances"][0]["instance"] == "relay-t" && v["instances"][0]["watches"] == 1
    };
    crate::fakes::eventually_async(Duration::from_secs(10), || "relay-t never listed with its watch".into(), listed)
        .await;
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap();
    for line in ["dari_relay_cluster_instances 1", "dari_relay_watches_owned 1", "dari_relay_lease_takeovers_total 0"] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// Per-watch leases on the store: a second instance gets its fair share
/// once the first hands it over (and not before the hand-over time), each
/// schedules and sends only what it owns, and writes to the other's watches
/// are refused; a silent instance's watches are taken over once its row
/// expires on the database's clock, not before, and it is fenced; one that
/// leaves hands everything over at once.
#[tokio::test]
async fn watches_are_shared_fairly_handed_over_taken_over_and_fenced() {
    use dari_relay::store::postgres::join;
    use dari_relay::store::{DelivererStore, PollerStore, StoreError};
    let Some(db) = TestDatabase::create() else { return };
    let ttl = Duration::from_millis(1500);
    let handoff = Duration::from_millis(400);
    let (a, b) = (Postgres::open(&db.url).await.unwrap(), Postgres::open(&db.url).await.unwrap());
    let jobs: Vec<String> = (0..10).map(|n| format!("00000000-0000-4000-8000-{n:012}")).collect();
    a.add_watches(jobs.iter().map(|j| watch(j)).collect()).await.unwrap();
    let ma = join(&a, "a", ttl, handoff).await.unwrap();
    let first = ma.round(&a, 0).await.unwrap().unwrap();
    assert_eq!((first.instances, first.work, first.owned, first.claimed, first.took_over), (1, 10, 10, 10, 0));

    // B joins: nothing is free, so B claims nothing until A hands over its
    // surplus, and nothing before the hand-over time has passed.
    let mb = join(&b, "b", ttl, handoff).await.unwrap();
    assert_eq!(mb.round(&b, 0).await.unwrap().unwrap().owned, 0);
    let handed_at = Instant::now();
    let handed = ma.round(&a, 10).await.unwrap().unwrap();
    assert_eq!((handed.instances, handed.released, handed.owned), (2, 5, 5));
    let early = mb.round(&b, 0).await.unwrap().unwrap();
    assert_eq!(early.claimed, 0, "not claimable before the hand-over time");
    let mut share = None;
    let claims = async || {
        let round = mb.round(&b, 0).await.unwrap().unwrap();
        let claimed = round.claimed > 0;
        share = Some(round);
        claimed
    };
    eventually_async(handoff * 10, || "the handed-over watches were never claimed".into(), claims).await;
    let share = share.unwrap();
    assert!(handed_at.elapsed() >= handoff, "claimed {:?} after the hand-over", handed_at.elapsed());
    assert_eq!((share.claimed, share.took_over, share.owned), (5, 0, 5), "hand-overs are not takeovers");

    // Each schedules only its own, and together they cover every watch once.
    let owned = |s: &dari_relay::store::Schedule| -> HashSet<String> {
        s.watches.iter().filter(|w| w.owned).map(|w| w.job_id.clone()).collect()
    };
    let (sa, sb) = (owned(&a.schedule().await.unwrap()), owned(&b.schedule().await.unwrap()));
    assert_eq!((sa.len(), sb.len()), (5, 5));
    assert!(sa.is_disjoint(&sb));
    let changed = a.schedule_since(0).await.unwrap();
    assert_eq!(owned(&changed), sa, "the changes say which are A's");
    // A cannot write B's watch.
    let theirs = sb.iter().next().unwrap().clone();
    let decide: dari_relay::store::Decide = Box::new(|_| panic!("a fenced write does not even decide"));
    assert!(matches!(a.commit_poll(theirs.clone(), decide).await, Err(StoreError::Fenced)));
    assert!(a.pending_heads("backend".into(), 10).await.unwrap().is_empty());

    // B goes silent: A takes its watches once B's row expires, not before.
    let silent = Instant::now();
    let mut took = None;
    let takes_over = async || {
        let owned = took.map_or(5, |t: dari_relay::store::postgres::Balance| t.owned);
        let round = ma.round(&a, owned).await.unwrap().expect("A renews");
        took = Some(round);
        round.took_over > 0
    };
    eventually_async(ttl + Duration::from_secs(2), || "never taken over".into(), takes_over).await;
    let took = took.unwrap();
    assert!(silent.elapsed() >= Duration::from_millis(1000), "not before B's row expired: {:?}", silent.elapsed());
    assert_eq!((took.instances, took.took_over, took.owned), (1, 5, 10));
    // B is fenced: its write is refused and its renewal too.
    let decide: dari_relay::store::Decide = Box::new(|_| panic!("a fenced write does not even decide"));
    assert!(matches!(b.commit_poll(theirs.clone(), decide).await, Err(StoreError::Fenced)));
    assert!(matches!(b.pending_heads("backend".into(), 10).await, Err(StoreError::Fenced)));
    assert!(mb.round(&b, 5).await.unwrap().is_none(), "a renewal after expiry is refused");

    // A leaves: a newcomer takes everything at once.
    ma.leave(&a).await.unwrap();
    let c = Postgres::open(&db.url).await.unwrap();
    let mc = join(&c, "c", ttl, handoff).await.unwrap();
    let all = mc.round(&c, 0).await.unwrap().unwrap();
    assert_eq!((all.instances, all.took_over, all.owned), (1, 10, 10));
    let listed = c.instances().await.unwrap();
    assert_eq!(listed.iter().map(|i| i.instance.as_str()).collect::<Vec<_>>(), ["c"]);
    assert_eq!(c.owner_of(&theirs).await.unwrap().as_deref(), Some("c"));
}

/// The keepers wake on each other's notifications, not only at their
/// renewals: with `lease_ttl = 30s` (a round every 10 s), watches added
/// while two instances run are claimed within a second, and when one
/// leaves the other takes its watches within a second.
#[tokio::test]
async fn keepers_wake_on_notifications_not_only_at_renewals() {
    use dari_relay::store::postgres::join;
    let Some(db) = TestDatabase::create() else { return };
    let ttl = Duration::from_secs(30);
    let (a, b) = (Arc::new(Postgres::open(&db.url).await.unwrap()), Arc::new(Postgres::open(&db.url).await.unwrap()));
    let ma = Arc::new(join(&a, "a", ttl, Duration::from_millis(100)).await.unwrap());
    let mb = Arc::new(join(&b, "b", ttl, Duration::from_millis(100)).await.unwrap());
    use std::sync::atomic::{AtomicUsize, Ordering};
    let keep = |m: Arc<dari_relay::store::postgres::Membership>, s: Arc<Postgres>, rounds: Arc<AtomicUsize>| {
        tokio::spawn(async move {
            m.keep(&s, |_| {
                rounds.fetch_add(1, Ordering::Relaxed);
            })
            .await
        })
    };
    let (ra, rb) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let ka = keep(Arc::clone(&ma), Arc::clone(&a), Arc::clone(&ra));
    let kb = keep(Arc::clone(&mb), Arc::clone(&b), Arc::clone(&rb));
    // Past each keeper's first round, so that what follows can only be a
    // wake-up by a notification.
    let first_rounds = || ra.load(Ordering::Relaxed) >= 1 && rb.load(Ordering::Relaxed) >= 1;
    crate::fakes::eventually(Duration::from_secs(5), || "the keepers never ran a round".into(), first_rounds).await;
    let jobs: Vec<String> = (0..6).map(|n| format!("00000000-0000-4000-8000-{n:012}")).collect();
    let added = Instant::now();
    a.add_watches(jobs.iter().map(|j| watch(j)).collect()).await.unwrap();
    let owners = async |jobs: &[String]| {
        let mut out = Vec::new();
        for j in jobs {
            out.push(a.owner_of(j).await.unwrap());
        }
        out
    };
    let claimed = async || owners(&jobs).await.iter().all(Option::is_some);
    crate::fakes::eventually_async(Duration::from_secs(3), || "new watches not claimed".into(), claimed).await;
    assert!(added.elapsed() < Duration::from_secs(1), "claimed {:?} after the add", added.elapsed());
    kb.abort();
    mb.leave(&b).await.unwrap();
    let left = Instant::now();
    let all_a = async || owners(&jobs).await.iter().all(|o| o.as_deref() == Some("a"));
    crate::fakes::eventually_async(Duration::from_secs(3), || "b's watches not taken over".into(), all_a).await;
    assert!(left.elapsed() < Duration::from_secs(1), "taken {:?} after b left", left.elapsed());
    ka.abort();
}

/// Polls of one watch committed at once, from many connections, each read
/// the state the previous one wrote (the row is read `FOR UPDATE`): none
/// is lost and none sees the same fingerprints twice.
#[tokio::test]
async fn concurrent_commits_of_one_watch_are_serialised() {
    use dari_relay::notification::Body;
    use dari_relay::store::{NewDelivery, NewNotification, PollCommit, PollWrite, PollerStore};
    use dari_relay::vocab::{NotificationKind, SeenState};
    let Some(db) = TestDatabase::create() else { return };
    let store = Arc::new(Postgres::open(&db.url).await.unwrap());
    store.add_watches(vec![watch(JOB)]).await.unwrap();
    let commits = (0..20).map(|_| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let decide: dari_relay::store::Decide = Box::new(|ctx| {
                let n = ctx.seen.event_fingerprints.len();
                let mut fingerprints = ctx.seen.event_fingerprints.clone();
                fingerprints.push(n as u64);
                Some(PollCommit {
                    job_id: JOB.into(),
                    seen: SeenState { status: Some("running".into()), event_fingerprints: fingerprints },
                    body_hash: n as u64,
                    end: None,
                    notifications: vec![NewNotification {
                        kind: NotificationKind::Event,
                        body: Body::Whole(format!("{{\"n\":{n}}}")),
                        deliveries: vec![NewDelivery { webhook: "backend".into(), msg_id: format!("msg_{n}") }],
                    }],
                })
            });
            store.commit_poll(JOB.into(), decide).await.unwrap()
        })
    });
    for commit in commits.collect::<Vec<_>>() {
        assert!(matches!(commit.await.unwrap(), PollWrite::Stored { deliveries: 1, .. }));
    }
    let seen = store.diff_context(JOB.into()).await.unwrap().unwrap().seen.event_fingerprints;
    assert_eq!(seen, (0..20).collect::<Vec<u64>>(), "each commit read the one before it");
    let bodies: Vec<String> = store.notifications_of(JOB.into()).await.unwrap().into_iter().map(|n| n.body).collect();
    assert_eq!(bodies, (0..20).map(|n| format!("{{\"n\":{n}}}")).collect::<Vec<_>>());
}
