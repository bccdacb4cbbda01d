//! Fake Dari API and fake receivers, on 127.0.0.1:0, scripted by the test,
//! plus a harness that runs the real relay against them.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use dari_relay::config::Config;
use dari_relay::metrics::Metrics;
use dari_relay::store::Store;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The API key every fake org accepts.
pub const API_KEY: &str = "sk-test-3f9a2c";
/// The admin API token of configs that set `token_env = "ADMIN_TOKEN"`.
pub const ADMIN_TOKEN: &str = "admin-token-5e1f";
/// The signing secret of every fake webhook.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One scripted answer of the fake Dari API.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with this JSON body.
    Json(Value),
    /// This status with an empty JSON body, and optionally `Retry-After`.
    Status(u16, Option<String>),
    /// 200 with this raw body.
    Raw(String),
    /// No answer for 5 seconds (longer than any test's request timeout).
    Hang,
    /// A 200 whose connection breaks after a few bytes of the body.
    Truncated,
}

/// A request the fake Dari API received.
#[derive(Debug, Clone)]
pub struct DariRequest {
    pub org: String,
    pub job_id: String,
    pub api_key: String,
    pub at: Instant,
}

#[derive(Default)]
struct DariState {
    /// Per job, the answers still to give; the last one repeats.
    scripts: HashMap<String, VecDeque<Reply>>,
    requests: Vec<DariRequest>,
    /// Bodies received by the start endpoint.
    starts: Vec<Value>,
    /// The job id the start endpoint hands out next, with the script it gets.
    next_start: Option<(String, Vec<Reply>)>,
}

/// A fake Dari status endpoint.
#[derive(Clone)]
pub struct FakeDari {
    pub url: String,
    state: Arc<Mutex<DariState>>,
}

impl FakeDari {
    pub async fn start() -> FakeDari {
        let state = Arc::new(Mutex::new(DariState::default()));
        let router = Router::new()
            .route("/task/{org}/{endpoint}/status", get(dari_status))
            .route("/jobs/{org}/{endpoint}/start", post(dari_start))
            .with_state(Arc::clone(&state));
        let url = format!("http://{}", serve(router).await);
        FakeDari { url, state }
    }

    /// Replaces the job's script: each poll takes the next reply; the last repeats.
    pub fn script(&self, job_id: &str, replies: Vec<Reply>) {
        self.state.lock().unwrap().scripts.insert(job_id.to_owned(), replies.into());
    }

    /// The next `POST /jobs/.../start` creates `job_id` with this script.
    pub fn on_start(&self, job_id: &str, replies: Vec<Reply>) {
        self.state.lock().unwrap().next_start = Some((job_id.to_owned(), replies));
    }

    /// Bodies the start endpoint received.
    pub fn starts(&self) -> Vec<Value> {
        self.state.lock().unwrap().starts.clone()
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<DariRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Requests for one job so far.
    pub fn polls(&self, job_id: &str) -> usize {
        self.requests().iter().filter(|r| r.job_id == job_id).count()
    }
}

async fn dari_status(
    State(state): State<Arc<Mutex<DariState>>>,
    UrlPath((org, _endpoint)): UrlPath<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let job_id = query.get("job_id").cloned().unwrap_or_default();
    let api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let reply = {
        let mut state = state.lock().unwrap();
        state.requests.push(DariRequest { org, job_id: job_id.clone(), api_key: api_key.clone(), at: Instant::now() });
        if api_key != API_KEY {
            return (StatusCode::UNAUTHORIZED, "{\"detail\":\"invalid key\"}").into_response();
        }
        let Some(script) = state.scripts.get_mut(&job_id) else {
            return (StatusCode::NOT_FOUND, "{\"detail\":\"not found\"}").into_response();
        };
        if script.len() > 1 { script.pop_front().unwrap() } else { script.front().cloned().unwrap() }
    };
    match reply {
        Reply::Json(v) => (StatusCode::OK, [("content-type", "application/json")], v.to_string()).into_response(),
        Reply::Raw(body) => (StatusCode::OK, body).into_response(),
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            (StatusCode::OK, "{\"status\":\"late\"}").into_response()
        }
        Reply::Truncated => {
            let chunks: Vec<Result<&'static str, std::io::Error>> =
                vec![Ok("{\"status\":\"run"), Err(std::io::Error::other("connection reset"))];
            let body = axum::body::Body::from_stream(futures_util::stream::iter(chunks));
            (StatusCode::OK, [("content-length", "400")], body).into_response()
        }
        Reply::Status(code, retry_after) => {
            let mut response = (StatusCode::from_u16(code).unwrap(), "{}").into_response();
            if let Some(v) = retry_after {
                response.headers_mut().insert("retry-after", v.parse().unwrap());
            }
            response
        }
    }
}

