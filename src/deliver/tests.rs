use super::*;
use crate::notification::Body;
use crate::store::Store;
use crate::vocab::{NotificationKind, TokioClock};

fn response(status: Option<u16>, retry_after: Option<u64>) -> Response {
    Response { status, retry_after: retry_after.map(Duration::from_secs), ..Response::default() }
}

#[test]
fn only_2xx_is_delivered_and_the_schedule_runs_out() {
    let schedule = [Duration::from_secs(5), Duration::from_secs(300)];
    assert_eq!(
        classify(&response(Some(204), None), 0, &schedule, 0, 0.5, None),
        DeliveryOutcome::Delivered { status: 204 }
    );
    assert_eq!(
        classify(&response(Some(500), None), 0, &schedule, 1_000, 0.5, None),
        DeliveryOutcome::RetryAt { at_ms: 6_000, error: "HTTP 500".into() }
    );
    assert_eq!(
        classify(&response(Some(302), None), 1, &schedule, 0, 0.5, None),
        DeliveryOutcome::RetryAt { at_ms: 300_000, error: "HTTP 302".into() }
    );
    // A 503 with Retry-After is a rate limit: it waits, uncounted.
    assert_eq!(
        classify(&response(Some(503), Some(9)), 1, &schedule, 0, 0.5, None),
        DeliveryOutcome::RateLimited { at_ms: 9_000, wait: Duration::from_secs(9), error: "HTTP 503".into() }
    );
    assert_eq!(
        classify(&response(None, None), 2, &schedule, 0, 0.5, None),
        DeliveryOutcome::GaveUp { error: "no answer".into() }
    );
    // 410 pauses the webhook, whatever is left of the schedule.
    assert_eq!(classify(&response(Some(410), None), 0, &schedule, 0, 0.5, None), DeliveryOutcome::Paused);
    assert_eq!(classify(&response(Some(410), None), 2, &schedule, 0, 0.5, None), DeliveryOutcome::Paused);
}

#[test]
fn a_rate_limit_waits_without_spending_a_retry_within_the_schedules_time() {
    let schedule = [Duration::from_secs(5), Duration::from_secs(300)];
    let limited = |status: u16, retry_after: Option<Duration>| Response {
        status: Some(status),
        retry_after: retry_after.map(retry::clamp_retry_after),
        ..Response::default()
    };
    let zero = limited(429, Some(Duration::ZERO));
    // Retry-After: 0 waits the 1 s minimum, whatever was counted before,
    // even with the schedule spent.
    for attempts_before in [0, 1, 2, 7] {
        assert_eq!(
            classify(&zero, attempts_before, &schedule, 10_000, 0.5, Some(9_000)),
            DeliveryOutcome::RateLimited { at_ms: 11_000, wait: Duration::from_secs(1), error: "HTTP 429".into() }
        );
    }
    // A 503 is a rate limit only when it says when to come back.
    let busy = limited(503, Some(Duration::from_secs(30)));
    assert!(matches!(classify(&busy, 0, &schedule, 0, 0.5, None), DeliveryOutcome::RateLimited { at_ms: 30_000, .. }));
    let down = limited(503, None);
    assert_eq!(
        classify(&down, 0, &schedule, 0, 0.5, None),
        DeliveryOutcome::RetryAt { at_ms: 5_000, error: "HTTP 503".into() }
    );
    // A 429 without Retry-After waits the schedule's next wait, bounded.
    let bare = limited(429, None);
    assert!(matches!(classify(&bare, 1, &schedule, 0, 0.5, None), DeliveryOutcome::RateLimited { at_ms: 300_000, .. }));
    assert!(matches!(classify(&bare, 9, &schedule, 0, 0.5, None), DeliveryOutcome::RateLimited { at_ms: 300_000, .. }));
    // Past the schedule's total time (305 s) from the first attempt, it gives up.
    let late = classify(&zero, 0, &schedule, 305_000, 0.5, Some(0));
    assert!(matches!(late, DeliveryOutcome::GaveUp { ref error } if error.contains("still rate limited")), "{late:?}");
    assert!(matches!(classify(&zero, 0, &schedule, 304_999, 0.5, Some(0)), DeliveryOutcome::RateLimited { .. }));
}

