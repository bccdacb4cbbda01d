//! `cargo bench --bench ui`: how long the status page takes to answer with
//! 100,000 watches and 100,000 deliveries in the database (issue 16: the
//! overview in under 100 ms of server time).
//!
//! The database is a temporary SQLite file holding 100,000 active watches
//! (over 50 portals, each with a `customer` label) and 100,000
//! notifications spread over the last hour, each with one delivery to one
//! of three webhooks (80 % delivered with an attempt, 15 % pending, 5 %
//! failed). The real admin listener serves `/ui/` on 127.0.0.1:0 (no token,
//! so the first page opens a session); each page is fetched once to warm
//! the caches, then `--requests N` times (default 50). The figure is the
//! time from sending the request to reading the whole page over loopback,
//! which bounds the server's time from above.
//!
//! `--smoke` runs at 5,000 of each with 5 requests, for CI (no figure is
//! asserted).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dari_relay::admin::{self, AdminState, Listener};
use dari_relay::config::{Config, ListenAddr};
use dari_relay::health::Health;
use dari_relay::metrics::Metrics;
use dari_relay::store::{Sqlite, Store};
use dari_relay::vocab::{NewWatch, now_ms};
use tokio_util::sync::CancellationToken;

const TARGET: Duration = Duration::from_millis(100);

fn config(db: &Path) -> Config {
    let text = format!(
        r#"
database = "{}"
[orgs.acme]
api_key_env = "KEY"
[[webhooks]]
name = "backend"
url = "http://127.0.0.1:9/hook"
[[webhooks]]
name = "crm"
url = "http://127.0.0.1:9/crm"
[[webhooks]]
name = "chat"
url = "http://127.0.0.1:9/chat"
format = "slack"
"#,
        db.display()
    );
    let env = |name: &str| (name == "KEY").then(|| "sk-bench".to_owned());
    Config::from_toml(&text, Path::new("bench.toml"), &env).unwrap()
}

fn seed(store: &Store, n: usize) {
    let watches: Vec<NewWatch> = (0..n)
        .map(|i| NewWatch {
            job_id: format!("{i:08x}-0000-4000-8000-00000000b0b0"),
            portal: format!("acme/portal_{}", i % 50).parse().unwrap(),
            webhooks: None,
            labels: [("customer".to_owned(), format!("customer-{}", i % 1000))].into(),
            from_now: false,
        })
        .collect();
    store.add_watches(&watches).unwrap();
    store
        .seed_outbox_for_bench("ffffffff-0000-4000-8000-00000000b0b0", n, &["backend", "crm", "chat"], now_ms())
        .unwrap();
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let n = if smoke { 5_000 } else { 100_000 };
    let requests: usize = match args.iter().position(|a| a == "--requests") {
        Some(i) => args[i + 1].parse().unwrap(),
        None if smoke => 5,
        None => 50,
    };
    let dir = tempfile::tempdir().unwrap();
    // UI_BENCH_KEEP=1 keeps the database (its path is printed), to look at
    // query plans afterwards.
    let dir = if std::env::var_os("UI_BENCH_KEEP").is_some() { dir.keep() } else { dir.path().to_owned() };
    let config = config(&dir.join("relay.db"));
    let store = Arc::new(Store::open(&config.database).unwrap());
    let started = Instant::now();
    seed(&store, n);
    println!(
        "ui-bench: {n} watches, {n} deliveries seeded in {:.1} s; {requests} requests per page{}",
        started.elapsed().as_secs_f64(),
        if smoke { " (smoke)" } else { "" }
    );
    if std::env::var_os("UI_BENCH_KEEP").is_some() {
        println!("ui-bench: the database is {}", config.database.display());
    }
    // The overview's queries one by one, to see where its time goes.
    let now = now_ms();
    let time = |name: &str, f: &dyn Fn()| {
        f();
        let t = Instant::now();
        for _ in 0..5 {
            f();
        }
        println!("  query {name:<38} {:>6.1} ms", ms(t.elapsed()) / 5.0);
    };
    time("watch_counts", &|| drop(store.watch_counts().unwrap()));
    time("backlog (as /metrics reads it)", &|| drop(store.backlog().unwrap()));
    time("webhook_backlog (what the page reads)", &|| drop(store.webhook_backlog().unwrap()));
    time("paused_webhooks", &|| drop(store.paused_webhooks().unwrap()));
    time("last_errors", &|| drop(store.last_errors().unwrap()));
    time("activity (last hour, per minute)", &|| drop(store.activity(now, 60).unwrap()));
    let listener = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()), None).await.unwrap();
    let base = format!("http://{}", listener.describe());
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(config));
    let state = AdminState {
        config: rx,
        store: Arc::new(Sqlite(Arc::clone(&store))),
        metrics: Arc::new(Metrics::default()),
        health: Arc::new(Health::default()),
        // No poller here: "poll now" requests go nowhere.
        poll_now: dari_relay::poller::PollNow::channel().0,
        startup_token: None,
        reload: None,
        stopping: None,
    };
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(admin::serve(listener, state, dari_relay::ui::router, shutdown.clone()));
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let first = http.get(format!("{base}/ui/")).send().await.unwrap();
    let cookie = first.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    let pages = [
        ("overview", "/ui/".to_owned()),
        ("watches, first page", "/ui/watches".to_owned()),
        ("watches by label", "/ui/watches?q=customer%3Dcustomer-999".to_owned()),
        ("watches by portal", "/ui/watches?q=acme%2Fportal_7".to_owned()),
        ("dead letters", "/ui/deliveries?status=failed".to_owned()),
        ("job page (100 of its 100,000 notifications)", "/ui/jobs/ffffffff-0000-4000-8000-00000000b0b0".to_owned()),
    ];
    let mut overview_p99 = Duration::ZERO;
    for (name, path) in &pages {
        let mut times = Vec::with_capacity(requests);
        let mut bytes = 0;
        for i in 0..=requests {
            let t = Instant::now();
            let response = http.get(format!("{base}{path}")).header("cookie", &cookie).send().await.unwrap();
            assert_eq!(response.status(), 200, "{path}");
            bytes = response.bytes().await.unwrap().len();
            // The first request warms SQLite's page cache and statements.
            if i > 0 {
                times.push(t.elapsed());
            }
        }
        times.sort();
        let (p50, p99) = (percentile(&times, 0.5), percentile(&times, 0.99));
        if *name == "overview" {
            overview_p99 = p99;
        }
        println!("  {name:<44} p50 {:>6.1} ms  p99 {:>6.1} ms  ({} KB)", ms(p50), ms(p99), bytes / 1024);
    }
    println!(
        "ui-bench: overview p99 {:.1} ms, target < {} ms: {}",
        ms(overview_p99),
        TARGET.as_millis(),
        if overview_p99 < TARGET { "met" } else { "NOT met" }
    );
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
