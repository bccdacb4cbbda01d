//! The store conformance suite: the rules the poller, the deliverer and the
//! operator commands rely on, checked directly against the storage traits.
//! Written once; `conformance!` runs every rule against each engine (SQLite
//! and PostgreSQL; a factory returning `Option<Engine>` may skip, as
//! PostgreSQL's does without a server).

use std::sync::Arc;

use dari_relay::notification::Body;
use dari_relay::store::{
    AttemptRecord, CommitOutcome, DeliveryOutcome, LiveMessage, NewDelivery, NewNotification, PollCommit, PollWrite,
    Postgres, Sqlite, Storage, Store,
};
use dari_relay::vocab::{DeliveryState, NewWatch, NotificationKind, SeenState, WatchState, now_ms};

/// An engine under test, and whatever keeps its database alive.
pub struct Engine {
    pub store: Arc<dyn Storage>,
    _keep: Box<dyn std::any::Any + Send>,
}

/// A fresh SQLite database in a temporary folder.
pub fn sqlite() -> Engine {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("relay.db")).unwrap());
    Engine { store: Arc::new(Sqlite(store)), _keep: Box::new(dir) }
}

/// A fresh PostgreSQL database (see `pg.rs`), or `None` when there is no
/// server to test against.
pub fn postgres() -> Option<Engine> {
    let db = crate::pg::TestDatabase::create()?;
    // Opened (and migrated) on a runtime of its own: the pool starts empty,
    // so its connections are made on the test's runtime when first used.
    let url = db.url.clone();
    let store = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(Postgres::open(&url))
    })
    .join()
    .unwrap()
    .unwrap();
    Some(Engine { store: Arc::new(store), _keep: Box::new(db) })
}

const JOB_A: &str = "11111111-1111-4111-8111-111111111111";
const JOB_B: &str = "22222222-2222-4222-8222-222222222222";

fn watch(job_id: &str) -> NewWatch {
    NewWatch {
        job_id: job_id.into(),
        portal: "acme/form".parse().unwrap(),
        webhooks: None,
        labels: Default::default(),
        from_now: false,
    }
}

