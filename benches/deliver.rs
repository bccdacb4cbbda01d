//! `cargo bench --bench deliver`: the delivery side under backlog (issue 13),
//! the relay's real pipeline against receivers in a child process (this same
//! binary, started with `--fakes`), so the CPU time read from /proc/self/stat
//! is the relay's own.
//!
//! Phases, each printing its figures:
//! 1. shallow: 1,000 chains of 10 deliveries (10,000 pending) to a fast
//!    receiver: deliveries per second and CPU per delivery over the drain;
//! 2. deep: 1,000 chains of 110 (110,000 pending): the same figures over the
//!    first 10,000 deliveries, with 100,000 still waiting behind them;
//!    phases 1 and 2 run in adjacent pairs, `--rounds N` times (default 3),
//!    and the median of the pairs' CPU ratios is printed;
//! 3. the deep backlog drained to the end: peak resident memory;
//! 4. slow: 64 chains of 20 to a receiver answering in 250 ms: deliveries
//!    per second against the 256/s that 64 parallel chains allow, and the
//!    adaptive concurrency reached.
//!
//! The backlog is made by the real poller (each job's first poll announces
//! its events) while the webhooks are paused; the clock starts at the first
//! 2xx after they are resumed. `--smoke` runs every phase at a small scale, for CI (no figure is
//! asserted).

#[path = "support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Query;
use axum::routing::{get, post};
use dari_relay::config::Config;
use dari_relay::metrics::Metrics;
use dari_relay::store::Store;
use dari_relay::vocab::NewWatch;
use tokio_util::sync::CancellationToken;

/// Job `i`'s id; its first 8 hex digits say how many events it has.
fn job_id(i: usize, events: usize) -> String {
    format!("{events:08x}-{:04x}-4000-8000-0000000be7c4", i % 0x10000)
}

// ----- the fakes (child process) ------------------------------------------

async fn fake_status(Query(q): Query<Vec<(String, String)>>) -> String {
    let job = q.iter().find(|(k, _)| k == "job_id").map(|(_, v)| v.clone()).unwrap_or_default();
    let events = usize::from_str_radix(&job[..8], 16).unwrap_or(0);
    let list: Vec<String> = (0..events)
        .map(|i| format!(r#"{{"event_type":"step_completed","message":"Step {i} of the form","data":{{"step":{i}}}}}"#))
        .collect();
    format!(r#"{{"job_id":"{job}","status":"running","events":[{}],"current_step":"Step {events}"}}"#, list.join(","))
}

fn run_fakes() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    runtime.block_on(async move {
        let dari = Router::new().route("/task/{org}/{endpoint}/status", get(fake_status));
        let receiver = Router::new().route("/fast", post(|| async { axum::http::StatusCode::NO_CONTENT })).route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_millis(250)).await;
                axum::http::StatusCode::NO_CONTENT
            }),
        );
        support::serve_fakes(dari, receiver).await;
    });
}

// ----- the relay under test (this process) ----------------------------------

fn config(db: &Path, dari: &str, receiver: &str) -> Arc<Config> {
    let text = format!(
        r#"
database = "{}"
[upstream]
base_url = "{dari}"
poll_interval = "1h"
max_poll_interval = "1h"
[delivery]
retry_schedule = ["1s"]
[orgs.bench]
api_key_env = "KEY"
[[webhooks]]
name = "fast"
url = "{receiver}/fast"
secret_env = "SECRET"
portals = ["bench/fast"]
[[webhooks]]
name = "slow"
url = "{receiver}/slow"
secret_env = "SECRET"
portals = ["bench/slow"]
"#,
        db.display()
    );
    let env = |n: &str| match n {
        "KEY" => Some("bench-key".into()),
        "SECRET" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
        _ => None,
    };
    Arc::new(Config::from_toml(&text, Path::new("bench.toml"), &env).unwrap())
}

fn pending(store: &Store) -> i64 {
    store.delivery_counts().unwrap().get("pending").copied().unwrap_or(0)
}

