//! The scheduler's step and its bookkeeping, driven with scripted times
//! and outcomes (no request is ever answered: the tasks a step spawns
//! never get to run, because these tests do not yield).

use std::path::Path;
use std::time::SystemTime;

use super::*;
use crate::store::{Sqlite, Store};

const A: &str = "00000000-0000-4000-8000-00000000000a";
const B: &str = "00000000-0000-4000-8000-00000000000b";

fn poller(dir: &Path, upstream: &str) -> Poller {
    poller_with(dir, upstream, |_| {})
}

/// A poller whose resolved config `adjust` may push past the config's
/// own bounds, to test the scheduler's arithmetic behind them.
fn poller_with(dir: &Path, upstream: &str, adjust: impl FnOnce(&mut Config)) -> Poller {
    let text = format!(
        "database = \"{}\"\n[upstream]\nbase_url = \"http://127.0.0.1:9\"\n{upstream}\n\
             [orgs.acme]\napi_key_env = \"KEY\"\n",
        dir.join("r.db").display()
    );
    let env = |name: &str| (name == "KEY").then(|| "k".to_owned());
    let mut config = Config::from_toml(&text, Path::new("t.toml"), &env).unwrap();
    adjust(&mut config);
    let config = Arc::new(config);
    let store = Arc::new(Sqlite(Arc::new(Store::open(&config.database).unwrap())));
    let (_, config_rx) = watch::channel(config);
    let health = Arc::new(Health::default());
    Poller::new(config_rx, store, Arc::new(Metrics::default()), health, Arc::new(Notify::new())).unwrap()
}

fn scheduled(job_id: &str) -> ScheduledWatch {
    ScheduledWatch {
        job_id: job_id.into(),
        portal: "acme/form".parse().unwrap(),
        state: WatchState::Active,
        body_hash: None,
        created_at: now_ms(),
        owned: true,
    }
}

fn finished(job_id: &str, outcome: PollOutcome) -> Finished {
    Finished { job_id: job_id.into(), outcome, _permit: None }
}

fn rate_limited(retry_after: Option<Duration>) -> PollOutcome {
    PollOutcome::Failed(UpstreamError::RateLimited { retry_after })
}

/// A poll task that unwinds still reports, as `Panicked`, with its
/// permit; the watch is then polled again after a backoff instead of
/// staying "in flight" forever.
#[tokio::test]
async fn a_panicking_poll_reports_and_its_watch_is_polled_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = poller(dir.path(), "max_in_flight = 1");
    let now = Instant::now();
    p.schedule_new(scheduled(A), now);
    p.watches.get_mut(A).unwrap().in_flight = true;
    let permit = Arc::clone(&p.permits).try_acquire_owned().unwrap();
    let report = Report { job_id: Some(A.into()), results: p.results_tx.clone(), permit: Some(permit) };
    let task = tokio::spawn(async move {
        let _report = report;
        panic!("a bug in a poll");
    });
    assert!(task.await.unwrap_err().is_panic());
    let finished = p.results_rx.try_recv().expect("the panicked task reported");
    assert!(matches!(finished.outcome, PollOutcome::Panicked));
    p.queue.clear();
    p.handle(finished, now);
    assert_eq!(p.permits.available_permits(), 1, "the permit came back");
    assert!(!p.watches[A].in_flight);
    let due = p.next_due().expect("rescheduled");
    assert!(due > now && due <= now + Duration::from_secs(60));
}

#[tokio::test]
async fn later_saturates_instead_of_overflowing() {
    let now = Instant::now();
    assert_eq!(later(now, Duration::MAX), now + LONGEST_WAIT);
    assert_eq!(later(now, Duration::from_secs(2)), now + Duration::from_secs(2));
}

