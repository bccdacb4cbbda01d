//! The diff: a pure function from the last-seen state of a job and a new
//! status answer to the ordered transitions to announce.
//!
//! Events have no ids upstream, so an event is known by its position and a
//! fingerprint (a hash of its canonical JSON). In the normal case the new
//! list starts with exactly the fingerprints already seen and everything after
//! them is new. If the list ever shrinks or an old entry changes, the diff
//! reports an [`Anomaly`] (the poller logs it) and falls back to matching
//! fingerprints as a multiset: an entry whose content was already announced is
//! never announced again, and an entry whose content was never seen is
//! announced once, so nothing is lost and nothing is duplicated.
//!
//! No I/O, no clock, no randomness: the same inputs always give the same diff.

use std::collections::HashMap;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::upstream::StatusAnswer;
use crate::vocab::{SeenState, normalize_status};

/// One thing to announce, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// `answer.events[index]` is new.
    Event { index: usize },
    /// The status changed (compared after normalisation).
    Status { previous: Option<String>, status: String },
}

/// The event list did not extend the one seen before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anomaly {
    /// The list is shorter than the number of events already seen.
    Shrunk { seen: usize, now: usize },
    /// An entry already seen changed; `index` is the first that differs.
    Rewritten { index: usize },
}

/// The result of one diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff {
    /// What to announce, events first, then the status change.
    pub transitions: Vec<Transition>,
    /// The state to store with the notifications, in the same transaction.
    pub state: SeenState,
    /// Set when the event list did not simply grow.
    pub anomaly: Option<Anomaly>,
}

/// Compares `answer` with `seen`. On the first successful poll (`seen.status`
/// is `None`) the events already present and the current status are new,
/// unless `from_now`, in which case the answer is taken as already known.
pub fn diff(seen: &SeenState, answer: &StatusAnswer, from_now: bool) -> Diff {
    let fingerprints: Vec<u64> = answer.events.iter().map(fingerprint).collect();
    let first_poll = seen.status.is_none();
    if first_poll && from_now {
        return Diff {
            transitions: Vec::new(),
            state: SeenState { status: Some(answer.status.clone()), event_fingerprints: fingerprints },
            anomaly: None,
        };
    }

    let known = &seen.event_fingerprints;
    let mut transitions = Vec::new();
    let mut state_fingerprints;
    let mut anomaly = None;
    if fingerprints.len() >= known.len() && fingerprints[..known.len()] == known[..] {
        transitions.extend((known.len()..fingerprints.len()).map(|index| Transition::Event { index }));
        state_fingerprints = fingerprints;
    } else {
        anomaly = Some(if fingerprints.len() < known.len() && fingerprints[..] == known[..fingerprints.len()] {
            Anomaly::Shrunk { seen: known.len(), now: fingerprints.len() }
        } else {
            let index = fingerprints.iter().zip(known).position(|(a, b)| a != b).unwrap_or(known.len());
            Anomaly::Rewritten { index }
        });
        let mut announced: HashMap<u64, usize> = HashMap::new();
        for fp in known {
            *announced.entry(*fp).or_default() += 1;
        }
        state_fingerprints = known.clone();
        for (index, fp) in fingerprints.iter().enumerate() {
            match announced.get_mut(fp) {
                Some(count) if *count > 0 => *count -= 1,
                _ => {
                    transitions.push(Transition::Event { index });
                    state_fingerprints.push(*fp);
                }
            }
        }
    }

    let changed = seen.status.as_deref().map(normalize_status) != Some(normalize_status(&answer.status));
    if changed {
        transitions.push(Transition::Status { previous: seen.status.clone(), status: answer.status.clone() });
    }
    Diff {
        transitions,
        state: SeenState { status: Some(answer.status.clone()), event_fingerprints: state_fingerprints },
        anomaly,
    }
}