/// Polls `done` every 50 ms until it holds (or `limit` passes, which fails
/// the bench: a figure measured on a stuck relay would be meaningless).
async fn until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Seeds `chains` jobs of `per_chain` notifications for `webhook` (paused
/// meanwhile), then resumes it and measures the first `measure` deliveries
/// (all of them with `None`): (deliveries/s, CPU µs per delivery, peak RSS,
/// peak concurrency gauge).
#[allow(clippy::too_many_arguments)]
async fn phase(
    dir: &Path,
    name: &str,
    dari: &str,
    receiver: &str,
    webhook: &str,
    chains: usize,
    per_chain: usize,
    measure: Option<usize>,
) -> (f64, f64, u64, u64) {
    let db = dir.join(format!("{name}.db"));
    let store = Arc::new(Store::open(&db).unwrap());
    store.pause_webhook(webhook, "bench: seeding").unwrap();
    let metrics = Arc::new(Metrics::default());
    let shutdown = CancellationToken::new();
    let (_tx, rx) = tokio::sync::watch::channel(config(&db, dari, receiver));
    let relay =
        tokio::spawn(dari_relay::app::serve(rx, Arc::clone(&store), Arc::clone(&metrics), None, shutdown.clone()));
    let watches: Vec<NewWatch> = (0..chains)
        .map(|i| NewWatch {
            job_id: job_id(i, per_chain - 1),
            portal: format!("bench/{webhook}").parse().unwrap(),
            webhooks: None,
            labels: Default::default(),
            from_now: false,
        })
        .collect();
    store.add_watches(&watches).unwrap();
    let total = chains * per_chain;
    until(Duration::from_secs(600), "seeding", || pending(&store) >= total as i64).await;
    let target = measure.unwrap_or(total) as u64;
    let delivered = || metrics.deliveries(webhook, "delivered");
    store.resume_webhook(webhook).unwrap();
    // The clock starts at the first 2xx: the deliverer notices a resume
    // within a second, which is not what is measured here.
    until(Duration::from_secs(60), "the first delivery", || delivered() > 0).await;
    if std::env::var_os("DELIVER_BENCH_MARKS").is_some() {
        // For a profiler attached to this window (docs/performance.md).
        println!("measuring {name}");
        std::io::stdout().flush().unwrap();
    }
    let (t0, cpu0, n0) = (Instant::now(), support::cpu_time(), delivered());
    let (mut peak_rss, mut peak_concurrency) = (support::rss_bytes(), 0);
    let deadline = Instant::now() + Duration::from_secs(1800);
    while delivered() < target {
        assert!(Instant::now() < deadline, "{name}: {} of {target} delivered", delivered());
        tokio::time::sleep(Duration::from_millis(20)).await;
        peak_rss = peak_rss.max(support::rss_bytes());
        peak_concurrency = peak_concurrency.max(metrics.webhook_concurrency(webhook).unwrap_or(0));
    }
    let (took, cpu) = (t0.elapsed(), support::cpu_time() - cpu0);
    let n = delivered() - n0;
    shutdown.cancel();
    relay.await.unwrap().unwrap();
    (n as f64 / took.as_secs_f64(), cpu.as_secs_f64() * 1e6 / n as f64, peak_rss, peak_concurrency)
}

async fn bench(smoke: bool, rounds: usize) {
    let exe = std::env::current_exe().unwrap();
    let mut child: Child = Command::new(exe).arg("--fakes").stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let ports: Vec<&str> = line.split_whitespace().collect();
    let dari = format!("http://127.0.0.1:{}", ports[1]);
    let receiver = format!("http://127.0.0.1:{}", ports[2]);
    // A real disk, not tmpfs, so every commit's fsync is real.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (chains, shallow, deep, measure) = if smoke { (50, 10, 60, 500) } else { (1_000, 10, 110, 10_000) };
    println!("deliver-bench: {chains} chains{}", if smoke { " (smoke)" } else { "" });

    // Shallow and deep in adjacent pairs, `rounds` times: this host's load
    // moves the absolute figures between phases, so the ratio of each pair
    // and the median of those ratios is the figure to read.
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let (rate, cpu, _, conc) =
            phase(dir.path(), &format!("shallow{round}"), &dari, &receiver, "fast", chains, shallow, None).await;
        println!(
            "round {round} shallow: {} pending, {rate:.0} deliveries/s, {cpu:.1} µs CPU per delivery, concurrency up to {conc}",
            chains * shallow
        );
        let (rate2, cpu2, _, conc2) =
            phase(dir.path(), &format!("deep{round}"), &dari, &receiver, "fast", chains, deep, Some(measure)).await;
        println!(
            "round {round} deep:    {} pending, first {measure}: {rate2:.0} deliveries/s, {cpu2:.1} µs CPU per delivery, concurrency up to {conc2} ({:+.0}% rate, {:+.0}% CPU vs shallow)",
            chains * deep,
            (rate2 / rate - 1.0) * 100.0,
            (cpu2 / cpu - 1.0) * 100.0
        );
        ratios.push(cpu2 / cpu);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "deep over shallow, CPU per delivery: median {:+.0}% of {rounds} rounds (each: {})",
        (ratios[ratios.len() / 2] - 1.0) * 100.0,
        ratios.iter().map(|r| format!("{:+.0}%", (r - 1.0) * 100.0)).collect::<Vec<_>>().join(", ")
    );
    let rss_before = support::rss_bytes();
    let (rate3, cpu3, peak, _) = phase(dir.path(), "drain", &dari, &receiver, "fast", chains, deep, None).await;
    println!(
        "drain deep backlog:  {} delivered at {rate3:.0}/s, {cpu3:.1} µs CPU each, peak RSS {:.1} MiB (before {:.1} MiB)",
        chains * deep,
        peak as f64 / 1048576.0,
        rss_before as f64 / 1048576.0
    );
    let (slow_chains, slow_each) = if smoke { (16, 4) } else { (64, 20) };
    let (rate4, cpu4, _, conc4) =
        phase(dir.path(), "slow", &dari, &receiver, "slow", slow_chains, slow_each, None).await;
    println!(
        "slow receiver:       {slow_chains} chains x {slow_each} at 250 ms: {rate4:.0} deliveries/s ({} allowed), {cpu4:.1} µs CPU each, concurrency up to {conc4}",
        slow_chains * 4
    );
    let _ = child.kill();
    let _ = child.wait();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--fakes") {
        return run_fakes();
    }
    let smoke = args.iter().any(|a| a == "--smoke");
    let rounds = match args.iter().position(|a| a == "--rounds") {
        Some(i) => match args.get(i + 1).and_then(|n| n.parse::<usize>().ok()) {
            Some(n) if (1..=20).contains(&n) => n,
            _ => {
                eprintln!("--rounds takes a count from 1 to 20");
                std::process::exit(2);
            }
        },
        None if smoke => 1,
        None => 3,
    };
    let filter = tracing_subscriber::EnvFilter::new("info");
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::sink).init();
    // The daemon's runtime (see cli::block_on): one async thread.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(bench(smoke, rounds));
}
