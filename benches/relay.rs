//! `cargo bench --bench relay`: the relay's real pipeline (HTTP client,
//! SQLite store on a temporary file, diff, delivery) against a fast fake Dari
//! API and a fast receiver, with the figures issue 7 asks for.
//!
//! The fakes run in a child process (this same binary, started with
//! `--fakes`), so the CPU time read from /proc/self/stat is the relay's own.
//! Phases, each printing its figures:
//! 1. start: 100,000 watches in the database, time from start to first poll;
//! 2. memory: resident memory per idle watch at 10,000 and 100,000 watches;
//! 3. unchanged: polls per second and CPU per unchanged poll;
//! 4. changed: CPU per changed poll (stored and enqueued), SQLite
//!    transactions per second, bytes written per notification;
//! 5. latency: detection-to-2xx p50 and p99 at about 1,000 notifications/s.
//!
//! `--only start|unchanged|changed|latency` runs the start and memory
//! phases and then just that one (for profiling).
//! `--smoke` runs every phase briefly at a small scale, for CI (no figure is
//! asserted); `--seconds N` sets each measuring phase's length (default 10).
//! `--engine postgres` runs the unchanged, changed and delivery phases on
//! PostgreSQL instead (benches/relay/postgres.rs), with the round trips per
//! changed poll and three instances sharing the watches.

#[path = "support/mod.rs"]
mod support;

#[path = "relay/postgres.rs"]
mod postgres;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::{Path as UrlPath, Query, State};
use axum::routing::{get, post};
use dari_relay::config::Config;
use dari_relay::metrics::Metrics;
use dari_relay::store::Store;
use dari_relay::vocab::NewWatch;
use tokio_util::sync::CancellationToken;

// ----- the fakes (child process) ------------------------------------------

/// What the fake portal and receiver share.
struct Fakes {
    /// Probability, per status request, that the job gains an event.
    changing: Mutex<f64>,
    /// Events per job: the job id's first 8 hex digits index this.
    events: Vec<AtomicUsize>,
    status_requests: AtomicU64,
    /// Detection-to-2xx latencies (µs) seen by the receiver since the last reset.
    latencies: Mutex<Vec<u64>>,
}

fn job_id(i: usize) -> String {
    format!("{i:08x}-0000-4000-8000-0000000be7c4")
}

/// A realistic 2 to 8 KB status body with `k` events.
fn status_body(j: usize, k: usize) -> String {
    let mut events = String::with_capacity(k * 220);
    for i in 0..k {
        if i > 0 {
            events.push(',');
        }
        events.push_str(&format!(
            r##"{{"event_type":"step_completed","message":"Step {i}: filled in the field labelled \"Company name\" and moved on to the next section of the form","data":{{"step":{i},"selector":"#field-{i}-input","duration_ms":{}}},"timestamp":"2026-11-30T10:{:02}:{:02}Z"}}"##,
            1000 + i * 37,
            (i / 60) % 60,
            i % 60
        ));
    }
    format!(
        r#"{{"job_id":"{}","status":"running","events":[{events}],"current_step":"Step {k}","browser_url":"https://live.example.com/session/{j:08x}","result":null,"final_result":null,"error":null,"downloads_link":null,"video_recording_url":null,"log_url":"https://logs.example.com/{j:08x}","total_cost_usd":0.0{},"created_at":"2026-11-30T10:00:00Z","updated_at":"2026-11-30T10:{:02}:00Z"}}"#,
        job_id(j),
        k % 10,
        k % 60
    )
}

async fn fake_status(
    State(f): State<Arc<Fakes>>,
    UrlPath((_org, _endpoint)): UrlPath<(String, String)>,
    Query(q): Query<Vec<(String, String)>>,
) -> String {
    f.status_requests.fetch_add(1, Ordering::Relaxed);
    let j =
        q.iter().find(|(k, _)| k == "job_id").and_then(|(_, v)| usize::from_str_radix(&v[..8], 16).ok()).unwrap_or(0);
    let slot = &f.events[j % f.events.len()];
    let changing = *f.changing.lock().unwrap();
    let k = if changing > 0.0 && fastrand::f64() < changing {
        slot.fetch_add(1, Ordering::Relaxed) + 1
    } else {
        slot.load(Ordering::Relaxed)
    };
    status_body(j, k)
}

async fn fake_receive(State(f): State<Arc<Fakes>>, body: String) -> axum::http::StatusCode {
    // The body's top-level timestamp is when the relay detected the transition.
    let parsed: Option<serde_json::Value> = serde_json::from_str(&body).ok();
    let at = parsed.as_ref().and_then(|b| b["timestamp"].as_str()).map(humantime::parse_rfc3339);
    if let Some(Ok(t)) = at {
        let latency = SystemTime::now().duration_since(t).unwrap_or_default().as_micros() as u64;
        f.latencies.lock().unwrap().push(latency);
    }
    axum::http::StatusCode::NO_CONTENT
}