/// A stable 64-bit fingerprint of an event: the first 8 bytes of the SHA-256
/// of its canonical JSON (object keys sorted, as serde_json's map keeps them).
/// Stored in the database, so it must not change between versions, which rules
/// out std's `DefaultHasher`.
pub fn fingerprint(event: &Value) -> u64 {
    // Streamed into the hash: no buffer per event.
    let mut hasher = Sha256::new();
    serde_json::to_writer(&mut hasher, event).expect("a JSON value serialises into a hasher");
    let digest = hasher.finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answer(status: &str, events: &[&str]) -> StatusAnswer {
        StatusAnswer {
            status: status.into(),
            events: events.iter().map(|m| json!({"event_type": "step", "message": m})).collect(),
            fields: Default::default(),
        }
    }

    fn kinds(d: &Diff) -> Vec<String> {
        d.transitions
            .iter()
            .map(|t| match t {
                Transition::Event { index } => format!("event{index}"),
                Transition::Status { status, .. } => format!("status:{status}"),
            })
            .collect()
    }

    #[test]
    fn first_poll_announces_everything_events_first() {
        let d = diff(&SeenState::default(), &answer("running", &["a", "b"]), false);
        assert_eq!(kinds(&d), ["event0", "event1", "status:running"]);
        assert_eq!(d.transitions[2], Transition::Status { previous: None, status: "running".into() });
    }

    #[test]
    fn from_now_announces_nothing_on_the_first_poll_only() {
        let d = diff(&SeenState::default(), &answer("running", &["a"]), true);
        assert!(d.transitions.is_empty());
        let d2 = diff(&d.state, &answer("completed", &["a", "b"]), true);
        assert_eq!(kinds(&d2), ["event1", "status:completed"]);
    }

    #[test]
    fn growth_announces_only_new_events() {
        let d1 = diff(&SeenState::default(), &answer("running", &["a"]), false);
        let d2 = diff(&d1.state, &answer("running", &["a", "b", "c"]), false);
        assert_eq!(kinds(&d2), ["event1", "event2"]);
        assert_eq!(d2.anomaly, None);
        let d3 = diff(&d2.state, &answer("running", &["a", "b", "c"]), false);
        assert!(d3.transitions.is_empty());
    }

    #[test]
    fn status_compared_after_normalisation() {
        let d1 = diff(&SeenState::default(), &answer("Running", &[]), false);
        assert!(diff(&d1.state, &answer("running", &[]), false).transitions.is_empty());
        assert_eq!(normalize_status("Waiting For-Input"), "waiting_for_input");
    }

    #[test]
    fn shrink_then_regrow_is_warned_and_never_duplicated() {
        let d1 = diff(&SeenState::default(), &answer("running", &["a", "b", "c"]), false);
        let d2 = diff(&d1.state, &answer("running", &["a"]), false);
        assert_eq!(d2.anomaly, Some(Anomaly::Shrunk { seen: 3, now: 1 }));
        assert!(d2.transitions.is_empty());
        let d3 = diff(&d2.state, &answer("running", &["a", "b", "c", "d"]), false);
        assert_eq!(kinds(&d3), ["event3"]);
    }

    #[test]
    fn rewritten_entry_is_announced_once_and_old_ones_never_again() {
        let d1 = diff(&SeenState::default(), &answer("running", &["a", "b"]), false);
        let d2 = diff(&d1.state, &answer("running", &["a", "B", "c"]), false);
        assert_eq!(d2.anomaly, Some(Anomaly::Rewritten { index: 1 }));
        assert_eq!(kinds(&d2), ["event1", "event2"]);
        let d3 = diff(&d2.state, &answer("running", &["a", "B", "c"]), false);
        assert!(d3.transitions.is_empty());
    }

    #[test]
    fn repeated_identical_events_are_counted() {
        let d1 = diff(&SeenState::default(), &answer("running", &["tick"]), false);
        let d2 = diff(&d1.state, &answer("running", &["tick", "tick"]), false);
        assert_eq!(kinds(&d2), ["event1"]);
    }
}
