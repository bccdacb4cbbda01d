//! The poller: one scheduler over every active watch.
//!
//! Each watch has its own next-poll time in a min-heap (one task for all
//! watches, not a sleeping task per watch). [`Poller::poll_due_once`] starts
//! a request for every due watch while `max_in_flight` permits last; each
//! request runs in its own task, which fetches the answer, skips it cheaply
//! when its raw bytes hash to the last answer's, and otherwise diffs it and
//! commits the new state with its notifications and deliveries in one
//! transaction. The task's [`PollOutcome`] comes back to the scheduler, which
//! picks the watch's next time: `poll_interval` after a change, 1.5x longer
//! after each unchanged answer (up to `max_poll_interval`), exponential
//! backoff with jitter after an error.
//!
//! Scheduling uses tokio's monotonic clock (pausable in tests); upstream
//! timestamps are data only. Watches added or removed by the CLI are picked
//! up by a cheap revision check every [`SCAN_INTERVAL`].

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug_span, error, info, warn};

use crate::config::Config;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::retry::{self, TokenBucket};
use crate::store::{PollerStore, Schedule, ScheduledWatch, StoreError};
use crate::upstream::{UpstreamClient, UpstreamError};
use crate::vocab::{PortalId, WatchState, now_ms};

mod outcome;
mod task;
#[cfg(test)]
mod tests;
mod trigger;
pub use outcome::{GiveUp, PollOutcome};
pub use trigger::{COALESCE, PollNow, PollNowError, Triggered};

/// How often the scheduler checks the database for watches added or removed
/// by the CLI. A quarter second keeps "polled within 1 second of `watch add`"
/// with room to spare, for one indexed single-row read.
pub const SCAN_INTERVAL: Duration = Duration::from_millis(250);

/// The longest wait the scheduler ever sets. Intervals and grace periods
/// come from the config, where a duration can be as long as `u64::MAX`
/// seconds: bounded to a year, no interval growth (`x1.5`) can overflow a
/// `Duration` and no deadline an `Instant`, and nobody waits for longer.
pub const LONGEST_WAIT: Duration = Duration::from_secs(365 * 86_400);

/// The shortest a watch held back (rate limit) is put off: a wait that
/// rounds to nothing would put it back as due at the same `now`, and
/// [`Poller::poll_due_once`] would pop it again without end.
const SHORTEST_WAIT: Duration = Duration::from_millis(1);

/// The slowest `max_requests_per_second` the token buckets take (one request
/// every 11.6 days): a slower configured rate is read as this, because the
/// wait for a token is `1 / rate` seconds and must fit in a `Duration`.
const SLOWEST_RATE: f64 = 1e-6;

/// `now + wait`, never overflowing: the wait is bounded by [`LONGEST_WAIT`],
/// and if even that does not fit the clock (it cannot on any real system),
/// the latest deadline that does is used. Every deadline of the scheduler
/// goes through here.
pub fn later(now: Instant, wait: Duration) -> Instant {
    let wait = wait.min(LONGEST_WAIT);
    now.checked_add(wait)
        .or_else(|| now.checked_add(Duration::from_secs(3600)))
        .or_else(|| now.checked_add(Duration::from_secs(1)))
        .unwrap_or(now)
}

/// One watch in the scheduler. Small on purpose: it exists for every active
/// watch, and the last-seen state lives in the database, not here.
#[derive(Debug)]
struct Scheduled {
    portal: Arc<PortalId>,
    body_hash: Option<u64>,
    interval: Duration,
    error_streak: u32,
    /// When the watch was added (Unix ms): `max_watch_age` is wall-clock age.
    created_at: i64,
    /// Since when Dari has answered 404 without a break.
    not_found_since: Option<Instant>,
    /// Distinguishes this watch's live heap entry from stale ones left by a
    /// removal and re-add.
    generation: u64,
    in_flight: bool,
    /// When the last poll asked by a trigger ("poll now") was due, for
    /// coalescing (see `trigger`).
    triggered_at: Option<Instant>,
    /// A trigger came while the poll was in flight: poll again when it ends.
    again: bool,
}

