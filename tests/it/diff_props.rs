//! Property tests of the pure diff: whatever the polls happen to see of a
//! job's history, every event is announced exactly once, in order, and the
//! status changes follow the statuses seen.

use dari_relay::diff::{Transition, diff};
use dari_relay::upstream::StatusAnswer;
use dari_relay::vocab::SeenState;
use proptest::prelude::*;
use serde_json::{Value, json};

fn answer(status: &str, events: &[Value]) -> StatusAnswer {
    StatusAnswer { status: status.into(), events: events.to_vec(), fields: Default::default() }
}

proptest! {
    /// Polls see growing prefixes of the event list (any subset of the
    /// snapshots, repeats allowed); the announced events are exactly the
    /// final list, once each, in order.
    #[test]
    fn append_only_history_is_announced_exactly_once(
        // Small alphabet: repeated identical events are part of the test.
        events in proptest::collection::vec(0u8..4, 0..30),
        cuts in proptest::collection::vec(0usize..=30, 1..12),
    ) {
        let events: Vec<Value> = events.iter().map(|e| json!({"event_type": "step", "message": e})).collect();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(events.len())).collect();
        cuts.sort_unstable();
        cuts.push(events.len());
        let mut seen = SeenState::default();
        let mut announced = Vec::new();
        for cut in cuts {
            let a = answer("running", &events[..cut]);
            let d = diff(&seen, &a, false);
            prop_assert!(d.anomaly.is_none());
            for t in &d.transitions {
                if let Transition::Event { index } = t {
                    announced.push(*index);
                }
            }
            seen = d.state;
        }
        prop_assert_eq!(announced, (0..events.len()).collect::<Vec<_>>());
    }

    /// Arbitrary (even non-append-only) lists never make the diff announce
    /// the same content more often than it has appeared at once, and never
    /// lose content that is in the latest list.
    #[test]
    fn arbitrary_lists_never_duplicate_or_lose(
        lists in proptest::collection::vec(proptest::collection::vec(0u8..5, 0..8), 1..8),
    ) {
        let mut seen = SeenState::default();
        let mut announced: std::collections::HashMap<u8, usize> = Default::default();
        for list in &lists {
            let events: Vec<Value> = list.iter().map(|e| json!({"m": e})).collect();
            let d = diff(&seen, &answer("running", &events), false);
            for t in &d.transitions {
                if let Transition::Event { index } = t {
                    *announced.entry(list[*index]).or_default() += 1;
                }
            }
            seen = d.state;
            // Everything in the current list has been announced at least as often as it appears.
            for v in 0..5u8 {
                let present = list.iter().filter(|&&x| x == v).count();
                prop_assert!(announced.get(&v).copied().unwrap_or(0) >= present);
            }
        }
        // And nothing more often than its largest multiplicity in any list seen.
        for (v, n) in announced {
            let max = lists.iter().map(|l| l.iter().filter(|&&x| x == v).count()).max().unwrap_or(0);
            prop_assert!(n <= max, "{} announced {} times, at most {} present at once", v, n, max);
        }
    }

    /// Status changes are announced whenever the normalised status differs
    /// from the previous poll's, after that poll's events.
    #[test]
    fn status_changes_follow_the_statuses_seen(statuses in proptest::collection::vec(0usize..4, 1..10)) {
        let names = ["pending", "running", "Running", "waiting_for_input"];
        let mut seen = SeenState::default();
        let mut previous: Option<String> = None;
        for (i, s) in statuses.iter().enumerate() {
            let events: Vec<Value> = (0..=i).map(|n| json!({"n": n})).collect();
            let d = diff(&seen, &answer(names[*s], &events), false);
            let norm = names[*s].to_lowercase();
            let expect_change = previous.as_ref().map(|p| p.to_lowercase()) != Some(norm);
            let status_at_end = matches!(d.transitions.last(), Some(Transition::Status { .. }));
            prop_assert_eq!(status_at_end, expect_change);
            prop_assert_eq!(d.transitions.iter().filter(|t| matches!(t, Transition::Status { .. })).count(), expect_change as usize);
            previous = Some(names[*s].to_owned());
            seen = d.state;
        }
    }
}
