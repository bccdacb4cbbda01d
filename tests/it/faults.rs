//! Issue 3, acceptance 2: for any valid job history and any interleaving of
//! upstream faults (malformed bodies, 5xx, 429, timeouts, resets), the
//! notifications delivered are exactly those of the fault-free run, in the
//! same order, each once.
//!
//! The relay runs on paused tokio time (a current-thread runtime started
//! paused, with the fakes on it): backoffs, 429 pauses and timeouts take no
//! wall time, so 48 cases run in the time 12 took in real time. Only the
//! deliverer, on its own thread, and the writer run in real time, and the
//! wait for them is bounded in real time.

use std::collections::HashSet;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::fakes::{FakeDari, FakeReceiver, Relay, Reply, config_text, eventually};

const JOB: &str = "550e8400-e29b-41d4-a716-446655440000";
const STATUSES: [&str; 4] = ["pending", "running", "waiting_for_input", "paused"];

#[derive(Debug, Clone, Copy)]
enum Fault {
    Malformed,
    ServerError,
    RateLimited,
    Timeout,
    Reset,
}

fn fault_reply(f: Fault) -> Reply {
    match f {
        Fault::Malformed => Reply::Raw("{\"status\": \"runn".into()),
        Fault::ServerError => Reply::Status(503, None),
        Fault::RateLimited => Reply::Status(429, Some("0".into())),
        Fault::Timeout => Reply::Hang,
        Fault::Reset => Reply::Truncated,
    }
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        3 => Just(Fault::Malformed),
        3 => Just(Fault::ServerError),
        2 => Just(Fault::RateLimited),
        1 => Just(Fault::Timeout),
        2 => Just(Fault::Reset),
    ]
}

/// A job history: (status, events added) per step, ending completed.
fn history() -> impl Strategy<Value = Vec<(usize, usize)>> {
    proptest::collection::vec((0..STATUSES.len(), 0usize..3), 1..6)
}

fn state(status: &str, events: usize) -> Value {
    let events: Vec<Value> =
        (0..events).map(|i| json!({"event_type": "step", "message": format!("e{i}"), "data": {"i": i}})).collect();
    json!({"status": status, "events": events, "current_step": format!("{status} with {}", events.len())})
}

/// What a fault-free run announces, derived from the history by hand.
fn expected(steps: &[(&str, usize)]) -> Vec<String> {
    let (mut out, mut seen_events, mut seen_status) = (Vec::new(), 0, None::<&str>);
    for &(status, events) in steps {
        for i in seen_events..events {
            out.push(format!("job.event#{i}"));
        }
        seen_events = seen_events.max(events);
        if seen_status != Some(status) {
            out.push(format!("job.{status}"));
            seen_status = Some(status);
        }
    }
    out
}

async fn run_case(steps: Vec<(&'static str, usize)>, faults: Vec<(usize, Fault)>) -> Result<(), TestCaseError> {
    let mut replies = Vec::new();
    for (i, &(status, events)) in steps.iter().enumerate() {
        replies.extend(faults.iter().filter(|(at, _)| *at == i).map(|(_, f)| fault_reply(*f)));
        replies.push(Reply::Json(state(status, events)));
    }
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let mut receiver = FakeReceiver::start().await;
    let scripted = replies.len();
    dari.script(JOB, replies);
    let text = config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "")
        .replace("poll_interval = \"50ms\"", "poll_interval = \"10ms\"")
        .replace("max_poll_interval = \"400ms\"", "max_poll_interval = \"50ms\"")
        .replace("request_timeout = \"2s\"\n[delivery]", "request_timeout = \"200ms\"\n[delivery]");
    let relay = Relay::start(&text).await;
    relay.store.add_watches(&[crate::fakes::watch_on("acme/form", JOB)]).unwrap();
    // Tokio's time is paused: the poller's backoffs, the org's 429 pauses
    // and the request timeouts pass as soon as nothing else is runnable.
    // What is waited for is the deliverer (its own thread, real time) and
    // the writer; `eventually` bounds that wait in real time.
    let pending = || relay.store.delivery_counts().unwrap().get("pending").copied().unwrap_or(0);
    let mut got = Vec::new();
    eventually(
        Duration::from_secs(20),
        || "job.completed was not delivered, or deliveries stayed pending".to_owned(),
        || {
            got.extend(receiver.drain());
            got.iter().any(|r| r.kind() == "job.completed") && pending() == 0
        },
    )
    .await;
    relay.stop().await;
    prop_assert!(dari.polls(JOB) >= scripted, "every scripted answer and fault was served: {} polls", dari.polls(JOB));
    let got: Vec<_> = got.into_iter().chain(receiver.drain()).collect();
    let delivered: Vec<String> = got
        .iter()
        .map(|r| {
            let body = r.json();
            match body["data"]["event"]["index"].as_u64() {
                Some(i) => format!("job.event#{i}"),
                None => r.kind(),
            }
        })
        .collect();
    prop_assert_eq!(delivered, expected(&steps));
    let ids: HashSet<String> = got.iter().map(|r| r.header("webhook-id")).collect();
    prop_assert_eq!(ids.len(), got.len(), "every delivery is a distinct notification");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn faults_never_change_what_is_delivered(
        history in history(),
        faults in proptest::collection::vec((0usize..7, fault()), 0..6),
    ) {
        // Events only ever grow; the job ends completed with every event.
        let mut events = 0;
        let mut steps: Vec<(&'static str, usize)> = history
            .iter()
            .map(|&(s, added)| {
                events += added;
                (STATUSES[s], events)
            })
            .collect();
        steps.push(("completed", events + 1));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap();
        runtime.block_on(run_case(steps, faults))?;
    }
}

#[test]
fn expected_is_derived_by_hand() {
    let steps = [("pending", 0), ("running", 2), ("running", 2), ("completed", 3)];
    assert_eq!(
        expected(&steps),
        ["job.pending", "job.event#0", "job.event#1", "job.running", "job.event#2", "job.completed"]
    );
}