async fn fake_control(State(f): State<Arc<Fakes>>, Query(q): Query<Vec<(String, String)>>) -> String {
    for (k, v) in q {
        if k == "changing" {
            *f.changing.lock().unwrap() = v.parse().unwrap_or(0.0);
        }
    }
    let mut lat = std::mem::take(&mut *f.latencies.lock().unwrap());
    lat.sort_unstable();
    let pct = |p: f64| if lat.is_empty() { 0 } else { lat[((lat.len() - 1) as f64 * p) as usize] };
    format!("{} {} {} {}", f.status_requests.load(Ordering::Relaxed), lat.len(), pct(0.5), pct(0.99))
}

fn run_fakes(jobs: usize) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    runtime.block_on(async move {
        let fakes = Arc::new(Fakes {
            changing: Mutex::new(0.0),
            // 10 to 33 events: bodies of about 2 to 8 KB.
            events: (0..jobs).map(|j| AtomicUsize::new(10 + j % 24)).collect(),
            status_requests: AtomicU64::new(0),
            latencies: Mutex::new(Vec::new()),
        });
        let dari =
            Router::new().route("/task/{org}/{endpoint}/status", get(fake_status)).with_state(Arc::clone(&fakes));
        let receiver = Router::new()
            .route("/hook", post(fake_receive))
            .route("/control", get(fake_control))
            .with_state(Arc::clone(&fakes));
        support::serve_fakes(dari, receiver).await;
    });
}

// ----- the relay under test (this process) ----------------------------------

fn write_bytes() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    io.lines().find_map(|l| l.strip_prefix("write_bytes: ")).and_then(|v| v.parse().ok()).unwrap_or(0)
}

struct Bench {
    control: String,
    dari: String,
    receiver: String,
    dir: tempfile::TempDir,
    seconds: u64,
    jobs: usize,
}

/// Tells the fakes how to behave; returns (status requests, latencies, p50 µs, p99 µs)
/// and resets the latencies.
async fn control(url: &str, query: &str) -> (u64, u64, u64, u64) {
    let text = reqwest::get(format!("{url}?{query}")).await.unwrap().text().await.unwrap();
    let v: Vec<u64> = text.split(' ').map(|x| x.parse().unwrap()).collect();
    (v[0], v[1], v[2], v[3])
}

impl Bench {
    fn config(&self, db: &Path, poll: &str, max_poll: &str, in_flight: usize) -> Arc<Config> {
        let text = format!(
            r#"
database = "{}"
[upstream]
base_url = "{}"
poll_interval = "{poll}"
max_poll_interval = "{max_poll}"
max_in_flight = {in_flight}
[delivery]
retry_schedule = ["1s"]
[orgs.bench]
api_key_env = "KEY"
[[webhooks]]
name = "receiver"
url = "{}"
secret_env = "SECRET"
max_in_flight = 64
"#,
            db.display(),
            self.dari,
            self.receiver
        );
        let env = |n: &str| match n {
            "KEY" => Some("bench-key".into()),
            "SECRET" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
            _ => None,
        };
        Arc::new(Config::from_toml(&text, Path::new("bench.toml"), &env).unwrap())
    }

    fn watches(range: std::ops::Range<usize>) -> Vec<NewWatch> {
        range
            .map(|j| NewWatch {
                job_id: job_id(j),
                portal: "bench/form".parse().unwrap(),
                webhooks: None,
                labels: Default::default(),
                from_now: true,
            })
            .collect()
    }

    /// Runs the relay on `store` with `config` until `until` says stop.
    async fn with_relay<F, Fut, T>(&self, config: Arc<Config>, store: Arc<Store>, body: F) -> T
    where
        F: FnOnce(Arc<Metrics>, Arc<Store>) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let metrics = Arc::new(Metrics::default());
        let shutdown = CancellationToken::new();
        let (_tx, rx) = tokio::sync::watch::channel(config);
        let relay =
            tokio::spawn(dari_relay::app::serve(rx, Arc::clone(&store), Arc::clone(&metrics), None, shutdown.clone()));
        let out = body(metrics, store).await;
        shutdown.cancel();
        relay.await.unwrap().unwrap();
        out
    }
}

/// Samples `count` (a counter) and this process's CPU time once a second for
/// `secs` seconds; returns the total count and the median, lowest and highest
/// CPU µs per counted item over the one-second windows. Medians, because these
/// machines are shared and a window can be disturbed.
async fn windows(secs: u64, count: impl Fn() -> u64) -> (u64, f64, f64, f64) {
    let (mut last_n, mut last_cpu) = (count(), support::cpu_time());
    let start_n = last_n;
    let mut per_item = Vec::new();
    for _ in 0..secs {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (n, cpu) = (count(), support::cpu_time());
        if n > last_n {
            per_item.push((cpu - last_cpu).as_secs_f64() * 1e6 / (n - last_n) as f64);
        }
        (last_n, last_cpu) = (n, cpu);
    }
    per_item.sort_by(f64::total_cmp);
    let median = per_item.get(per_item.len() / 2).copied().unwrap_or(0.0);
    let (low, high) = (per_item.first().copied().unwrap_or(0.0), per_item.last().copied().unwrap_or(0.0));
    (last_n - start_n, median, low, high)
}