async fn dari_start(State(state): State<Arc<Mutex<DariState>>>, headers: HeaderMap, body: String) -> Response {
    if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some(API_KEY) {
        return (StatusCode::UNAUTHORIZED, "{\"detail\":\"invalid key\"}").into_response();
    }
    let mut state = state.lock().unwrap();
    state.starts.push(serde_json::from_str(&body).unwrap_or(Value::Null));
    let Some((job_id, replies)) = state.next_start.take() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "{}").into_response();
    };
    state.scripts.insert(job_id.clone(), replies.into());
    (StatusCode::OK, serde_json::json!({"job_id": job_id, "status": "pending"}).to_string()).into_response()
}

/// A request a fake receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: String,
    pub answered: u16,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> String {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
    pub fn kind(&self) -> String {
        self.json()["type"].as_str().unwrap().to_owned()
    }
}

/// How a fake receiver answers once its scripted answers run out.
#[derive(Debug, Clone, Copy, Default)]
pub struct Behaviour {
    /// Share of requests answered 500 at random.
    pub flaky: f64,
    /// Wait this long before answering.
    pub delay: Duration,
}

#[derive(Clone)]
struct ReceiverState {
    tx: mpsc::UnboundedSender<Received>,
    /// (status, delay) to answer with, in order; then `behaviour`.
    answers: Arc<Mutex<VecDeque<(u16, Duration)>>>,
    behaviour: Arc<Mutex<Behaviour>>,
}

/// A fake webhook receiver that records every request into a channel.
pub struct FakeReceiver {
    pub url: String,
    rx: mpsc::UnboundedReceiver<Received>,
    answers: Arc<Mutex<VecDeque<(u16, Duration)>>>,
    behaviour: Arc<Mutex<Behaviour>>,
}

impl FakeReceiver {
    pub async fn start() -> FakeReceiver {
        FakeReceiver::start_with(None).await
    }

    /// A receiver on `https://127.0.0.1:…/hook` presenting `cert_pem` (the
    /// chain) with `key_pem` (PKCS#8).
    pub async fn start_tls(cert_pem: &str, key_pem: &str) -> FakeReceiver {
        FakeReceiver::start_with(Some(tls_acceptor(cert_pem, key_pem))).await
    }

    async fn start_with(tls: Option<tokio_rustls::TlsAcceptor>) -> FakeReceiver {
        let (tx, rx) = mpsc::unbounded_channel();
        let answers = Arc::new(Mutex::new(VecDeque::new()));
        let behaviour = Arc::new(Mutex::new(Behaviour::default()));
        let state = ReceiverState { tx, answers: Arc::clone(&answers), behaviour: Arc::clone(&behaviour) };
        let router = Router::new().route("/hook", post(receive)).with_state(state);
        let url = match tls {
            None => format!("http://{}/hook", serve(router).await),
            Some(acceptor) => {
                let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = tcp.local_addr().unwrap();
                let listener = TlsListener { tcp, acceptor };
                tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
                format!("https://{addr}/hook")
            }
        };
        FakeReceiver { url, rx, answers, behaviour }
    }

    /// The next requests will be answered with these statuses.
    pub fn answer_with(&self, statuses: &[u16]) {
        self.answers.lock().unwrap().extend(statuses.iter().map(|&s| (s, Duration::ZERO)));
    }

    /// The next request will be answered with `status` after `delay`.
    pub fn answer_after(&self, status: u16, delay: Duration) {
        self.answers.lock().unwrap().push_back((status, delay));
    }

