//! `dari-relay demo`: the whole pipeline against a simulated portal.
//!
//! With no credentials and no network, it starts two in-process servers on
//! 127.0.0.1: a simulated Dari portal whose one job moves a step forward on
//! every poll (pending, running with step events, waiting for a human,
//! running, completed with a final result), and a receiver that verifies each
//! delivery's Standard Webhooks signature and prints it. Between them runs the
//! real relay (the same HTTP client, store, diff and delivery as `run`) on a
//! temporary database. The receiver refuses one delivery with a 503 once, to
//! show a retry carrying the same `webhook-id`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::signature::SigningKey;
use crate::store::Store;
use crate::vocab::NewWatch;

const DEMO_SECRET: &str = "whsec_ZGFyaS1yZWxheSBkZW1vIHNpZ25pbmcga2V5IQ==";
const DEMO_JOB: &str = "550e8400-e29b-41d4-a716-446655440000";
/// The demo gives up after this long; it normally takes a few seconds.
const DEMO_DEADLINE: Duration = Duration::from_secs(30);

/// The simulated job's life: one entry per poll, the last repeated.
fn script() -> Vec<Value> {
    let event = |t: &str, msg: &str, data: Value| json!({"event_type": t, "message": msg, "data": data, "timestamp": "2026-11-30T10:30:00Z"});
    let e1 = event("step_started", "Opening https://example.com/contact", json!({"step": 1}));
    let e2 = event("step_completed", "Filled in name and email", json!({"step": 2}));
    let e3 = event("step_completed", "Uploaded the attachment", json!({"step": 3}));
    let q = event(
        "question",
        "Which department should receive this?",
        json!({"question_id": "q-1", "options": ["sales", "support"]}),
    );
    let e4 = event("step_completed", "Submitted the form", json!({"step": 4, "answer": "sales"}));
    let job = |status: &str, step: Value, events: Vec<&Value>, final_result: Value| {
        json!({
            "status": status, "current_step": step, "events": events,
            "browser_url": "https://live.example/session/abc", "final_result": final_result,
            "error": null, "total_cost_usd": 0.12, "created_at": "2026-11-30T10:29:58Z", "updated_at": "2026-11-30T10:30:15Z"
        })
    };
    vec![
        job("pending", Value::Null, vec![], Value::Null),
        job("running", json!("Opening page"), vec![&e1], Value::Null),
        job("running", json!("Filling in the form"), vec![&e1, &e2], Value::Null),
        job("running", json!("Uploading"), vec![&e1, &e2, &e3], Value::Null),
        job("waiting_for_input", json!("Asking a human"), vec![&e1, &e2, &e3, &q], Value::Null),
        job("waiting_for_input", json!("Asking a human"), vec![&e1, &e2, &e3, &q], Value::Null),
        job("running", json!("Submitting"), vec![&e1, &e2, &e3, &q, &e4], Value::Null),
        job(
            "completed",
            Value::Null,
            vec![&e1, &e2, &e3, &q, &e4],
            json!({"submitted": true, "confirmation": "CF-2291", "department": "sales"}),
        ),
    ]
}

/// What the simulated portal has served so far.
struct Portal {
    script: Vec<Value>,
    polls: usize,
}

async fn status(
    State(portal): State<Arc<Mutex<Portal>>>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> (StatusCode, String) {
    if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some("demo-key") {
        return (StatusCode::UNAUTHORIZED, "{\"detail\":\"bad key\"}".into());
    }
    if !q.iter().any(|(k, v)| k == "job_id" && v == DEMO_JOB) {
        return (StatusCode::NOT_FOUND, "{\"detail\":\"no such job\"}".into());
    }
    let mut p = portal.lock().unwrap_or_else(|e| e.into_inner());
    let answer = p.script[p.polls.min(p.script.len() - 1)].to_string();
    p.polls += 1;
    (StatusCode::OK, answer)
}

/// One delivery as the receiver saw it.
struct Received {
    headers: HeaderMap,
    body: String,
    answered: StatusCode,
}

struct Receiver {
    tx: mpsc::UnboundedSender<Received>,
    refused_once: Mutex<bool>,
}

async fn receive(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: String) -> StatusCode {
    // Refuse the first "needs a human" delivery once, to show a retry.
    let refuse = body.contains("\"job.waiting_for_input\"") && {
        let mut refused = r.refused_once.lock().unwrap_or_else(|e| e.into_inner());
        !std::mem::replace(&mut *refused, true)
    };
    let answered = if refuse { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::NO_CONTENT };
    let _ = r.tx.send(Received { headers, body, answered });
    answered
}

async fn serve(router: Router) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(addr)
}

