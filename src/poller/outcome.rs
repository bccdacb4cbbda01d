//! What one poll of one watch comes to ([`PollOutcome`]) and why the relay
//! gives up on a watch ([`GiveUp`]): the types the poll's task hands back to
//! the scheduler, and the labels they are counted under.

use crate::store::StoreError;
use crate::upstream::UpstreamError;

/// What one poll of one watch came to.
#[derive(Debug)]
pub enum PollOutcome {
    /// The answer's bytes were the same as last time: nothing parsed or written.
    Unchanged,
    /// The answer changed; its state (and any notifications) are stored.
    Changed {
        /// Notifications stored.
        notifications: usize,
        /// The job reached a terminal status: polling ends.
        terminal: bool,
        /// Hash of the stored answer.
        body_hash: u64,
        /// Deliveries stored with the notifications.
        deliveries: usize,
    },
    /// The watch was removed while the request was out; nothing stored.
    Gone,
    /// The org has no credentials in the current config.
    NoCredentials,
    /// The request or its answer failed; the last-seen state is untouched.
    Failed(UpstreamError),
    /// The answer could not be stored; it will be seen again next poll.
    StoreFailed(StoreError),
    /// The relay gave up on the watch; `watch.failed` is stored with this
    /// many deliveries.
    GaveUp { deliveries: usize },
    /// The poll's task ended without an outcome (it panicked): nothing was
    /// stored, and the watch is polled again after a backoff.
    Panicked,
}

impl PollOutcome {
    /// The label under which the outcome is counted.
    pub fn label(&self) -> &'static str {
        match self {
            PollOutcome::Unchanged => "unchanged",
            PollOutcome::Changed { .. } => "changed",
            PollOutcome::Gone => "gone",
            PollOutcome::NoCredentials => "no_credentials",
            PollOutcome::Failed(e) => e.label(),
            PollOutcome::StoreFailed(_) => "store_error",
            PollOutcome::GaveUp { .. } => "gave_up",
            PollOutcome::Panicked => "panicked",
        }
    }
}

/// Why the relay gives up on a watch (`watch.failed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// Dari answered 404 for longer than `not_found_grace`.
    NotFound,
    /// The org's key was rejected for longer than `auth_grace`.
    KeyRejected,
    /// The watch is older than `max_watch_age`.
    TooOld,
}

impl GiveUp {
    /// The label used in metrics and in the `reason` of `watch.failed`.
    pub fn label(self) -> &'static str {
        match self {
            GiveUp::NotFound => "job_not_found",
            GiveUp::KeyRejected => "api_key_rejected",
            GiveUp::TooOld => "max_watch_age",
        }
    }
}