fn polls(m: &Metrics) -> u64 {
    m.polls("bench", "unchanged") + m.polls("bench", "changed")
}

async fn bench(smoke: bool, seconds: u64, only: Option<String>, postgres: bool) {
    let wants = |phase: &str| only.as_deref().is_none_or(|o| o == phase);
    let jobs = if smoke { 2_000 } else { 100_000 };
    let exe = std::env::current_exe().unwrap();
    let mut child: Child =
        Command::new(exe).args(["--fakes", &jobs.to_string()]).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let ports: Vec<&str> = line.split_whitespace().collect();
    let b = Bench {
        dari: format!("http://127.0.0.1:{}", ports[1]),
        receiver: format!("http://127.0.0.1:{}/hook", ports[2]),
        control: format!("http://127.0.0.1:{}/control", ports[2]),
        // A real disk, not tmpfs, so bytes written are real writes.
        dir: tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap(),
        seconds: if smoke { 2 } else { seconds },
        jobs,
    };
    println!("relay-bench: {} watches, {} s per phase{}", b.jobs, b.seconds, if smoke { " (smoke)" } else { "" });
    if postgres {
        postgres::bench_postgres(&b, smoke).await;
        let _ = child.kill();
        let _ = child.wait();
        return;
    }

    // 1 and 2: start with the watches in the database; memory per idle watch.
    let small = b.jobs / 10;
    let db = b.dir.path().join("relay.db");
    let store = Arc::new(Store::open(&db).unwrap());
    let t = Instant::now();
    store.add_watches(&Bench::watches(0..b.jobs)).unwrap();
    println!("import:              {} watches in one transaction in {:.2} s", b.jobs, t.elapsed().as_secs_f64());
    drop(store);
    // Idle: every watch polled at most every 60 s.
    let idle = b.config(&db, "30s", "60s", 64);
    let baseline_db = b.dir.path().join("empty.db");
    let rss_empty = b
        .with_relay(
            b.config(&baseline_db, "30s", "60s", 64),
            Arc::new(Store::open(&baseline_db).unwrap()),
            |_, _| async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                support::rss_bytes()
            },
        )
        .await;
    let started = Instant::now();
    let (first_poll, rss_full) = b
        .with_relay(Arc::clone(&idle), Arc::new(Store::open(&db).unwrap()), |m, _| async move {
            while polls(&m) == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let first = started.elapsed();
            // Let the first round of polls finish, so every watch is idle.
            let deadline = Instant::now() + Duration::from_secs(if smoke { 5 } else { 60 });
            while polls(&m) < b.jobs as u64 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (first, support::rss_bytes())
        })
        .await;
    println!("start to first poll: {:.0} ms with {} watches", first_poll.as_secs_f64() * 1000.0, b.jobs);
    let small_db = b.dir.path().join("small.db");
    let small_store = Arc::new(Store::open(&small_db).unwrap());
    small_store.add_watches(&Bench::watches(0..small)).unwrap();
    let rss_small = b
        .with_relay(b.config(&small_db, "30s", "60s", 64), small_store, |m, _| async move {
            while polls(&m) < small as u64 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            support::rss_bytes()
        })
        .await;
    let per = |rss: u64, n: usize| rss.saturating_sub(rss_empty) as f64 / n as f64;
    println!(
        "memory per idle watch: {:.0} B at {} watches, {:.0} B at {} watches (RSS {:.1} MiB with none)",
        per(rss_small, small),
        small,
        per(rss_full, b.jobs),
        b.jobs,
        rss_empty as f64 / 1048576.0
    );

    // 3: unchanged polls at full speed.
    let fast = b.config(&db, "1ms", "1ms", 64);
    control(&b.control, "changing=0").await;
    let secs = b.seconds;
    if wants("unchanged") {
        let (n, median, low, high) = b
            .with_relay(Arc::clone(&fast), Arc::new(Store::open(&db).unwrap()), |m, _| async move {
                tokio::time::sleep(Duration::from_secs(1)).await; // warm up connections
                windows(secs, || polls(&m)).await
            })
            .await;
        println!(
            "unchanged polls:     {:.0} polls/s, {median:.1} µs CPU per unchanged poll (median of {secs} 1-s windows; {low:.1} to {high:.1})",
            n as f64 / secs as f64,
        );
    }

    // 4: every poll changed (one new event each), stored and enqueued: the
    // webhook is paused, so the deliveries wait and their sending is not
    // counted here. Then the webhook is resumed and the backlog is sent,
    // which gives the CPU per delivery on its own.
    if wants("changed") {
        control(&b.control, "changing=1").await;
        let store = Arc::new(Store::open(&db).unwrap());
        store.pause_webhook("receiver", "bench: measuring polls alone").unwrap();
        let (n, notes, median, low, high, commits, written) = b
            .with_relay(Arc::clone(&fast), Arc::clone(&store), |m, store| async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let (t0, w0, n0) = (store.commits(), write_bytes(), m.notifications());
                let (n, median, low, high) = windows(secs, || m.polls("bench", "changed")).await;
                (n, m.notifications() - n0, median, low, high, store.commits() - t0, write_bytes() - w0)
            })
            .await;
        println!(
            "changed polls:       {:.0} polls/s, {median:.1} µs CPU per changed poll, parsed, diffed, stored and enqueued (median of {secs} 1-s windows; {low:.1} to {high:.1})",
            n as f64 / secs as f64,
        );
        println!(
            "sqlite:              {:.0} transactions/s, {:.0} bytes written per notification",
            commits as f64 / secs as f64,
            written as f64 / notes.max(1) as f64
        );
        // The backlog, sent with polling idle (no change, 60 s interval).
        control(&b.control, "changing=0").await;
        store.resume_webhook("receiver").unwrap();
        let backlog = store.delivery_counts().unwrap().get("pending").copied().unwrap_or(0) as u64;
        let (sent, cpu) = b
            .with_relay(Arc::clone(&idle), Arc::clone(&store), |m, _| async move {
                let c0 = support::cpu_time();
                let deadline = Instant::now() + Duration::from_secs(secs * 6);
                while m.deliveries("receiver", "delivered") < backlog && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (m.deliveries("receiver", "delivered"), support::cpu_time() - c0)
            })
            .await;
        println!(
            "deliveries:          {sent} sent, {:.1} µs CPU per delivery (signed, sent, recorded; idle polling included)",
            cpu.as_secs_f64() * 1e6 / sent.max(1) as f64
        );
    }

    // 5: about 1,000 notifications a second: 1,000 watches polled every
    // second, each poll bringing one new event.
    if !wants("latency") {
        let _ = child.kill();
        let _ = child.wait();
        return;
    }
    let lat_db = b.dir.path().join("latency.db");
    let lat_store = Arc::new(Store::open(&lat_db).unwrap());
    lat_store.add_watches(&Bench::watches(0..1000.min(b.jobs))).unwrap();
    control(&b.control, "changing=1").await;
    let url = b.control.clone();
    let (notes, p50, p99) = b
        .with_relay(b.config(&lat_db, "1s", "1s", 64), lat_store, |m, _| async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            control(&url, "").await; // reset the receiver's latencies
            let n0 = m.notifications();
            tokio::time::sleep(Duration::from_secs(secs)).await;
            let (_, _, p50, p99) = control(&url, "").await;
            (m.notifications() - n0, p50, p99)
        })
        .await;
    println!(
        "latency:             detection to 2xx p50 {:.1} ms, p99 {:.1} ms at {:.0} notifications/s",
        p50 as f64 / 1000.0,
        p99 as f64 / 1000.0,
        notes as f64 / secs as f64
    );
    let _ = child.kill();
    let _ = child.wait();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--fakes") {
        return run_fakes(args[i + 1].parse().unwrap());
    }
    let smoke = args.iter().any(|a| a == "--smoke");
    let seconds = args.iter().position(|a| a == "--seconds").map_or(10, |i| args[i + 1].parse().unwrap());
    let only = args.iter().position(|a| a == "--only").map(|i| args[i + 1].clone());
    let postgres = match args.iter().position(|a| a == "--engine").map(|i| args.get(i + 1).map(String::as_str)) {
        None | Some(Some("sqlite")) => false,
        Some(Some("postgres")) => true,
        Some(other) => panic!("--engine takes sqlite or postgres, not {other:?}"),
    };
    // The daemon's own logging, at its own level, so spans cost what they
    // cost in production; the lines go nowhere.
    // BENCH_LOG=1 shows them on stderr (to see why a phase is slow).
    let filter = tracing_subscriber::EnvFilter::new("info");
    if std::env::var_os("BENCH_LOG").is_some() {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::sink).init();
    }
    // The daemon's runtime (see cli::block_on): one async thread.
    // BENCH_MULTI_THREAD=1 measures a multi-threaded one instead, for comparison.
    let mut builder = if std::env::var_os("BENCH_MULTI_THREAD").is_some() {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = builder.enable_all().build().unwrap();
    runtime.block_on(bench(smoke, seconds, only, postgres));
}