/// Why the scheduler's loop woke up.
enum Wake {
    /// This many polls finished (they are in the batch buffer).
    Finished(usize),
    /// The timer: a watch is due (and a permit free), or the scan is.
    Timer,
    /// This many "poll now" triggers arrived (in the trigger buffer).
    Triggered(usize),
}

/// Results sent back by poll tasks.
struct Finished {
    job_id: String,
    outcome: PollOutcome,
    /// Released when the result is handled, so `max_in_flight` also bounds
    /// finished-but-unprocessed polls. Giving up needs no request, so no permit.
    _permit: Option<OwnedSemaphorePermit>,
}

/// How a poll task reports back: [`Report::send`] with its outcome, or, if
/// the task unwinds before that, [`PollOutcome::Panicked`] from `drop`.
/// Without it a panicking poll returned its permit but no result, and its
/// watch stayed "in flight" and was never polled again, silently.
struct Report {
    /// `None` once sent.
    job_id: Option<String>,
    results: mpsc::UnboundedSender<Finished>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Report {
    fn send(mut self, outcome: PollOutcome) {
        self.deliver(outcome);
    }

    fn deliver(&mut self, outcome: PollOutcome) {
        if let Some(job_id) = self.job_id.take() {
            // The scheduler may be gone (shutdown): then nobody waits for it.
            let _ = self.results.send(Finished { job_id, outcome, _permit: self.permit.take() });
        }
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        self.deliver(PollOutcome::Panicked);
    }
}

/// The scheduler. Created by `app`, consumed by [`Poller::run`].
pub struct Poller {
    /// The live config; a SIGHUP reload replaces what it holds.
    config_rx: watch::Receiver<Arc<Config>>,
    config: Arc<Config>,
    store: Arc<dyn PollerStore>,
    client: UpstreamClient,
    /// Told whenever deliveries were stored, so they go out at once.
    wake_delivery: Arc<Notify>,
    /// `max_in_flight` permits, shared by every org.
    permits: Arc<Semaphore>,
    queue: BinaryHeap<Reverse<(Instant, u64, String)>>,
    watches: HashMap<String, Scheduled>,
    /// Orgs paused by a 429 until the given time.
    paused_orgs: HashMap<String, Instant>,
    /// Orgs whose key is being rejected, and since when; the error is logged
    /// once per org, not per poll.
    rejected_orgs: HashMap<String, Instant>,
    /// Orgs without credentials in the config, logged once each.
    unconfigured_orgs: HashSet<String>,
    /// Per-org request rate limits (`max_requests_per_second`).
    rate_limits: HashMap<String, TokenBucket>,
    /// Origin of the monotonic clock used by the token buckets, and
    /// `epoch_wall_ms` the wall-clock time then: watch ages (wall-clock, as
    /// `created_at` survives restarts) are derived from the monotonic clock,
    /// so a scheduler turn reads the clock once.
    epoch: Instant,
    epoch_wall_ms: i64,
    metrics: Arc<Metrics>,
    /// Stamped every time round the loop, for `/readyz` and the watchdog.
    health: Arc<Health>,
    next_generation: u64,
    watch_rev: i64,
    /// Turns of the loop in [`Poller::run`], for tests that check the loop
    /// sleeps when it has nothing to do (see [`Poller::turn_counter`]).
    turns: Arc<AtomicU64>,
    results_tx: mpsc::UnboundedSender<Finished>,
    results_rx: mpsc::UnboundedReceiver<Finished>,
    /// "Poll now" triggers: the handle is cloned out by
    /// [`Poller::poll_now_handle`]; the poller keeps one, so the channel
    /// stays open for its whole life.
    poll_now: PollNow,
    triggers_rx: mpsc::Receiver<String>,
}

impl Poller {
    /// A poller over `store`, with no watches loaded yet ([`Poller::run`] loads them).
    pub fn new(
        config_rx: watch::Receiver<Arc<Config>>,
        store: Arc<dyn PollerStore>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        wake_delivery: Arc<Notify>,
    ) -> Result<Poller, reqwest::Error> {
        let config = Arc::clone(&config_rx.borrow());
        let client = UpstreamClient::new(&config.upstream)?;
        let (results_tx, results_rx) = mpsc::unbounded_channel();
        let epoch = Instant::now();
        let rate_limits = rate_limits(&config, Duration::ZERO);
        let (poll_now, triggers_rx) = PollNow::channel();
        Ok(Poller {
            config_rx,
            permits: Arc::new(Semaphore::new(config.upstream.max_in_flight)),
            config,
            store,
            client,
            wake_delivery,
            queue: BinaryHeap::new(),
            watches: HashMap::new(),
            paused_orgs: HashMap::new(),
            rejected_orgs: HashMap::new(),
            unconfigured_orgs: HashSet::new(),
            rate_limits,
            epoch,
            epoch_wall_ms: now_ms(),
            metrics,
            health,
            next_generation: 0,
            watch_rev: 0,
            turns: Arc::new(AtomicU64::new(0)),
            results_tx,
            results_rx,
            poll_now,
            triggers_rx,
        })
    }