    /// How to answer once the scripted answers run out.
    pub fn behave(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    /// The next request, or a panic after 10 seconds of real time, also on
    /// paused tokio time: there the 20 ms steps pass at once (driving the
    /// relay's timers) while the deliverer's thread takes real time, as in
    /// [`eventually`].
    pub async fn next(&mut self) -> Received {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(received) = tokio::time::timeout(Duration::from_millis(20), self.rx.recv()).await {
                return received.expect("receiver open");
            }
            assert!(std::time::Instant::now() < deadline, "no delivery within 10 s");
        }
    }

    /// Requests until one of type `kind` answered 2xx, inclusive.
    pub async fn until_delivered(&mut self, kind: &str) -> Vec<Received> {
        let mut got = Vec::new();
        loop {
            let r = self.next().await;
            let done = r.kind() == kind && (200..300).contains(&r.answered);
            got.push(r);
            if done {
                return got;
            }
        }
    }

    /// Whatever arrived and was not yet taken.
    pub fn drain(&mut self) -> Vec<Received> {
        let mut got = Vec::new();
        while let Ok(r) = self.rx.try_recv() {
            got.push(r);
        }
        got
    }
}

async fn receive(State(state): State<ReceiverState>, headers: HeaderMap, body: String) -> StatusCode {
    let scripted = state.answers.lock().unwrap().pop_front();
    let (answered, delay) = scripted.unwrap_or_else(|| {
        let b = *state.behaviour.lock().unwrap();
        (if fastrand::f64() < b.flaky { 500 } else { 204 }, b.delay)
    });
    let at = Instant::now();
    // Recorded on arrival, so a test sees a request that is still being answered.
    let _ = state.tx.send(Received { headers, body, answered, at });
    tokio::time::sleep(delay).await;
    StatusCode::from_u16(answered).unwrap()
}

