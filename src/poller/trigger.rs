//! "Poll now": a request, from the inbound listener or the admin API, that a
//! watch be polled at once instead of at its scheduled time.
//!
//! A trigger only moves the watch's next poll earlier; the poll itself goes
//! through [`Poller::poll_due_once`] like any other, so the org's 429 pause,
//! its `max_requests_per_second` and `max_in_flight` all still apply.
//! Triggers of one job coalesce: a trigger while that job's poll is in
//! flight asks for one more poll when it ends (the poll out may have left
//! before the job changed), and triggers less than [`COALESCE`] after the
//! last triggered poll wait for the end of that window, so a burst of ten
//! webhooks for one job makes one or two polls, not ten.

use std::cmp::Reverse;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use super::{Poller, later};

/// The shortest time between two triggered polls of one job.
pub const COALESCE: Duration = Duration::from_secs(1);

/// How many triggers may wait for the scheduler at once. Each is a job id;
/// the inbound listener's per-source rate limit keeps this far from full in
/// any honest use, and a full queue is refused (the caller answers 429)
/// rather than grown without bound.
pub const QUEUE: usize = 4096;

/// A handle that asks the poller to poll a job now. Cheap to clone; created
/// by [`Poller::poll_now_handle`], held by the inbound listener and the admin
/// API, and dropped with them.
#[derive(Debug, Clone)]
pub struct PollNow {
    tx: mpsc::Sender<String>,
}

/// Why a trigger was not queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PollNowError {
    /// [`QUEUE`] triggers are already waiting for the scheduler.
    #[error("too many poll requests are waiting for the scheduler")]
    Busy,
    /// The poller has stopped (shutdown).
    #[error("the poller has stopped")]
    Stopped,
}

impl PollNow {
    /// Queues a "poll now" of `job_id` (a watched job's normalised UUID).
    /// Never waits: a full queue is an error for the caller to answer.
    pub fn request(&self, job_id: &str) -> Result<(), PollNowError> {
        self.tx.try_send(job_id.to_owned()).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => PollNowError::Busy,
            mpsc::error::TrySendError::Closed(_) => PollNowError::Stopped,
        })
    }

    /// A handle whose receiver is also returned, for code that wants the
    /// triggers without a poller (tests of the inbound listener's answers).
    pub fn channel() -> (PollNow, mpsc::Receiver<String>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (PollNow { tx }, rx)
    }
}

/// What the scheduler did with one trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Triggered {
    /// The watch's next poll is now (or at the end of the coalescing window).
    Scheduled,
    /// Its poll is in flight: one more follows when it ends.
    AfterFlight,
    /// The scheduler does not know the job (yet): a scan is due at once, so
    /// a watch just added (by `auto_watch`) is picked up without waiting.
    Unknown,
}

impl Poller {
    /// A handle for the inbound listener and the admin API.
    pub fn poll_now_handle(&self) -> PollNow {
        self.poll_now.clone()
    }

    /// Applies one trigger at `now`. The watch's next poll becomes
    /// `max(now, last triggered poll + COALESCE)`; earlier heap entries of
    /// the watch become stale (a new generation), so it is polled once.
    pub(super) fn trigger(&mut self, job_id: String, now: Instant) -> Triggered {
        let Some(watch) = self.watches.get_mut(&job_id) else {
            return Triggered::Unknown;
        };
        if watch.in_flight {
            watch.again = true;
            return Triggered::AfterFlight;
        }
        if watch.triggered_at.is_some_and(|at| at >= now) {
            // A triggered poll is already waiting (due now or at the end of
            // the window): this trigger is folded into it.
            return Triggered::Scheduled;
        }
        self.next_generation += 1;
        let generation = self.next_generation;
        let due = watch.triggered_at.map_or(now, |at| later(at, COALESCE).max(now));
        watch.triggered_at = Some(due);
        watch.generation = generation;
        debug!(job_id = %job_id, in_ms = due.saturating_duration_since(now).as_millis() as u64, "poll now");
        self.queue.push(Reverse((due, generation, job_id)));
        Triggered::Scheduled
    }