/// Item B: Dari's `Retry-After: 18446744073709551615` (and any wait the
/// poller is handed, even `Duration::MAX` or zero) pauses the whole org
/// for a bounded time: every watch of it waits, and all are polled again
/// once the pause ends. Before, `now + wait` panicked on the huge value
/// and a zero wait paused nothing.
#[tokio::test]
async fn a_429_pauses_the_org_for_a_bounded_time_then_polling_resumes() {
    let huge = retry::parse_retry_after("18446744073709551615", SystemTime::now());
    for (retry_after, pause) in [
        (huge, retry::RETRY_AFTER_MAX),
        (Some(Duration::MAX), retry::RETRY_AFTER_MAX),
        (Some(Duration::ZERO), retry::RETRY_AFTER_MIN),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut p = poller(dir.path(), "");
        let now = Instant::now();
        p.schedule_new(scheduled(A), now);
        assert_eq!(p.poll_due_once(now), 1, "A's request goes out");
        p.schedule_new(scheduled(B), now);
        p.handle(finished(A, rate_limited(retry_after)), now);
        assert_eq!(p.paused_orgs["acme"], now + pause, "{retry_after:?}");
        assert_eq!(p.poll_due_once(now), 0, "B waits for the org's pause");
        assert_eq!(p.next_due(), Some(now + pause));
        assert_eq!(p.poll_due_once(now + pause - Duration::from_millis(1)), 0);
        assert_eq!(p.poll_due_once(now + pause), 2, "both are polled when the pause ends");
    }
}

/// Item B, the config side: durations in the config can be as long as
/// `u64::MAX` seconds. Quiet answers grow the interval by 1.5x and
/// errors back off; neither the growth nor any deadline may overflow
/// (before, `mul_f64` and `Instant + Duration` panicked).
#[tokio::test]
async fn intervals_near_duration_max_never_overflow() {
    let dir = tempfile::tempdir().unwrap();
    // The config refuses such values (its bounds); the scheduler must
    // survive them anyway, as a second line of defence.
    let mut p = poller_with(dir.path(), "poll_interval = \"1s\"", |c| {
        let far = Duration::from_secs(500_000_000_000 * 365 * 86_400);
        c.upstream.max_poll_interval = far;
        c.upstream.not_found_grace = far;
        c.upstream.auth_grace = far;
    });
    let now = Instant::now();
    p.schedule_new(scheduled(A), now);
    assert_eq!(p.poll_due_once(now), 1);
    let outcomes = [
        || PollOutcome::Unchanged,
        || PollOutcome::Failed(UpstreamError::Status(500)),
        || PollOutcome::Failed(UpstreamError::NotFound),
        || PollOutcome::Failed(UpstreamError::Unauthorized(401)),
        || PollOutcome::NoCredentials,
    ];
    for outcome in outcomes {
        for _ in 0..200 {
            p.handle(finished(A, outcome()), now);
            p.queue.clear();
        }
    }
    p.handle(finished(A, PollOutcome::Unchanged), now);
    assert_eq!(p.next_due(), Some(now + LONGEST_WAIT));
}

/// A watch held back by its org's token bucket is put off by at least
/// `SHORTEST_WAIT`, never to the same `now`, so one step always ends.
/// A third of a second after a 3-per-second bucket emptied, it holds
/// 0.999999999 tokens: the wait for the next one rounds to 0 ns, and
/// before the fix the step popped the watch again without end.
#[tokio::test]
async fn a_rate_limited_watch_is_put_off_not_popped_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = poller(dir.path(), "");
    p.rate_limits.insert("acme".into(), TokenBucket::new(3.0, Duration::ZERO));
    let bucket = p.rate_limits.get_mut("acme").unwrap();
    while bucket.take(Duration::ZERO).is_ok() {}
    let now = p.epoch + Duration::from_nanos(333_333_333);
    assert_eq!(bucket.clone().take(now - p.epoch), Err(Duration::ZERO), "the sliver this test is about");
    p.schedule_new(scheduled(A), now);
    assert_eq!(p.poll_due_once(now), 0);
    assert!(p.next_due().unwrap() >= now + SHORTEST_WAIT);
}

/// The give-up a scripted step started: its task's outcome, once it ran.
async fn give_up_outcome(p: &mut Poller) -> PollOutcome {
    p.results_rx.recv().await.expect("the give-up task reports").outcome
}