#[test]
fn clock_arithmetic_saturates() {
    let schedule = [Duration::from_secs(5)];
    assert_eq!(
        classify(&response(Some(500), None), 0, &schedule, i64::MAX - 10, 0.5, None),
        DeliveryOutcome::RetryAt { at_ms: i64::MAX, error: "HTTP 500".into() }
    );
    assert_eq!(millis(Duration::MAX), i64::MAX);
    // A sub-millisecond wait is not a wait of 0, which would spin the loop.
    assert_eq!(millis(Duration::from_micros(400)), 1);
    assert_eq!(millis(Duration::ZERO), 0);
    let now = Instant::now();
    assert!(instant_after(now, Duration::MAX) >= now);
    assert_eq!(record_backoff(1), Duration::from_millis(200));
    assert_eq!(record_backoff(u32::MAX), RECORD_RETRY_MAX);
}

/// Watches `job` and gives up on it, which leaves one pending
/// `watch.failed` delivery to webhook `h` with `msg_id`.
fn pending_delivery(store: &Store, job: &str, msg_id: &str) {
    use crate::store::{NewDelivery, NewNotification};
    use crate::vocab::NewWatch;
    let watch = NewWatch {
        job_id: job.into(),
        portal: "acme/form".parse().unwrap(),
        webhooks: None,
        labels: Default::default(),
        from_now: false,
    };
    store.add_watches(&[watch]).unwrap();
    let notification = NewNotification {
        kind: NotificationKind::WatchFailed,
        body: Body::Whole(r#"{"type":"watch.failed"}"#.into()),
        deliveries: vec![NewDelivery { webhook: "h".into(), msg_id: msg_id.into() }],
    };
    store.fail_watch(job, "test", &notification).unwrap();
}

/// A deliverer over a fresh store with one webhook `h` posting to `url`,
/// and one pending `watch.failed` delivery to it. It reads a [`TokioClock`],
/// so a test that pauses tokio's time drives its schedule with `advance`.
fn deliverer_with_one_delivery(dir: &std::path::Path, url: &str) -> (Deliverer, Arc<Store>, Arc<Metrics>) {
    deliverer_with_schedule(dir, url, r#"["50ms"]"#)
}

/// [`deliverer_with_one_delivery`] with the `retry_schedule` written as TOML.
fn deliverer_with_schedule(dir: &std::path::Path, url: &str, schedule: &str) -> (Deliverer, Arc<Store>, Arc<Metrics>) {
    use crate::store::Sqlite;

    let text = format!(
        "database = \"{}\"\n[upstream]\nbase_url = \"http://127.0.0.1:9\"\n[delivery]\nretry_schedule = {schedule}\n\
             [orgs.acme]\napi_key_env = \"K\"\n[[webhooks]]\nname = \"h\"\nurl = \"{url}\"\n",
        dir.join("r.db").display()
    );
    let env = |name: &str| (name == "K").then(|| "k".to_owned());
    let config = Arc::new(Config::from_toml(&text, std::path::Path::new("t.toml"), &env).unwrap());
    let store = Arc::new(Store::open(&config.database).unwrap());
    pending_delivery(&store, "550e8400-e29b-41d4-a716-446655440000", "msg_1");
    let metrics = Arc::new(Metrics::default());
    let (_tx, rx) = watch::channel(config);
    let deliverer = Deliverer::new(
        rx,
        Arc::new(Sqlite(Arc::clone(&store))),
        Arc::clone(&metrics),
        Arc::new(Health::default()),
        Arc::new(Notify::new()),
    )
    .unwrap()
    .with_clock(Arc::new(TokioClock::new()));
    (deliverer, store, metrics)
}

/// A receiver on 127.0.0.1:0 that answers 204 and counts requests.
async fn counting_receiver() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    let router = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { axum::http::StatusCode::NO_CONTENT }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (url, hits)
}

/// Issue 10 item 11: a panic in an attempt used to leave its chain in
/// flight forever. Now it is caught, counted, recorded as a failed
/// attempt, and the chain is retried per the schedule.
#[tokio::test(start_paused = true)]
async fn a_panicking_attempt_is_recorded_and_its_chain_retried() {
    let dir = tempfile::tempdir().unwrap();
    let (url, hits) = counting_receiver().await;
    let (mut deliverer, store, metrics) = deliverer_with_one_delivery(dir.path(), &url);
    deliverer.render = |_, _| panic!("a render that panics");
    deliverer.deliver_due_once().await.unwrap();
    let done = deliverer.tasks.join_next_with_id().await.unwrap();
    assert!(done.as_ref().is_err_and(|e| e.is_panic()));
    deliverer.finish(done).await;
    assert_eq!(metrics.delivery_faults("h", "panicked"), 1);
    assert!(deliverer.in_flight.is_empty() && deliverer.spawned.is_empty(), "the chain is released");
    let delivery = &store.list_deliveries(None, 10).unwrap()[0];
    assert_eq!((delivery.state, delivery.attempts), ("pending", 1), "one retry of the schedule spent");
    let attempts = store.attempts(delivery.id).unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].error.as_deref(), Some("the attempt panicked: a render that panics"));

    // The retry is due after the 50 ms schedule (40 to 60 ms with its
    // jitter): not before, and then it renders and is delivered.
    deliverer.render = Webhook::render;
    let recorded_at = deliverer.clock.now_ms();
    let next = deliverer.deliver_due_once().await.unwrap().expect("the retry's time");
    assert!((40..=60).contains(&(next - recorded_at)), "{} ms", next - recorded_at);
    assert!(deliverer.tasks.is_empty(), "not started before its time");
    tokio::time::advance(Duration::from_millis(60)).await;
    deliverer.deliver_due_once().await.unwrap();
    let done = deliverer.tasks.join_next_with_id().await.unwrap();
    deliverer.finish(done).await;
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(store.list_deliveries(None, 10).unwrap()[0].state, "delivered");
}