    /// The next poll time of a watch whose poll just ended, `due` as its
    /// outcome asks: sooner if a trigger came while it was in flight (then
    /// within the coalescing window of the last triggered poll).
    pub(super) fn due_after_flight(&mut self, job_id: &str, due: Instant, now: Instant) -> Instant {
        let Some(watch) = self.watches.get_mut(job_id).filter(|w| w.again) else {
            return due;
        };
        watch.again = false;
        let soon = watch.triggered_at.map_or(now, |at| later(at, COALESCE).max(now));
        if soon < due {
            watch.triggered_at = Some(soon);
            return soon;
        }
        due
    }
}

#[cfg(test)]
mod tests {
    //! The trigger's bookkeeping on scripted times and outcomes (the tasks
    //! a step spawns never run: these tests do not yield).

    use std::path::Path;
    use std::sync::Arc;

    use tokio::sync::{Notify, watch};

    use super::*;
    use crate::config::Config;
    use crate::health::Health;
    use crate::poller::{Finished, PollOutcome};
    use crate::store::{ScheduledWatch, Sqlite, Store};
    use crate::vocab::{WatchState, now_ms};

    const A: &str = "00000000-0000-4000-8000-0000000000a1";

    fn poller(dir: &Path) -> Poller {
        let text = format!(
            "database = \"{}\"\n[upstream]\nbase_url = \"http://127.0.0.1:9\"\npoll_interval = \"60s\"\n\
             max_poll_interval = \"60s\"\n[orgs.acme]\napi_key_env = \"KEY\"\n",
            dir.join("r.db").display()
        );
        let env = |name: &str| (name == "KEY").then(|| "k".to_owned());
        let config = Arc::new(Config::from_toml(&text, Path::new("t.toml"), &env).unwrap());
        let store = Arc::new(Sqlite(Arc::new(Store::open(&config.database).unwrap())));
        let (_, config_rx) = watch::channel(config);
        Poller::new(config_rx, store, Arc::default(), Arc::new(Health::default()), Arc::new(Notify::new())).unwrap()
    }

    fn watch_a() -> ScheduledWatch {
        ScheduledWatch {
            job_id: A.into(),
            portal: "acme/form".parse().unwrap(),
            state: WatchState::Active,
            body_hash: None,
            created_at: now_ms(),
            owned: true,
        }
    }

    /// Live heap entries of A (stale generations are skipped by the step).
    fn live(p: &Poller) -> Vec<Instant> {
        let generation = p.watches[A].generation;
        p.queue.iter().filter(|Reverse((_, g, j))| j == A && *g == generation).map(|Reverse((d, _, _))| *d).collect()
    }

    #[tokio::test]
    async fn a_burst_of_triggers_makes_one_poll_now_and_at_most_one_more() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = poller(dir.path());
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        p.schedule_new(watch_a(), t0 + Duration::from_secs(60));
        assert_eq!(p.trigger("00000000-0000-4000-8000-0000000000ff".into(), t0), Triggered::Unknown);

        // The first trigger moves the 60 s poll to now; the old entry is stale.
        assert_eq!(p.trigger(A.into(), t0), Triggered::Scheduled);
        assert_eq!(live(&p), [t0]);
        // More triggers at the same moment fold into it.
        for _ in 0..3 {
            assert_eq!(p.trigger(A.into(), t0), Triggered::Scheduled);
        }
        assert_eq!(live(&p), [t0]);
        assert_eq!(p.poll_due_once(t0), 1, "one poll starts");
        assert!(p.watches[A].in_flight);

        // Triggers during the poll ask for one more, after the window.
        for i in 1..5 {
            assert_eq!(p.trigger(A.into(), t0 + ms(10 * i)), Triggered::AfterFlight);
        }
        p.handle(Finished { job_id: A.into(), outcome: PollOutcome::Unchanged, _permit: None }, t0 + ms(100));
        assert_eq!(live(&p), [t0 + COALESCE], "one more poll, a window after the first");
        for i in 2..10 {
            assert_eq!(p.trigger(A.into(), t0 + ms(100 * i)), Triggered::Scheduled);
        }
        assert_eq!(live(&p), [t0 + COALESCE], "the rest of the second folds into it");
        assert_eq!(p.poll_due_once(t0 + ms(900)), 0);

        // The org's 429 pause still holds a triggered poll back.
        p.paused_orgs.insert("acme".into(), t0 + Duration::from_secs(5));
        assert_eq!(p.poll_due_once(t0 + COALESCE), 0, "paused: not polled");
        assert_eq!(live(&p), [t0 + Duration::from_secs(5)]);
        assert_eq!(p.poll_due_once(t0 + Duration::from_secs(5)), 1);
    }
}