/// The 404 grace period on a scripted clock: a job Dari does not know
/// is polled again with a backoff for `not_found_grace`, then given up
/// on with `watch.failed` stored; an answer within the grace period
/// starts the count again. No real time passes.
#[tokio::test]
async fn a_job_not_found_is_given_up_only_after_its_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = poller(dir.path(), "poll_interval = \"1s\"\nmax_poll_interval = \"30s\"\nnot_found_grace = \"10m\"");
    let store = Store::open(&p.config.database).unwrap();
    store
        .add_watches(&[crate::vocab::NewWatch {
            job_id: A.into(),
            portal: "acme/form".parse().unwrap(),
            webhooks: None,
            labels: Default::default(),
            from_now: false,
        }])
        .unwrap();
    let t0 = Instant::now();
    p.schedule_new(scheduled(A), t0);
    p.queue.clear();
    let not_found = || PollOutcome::Failed(UpstreamError::NotFound);
    for minute in [0, 3, 6, 9] {
        let now = t0 + Duration::from_secs(60 * minute);
        p.handle(finished(A, not_found()), now);
        let watch = &p.watches[A];
        assert!(!watch.in_flight, "minute {minute}: still polled, not given up");
        let due = p.next_due().unwrap();
        assert!(due > now && due <= now + Duration::from_secs(30), "minute {minute}: backoff within the cap");
        p.queue.clear();
    }
    // Found once: the grace period starts again from the next 404.
    p.handle(finished(A, PollOutcome::Unchanged), t0 + Duration::from_secs(9 * 60 + 30));
    p.queue.clear();
    p.handle(finished(A, not_found()), t0 + Duration::from_secs(10 * 60));
    assert!(!p.watches[A].in_flight, "the count started again");
    p.queue.clear();
    p.handle(finished(A, not_found()), t0 + Duration::from_secs(20 * 60));
    assert!(p.watches[A].in_flight, "ten minutes of 404s: the give-up starts");
    assert!(matches!(give_up_outcome(&mut p).await, PollOutcome::GaveUp { .. }));
    assert_eq!(store.list_watches(true).unwrap()[0].state, "failed");
    let stored = store.notifications_of(A).unwrap();
    assert_eq!(stored.iter().map(|n| n.kind.as_str()).collect::<Vec<_>>(), ["watch.failed"]);
    assert!(stored[0].body.contains("\"reason\":\"job_not_found\""), "{}", stored[0].body);
}

/// The 401/403 grace period on a scripted clock: an org whose key Dari
/// rejects has its watches polled at `max_poll_interval` for
/// `auth_grace`, counted from the org's first rejection, then each is
/// given up on; an accepted answer forgets the rejection.
#[tokio::test]
async fn a_rejected_key_waits_out_the_auth_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = poller(dir.path(), "poll_interval = \"1s\"\nmax_poll_interval = \"1m\"\nauth_grace = \"1h\"");
    let t0 = Instant::now();
    p.schedule_new(scheduled(A), t0);
    p.schedule_new(scheduled(B), t0);
    p.queue.clear();
    let rejected = || PollOutcome::Failed(UpstreamError::Unauthorized(401));
    p.handle(finished(A, rejected()), t0);
    assert_eq!(p.rejected_orgs["acme"], t0);
    p.queue.clear();
    p.handle(finished(B, rejected()), t0 + Duration::from_secs(30 * 60));
    assert_eq!(p.next_due(), Some(t0 + Duration::from_secs(31 * 60)), "polled at max_poll_interval");
    assert!(!p.watches[B].in_flight);
    p.queue.clear();
    // An accepted answer (another watch of the org) forgets it.
    p.handle(finished(A, PollOutcome::Unchanged), t0 + Duration::from_secs(50 * 60));
    assert!(!p.rejected_orgs.contains_key("acme"));
    p.queue.clear();
    p.handle(finished(B, rejected()), t0 + Duration::from_secs(70 * 60));
    assert!(!p.watches[B].in_flight, "the hour counts from the new first rejection");
    p.queue.clear();
    p.handle(finished(B, rejected()), t0 + Duration::from_secs(130 * 60));
    assert!(p.watches[B].in_flight, "an hour of rejections: the give-up starts");
    // The watch is not in this test's database: the give-up finds it gone.
    assert!(matches!(give_up_outcome(&mut p).await, PollOutcome::Gone));
}
