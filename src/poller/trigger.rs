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