/// A rustls server config (ring, as the relay) for a certificate chain and key.
fn tls_acceptor(cert_pem: &str, key_pem: &str) -> tokio_rustls::TlsAcceptor {
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A TCP listener whose connections are TLS: a handshake that fails (the
/// client refused the certificate) drops that connection and waits for
/// the next one, as a real server would.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else { continue };
            if let Ok(tls) = self.acceptor.accept(stream).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

async fn serve(router: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

/// A watch of `job_id` on `portal`, by portal patterns, no labels, from the start.
pub fn watch_on(portal: &str, job_id: &str) -> dari_relay::vocab::NewWatch {
    dari_relay::vocab::NewWatch {
        job_id: job_id.into(),
        portal: portal.parse().unwrap(),
        webhooks: None,
        labels: Default::default(),
        from_now: false,
    }
}

/// The bot token of the live Slack tests (fake, but treated as a secret:
/// the tests look for it where it must not be).
pub const SLACK_BOT_TOKEN: &str = "xoxb-1111-2222-LiveTestTokenNeverLogged";

/// The environment the test configs read secrets from.
pub fn env(name: &str) -> Option<String> {
    match name {
        "DARI_API_KEY" => Some(API_KEY.to_owned()),
        "HOOK_SECRET" => Some(SECRET.to_owned()),
        "OLD_DARI_API_KEY" => Some("sk-revoked".to_owned()),
        "ADMIN_TOKEN" => Some(ADMIN_TOKEN.to_owned()),
        "SLACK_BOT_TOKEN" => Some(SLACK_BOT_TOKEN.to_owned()),
        _ => None,
    }
}

/// A config with fast timings, one org `acme`, and one signed webhook per
/// `(name, url)`, followed by `extra` TOML.
pub fn config_text(db: &Path, dari: &FakeDari, webhooks: &[(&str, &str)], extra: &str) -> String {
    let mut text = format!(
        r#"
database = "{}"
[upstream]
base_url = "{}"
poll_interval = "50ms"
max_poll_interval = "400ms"
request_timeout = "2s"
[delivery]
retry_schedule = ["100ms", "200ms", "300ms"]
request_timeout = "2s"
[orgs.acme]
api_key_env = "DARI_API_KEY"
"#,
        db.display(),
        dari.url
    );
    for (name, url) in webhooks {
        text.push_str(&format!("[[webhooks]]\nname = \"{name}\"\nurl = \"{url}\"\nsecret_env = \"HOOK_SECRET\"\n"));
    }
    text.push_str(extra);
    text
}

/// A running relay on a temporary database.
pub struct Relay {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// Sends a new config, as a SIGHUP reload does.
    config_tx: tokio::sync::watch::Sender<Arc<Config>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), dari_relay::app::AppError>>,
}

impl Relay {
    pub async fn start(config_text: &str) -> Relay {
        Relay::start_with_admin(config_text, None).await
    }

    /// Starts the relay with the admin API on `admin` (e.g. 127.0.0.1:0).
    pub async fn start_with_admin(config_text: &str, admin: Option<dari_relay::admin::Listener>) -> Relay {
        let config = Arc::new(Config::from_toml(config_text, Path::new("test.toml"), &env).unwrap());
        let store = Arc::new(Store::open(&config.database).unwrap());
        // A test on paused tokio time then sees no time pass while a poll
        // commits (a no-op for the others, but one thread hop per commit).
        store.hold_paused_time_while_writing();
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(Metrics::default());
        let (config_tx, config_rx) = tokio::sync::watch::channel(config);
        let task = tokio::spawn(dari_relay::app::serve(
            config_rx,
            Arc::clone(&store),
            Arc::clone(&metrics),
            admin,
            shutdown.clone(),
        ));
        Relay { store, metrics, config_tx, shutdown, task }
    }

    /// Replaces the running config, as SIGHUP does after a successful reload.
    pub fn reload(&self, config_text: &str) {
        let config = Config::from_toml(config_text, Path::new("test.toml"), &env).unwrap();
        self.config_tx.send_replace(Arc::new(config));
    }

    /// Stops the relay as SIGTERM would, and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }

    /// Waits (polling the store) until no delivery is pending.
    pub async fn settle(&self) {
        let pending = || self.store.delivery_counts().unwrap().get("pending").copied().unwrap_or(0);
        eventually(Duration::from_secs(10), || format!("{} deliveries still pending", pending()), || pending() == 0)
            .await;
    }
}

/// Waits until `done` holds, looking every 20 ms, and fails after `limit`
/// with `what` (evaluated then, so it can show what was last seen). The
/// suite's one "poll until": what the relay does takes real time where its
/// processes and sockets are the point, and this bounds that wait.
///
/// `limit` is real time, also on paused tokio time: there the 20 ms steps
/// pass at once (driving the relay's timers), while the work waited for
/// (the deliverer's thread, the writer) still takes real milliseconds, and
/// a paused-time bound would run out before it is done.
pub async fn eventually(limit: Duration, what: impl Fn() -> String, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "not within {limit:?}: {}", what());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `work` with a bound of `limit` in real time, for tests on paused
/// tokio time: there a loop that never sleeps (the spin those tests look
/// for) keeps the runtime busy, so paused time stops and a virtual timeout
/// would never fire. The bound's timer is a thread of its own, which wakes
/// the runtime whatever its clock does.
pub async fn within_real_time<F: std::future::Future>(limit: Duration, what: &str, work: F) -> F::Output {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if stop_rx.recv_timeout(limit).is_err() {
            let _ = tx.send(());
        }
    });
    let output = tokio::select! {
        output = work => output,
        Ok(()) = rx => panic!("not within {limit:?} of real time: {what}"),
    };
    let _ = stop_tx.send(());
    output
}

/// Waits until the log file at `log` says `text` at least `times` times.
pub async fn log_says(log: &std::path::Path, times: usize, text: &str) {
    let read = || std::fs::read_to_string(log).unwrap_or_default();
    eventually(
        Duration::from_secs(10),
        || format!("the log never said {text:?} {times} times:\n{}", read()),
        || read().matches(text).count() >= times,
    )
    .await;
}

/// [`eventually`] for a probe that has to await (a request, a query of an
/// async store).
pub async fn eventually_async(limit: Duration, what: impl Fn() -> String, mut done: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !done().await {
        assert!(std::time::Instant::now() < deadline, "not within {limit:?}: {}", what());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