/// A notification going to each of `webhooks`, with a body naming `n`.
fn notification(job_id: &str, n: usize, webhooks: &[&str]) -> NewNotification {
    NewNotification {
        kind: NotificationKind::Event,
        body: Body::Whole(format!(r#"{{"type":"job.event","data":{{"job_id":"{job_id}","n":{n}}}}}"#)),
        deliveries: webhooks
            .iter()
            .map(|w| NewDelivery { webhook: (*w).into(), msg_id: format!("msg_{job_id}_{w}_{n}") })
            .collect(),
    }
}

/// Stores `count` notifications for `job_id` in one poll, to `webhooks`.
pub(crate) async fn commit(
    store: &dyn Storage,
    job_id: &str,
    status: &str,
    count: usize,
    webhooks: &[&str],
) -> PollWrite {
    let (job, status, hooks) =
        (job_id.to_owned(), status.to_owned(), webhooks.iter().map(|w| w.to_string()).collect::<Vec<_>>());
    store
        .commit_poll(
            job_id.into(),
            Box::new(move |ctx| {
                let hooks: Vec<&str> = hooks.iter().map(String::as_str).collect();
                let mut fingerprints = ctx.seen.event_fingerprints.clone();
                let first = fingerprints.len();
                fingerprints.extend((first..first + count).map(|i| i as u64));
                Some(PollCommit {
                    job_id: job.clone(),
                    seen: SeenState { status: Some(status), event_fingerprints: fingerprints },
                    body_hash: 7,
                    end: None,
                    notifications: (first..first + count).map(|n| notification(&job, n, &hooks)).collect(),
                })
            }),
        )
        .await
        .unwrap()
}

pub(crate) fn attempt(status: Option<u16>, error: Option<&str>) -> AttemptRecord {
    AttemptRecord {
        attempted_at: now_ms(),
        duration_ms: 3,
        http_status: status,
        response_excerpt: None,
        error: error.map(str::to_owned),
    }
}

/// The head of `job_id`'s chain to `webhook`, with its body.
async fn head(store: &dyn Storage, webhook: &str, job_id: &str) -> Option<dari_relay::store::OutboundDelivery> {
    let heads = store.pending_heads(webhook.into(), 100).await.unwrap();
    let id = heads.iter().find(|h| h.job_id == job_id)?.id;
    store.outbound(vec![id]).await.unwrap().pop()
}

/// One head per (job, webhook) chain; the next delivery of a chain becomes
/// its head only once the head is delivered; chains and webhooks are
/// independent of each other.
pub async fn chains_deliver_in_order(store: &dyn Storage) {
    store.add_watches(vec![watch(JOB_A), watch(JOB_B)]).await.unwrap();
    assert!(matches!(commit(store, JOB_A, "running", 3, &["a", "b"]).await, PollWrite::Stored { deliveries: 6, .. }));
    assert!(matches!(commit(store, JOB_B, "running", 1, &["a"]).await, PollWrite::Stored { deliveries: 1, .. }));

    let heads = store.pending_heads("a".into(), 100).await.unwrap();
    assert_eq!(heads.len(), 2, "one head per chain: {heads:?}");
    for n in 0..3 {
        let first = head(store, "a", JOB_A).await.expect("a head");
        assert!(first.body.contains(&format!("\"n\":{n}")), "head {n} of the chain: {}", first.body);
        assert_eq!(first.msg_id, format!("msg_{JOB_A}_a_{n}"));
        store
            .record_attempt(first.id, attempt(Some(204), None), DeliveryOutcome::Delivered { status: 204 })
            .await
            .unwrap();
    }
    assert!(head(store, "a", JOB_A).await.is_none(), "the chain is done");
    // The other webhook's chain of the same job has not moved.
    assert!(head(store, "b", JOB_A).await.unwrap().body.contains("\"n\":0"));
    // Nor has the other job's chain.
    assert!(head(store, "a", JOB_B).await.unwrap().body.contains("\"n\":0"));
}

/// A failing head keeps its place (the chain waits behind it), counts the
/// attempt and moves its next attempt; a rate limit does not count.
pub async fn a_retry_holds_the_chain_and_a_rate_limit_is_not_counted(store: &dyn Storage) {
    store.add_watches(vec![watch(JOB_A)]).await.unwrap();
    commit(store, JOB_A, "running", 2, &["a"]).await;
    let first = head(store, "a", JOB_A).await.unwrap();
    let at_ms = now_ms() + 60_000;
    let outcome = DeliveryOutcome::RetryAt { at_ms, error: "HTTP 500".into() };
    store.record_attempt(first.id, attempt(Some(500), None), outcome).await.unwrap();
    let heads = store.pending_heads("a".into(), 100).await.unwrap();
    assert_eq!(heads.len(), 1);
    assert_eq!((heads[0].id, heads[0].next_attempt_at), (first.id, at_ms), "the same head, later");
    assert_eq!(head(store, "a", JOB_A).await.unwrap().attempts, 1);

    let later = at_ms + 5_000;
    let limited = DeliveryOutcome::RateLimited {
        at_ms: later,
        wait: std::time::Duration::from_secs(5),
        error: "HTTP 429".into(),
    };
    store.record_attempt(first.id, attempt(Some(429), Some("HTTP 429")), limited).await.unwrap();
    let again = head(store, "a", JOB_A).await.unwrap();
    assert_eq!((again.id, again.attempts), (first.id, 1), "a rate limit spends no retry");
    assert_eq!(store.pending_heads("a".into(), 1).await.unwrap()[0].next_attempt_at, later);
    assert_eq!(store.attempts(first.id).await.unwrap().len(), 2, "both attempts are kept");
    assert!(store.first_attempt_at(first.id).await.unwrap().is_some());
}

/// Adding, removing and committing twice change nothing the second time;
/// a removed watch takes no poll and no give-up; re-adding it keeps what
/// was seen, so nothing is announced twice.
pub async fn writes_are_idempotent(store: &dyn Storage) {
    let added = store.add_watches(vec![watch(JOB_A)]).await.unwrap();
    assert_eq!((added.added, added.existing), (1, 0));
    let again = store.add_watches(vec![watch(JOB_A)]).await.unwrap();
    assert_eq!((again.added, again.existing), (0, 1));
    commit(store, JOB_A, "running", 2, &["a"]).await;

    assert!(store.remove_watch(JOB_A.into()).await.unwrap());
    assert!(!store.remove_watch(JOB_A.into()).await.unwrap(), "removed once");
    assert!(
        matches!(commit(store, JOB_A, "running", 1, &["a"]).await, PollWrite::Skipped),
        "no poll of a removed watch"
    );
    let given_up = store.fail_watch(JOB_A.into(), "test".into(), notification(JOB_A, 99, &["a"])).await.unwrap();
    assert_eq!(given_up, CommitOutcome::WatchGone);

    let back = store.add_watches(vec![watch(JOB_A)]).await.unwrap();
    assert_eq!(back.added, 1, "a removed watch comes back");
    let ctx = store.diff_context(JOB_A.into()).await.unwrap().unwrap();
    assert_eq!(ctx.state, WatchState::Active);
    assert_eq!(ctx.seen.event_fingerprints, vec![0, 1], "what was seen before the removal is kept");
    // The removal did not drop the deliveries already stored.
    assert_eq!(store.notifications_of(JOB_A.into()).await.unwrap().len(), 2);
}

/// A poll's decision sees the state the previous commit wrote: the read
/// and the write are one step.
pub async fn each_commit_reads_the_last_one(store: &dyn Storage) {
    store.add_watches(vec![watch(JOB_A)]).await.unwrap();
    for round in 0..5 {
        let PollWrite::Stored { before, commit: wrote, .. } = commit(store, JOB_A, "running", 1, &["a"]).await else {
            panic!("stored")
        };
        assert_eq!(before.seen.event_fingerprints.len(), round, "round {round}");
        assert_eq!(wrote.seen.event_fingerprints.len(), round + 1);
    }
    let ctx = store.diff_context(JOB_A.into()).await.unwrap().unwrap();
    assert_eq!(ctx.seen.status.as_deref(), Some("running"));
}

/// The scheduler's reads: every active watch, then only what changed.
pub async fn the_schedule_follows_changes(store: &dyn Storage) {
    store.add_watches(vec![watch(JOB_A)]).await.unwrap();
    let first = store.schedule().await.unwrap();
    assert_eq!(first.watches.iter().map(|w| w.job_id.as_str()).collect::<Vec<_>>(), [JOB_A]);
    let unchanged = store.schedule_since(first.rev).await.unwrap();
    assert!(unchanged.watches.is_empty() && unchanged.rev == first.rev, "{unchanged:?}");

    store.add_watches(vec![watch(JOB_B)]).await.unwrap();
    store.remove_watch(JOB_A.into()).await.unwrap();
    let changed = store.schedule_since(first.rev).await.unwrap();
    assert!(changed.rev > first.rev);
    let mut seen: Vec<_> = changed.watches.iter().map(|w| (w.job_id.as_str(), w.state)).collect();
    seen.sort_by_key(|(job, _)| *job);
    assert_eq!(seen, [(JOB_A, WatchState::Removed), (JOB_B, WatchState::Active)]);
}

/// A 410 pauses the webhook: the delivery stays pending, uncounted, and
/// the pause holds until resumed, once.
pub async fn a_pause_holds_until_resumed(store: &dyn Storage) {
    store.add_watches(vec![watch(JOB_A)]).await.unwrap();
    commit(store, JOB_A, "running", 1, &["a"]).await;
    let first = head(store, "a", JOB_A).await.unwrap();
    store.record_attempt(first.id, attempt(Some(410), None), DeliveryOutcome::Paused).await.unwrap();
    store.pause_webhook("a".into(), "receiver answered 410 Gone".into()).await.unwrap();
    let paused = store.paused_webhooks().await.unwrap();
    assert_eq!(paused.get("a").map(|(reason, _)| reason.as_str()), Some("receiver answered 410 Gone"));
    let still = head(store, "a", JOB_A).await.unwrap();
    assert_eq!((still.id, still.attempts), (first.id, 0), "pending, its retries untouched");

    assert!(store.resume_webhook("a".into()).await.unwrap());
    assert!(!store.resume_webhook("a".into()).await.unwrap(), "resumed once");
    assert!(store.paused_webhooks().await.unwrap().is_empty());
}

/// A delivery that ran out of retries is `failed` and leaves the chain;
/// a replay makes it pending again with the same `webhook-id`.
pub async fn a_replay_keeps_the_webhook_id(store: &dyn Storage) {
    store.add_watches(vec![watch(JOB_A)]).await.unwrap();
    commit(store, JOB_A, "running", 2, &["a"]).await;
    let first = head(store, "a", JOB_A).await.unwrap();
    store
        .record_attempt(first.id, attempt(Some(500), None), DeliveryOutcome::GaveUp { error: "HTTP 500".into() })
        .await
        .unwrap();
    let failed = store.list_deliveries(Some(DeliveryState::Failed), 10).await.unwrap();
    assert_eq!(failed.iter().map(|d| d.id).collect::<Vec<_>>(), [first.id]);
    assert_ne!(head(store, "a", JOB_A).await.unwrap().id, first.id, "the chain moves past a dead letter");

    assert_eq!(store.retry_failed(Some(first.id)).await.unwrap(), 1);
    assert_eq!(store.retry_failed(Some(first.id)).await.unwrap(), 0, "requeued once");
    let pending = store.list_deliveries(Some(DeliveryState::Pending), 10).await.unwrap();
    let replayed = pending.iter().find(|d| d.id == first.id).expect("pending again");
    assert_eq!(replayed.msg_id, first.msg_id, "the same webhook-id");
}

/// Pruning removes delivered history and ended watches past the cutoff,
/// never pending or failed work.
pub async fn pruning_keeps_work_not_done(store: &dyn Storage) {
    store.add_watches(vec![watch(JOB_A), watch(JOB_B)]).await.unwrap();
    commit(store, JOB_A, "running", 2, &["a"]).await;
    commit(store, JOB_B, "running", 1, &["a"]).await;
    let first = head(store, "a", JOB_A).await.unwrap();
    store.record_attempt(first.id, attempt(Some(200), None), DeliveryOutcome::Delivered { status: 200 }).await.unwrap();
    store.remove_watch(JOB_B.into()).await.unwrap();

    let pruned = store.prune(now_ms() + 60_000).await.unwrap();
    assert_eq!(pruned.deliveries, 1, "only the delivered one: {pruned:?}");
    let left = store.list_deliveries(None, 10).await.unwrap();
    assert_eq!(left.len(), 2, "pending work stays: {left:?}");
    assert!(left.iter().all(|d| d.state == "pending"));
    // JOB_B ended (removed) but its delivery is pending: it stays too.
    assert_eq!(store.notifications_of(JOB_B.into()).await.unwrap().len(), 1);
    let nothing = store.prune(now_ms() + 60_000).await.unwrap();
    assert_eq!(nothing.deliveries, 0, "pruning twice prunes nothing more");
}

/// A live message is kept per (job, webhook), replaced by a new one, and
/// goes with its job when the job is pruned; an edit reads the chain's
/// pending run in order and its recent events up to a delivery.
pub async fn live_messages_and_the_runs_they_cover(store: &dyn Storage) {
    store.add_watches(vec![watch(JOB_A), watch(JOB_B)]).await.unwrap();
    commit(store, JOB_A, "running", 4, &["a", "b"]).await;
    assert_eq!(store.live_message(JOB_A.into(), "a".into()).await.unwrap(), None);
    let first = LiveMessage { id: "1300000000000000001".into(), channel: None };
    store.save_live_message(JOB_A.into(), "a".into(), first.clone()).await.unwrap();
    assert_eq!(store.live_message(JOB_A.into(), "a".into()).await.unwrap(), Some(first));
    assert_eq!(store.live_message(JOB_A.into(), "b".into()).await.unwrap(), None, "per webhook");
    assert_eq!(store.live_message(JOB_B.into(), "a".into()).await.unwrap(), None, "per job");
    let slack = LiveMessage { id: "1700000000.000100".into(), channel: Some("C0123456789".into()) };
    store.save_live_message(JOB_A.into(), "a".into(), slack.clone()).await.unwrap();
    assert_eq!(store.live_message(JOB_A.into(), "a".into()).await.unwrap(), Some(slack.clone()), "replaced");

    let run = store.pending_chain(JOB_A.into(), "a".into(), 10).await.unwrap();
    assert_eq!(run.len(), 4);
    assert_eq!(run[0].id, head(store, "a", JOB_A).await.unwrap().id, "the run starts at the head");
    assert!(run.windows(2).all(|w| w[0].id < w[1].id), "in order");
    assert!(run.iter().enumerate().all(|(n, d)| d.body.contains(&format!("\"n\":{n}"))));
    assert_eq!(store.pending_chain(JOB_A.into(), "a".into(), 2).await.unwrap().len(), 2, "at most limit");
    for d in &run[..2] {
        store.record_attempt(d.id, attempt(Some(200), None), DeliveryOutcome::Delivered { status: 200 }).await.unwrap();
    }
    let rest = store.pending_chain(JOB_A.into(), "a".into(), 10).await.unwrap();
    assert_eq!(rest.iter().map(|d| d.id).collect::<Vec<_>>(), vec![run[2].id, run[3].id], "only pending ones");
    // Recent events: delivered or not, up to the delivery, oldest first, the last `limit`.
    let events = store.recent_events(JOB_A.into(), "a".into(), run[2].id, 2).await.unwrap();
    assert_eq!(events.len(), 2);
    assert!(events[0].contains("\"n\":1") && events[1].contains("\"n\":2"), "{events:?}");

    // Pruned with its job.
    for d in &rest {
        store.record_attempt(d.id, attempt(Some(200), None), DeliveryOutcome::Delivered { status: 200 }).await.unwrap();
    }
    let b_run = store.pending_chain(JOB_A.into(), "b".into(), 10).await.unwrap();
    for d in &b_run {
        store.record_attempt(d.id, attempt(Some(200), None), DeliveryOutcome::Delivered { status: 200 }).await.unwrap();
    }
    store.remove_watch(JOB_A.into()).await.unwrap();
    let pruned = store.prune(now_ms() + 60_000).await.unwrap();
    assert_eq!(pruned.watches, 1, "{pruned:?}");
    assert_eq!(store.live_message(JOB_A.into(), "a".into()).await.unwrap(), None, "pruned with its job");
}

macro_rules! conformance {
    ($engine:ident) => {
        mod $engine {
            use super::*;

            #[tokio::test]
            async fn chains_deliver_in_order() {
                if let Some(engine) = Option::<Engine>::from($engine()) {
                    super::chains_deliver_in_order(&*engine.store).await;
                }
            }

            #[tokio::test]
            async fn a_retry_holds_the_chain_and_a_rate_limit_is_not_counted() {
                if let Some(engine) = Option::<Engine>::from($engine()) {
                    super::a_retry_holds_the_chain_and_a_rate_limit_is_not_counted(&*engine.store).await;
                }
            }

            #[tokio::test]
            async fn writes_are_idempotent() {
                if let Some(engine) = Option::<Engine>::from($engine()) {
                    super::writes_are_idempotent(&*engine.store).await;
                }
            }

            #[tokio::test]
            async fn each_commit_reads_the_last_one() {
                if let Some(engine) = Option::<Engine>::from($engine()) {
                    super::each_commit_reads_the_last_one(&*engine.store).await;
                }
            }

            #[tokio::test]
            async fn the_schedule_follows_changes() {
                if let Some(engine) = Option::<Engine>::from($engine()) {
                    super::the_schedule_follows_changes(&*engine.store).await;
                }
            }

            #[tokio::test]
            async fn a_pause_holds_until_resumed() {
                if let Some(engine) = Option::<Engine>::from($engine()) {
                    super::a_pause_holds_until_resumed(&*engine.store).await;
                }
            }

            #[tokio::test]
            async fn a_replay_keeps_the_webhook_id() {
                if let Some(engine) = Option::<Engine>::from($engine()) {
                    super::a_replay_keeps_the_webhook_id(&*engine.store).await;
                }
            }

            #[tokio::test]
            async fn live_messages_and_the_runs_they_cover() {
                if let Some(engine) = Option::<Engine>::from($engine()) {
                    super::live_messages_and_the_runs_they_cover(&*engine.store).await;
                }
            }

            #[tokio::test]
            async fn pruning_keeps_work_not_done() {
                if let Some(engine) = Option::<Engine>::from($engine()) {
                    super::pruning_keeps_work_not_done(&*engine.store).await;
                }
            }
        }
    };
}

conformance!(sqlite);
conformance!(postgres);