/// Runs the demo, printing to `out`. Fails if the job's notifications do not
/// all arrive, verified and in order, within 30 seconds.
pub async fn run(mut out: impl Write) -> anyhow::Result<()> {
    let started = Instant::now();
    let portal = Arc::new(Mutex::new(Portal { script: script(), polls: 0 }));
    let portal_addr =
        serve(Router::new().route("/task/{org}/{endpoint}/status", get(status)).with_state(portal)).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let receiver = Arc::new(Receiver { tx, refused_once: Mutex::new(false) });
    let receiver_addr = serve(Router::new().route("/hooks", post(receive)).with_state(receiver)).await?;

    let dir = tempfile::tempdir()?;
    let text = format!(
        r#"
database = "{db}"
[upstream]
base_url = "http://{portal_addr}"
poll_interval = "150ms"
max_poll_interval = "1s"
[delivery]
retry_schedule = ["300ms", "1s", "2s"]
[orgs.demo-org]
api_key_env = "DEMO_API_KEY"
[[webhooks]]
name = "demo-receiver"
url = "http://{receiver_addr}/hooks"
secret_env = "DEMO_WEBHOOK_SECRET"
"#,
        db = dir.path().join("relay.db").display()
    );
    let env = |name: &str| match name {
        "DEMO_API_KEY" => Some("demo-key".to_owned()),
        "DEMO_WEBHOOK_SECRET" => Some(DEMO_SECRET.to_owned()),
        _ => None,
    };
    let config = Arc::new(Config::from_toml(&text, Path::new("<demo config>"), &env)?);
    let store = Arc::new(Store::open(&config.database)?);
    store.add_watches(&[NewWatch {
        job_id: DEMO_JOB.into(),
        portal: "demo-org/contact_form".parse().map_err(anyhow::Error::msg)?,
        webhooks: None,
        labels: [("customer".to_owned(), "acme".to_owned())].into(),
        from_now: false,
    }])?;
    writeln!(out, "dari-relay demo")?;
    writeln!(out, "  simulated Dari portal  http://{portal_addr}")?;
    writeln!(out, "  receiver               http://{receiver_addr}/hooks (verifies every signature)")?;
    writeln!(out, "  database               {}", config.database.display())?;
    writeln!(out, "  watching               demo-org/contact_form job {DEMO_JOB}\n")?;

    let shutdown = CancellationToken::new();
    // The demo never reloads its config: the sender is dropped at once.
    let (_, config_rx) = tokio::sync::watch::channel(Arc::clone(&config));
    let relay = tokio::spawn(crate::app::serve(
        config_rx,
        Arc::clone(&store),
        Arc::new(crate::metrics::Metrics::default()),
        None,
        shutdown.clone(),
    ));
    let key = SigningKey::parse(DEMO_SECRET)?;
    let expected = [
        "job.pending",
        "job.event",
        "job.running",
        "job.event",
        "job.event",
        "job.event",
        "job.waiting_for_input",
        "job.event",
        "job.running",
        "job.completed",
    ];
    let mut delivered = Vec::new();
    let deadline = tokio::time::Instant::now() + DEMO_DEADLINE;
    let outcome: anyhow::Result<()> = async {
        while delivered.len() < expected.len() {
            let received = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "timed out after {}s with {} of {} notifications",
                        DEMO_DEADLINE.as_secs(),
                        delivered.len(),
                        expected.len()
                    )
                })?
                .ok_or_else(|| anyhow::anyhow!("the receiver stopped"))?;
            let header = |n: &str| received.headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            let (id, ts, sig) = (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"));
            let verified = ts.parse().is_ok_and(|ts| key.verify(&id, ts, received.body.as_bytes(), &sig));
            anyhow::ensure!(verified, "delivery {id} has a bad signature");
            let body: Value = serde_json::from_str(&received.body)?;
            let kind = body["type"].as_str().unwrap_or("?").to_owned();
            let data = &body["data"];
            let detail = match kind.as_str() {
                "job.event" => format!(
                    "#{} {}: {}",
                    data["event"]["index"],
                    data["event"]["event_type"].as_str().unwrap_or(""),
                    data["event"]["message"].as_str().unwrap_or("")
                ),
                "job.completed" => format!("final_result {}", data["final_result"]),
                _ => format!(
                    "status {} (was {}), step {}",
                    data["status"], data["previous_status"], data["current_step"]
                ),
            };
            if !received.answered.is_success() {
                writeln!(
                    out,
                    "  {:<22} {id}  signature ok  answered {} -> will be retried, same id",
                    kind,
                    received.answered.as_u16()
                )?;
                continue;
            }
            delivered.push(kind.clone());
            writeln!(out, "{:>3} {:<22} {id}  signature ok  {detail}", delivered.len(), kind)?;
        }
        anyhow::ensure!(delivered == expected, "notifications arrived as {delivered:?}, expected {expected:?}");
        Ok(())
    }
    .await;
    shutdown.cancel();
    relay.await??;
    outcome?;
    let counts = store.delivery_counts()?;
    writeln!(
        out,
        "\n{} notifications delivered in order, every signature verified, {} deliveries pending, in {:.1}s",
        delivered.len(),
        counts.get("pending").copied().unwrap_or(0),
        started.elapsed().as_secs_f64()
    )?;
    Ok(())
}
