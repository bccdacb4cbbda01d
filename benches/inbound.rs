//! `cargo bench --bench inbound`: push assist, from Dari's webhook POST to
//! the receiver's 2xx for `job.completed` (issue 14, acceptance 3).
//!
//! The real relay (`app::serve_with`, inbound listener included) runs in
//! this process against a fake Dari status endpoint and a receiver on
//! 127.0.0.1:0. 1,000 jobs are watched with `poll_interval` and
//! `max_poll_interval` at 60 s, so after their first poll (`job.running`)
//! only the webhook can make the relay see their completion. Then, job by
//! job, the fake Dari starts answering `completed` and a signed webhook is
//! posted; the figure is the time from just before the POST to the
//! receiver's arrival of that job's `job.completed` (it answers 204 at
//! once). The POSTs are paced at 200 a second, spread over 20 source
//! addresses (127.0.0.1 to 127.0.0.20) so the per-source limit of 50 a
//! second is not what is measured.
//!
//! `--smoke` runs 50 jobs, for CI (no figure is asserted); `--jobs N` sets
//! the number of jobs (default 1,000).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::routing::{get, post};
use dari_relay::app::{Listeners, serve_with};
use dari_relay::config::Config;
use dari_relay::metrics::Metrics;
use dari_relay::store::Store;
use dari_relay::vocab::NewWatch;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

const API_KEY: &str = "sk-bench";
const DARI_KEY: &str = "dari-webhook-bench-key";
/// POSTs a second, all sources together.
const PACE: f64 = 200.0;
const SOURCES: u8 = 20;

#[derive(Default)]
struct Fakes {
    /// Jobs that answer `completed`.
    completed: Mutex<HashSet<String>>,
    /// When the receiver got each job's `job.running` and `job.completed`.
    running: Mutex<HashSet<String>>,
    arrived: Mutex<HashMap<String, Instant>>,
}

fn job_id(i: usize) -> String {
    format!("{i:08x}-0000-4000-8000-00000000b14e")
}