/// A rate-limit answer slows the whole webhook down: until its
/// Retry-After has passed, no delivery of that webhook starts, and the
/// step says when to look again.
#[tokio::test(start_paused = true)]
async fn a_rate_limit_holds_the_whole_webhook() {
    let dir = tempfile::tempdir().unwrap();
    let router = axum::Router::new().route(
        "/hook",
        axum::routing::post(|| async { (axum::http::StatusCode::TOO_MANY_REQUESTS, [("retry-after", "3")]) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let (mut deliverer, store, _metrics) = deliverer_with_one_delivery(dir.path(), &url);
    deliverer.deliver_due_once().await.unwrap();
    let done = deliverer.tasks.join_next_with_id().await.unwrap();
    // The pause starts when the loop hears of the answer; nothing between
    // here and the step's look at it lets time move.
    let heard_at = deliverer.clock.now_ms();
    deliverer.finish(done).await;
    let delivery = &store.list_deliveries(None, 10).unwrap()[0];
    assert_eq!((delivery.state, delivery.attempts), ("pending", 0), "deferred, not counted");
    // Another job's delivery to the same webhook, due now, waits too.
    pending_delivery(&store, "6ba7b810-9dad-41d1-80b4-00c04fd430c8", "msg_2");
    let next = deliverer.deliver_due_once().await.unwrap().expect("a time to look again");
    assert!(deliverer.tasks.is_empty(), "nothing starts while the webhook is slowed");
    assert_eq!(next - heard_at, 3_000, "the Retry-After to the millisecond");
    // A millisecond before the end of the pause nothing starts; at its end
    // both chains do.
    tokio::time::advance(Duration::from_millis(2_999)).await;
    deliverer.deliver_due_once().await.unwrap();
    assert!(deliverer.tasks.is_empty(), "still slowed 1 ms before the Retry-After ends");
    tokio::time::advance(Duration::from_millis(1)).await;
    deliverer.deliver_due_once().await.unwrap();
    assert_eq!(deliverer.tasks.len(), 2, "both chains start once the Retry-After has passed");
}

/// Issue 13's acceptance 3 on paused time: twenty 429s with
/// `Retry-After: 0`, then a 2xx. Each 429 holds the webhook for the 1 s
/// minimum (a `Retry-After` of 0 is never a tight loop) and spends none of
/// the schedule's two retries: the delivery ends `delivered` after one
/// counted attempt. (tests/it/adaptive.rs checks a few through the relay.)
#[tokio::test(start_paused = true)]
async fn twenty_rate_limits_wait_a_second_each_and_spend_no_retry() {
    let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&arrivals);
    let router = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let mut seen = seen.lock().unwrap();
            seen.push(Instant::now());
            // Each answer closes its connection, so no keep-alive timer
            // lets paused time jump ahead while the test waits for a write.
            let status = if seen.len() <= 20 { 429 } else { 204 };
            let status = axum::http::StatusCode::from_u16(status).unwrap();
            async move { (status, [("retry-after", "0"), ("connection", "close")]) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let dir = tempfile::tempdir().unwrap();
    let (mut deliverer, store, _metrics) = deliverer_with_schedule(dir.path(), &url, r#"["1h", "1h"]"#);
    for _ in 0..100 {
        if store.list_deliveries(None, 10).unwrap()[0].state == "delivered" {
            break;
        }
        let next = deliverer.deliver_due_once().await.unwrap();
        if let Some(done) = deliverer.tasks.join_next_with_id().await {
            deliverer.finish(done).await;
            continue;
        }
        let wait = next.expect("a time to look again") - deliverer.clock.now_ms();
        tokio::time::advance(Duration::from_millis(wait.max(1) as u64)).await;
    }
    let delivery = &store.list_deliveries(None, 10).unwrap()[0];
    assert_eq!((delivery.state, delivery.attempts), ("delivered", 1), "only the 2xx counted: no retry used up");
    let arrivals = arrivals.lock().unwrap();
    assert_eq!(arrivals.len(), 21);
    for pair in arrivals.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= Duration::from_secs(1), "Retry-After: 0 waits the 1 s minimum: {gap:?}");
        assert!(gap < Duration::from_millis(1_100), "and not much more: {gap:?}");
    }
}

/// A 2xx the store refuses to record is kept in memory and its chain held:
/// through a minute of refused writes (paused time, stepped as the loop
/// steps) the delivery is never sent again, and once the store accepts
/// writes the one attempt is recorded, with its 204.
#[tokio::test(start_paused = true)]
async fn an_unrecorded_outcome_is_written_later_and_never_resent() {
    let dir = tempfile::tempdir().unwrap();
    let (url, hits) = counting_receiver().await;
    let (mut deliverer, store, metrics) = deliverer_with_one_delivery(dir.path(), &url);
    store.set_read_only(true).unwrap();
    deliverer.deliver_due_once().await.unwrap();
    let done = deliverer.tasks.join_next_with_id().await.unwrap();
    deliverer.finish(done).await;
    assert_eq!(metrics.delivery_faults("h", "unrecorded"), 1);
    assert_eq!(deliverer.unrecorded.len(), 1, "kept in memory");
    for _ in 0..60 {
        tokio::time::advance(Duration::from_secs(1)).await;
        deliverer.deliver_due_once().await.unwrap();
        assert!(deliverer.tasks.is_empty(), "nothing is sent while its outcome waits for the store");
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(store.list_deliveries(None, 10).unwrap()[0].state, "pending");

    store.set_read_only(false).unwrap();
    tokio::time::advance(RECORD_RETRY_MAX).await;
    deliverer.deliver_due_once().await.unwrap();
    assert!(deliverer.unrecorded.is_empty() && deliverer.in_flight.is_empty(), "recorded at last, chain released");
    let delivery = &store.list_deliveries(None, 10).unwrap()[0];
    assert_eq!((delivery.state, delivery.attempts), ("delivered", 1));
    let attempts = store.attempts(delivery.id).unwrap();
    assert_eq!((attempts.len(), attempts[0].http_status), (1, Some(204)));
    deliverer.deliver_due_once().await.unwrap();
    assert!(deliverer.tasks.is_empty(), "and it is not sent again");
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A stored webhook-id that is not a valid header value (a corrupt row)
/// is a failed attempt, not a panic.
#[tokio::test]
async fn a_corrupt_webhook_id_fails_the_attempt_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (url, hits) = counting_receiver().await;
    let (deliverer, _store, _metrics) = deliverer_with_one_delivery(dir.path(), &url);
    let webhook = &deliverer.config.webhooks[0];
    let response = send(&deliverer.http, webhook, "msg_1\r\nx-injected: 1", "{}".into()).await;
    assert_eq!(response.status, None);
    assert_eq!(response.error.as_deref(), Some("the stored webhook-id is not a valid header value"));
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
}
