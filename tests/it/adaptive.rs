//! Issue 13, deliveries that keep up with slow, struggling and far-behind
//! receivers: adaptive concurrency against a 250 ms receiver and against one
//! that refuses past 8 open requests, a 429 storm that spends no retry, and
//! Discord's rate-limit window honoured before a 429.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::fakes::{FakeDari, Relay, Reply, config_text, eventually, watch_on};
use dari_relay::vocab::DeliveryState;

/// One request a [`CountingReceiver`] got.
#[derive(Debug, Clone)]
struct Seen {
    job_id: String,
    /// The event's index, or `None` for the status notification.
    event: Option<u64>,
    msg_id: String,
    /// Requests open at its arrival, itself included.
    open: usize,
    status: u16,
    at: Instant,
}

/// How a [`CountingReceiver`] answers a request, given how many are open
/// (itself included) and how many it got before: (status, delay, headers).
type Answer = Arc<dyn Fn(usize, usize) -> (u16, Duration, Vec<(&'static str, String)>) + Send + Sync>;

/// A receiver on 127.0.0.1:0 that counts the requests it has open.
struct CountingReceiver {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    peak: Arc<AtomicUsize>,
}

impl CountingReceiver {
    async fn start(answer: Answer) -> CountingReceiver {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let open = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (s, o, p) = (Arc::clone(&seen), Arc::clone(&open), Arc::clone(&peak));
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let (seen, open, peak, answer) = (Arc::clone(&s), Arc::clone(&o), Arc::clone(&p), Arc::clone(&answer));
                async move {
                    let now_open = open.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now_open, Ordering::SeqCst);
                    let body: Value = serde_json::from_str(&body).unwrap();
                    let before = seen.lock().unwrap().len();
                    let (status, delay, extra) = answer(now_open, before);
                    seen.lock().unwrap().push(Seen {
                        job_id: body["data"]["job_id"].as_str().unwrap().to_owned(),
                        event: body["data"]["event"]["index"].as_u64(),
                        msg_id: headers["webhook-id"].to_str().unwrap().to_owned(),
                        open: now_open,
                        status,
                        at: Instant::now(),
                    });
                    tokio::time::sleep(delay).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                    let mut response: Response = StatusCode::from_u16(status).unwrap().into_response();
                    for (name, value) in extra {
                        response.headers_mut().insert(name, value.parse().unwrap());
                    }
                    response
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        CountingReceiver { url, seen, peak }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn job_id(i: usize) -> String {
    format!("{i:08x}-0000-4000-8000-00000000ad13")
}

/// A running job with `events` events: each becomes a `job.event`, then its
/// status a `job.running`, all on the first poll.
fn busy_job(events: usize) -> Reply {
    let events: Vec<Value> = (0..events).map(|i| json!({"event_type": "step", "message": format!("e{i}")})).collect();
    Reply::Json(json!({"status": "running", "events": events}))
}

/// Every notification reached the receiver with a 2xx, once its earlier
/// ones had: per job, the 2xx answers are events 0.. in order, then the
/// status; and no request of a job was sent while an earlier one of the
/// same job was unanswered (one attempt in flight per chain), which the
/// order of 2xx answers and arrivals shows.
fn assert_in_order(seen: &[Seen], jobs: usize, events: usize) {
    let mut per_job: HashMap<&str, Vec<&Seen>> = HashMap::new();
    for s in seen {
        per_job.entry(&s.job_id).or_default().push(s);
    }
    assert_eq!(per_job.len(), jobs, "every job's chain was delivered");
    for (job, requests) in per_job {
        let delivered: Vec<Option<u64>> =
            requests.iter().filter(|s| (200..300).contains(&s.status)).map(|s| s.event).collect();
        let mut expected: Vec<Option<u64>> = (0..events as u64).map(Some).collect();
        expected.push(None);
        assert_eq!(delivered, expected, "job {job}: every notification delivered once, in order");
        // A refused request is tried again before anything later is sent.
        let sent: Vec<Option<u64>> = requests.iter().map(|s| s.event).collect();
        let mut dedup = sent.clone();
        dedup.dedup();
        assert_eq!(dedup, expected, "job {job}: retries stay in place, nothing overtakes");
        let ids: std::collections::BTreeSet<&str> = requests.iter().map(|s| s.msg_id.as_str()).collect();
        assert_eq!(ids.len(), events + 1, "job {job}: one webhook-id per notification, the same on every retry");
    }
}

/// Acceptance 1: 32 chains and a receiver that answers in 250 ms. With v1's
/// fixed 4 in flight this took 8 times as long; now the relay opens at
/// least 16 requests at once and the backlog drains within 10% of what 32
/// parallel chains allow (each chain strictly one at a time, in order).
///
/// What they allow is measured, not assumed: 32 control chains of the same
/// length run alongside, each to a webhook of its own, where adaptation
/// never holds one back (a webhook starts at 10 attempts at once and each
/// has one chain). Both groups share the host, the writer and its group
/// commits at the same moment, so the bar is the adaptation's share of the
/// time, not the host's: on a loaded CI host the relay's own time per
/// delivery grows for both alike (a single control chain, used before,
/// paid less of the writer's queue than 32 chains do, and the bar failed
/// on load, not on adaptation). The strict 60 x 250 ms is printed too.
#[tokio::test]
async fn thirty_two_chains_to_a_250ms_receiver_run_in_parallel() {
    const JOBS: usize = 32;
    const EVENTS: usize = 59; // 60 notifications per chain: 15 s at 250 ms each
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let receiver = CountingReceiver::start(Arc::new(|_, _| (204, Duration::from_millis(250), vec![]))).await;
    let control = CountingReceiver::start(Arc::new(|_, _| (204, Duration::from_millis(250), vec![]))).await;
    for i in 0..2 * JOBS {
        dari.script(&job_id(i), vec![busy_job(EVENTS)]);
    }
    let mut text = config_text(&dir.path().join("r.db"), &dari, &[], "")
        + &format!("[[webhooks]]\nname = \"slow\"\nurl = \"{}\"\nportals = [\"acme/form\"]\n", receiver.url);
    for c in 0..JOBS {
        text += &format!(
            "[[webhooks]]\nname = \"control{c}\"\nurl = \"{}\"\nportals = [\"acme/control{c}\"]\n",
            control.url
        );
    }
    let relay = Relay::start(&text).await;
    let mut watches: Vec<_> = (0..JOBS).map(|i| watch_on("acme/form", &job_id(i))).collect();
    watches.extend((0..JOBS).map(|c| watch_on(&format!("acme/control{c}"), &job_id(JOBS + c))));
    relay.store.add_watches(&watches).unwrap();
    let total = JOBS * (EVENTS + 1);
    eventually(
        Duration::from_secs(60),
        || format!("{} and {} of {total} delivered", receiver.seen().len(), control.seen().len()),
        || receiver.seen().len() >= total && control.seen().len() >= total,
    )
    .await;
    relay.settle().await;
    let span = |seen: &[Seen]| {
        let first = seen.iter().map(|s| s.at).min().unwrap();
        let last = seen.iter().map(|s| s.at).max().unwrap() + Duration::from_millis(250);
        (first, last - first)
    };
    let seen = receiver.seen();
    let (first, took) = span(&seen);
    let alone = control.seen();
    assert_in_order(&alone, JOBS, EVENTS);
    let (_, allowed) = span(&alone);
    let ideal = Duration::from_millis(250) * (EVENTS as u32 + 1);
    let peak = receiver.peak.load(Ordering::SeqCst);
    let starts: Vec<u128> = (0..JOBS)
        .map(|i| (seen.iter().filter(|s| s.job_id == job_id(i)).map(|s| s.at).min().unwrap() - first).as_millis())
        .collect();
    let mut opens: Vec<usize> = seen.iter().map(|s| s.open).collect();
    opens.truncate(200);
    let gaps = |seen: &[Seen], jobs: std::ops::Range<usize>| {
        let mut gaps: Vec<u128> = Vec::new();
        for i in jobs {
            let at: Vec<Instant> = seen.iter().filter(|s| s.job_id == job_id(i)).map(|s| s.at).collect();
            gaps.extend(at.windows(2).map(|w| (w[1] - w[0]).as_millis().saturating_sub(250)));
        }
        gaps.sort();
        let q = |p: usize| gaps[(gaps.len() * p / 100).min(gaps.len() - 1)];
        format!("p10 {} p50 {} p90 {} p99 {} max {}", q(10), q(50), q(90), q(99), q(100))
    };
    let report = format!(
        "32 chains x 60 at 250 ms: {took:?}; 32 control chains: {allowed:?} (strictly {ideal:?}); peak {peak} open\n\
         chain starts (ms) {starts:?}\nopen at arrival {opens:?}\n\
         gap over 250 ms (ms), adaptive: {}; control: {}",
        gaps(&seen, 0..JOBS),
        gaps(&alone, JOBS..2 * JOBS),
    );
    eprintln!("{report}");
    assert!(peak >= 16, "at least 16 requests open at once, saw {peak}\n{report}");
    assert!(peak <= JOBS, "never more than one attempt per chain: {peak}\n{report}");
    assert!(
        took <= allowed.max(ideal).mul_f64(1.1),
        "took {took:?}, 32 parallel chains allow {allowed:?} (strictly {ideal:?})\n{report}"
    );
    assert_in_order(&seen, JOBS, EVENTS);
    let gauge = relay.metrics.webhook_concurrency("slow").unwrap();
    assert!(gauge >= 16, "the gauge shows the grown limit: {gauge}");
    // What `webhooks list` shows: the value the deliverer publishes every 5 s.
    let published = relay.store.webhook_concurrency().unwrap()["slow"].0;
    assert!(published >= 16, "published for `webhooks list`: {published}");
    relay.stop().await;
}

/// Acceptance 2: a receiver that answers 503 whenever more than 8 of its
/// requests are open. The relay settles at or below 8: once it has adapted
/// (the second half of the run), fewer than 10% of its attempts are refused;
/// and every notification is delivered, in order.
#[tokio::test]
async fn a_receiver_that_refuses_past_eight_open_gets_at_most_eight() {
    const JOBS: usize = 16;
    const EVENTS: usize = 24;
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let receiver = CountingReceiver::start(Arc::new(|open, _| {
        if open > 8 { (503, Duration::ZERO, vec![]) } else { (204, Duration::from_millis(100), vec![]) }
    }))
    .await;
    for i in 0..JOBS {
        dari.script(&job_id(i), vec![busy_job(EVENTS)]);
    }
    let schedule = format!("retry_schedule = [{}]\n", vec!["\"20ms\""; 60].join(", "));
    let text = config_text(&dir.path().join("r.db"), &dari, &[("small", &receiver.url)], "")
        .replace("retry_schedule = [\"100ms\", \"200ms\", \"300ms\"]\n", &schedule);
    let relay = Relay::start(&text).await;
    let watches: Vec<_> = (0..JOBS).map(|i| watch_on("acme/form", &job_id(i))).collect();
    relay.store.add_watches(&watches).unwrap();
    let total = JOBS * (EVENTS + 1);
    let delivered = || receiver.seen().iter().filter(|s| s.status == 204).count();
    eventually(Duration::from_secs(30), || format!("{} of {total} delivered", delivered()), || delivered() >= total)
        .await;
    relay.settle().await;
    let seen = receiver.seen();
    let later = &seen[seen.len() / 2..];
    let refused = later.iter().filter(|s| s.status == 503).count();
    let all_refused = seen.iter().filter(|s| s.status == 503).count();
    eprintln!("refused: {all_refused} of {} in all, {refused} of {} once adapted", seen.len(), later.len());
    assert!(refused * 10 < later.len(), "{refused} of {} attempts refused once adapted", later.len());
    let over = later.iter().filter(|s| s.open > 9).count();
    assert_eq!(over, 0, "once adapted, at most one request past the 8 is ever tried at once");
    assert_in_order(&seen, JOBS, EVENTS);
    assert_eq!(relay.store.delivery_counts().unwrap().get("failed"), None, "nothing gave up");
    relay.stop().await;
}

/// Acceptance 3 through the relay: 429s with `Retry-After: 0`, then a 2xx.
/// Each 429 waits the 1 s minimum and slows the webhook, without spending
/// any of the schedule's two retries: the delivery ends `delivered` after
/// one counted attempt. Three of them here, a second of real time each (the
/// 1 s floor is the point); the twenty of the acceptance run on paused time
/// in `deliver::tests::twenty_rate_limits_wait_a_second_each_and_spend_no_retry`.
#[tokio::test]
async fn rate_limits_spend_no_retry() {
    const RATE_LIMITS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let receiver = CountingReceiver::start(Arc::new(|_, before| {
        if before < RATE_LIMITS {
            (429, Duration::ZERO, vec![("retry-after", "0".to_owned())])
        } else {
            (204, Duration::ZERO, vec![])
        }
    }))
    .await;
    let job = job_id(1);
    dari.script(&job, vec![Reply::Json(json!({"status": "completed", "events": []}))]);
    // Two retries, and a schedule long enough (60 s) for the 1 s waits.
    let text = config_text(&dir.path().join("r.db"), &dari, &[("limited", &receiver.url)], "")
        .replace("retry_schedule = [\"100ms\", \"200ms\", \"300ms\"]", "retry_schedule = [\"30s\", \"30s\"]");
    let relay = Relay::start(&text).await;
    relay.store.add_watches(&[watch_on("acme/form", &job)]).unwrap();
    eventually(
        Duration::from_secs(40),
        || format!("{} requests", receiver.seen().len()),
        || {
            relay
                .store
                .notifications_of(&job)
                .unwrap()
                .first()
                .is_some_and(|n| n.deliveries[0].state == DeliveryState::Delivered)
        },
    )
    .await;
    let seen = receiver.seen();
    let statuses: Vec<u16> = seen.iter().map(|s| s.status).collect();
    assert_eq!(statuses.len(), RATE_LIMITS + 1, "{statuses:?}");
    assert!(statuses[..RATE_LIMITS].iter().all(|&s| s == 429) && statuses[RATE_LIMITS] == 204, "{statuses:?}");
    let delivery = &relay.store.notifications_of(&job).unwrap()[0].deliveries[0];
    assert_eq!(delivery.attempts, 1, "only the 2xx counted: no retry used up");
    for pair in seen.windows(2) {
        assert!(pair[1].at - pair[0].at >= Duration::from_millis(950), "Retry-After: 0 waits the 1 s minimum");
    }
    relay.stop().await;
}

/// Discord's window: a receiver that says `X-RateLimit-Remaining: 0` and
/// `X-RateLimit-Reset-After: 0.4` on every answer is not sent to again
/// before the reset, so it never has to answer 429.
/// (With no window, one chain's requests follow each other within a few ms.)
#[tokio::test]
async fn a_used_up_rate_limit_window_is_waited_out_before_a_429() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let receiver = CountingReceiver::start(Arc::new(|_, _| {
        let headers = vec![("x-ratelimit-remaining", "0".to_owned()), ("x-ratelimit-reset-after", "0.4".to_owned())];
        (204, Duration::ZERO, headers)
    }))
    .await;
    // One chain, whose requests would otherwise follow each other within
    // milliseconds: each waits for the window's reset.
    dari.script(&job_id(0), vec![busy_job(4)]);
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[("windowed", &receiver.url)], "")).await;
    relay.store.add_watches(&[watch_on("acme/form", &job_id(0))]).unwrap();
    eventually(
        Duration::from_secs(10),
        || format!("{} requests", receiver.seen().len()),
        || receiver.seen().len() >= 5,
    )
    .await;
    relay.settle().await;
    let seen = receiver.seen();
    let mut at: Vec<Instant> = seen.iter().map(|s| s.at).collect();
    at.sort();
    for pair in at.windows(2) {
        let shown: Vec<_> = seen.iter().map(|s| (&s.job_id[..8], s.event, s.status, s.at - at[0])).collect();
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(380),
            "sent before the window reset: {:?} {shown:?}",
            pair[1] - pair[0]
        );
    }
    assert_in_order(&seen, 1, 4);
    relay.stop().await;
}