fn status(job: &str, completed: bool) -> String {
    let (status, result) = if completed { ("completed", r#"{"answer":"yes"}"#) } else { ("running", "null") };
    format!(
        r#"{{"job_id":"{job}","status":"{status}","events":[{{"event_type":"started","message":"go"}}],"final_result":{result}}}"#
    )
}

async fn dari(State(f): State<Arc<Fakes>>, Query(q): Query<HashMap<String, String>>) -> String {
    let job = q.get("job_id").cloned().unwrap_or_default();
    let completed = f.completed.lock().unwrap().contains(&job);
    status(&job, completed)
}

async fn receiver(State(f): State<Arc<Fakes>>, body: String) -> axum::http::StatusCode {
    let at = Instant::now();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let job = v["data"]["job_id"].as_str().unwrap_or_default().to_owned();
    match v["type"].as_str() {
        Some("job.running") => {
            f.running.lock().unwrap().insert(job);
        }
        Some("job.completed") => {
            f.arrived.lock().unwrap().insert(job, at);
        }
        _ => {}
    }
    axum::http::StatusCode::NO_CONTENT
}

/// Serves `router` on the fakes' runtime (its own thread), so the fakes do
/// not share the relay's one async thread.
async fn serve(fakes: &Handle, router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = listener.into_std().unwrap();
    fakes.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        axum::serve(listener, router).await.unwrap()
    });
    addr
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn wait_for(what: &str, deadline: Duration, done: impl Fn() -> bool) {
    let until = Instant::now() + deadline;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn bench(jobs: usize, smoke: bool, side: Handle) {
    let fakes = Arc::new(Fakes::default());
    let dari_addr =
        serve(&side, Router::new().route("/task/{org}/{ep}/status", get(dari)).with_state(Arc::clone(&fakes))).await;
    let hook_addr = serve(&side, Router::new().route("/hook", post(receiver)).with_state(Arc::clone(&fakes))).await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        r#"
database = "{}"
[upstream]
base_url = "http://{dari_addr}"
poll_interval = "60s"
max_poll_interval = "60s"
[orgs.acme]
api_key_env = "DARI_API_KEY"
[inbound]
listen = "127.0.0.1:0"
dari_webhook_key_env = "DARI_WEBHOOK_KEY"
[[webhooks]]
name = "backend"
url = "http://{hook_addr}/hook"
"#,
        dir.path().join("relay.db").display()
    );
    let env = |name: &str| match name {
        "DARI_API_KEY" => Some(API_KEY.to_owned()),
        "DARI_WEBHOOK_KEY" => Some(DARI_KEY.to_owned()),
        _ => None,
    };
    let config = Arc::new(Config::from_toml(&text, Path::new("bench.toml"), &env).unwrap());
    let store = Arc::new(Store::open(&config.database).unwrap());
    let watches: Vec<NewWatch> = (0..jobs)
        .map(|i| NewWatch {
            job_id: job_id(i),
            portal: "acme/form".parse().unwrap(),
            webhooks: None,
            labels: Default::default(),
            from_now: false,
        })
        .collect();
    store.add_watches(&watches).unwrap();
    let inbound = dari_relay::inbound::Listener::bind(config.inbound.as_ref().unwrap().listen).await.unwrap();
    let url = format!("http://{}/v1/dari/webhook", inbound.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let (config_tx, config_rx) = tokio::sync::watch::channel(config);
    let relay = tokio::spawn(serve_with(
        config_rx,
        Arc::clone(&store),
        Arc::new(Metrics::default()),
        Listeners { admin: None, inbound: Some(inbound) },
        shutdown.clone(),
    ));
    wait_for("every job.running", Duration::from_secs(120), || fakes.running.lock().unwrap().len() == jobs).await;
    println!("inbound-bench: {jobs} jobs watched and running{}", if smoke { " (smoke)" } else { "" });

    let clients: Vec<reqwest::Client> = (1..=SOURCES)
        .map(|n| reqwest::Client::builder().local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))).build().unwrap())
        .collect();
    let started = Instant::now();
    let mut posts = Vec::with_capacity(jobs);
    let mut posted = Vec::with_capacity(jobs);
    for i in 0..jobs {
        tokio::time::sleep_until((started + Duration::from_secs_f64(i as f64 / PACE)).into()).await;
        let job = job_id(i);
        fakes.completed.lock().unwrap().insert(job.clone());
        let mut body: serde_json::Value = serde_json::from_str(&status(&job, true)).unwrap();
        body["event_type"] = "job.completed".into();
        body["timestamp"] = "2026-12-02T10:00:00Z".into();
        let body = body.to_string();
        let mut mac = Hmac::<Sha256>::new_from_slice(DARI_KEY.as_bytes()).unwrap();
        mac.update(body.as_bytes());
        let sig: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        let request = clients[i % clients.len()]
            .post(&url)
            .header("content-type", "application/json")
            .header("x-webhook-signature", format!("sha256={sig}"))
            .body(body);
        let at = Instant::now();
        posted.push((job, at));
        posts.push(side.spawn(async move { request.send().await.map(|r| r.status().as_u16()) }));
    }
    let mut refused = 0;
    for p in posts {
        if p.await.unwrap().ok() != Some(202) {
            refused += 1;
        }
    }
    wait_for("every job.completed", Duration::from_secs(120), || fakes.arrived.lock().unwrap().len() == jobs).await;
    let arrived = fakes.arrived.lock().unwrap().clone();
    let mut latencies: Vec<Duration> =
        posted.iter().map(|(job, at)| arrived[job].saturating_duration_since(*at)).collect();
    latencies.sort();
    println!(
        "inbound-bench: POST to receiver 2xx over {jobs} jobs at {PACE} POSTs/s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({refused} POSTs not answered 202)",
        percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        latencies.last().unwrap().as_secs_f64() * 1000.0,
    );
    shutdown.cancel();
    relay.await.unwrap().unwrap();
    drop(config_tx);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let jobs = args
        .iter()
        .position(|a| a == "--jobs")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(if smoke { 50 } else { 1000 });
    // The daemon's runtime: one thread (as `dari-relay run`), the deliverer
    // on its own thread inside `serve_with`.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // The fakes and the HTTP client that plays Dari: another thread.
    let side = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    runtime.block_on(bench(jobs, smoke, side.handle().clone()));
}