    /// A counter of the scheduler loop's turns, shared with the caller: a
    /// loop that wakes only when something can make progress turns a few
    /// times per poll and scan; one that spins turns millions of times.
    pub fn turn_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.turns)
    }

    /// Takes a reloaded config: new orgs and keys, rate limits, intervals and
    /// terminal statuses apply from the next poll. Watches keep their place.
    fn apply_config(&mut self, config: Arc<Config>) {
        let (old, new) = (&self.config.upstream, &config.upstream);
        if (&old.base_url, old.request_timeout, old.max_response_bytes)
            != (&new.base_url, new.request_timeout, new.max_response_bytes)
        {
            match UpstreamClient::new(new) {
                Ok(client) => self.client = client,
                Err(e) => error!(error = %e, "cannot rebuild the upstream client; keeping the old one"),
            }
        }
        if new.max_in_flight > old.max_in_flight {
            self.permits.add_permits(new.max_in_flight - old.max_in_flight);
        } else if new.max_in_flight < old.max_in_flight {
            // Permits out now come back and are forgotten then, so the new
            // limit holds once the polls in flight have ended.
            let shrink = old.max_in_flight - new.max_in_flight;
            let permits = Arc::clone(&self.permits);
            tokio::spawn(async move {
                if let Ok(p) = permits.acquire_many(shrink as u32).await {
                    p.forget();
                }
            });
        }
        self.rate_limits = rate_limits(&config, self.epoch.elapsed());
        if config.upstream.terminal_statuses != self.config.upstream.terminal_statuses {
            // A job resting in a status that just became terminal answers
            // the same bytes as before, which would be skipped as unchanged
            // forever: forget the hashes, so each watch's next answer is
            // parsed once and a terminal one ends the watch.
            for watch in self.watches.values_mut() {
                watch.body_hash = None;
            }
        }
        self.unconfigured_orgs.clear();
        if config.database != self.config.database {
            warn!("a new database path takes effect only after a restart");
        }
        self.config = config;
        info!(orgs = self.config.orgs.len(), "poller uses the reloaded config");
    }

    /// Polls until `shutdown` is cancelled. Polls still out at that moment are
    /// dropped: nothing of theirs was stored, so the next start redoes them.
    ///
    /// Each turn handles what finished, scans for CLI changes (and beats the
    /// heartbeat) once [`SCAN_INTERVAL`] has passed, starts what is due, and
    /// then sleeps until the next thing that can make progress: a poll
    /// finishing (which frees a permit), the earliest due watch if a permit
    /// is free to poll it, or the next scan. A due watch that cannot start
    /// (every permit busy) must not arm the timer: an overdue deadline fires
    /// at once, every turn, and the loop spins on it while the biased select
    /// never reaches anything after it (issue 10).
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), StoreError> {
        self.load().await?;
        // One timer and one cancellation future for the loop's whole life:
        // at tens of thousands of polls a second, registering a fresh timer
        // per turn was the loop's largest cost.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let timer = tokio::time::sleep_until(later(Instant::now(), SCAN_INTERVAL));
        tokio::pin!(timer);
        let mut batch = Vec::with_capacity(256);
        let mut triggered = Vec::with_capacity(64);
        // One clock reading per turn, taken when the loop wakes; it serves
        // the finished polls of this turn and the due check of the next.
        let mut now = Instant::now();
        // The scan is a deadline checked every turn, not a branch of the
        // select: a steady stream of finished polls (always ready, and
        // first in the biased order) can then never starve the scan or
        // the heartbeat that rides on it.
        let mut next_scan = now;
        loop {
            self.turns.fetch_add(1, Ordering::Relaxed);
            if self.config_rx.has_changed().unwrap_or(false) {
                let config = Arc::clone(&self.config_rx.borrow_and_update());
                self.apply_config(config);
            }
            if now >= next_scan {
                // The heartbeat rides on the scan (4 a second), not on every
                // turn: a clock read per turn was a measurable cost.
                self.health.poller_beat();
                if let Err(e) = self.scan_changes().await {
                    warn!(error = %e, "cannot read watch changes; will retry");
                }
                now = Instant::now();
                next_scan = later(now, SCAN_INTERVAL);
            }
            self.poll_due_once(now);
            let wake_at = self.next_wake(next_scan);
            if timer.deadline() != wake_at {
                timer.as_mut().reset(wake_at);
            }
            let woke_by = tokio::select! {
                // In this order, without tokio's per-turn shuffle: shutdown
                // first, so a busy loop still stops at once.
                biased;
                _ = &mut cancelled => return Ok(()),
                // Every poll that finished meanwhile, handled in one turn.
                // Triggers before results: each is one heap push, at most
                // 64 a turn, and a steady stream of results must not keep
                // a "poll now" waiting.
                n = self.triggers_rx.recv_many(&mut triggered, 64) => Wake::Triggered(n),
                n = self.results_rx.recv_many(&mut batch, 256) => Wake::Finished(n),
                _ = &mut timer => Wake::Timer,
            };
            now = Instant::now();
            if let Wake::Triggered(n) = woke_by {
                for job_id in triggered.drain(..n) {
                    if self.trigger(job_id, now) == Triggered::Unknown {
                        next_scan = now;
                    }
                }
            }
            if let Wake::Finished(n) = woke_by {
                // One wake-up of the deliverer (on its own thread) for all
                // the deliveries this turn stored, not one per poll.
                let mut stored = 0;
                for finished in batch.drain(..n) {
                    if let PollOutcome::Changed { deliveries, .. } | PollOutcome::GaveUp { deliveries } =
                        finished.outcome
                    {
                        stored += deliveries;
                    }
                    self.handle(finished, now);
                }
                if stored > 0 {
                    self.wake_delivery.notify_one();
                }
            }
        }
    }

    /// When the loop should wake if no poll finishes first: the earliest due
    /// watch while a permit is free to start it, else the next scan. With
    /// every permit busy only a finishing poll (it returns its permit) or
    /// the scan can let the loop do anything, so a watch already overdue
    /// must not set the timer then; a reload that adds permits is applied
    /// at the next scan's turn.
    fn next_wake(&self, next_scan: Instant) -> Instant {
        match self.next_due() {
            Some(due) if self.permits.available_permits() > 0 => due.min(next_scan),
            _ => next_scan,
        }
    }

    /// Loads the active watches, all due now.
    async fn load(&mut self) -> Result<(), StoreError> {
        let Schedule { rev, watches } = self.store.schedule().await?;
        self.watch_rev = rev;
        let now = Instant::now();
        for w in watches.into_iter().filter(|w| w.owned) {
            self.schedule_new(w, now);
        }
        info!(watches = self.watches.len(), "poller started");
        Ok(())
    }

    /// Starts or stops watches the CLI changed since the last scan, and
    /// those this instance took over or handed over (several instances on
    /// PostgreSQL).
    async fn scan_changes(&mut self) -> Result<(), StoreError> {
        let changed = self.store.schedule_since(self.watch_rev).await?;
        self.watch_rev = changed.rev;
        let now = Instant::now();
        for w in changed.watches {
            match (w.state, self.watches.contains_key(&w.job_id)) {
                (WatchState::Active, true) if !w.owned => {
                    info!(job_id = %w.job_id, "watch handed to another instance; polling stops here");
                    self.watches.remove(&w.job_id);
                }
                (WatchState::Active, false) if !w.owned => {}
                (WatchState::Active, false) => {
                    info!(job_id = %w.job_id, portal_id = %w.portal, "new watch");
                    self.schedule_new(w, now);
                }
                (WatchState::Active, true) => {
                    // Removed and added again between two scans: the row
                    // has a fresh age and (see Store::add_watches) no
                    // answer hash, and the schedule must follow it, or the
                    // old age gives up on the watch too early and the old
                    // hash keeps an ended job's answer looking unchanged.
                    if let Some(watch) = self.watches.get_mut(&w.job_id)
                        && watch.created_at != w.created_at
                    {
                        watch.created_at = w.created_at;
                        watch.body_hash = w.body_hash;
                    }
                }
                (_, true) => {
                    info!(job_id = %w.job_id, state = w.state.as_str(), "watch no longer active; polling stops");
                    self.watches.remove(&w.job_id);
                }
                (_, false) => {}
            }
        }
        Ok(())
    }

    fn schedule_new(&mut self, w: ScheduledWatch, due: Instant) {
        self.next_generation += 1;
        let generation = self.next_generation;
        self.queue.push(Reverse((due, generation, w.job_id.clone())));
        self.watches.insert(
            w.job_id,
            Scheduled {
                portal: Arc::new(w.portal),
                body_hash: w.body_hash,
                interval: self.config.upstream.poll_interval,
                error_streak: 0,
                created_at: w.created_at,
                not_found_since: None,
                generation,
                in_flight: false,
                triggered_at: None,
                again: false,
            },
        );
    }

    fn reschedule(&mut self, job_id: String, due: Instant) {
        if let Some(w) = self.watches.get(&job_id) {
            self.queue.push(Reverse((due, w.generation, job_id)));
        }
    }

    /// When the earliest queued poll is due, if any.
    pub fn next_due(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((due, _, _))| *due)
    }

    /// Starts a request for every watch due at `now`, while permits last.
    /// Returns how many were started. This is the scheduler's one step; the
    /// loop in [`Poller::run`] is this step plus waiting.
    pub fn poll_due_once(&mut self, now: Instant) -> usize {
        let mut started = 0;
        let since_epoch_ms = i64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(i64::MAX);
        let wall_ms = self.epoch_wall_ms.saturating_add(since_epoch_ms);
        while self.next_due().is_some_and(|due| due <= now) && self.permits.available_permits() > 0 {
            let Reverse((_, generation, job_id)) = self.queue.pop().expect("peeked");
            // Skip stale entries: a removed watch, or one re-added since.
            let Some(watch) = self.watches.get(&job_id).filter(|w| w.generation == generation && !w.in_flight) else {
                continue;
            };
            let age = Duration::from_millis(wall_ms.saturating_sub(watch.created_at).max(0) as u64);
            if age > self.config.upstream.max_watch_age {
                self.start(job_id, None, Some(GiveUp::TooOld));
                started += 1;
                continue;
            }
            let org = &watch.portal.org;
            if let Some(&until) = self.paused_orgs.get(org) {
                if until > now {
                    self.reschedule(job_id, until);
                    continue;
                }
                self.paused_orgs.remove(org);
            }
            let since_epoch = now.saturating_duration_since(self.epoch);
            if let Some(Err(wait)) = self.rate_limits.get_mut(org).map(|bucket| bucket.take(since_epoch)) {
                self.reschedule(job_id, later(now, wait.max(SHORTEST_WAIT)));
                continue;
            }
            let permit = Arc::clone(&self.permits).try_acquire_owned().expect("a permit is available");
            self.start(job_id, Some(permit), None);
            started += 1;
        }
        started
    }

    /// Spawns the task that polls a watch, or gives up on it.
    fn start(&mut self, job_id: String, permit: Option<OwnedSemaphorePermit>, give_up: Option<GiveUp>) {
        let watch = self.watches.get_mut(&job_id).expect("live entry");
        watch.in_flight = true;
        let task = PollTask {
            job_id: job_id.clone(),
            portal: Arc::clone(&watch.portal),
            last_hash: watch.body_hash,
            config: Arc::clone(&self.config),
            store: Arc::clone(&self.store),
            client: self.client.clone(),
            metrics: Arc::clone(&self.metrics),
        };
        let report = Report { job_id: Some(job_id), results: self.results_tx.clone(), permit };
        // Debug level: at tens of thousands of polls a second an info span per
        // poll is a measurable cost. Every line a poll logs at info or above
        // names its job_id itself.
        let span = debug_span!("poll", job_id = %task.job_id, portal_id = %task.portal);
        tokio::spawn(
            async move {
                let outcome = match give_up {
                    None => task.poll().await,
                    Some(reason) => task.give_up(reason).await,
                };
                report.send(outcome);
            }
            .instrument(span),
        );
    }

    /// Applies a finished poll to its watch's schedule.
    fn handle(&mut self, finished: Finished, now: Instant) {
        let Finished { job_id, outcome, .. } = finished;
        let up = &self.config.upstream;
        // The config's intervals, bounded so that no growth or backoff
        // arithmetic on them can overflow (see LONGEST_WAIT).
        let (base, cap) = (up.poll_interval.min(LONGEST_WAIT), up.max_poll_interval.min(LONGEST_WAIT));
        let backoff = |streak: u32| retry::error_backoff(streak, base, cap, fastrand::f64());
        if matches!(outcome, PollOutcome::StoreFailed(StoreError::Fenced)) {
            // Another instance owns the watch now (several instances on
            // PostgreSQL): nothing of this poll was stored, and the owner
            // polls it from here.
            info!(job_id = %job_id, "another instance owns this watch now; polling stops here");
            self.watches.remove(&job_id);
            return;
        }
        let Some(watch) = self.watches.get_mut(&job_id) else {
            return; // removed while in flight
        };
        watch.in_flight = false;
        // Borrowed from the watch's shared portal: no copy of the org on
        // this per-poll path; owned copies only where an org is remembered.
        let portal = Arc::clone(&watch.portal);
        let org = portal.org.as_str();
        self.metrics.poll(org, outcome.label());
        if matches!(outcome, PollOutcome::Unchanged | PollOutcome::Changed { .. }) {
            watch.error_streak = 0;
            watch.not_found_since = None;
            if self.rejected_orgs.remove(org).is_some() {
                info!(org_id = %org, "Dari accepts the org's API key again");
            }
        }
        let delay = match outcome {
            PollOutcome::Unchanged => {
                watch.interval = retry::next_poll_interval(watch.interval.min(cap), false, base, cap);
                watch.interval
            }
            PollOutcome::Changed { terminal: true, notifications, .. } => {
                info!(job_id = %job_id, notifications, "job reached a terminal status; polling ends");
                self.watches.remove(&job_id);
                return;
            }
            PollOutcome::Changed { body_hash, .. } => {
                watch.body_hash = Some(body_hash);
                watch.interval = base;
                watch.interval
            }
            PollOutcome::Gone | PollOutcome::GaveUp { .. } => {
                self.watches.remove(&job_id);
                return;
            }
            PollOutcome::NoCredentials => {
                if self.unconfigured_orgs.insert(org.to_owned()) {
                    error!(org_id = %org, "the config has no [orgs.{org}] table: its watches wait at max_poll_interval");
                }
                cap
            }
            PollOutcome::Failed(UpstreamError::Unauthorized(status)) => {
                let since = *self.rejected_orgs.entry(org.to_owned()).or_insert_with(|| {
                    error!(org_id = %org, status, "Dari rejected the org's API key; its watches are polled at max_poll_interval until it is accepted");
                    now
                });
                if now.saturating_duration_since(since) >= up.auth_grace {
                    self.start(job_id, None, Some(GiveUp::KeyRejected));
                    return;
                }
                cap
            }
            PollOutcome::Failed(UpstreamError::NotFound) => {
                let since = *watch.not_found_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= up.not_found_grace {
                    self.start(job_id, None, Some(GiveUp::NotFound));
                    return;
                }
                watch.error_streak = watch.error_streak.saturating_add(1);
                let wait = backoff(watch.error_streak);
                info!(job_id = %job_id, retry_in_ms = wait.as_millis() as u64, "job not found (yet)");
                wait
            }
            PollOutcome::Failed(UpstreamError::RateLimited { retry_after }) => {
                watch.error_streak = watch.error_streak.saturating_add(1);
                // Dari's Retry-After is already bounded by the parser; clamped
                // again here because this is where it becomes a pause of a
                // whole org: never zero (a tight loop against a struggling
                // Dari), never past the hour (an org silenced until restart).
                let wait = retry_after.map_or_else(|| backoff(watch.error_streak), retry::clamp_retry_after);
                warn!(job_id = %job_id, org_id = %org, wait_ms = wait.as_millis() as u64, "rate limited (429): pausing every poll of the org");
                let until = later(now, wait);
                let paused = self.paused_orgs.entry(org.to_owned()).or_insert(until);
                *paused = (*paused).max(until);
                wait
            }
            PollOutcome::Failed(e) => {
                watch.error_streak = watch.error_streak.saturating_add(1);
                let wait = backoff(watch.error_streak);
                warn!(job_id = %job_id, error = %e, kind = e.label(), streak = watch.error_streak, retry_in_ms = wait.as_millis() as u64, "poll failed");
                wait
            }
            PollOutcome::Panicked => {
                watch.error_streak = watch.error_streak.saturating_add(1);
                let wait = backoff(watch.error_streak);
                error!(job_id = %job_id, retry_in_ms = wait.as_millis() as u64, "the poll's task panicked; nothing was stored, polling again later");
                wait
            }
            PollOutcome::StoreFailed(e) => {
                watch.error_streak = watch.error_streak.saturating_add(1);
                let wait = backoff(watch.error_streak);
                error!(job_id = %job_id, error = %e, "cannot store the poll's result; the change will be seen again");
                wait
            }
        };
        let due = self.due_after_flight(&job_id, later(now, delay), now);
        self.reschedule(job_id, due);
    }
}

/// One token bucket per org with a `max_requests_per_second`.
fn rate_limits(config: &Config, now: Duration) -> HashMap<String, TokenBucket> {
    config
        .orgs
        .values()
        .filter_map(|o| Some((o.id.clone(), TokenBucket::new(o.max_requests_per_second?.max(SLOWEST_RATE), now))))
        .collect()
}

use task::PollTask;
pub use task::new_msg_id;
