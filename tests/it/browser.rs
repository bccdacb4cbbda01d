//! Issue 16: the status page, driven in a real browser (Debian's Chromium
//! through chromedriver and WebDriver) against the real relay, a fake Dari
//! and fake receivers; and its refusals, checked over plain HTTP.
//!
//! Each browser test starts its own chromedriver on a free port and a
//! headless Chromium with a fresh profile, and saves screenshots under
//! `$CARGO_TARGET_TMPDIR/browser/`. Without `/usr/bin/chromium` or
//! `/usr/bin/chromedriver` a browser test prints one line saying it was
//! skipped and passes, unless `DARI_RELAY_BROWSER_TESTS=required` (as in
//! `.ci/run`), where a missing browser fails it.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dari_relay::admin::Listener;
use dari_relay::config::ListenAddr;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::fakes::{
    ADMIN_TOKEN, API_KEY, FakeDari, FakeReceiver, Relay, Reply, SECRET, config_text, eventually, eventually_async,
};
use dari_relay::vocab::NewWatch;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

const FORM_JOB: &str = "3f2b8c1e-7d4a-4e9b-9c61-2a5d8e0f4b17";
const CRM_JOB: &str = "9a1c5e3b-2f8d-4b6a-8e7c-1d4f6a9b3c25";
const CHAT_JOB: &str = "c4e8a2f6-1b3d-4c5e-9f7a-8b2d6e4c1a39";
const RUNNING: [&str; 3] = [
    "0b6f3d2a-8c1e-4f5b-a9d7-3e2c1b0a9f84",
    "5d9e7c3b-4a2f-4e1d-8b6c-9f0e2d4a7c16",
    "e1a7c9d3-6b5f-4a8e-9c2d-4f6b8a0e3d52",
];

/// A started chromedriver, killed when dropped.
struct Driver {
    child: Child,
    url: String,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    /// Asks chromedriver to shut down first (it then quits the browsers of
    /// its sessions: a test that panicked before closing its session would
    /// otherwise leave Chromium running, orphaned), and kills it after 3 s.
    fn drop(&mut self) {
        use std::io::Write as _;
        let address = self.url.trim_start_matches("http://");
        if let Ok(mut stream) = std::net::TcpStream::connect(address) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
            let _ = write!(stream, "GET /shutdown HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
            let _ = std::io::Read::read(&mut stream, &mut [0u8; 256]);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the browser tests can run here; `None` (after saying so in one
/// line) when they are skipped. With `DARI_RELAY_BROWSER_TESTS=required`
/// a missing browser is a failure instead.
fn browsers_present() -> bool {
    let required = std::env::var("DARI_RELAY_BROWSER_TESTS").as_deref() == Ok("required");
    browsers_at(Path::new(CHROMIUM), Path::new(CHROMEDRIVER), required)
}

fn browsers_at(chromium: &Path, chromedriver: &Path, required: bool) -> bool {
    let present = chromium.exists() && chromedriver.exists();
    if !present {
        assert!(
            !required,
            "DARI_RELAY_BROWSER_TESTS=required, but {} or {} is missing (apt-get install -y chromium chromium-driver)",
            chromium.display(),
            chromedriver.display()
        );
        println!("browser tests skipped: chromium/chromedriver not found");
    }
    present
}

#[test]
fn missing_browsers_skip_unless_required() {
    let missing = Path::new("/nonexistent/chromium");
    assert!(!browsers_at(missing, missing, false));
    let required = std::panic::catch_unwind(|| browsers_at(missing, missing, true));
    assert!(required.is_err(), "with DARI_RELAY_BROWSER_TESTS=required a missing browser fails");
}

/// Starts chromedriver on a free port and opens a headless Chromium session.
async fn browser() -> (Driver, Client) {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let profile = tempfile::tempdir().unwrap();
    let driver = Driver { child, url: format!("http://127.0.0.1:{port}"), _profile: profile };
    let up = async || reqwest::get(format!("{}/status", driver.url)).await.is_ok();
    eventually_async(Duration::from_secs(20), || format!("chromedriver did not start on port {port}"), up).await;
    let args = [
        "--headless=new".to_owned(),
        "--no-sandbox".to_owned(),
        "--disable-gpu".to_owned(),
        "--disable-background-networking".to_owned(),
        "--disable-component-update".to_owned(),
        "--disable-sync".to_owned(),
        "--no-first-run".to_owned(),
        "--disable-dev-shm-usage".to_owned(),
        "--window-size=1280,1000".to_owned(),
        format!("--user-data-dir={}", driver._profile.path().display()),
    ];
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), "chrome".into());
    caps.insert("goog:chromeOptions".into(), json!({"binary": CHROMIUM, "args": args}));
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let client =
        ClientBuilder::new(connector).capabilities(caps).connect(&driver.url).await.expect("a WebDriver session");
    (driver, client)
}

/// Where this run's screenshots go.
fn shots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Makes the window as tall as the page (at most 2,400 px), so that a
/// screenshot shows all of it.
async fn fit_window(client: &Client) {
    client.set_window_size(1280, 600).await.unwrap();
    // The window's size includes its frame: add what the frame takes.
    let script = "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight;";
    let height = client.execute(script, vec![]).await.unwrap();
    let height = height.as_u64().unwrap_or(1000).clamp(600, 2400) as u32;
    client.set_window_size(1280, height).await.unwrap();
}

async fn screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.unwrap();
    std::fs::write(shots().join(format!("{name}.png")), png).unwrap();
}

/// The visible text of the page (retried while a navigation replaces it).
async fn text(client: &Client) -> String {
    for _ in 0..50 {
        if let Ok(body) = client.find(Locator::Css("body")).await
            && let Ok(t) = body.text().await
        {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the page has no body");
}

/// Waits (without reloading) until the page, after a click or a submit,
/// shows `needle`; returns its text.
async fn shown(client: &Client, needle: &str) -> String {
    let last = RefCell::new(String::new());
    let showing = async || {
        let t = text(client).await;
        let hit = t.contains(needle);
        *last.borrow_mut() = t;
        hit
    };
    let what = || format!("the page never showed {needle:?}; it shows:\n{}", last.borrow());
    eventually_async(Duration::from_secs(10), what, showing).await;
    last.into_inner()
}

/// Reloads `url` until its text contains `needle` (10 s at most).
async fn until_text(client: &Client, url: &str, needle: &str) -> String {
    let last = RefCell::new(String::new());
    let showing = async || {
        client.goto(url).await.unwrap();
        let t = text(client).await;
        let hit = t.contains(needle);
        *last.borrow_mut() = t;
        hit
    };
    let what = || format!("{url} never showed {needle:?}; it shows:\n{}", last.borrow());
    eventually_async(Duration::from_secs(10), what, showing).await;
    last.into_inner()
}

fn job_answer(status: &str, steps: &[&str], with_links: bool) -> Reply {
    let events: Vec<Value> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"event_type": "step_completed", "message": s, "timestamp": format!("2026-12-02T10:0{i}:00Z")}))
        .collect();
    let mut answer = json!({"status": status, "events": events, "current_step": steps.last(), "total_cost_usd": 0.04});
    if with_links {
        answer["browser_url"] = "https://agent.example/browser/3f2b8c1e".into();
        answer["video_recording_url"] = "https://agent.example/videos/3f2b8c1e.mp4".into();
        answer["log_url"] = "https://agent.example/logs/3f2b8c1e".into();
    }
    Reply::Json(answer)
}

fn watch(job: &str, portal: &str, webhook: &str, labels: &[(&str, &str)]) -> NewWatch {
    NewWatch {
        job_id: job.into(),
        portal: portal.parse().unwrap(),
        webhooks: Some(vec![webhook.to_owned()]),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        from_now: false,
    }
}

/// A relay with three webhooks and a token, its admin API on 127.0.0.1:0,
/// and the receivers; returns the relay, the API's base URL and them.
async fn relay_with_page(dari: &FakeDari) -> (Relay, String, [FakeReceiver; 3], tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let receivers = [FakeReceiver::start().await, FakeReceiver::start().await, FakeReceiver::start().await];
    let extra = "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"ADMIN_TOKEN\"\n";
    let text = config_text(
        &dir.path().join("r.db"),
        dari,
        &[("backend", &receivers[0].url), ("crm", &receivers[1].url), ("chat", &receivers[2].url)],
        extra,
    );
    let config = dari_relay::config::Config::from_toml(&text, Path::new("t.toml"), &crate::fakes::env).unwrap();
    let token = config.admin.and_then(|a| a.token);
    let listener = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap()), token).await.unwrap();
    let base = format!("http://{}", listener.describe());
    (Relay::start_with_admin(&text, Some(listener)).await, base, receivers, dir)
}

/// Waits until the store shows `job`'s deliveries to `webhook` in `state`.
async fn until_delivery(relay: &Relay, job: &str, state: &str) -> i64 {
    let mut found = None;
    let what = || format!("no {state} delivery of {job}: {:?}", relay.store.list_deliveries(None, 1000).unwrap());
    let seen = || {
        let rows = relay.store.list_deliveries(None, 1000).unwrap();
        found = rows.iter().find(|d| d.job_id == job && d.state == state).map(|d| d.id);
        found.is_some()
    };
    eventually(Duration::from_secs(10), what, seen).await;
    found.expect("found")
}

async fn log_in(client: &Client, base: &str) {
    client.goto(&format!("{base}/ui/")).await.unwrap();
    assert!(client.current_url().await.unwrap().path() == "/ui/login", "no session: the login comes first");
    let form = client.form(Locator::Css("form[action='/ui/login']")).await.unwrap();
    form.set_by_name("token", "not-the-token").await.unwrap();
    form.submit().await.unwrap();
    shown(client, "That is not the admin token.").await;
    let form = client.form(Locator::Css("form[action='/ui/login']")).await.unwrap();
    form.set_by_name("token", ADMIN_TOKEN).await.unwrap();
    form.submit().await.unwrap();
    shown(client, "Health").await;
    assert_eq!(client.current_url().await.unwrap().path(), "/ui/");
}

/// Log in, see the watches, open a job and read its timeline, find a dead
/// letter, press Retry and see it delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_login_watches_job_and_retry() {
    if !browsers_present() {
        return;
    }
    let dari = FakeDari::start().await;
    let steps = ["Opened the contact form", "Filled in name and email", "Solved the captcha", "Submitted the form"];
    dari.script(
        FORM_JOB,
        vec![
            job_answer("running", &steps[..2], true),
            job_answer("running", &steps[..3], true),
            job_answer("completed", &steps, true),
        ],
    );
    dari.script(CRM_JOB, vec![job_answer("failed", &["Opened the CRM", "Login rejected"], true)]);
    for (i, job) in RUNNING.iter().enumerate() {
        dari.script(job, vec![job_answer("running", &steps[..i + 1], false)]);
    }
    let (relay, base, mut receivers, _dir) = relay_with_page(&dari).await;
    // The CRM receiver is down for all four attempts of the schedule.
    receivers[1].answer_with(&[500, 502, 503, 500]);
    let mut watches = vec![
        watch(FORM_JOB, "acme/contact_form", "backend", &[("customer", "globex")]),
        watch(CRM_JOB, "acme/crm_sync", "crm", &[("customer", "initech")]),
    ];
    for job in RUNNING {
        watches.push(watch(job, "acme/contact_form", "backend", &[("customer", "acme")]));
    }
    relay.store.add_watches(&watches).unwrap();
    receivers[0].until_delivered("job.completed").await;
    let failed = until_delivery(&relay, CRM_JOB, "failed").await;

    let (_driver, client) = browser().await;
    log_in(&client, &base).await;
    let overview = until_text(&client, &format!("{base}/ui/"), "2 finished").await;
    for needle in ["Poller", "running", "writable", "backend", "crm", "Upstream", "Newest deliveries", "3 active"] {
        assert!(overview.contains(needle), "the overview shows {needle:?}:\n{overview}");
    }
    assert!(client.find(Locator::Css("svg.chart polyline")).await.is_ok(), "the chart is drawn");
    // The whole page (docs/img/ shows this one).
    fit_window(&client).await;
    screenshot(&client, "overview").await;

    // The watches, searched by label, then one job's page.
    client.find(Locator::LinkText("Watches")).await.unwrap().click().await.unwrap();
    let form = client.form(Locator::Css("form[role='search']")).await.unwrap();
    form.set_by_name("q", "customer=globex").await.unwrap();
    form.submit().await.unwrap();
    let found = shown(&client, "customer=globex").await;
    assert!(found.contains(FORM_JOB) && !found.contains(RUNNING[0]), "{found}");
    client.find(Locator::LinkText(FORM_JOB)).await.unwrap().click().await.unwrap();
    let page = shown(&client, "Timeline").await;
    for needle in [
        "job.running",
        "job.completed",
        "Submitted the form",
        "→ backend",
        "delivered",
        "Live browser",
        "Video recording",
    ] {
        assert!(page.contains(needle), "the job page shows {needle:?}:\n{page}");
    }
    let link = client.find(Locator::LinkText("Log")).await.unwrap().attr("href").await.unwrap();
    assert_eq!(link.as_deref(), Some("https://agent.example/logs/3f2b8c1e"));
    let events = page.find("Opened the contact form").unwrap();
    assert!(events < page.find("Submitted the form").unwrap(), "the timeline is in order");
    fit_window(&client).await;
    screenshot(&client, "job").await;
    client.set_window_size(1280, 1000).await.unwrap();

    // The dead letter, retried from the page.
    client.find(Locator::LinkText("Dead letters")).await.unwrap().click().await.unwrap();
    let dead = shown(&client, "Failed, by webhook").await;
    // The chain's head failed; the notifications after it wait behind it.
    assert!(dead.contains("HTTP 500") && dead.contains("crm") && dead.contains("job.event"), "{dead}");
    screenshot(&client, "dead-letters").await;
    let button = format!("button[aria-label='Retry delivery {failed}']");
    client.find(Locator::Css(&button)).await.unwrap().click().await.unwrap();
    shown(&client, "put back in the queue").await;
    let delivered =
        || !relay.store.list_deliveries(None, 1000).unwrap().iter().any(|d| d.id == failed && d.state != "delivered");
    eventually(Duration::from_secs(10), || format!("the retried delivery {failed} was never delivered"), delivered)
        .await;
    let after = until_text(&client, &format!("{base}/ui/deliveries?status=failed"), "No dead letters.").await;
    assert!(!after.contains("HTTP 500"));
    client.goto(&format!("{base}/ui/jobs/{CRM_JOB}")).await.unwrap();
    let job = shown(&client, "Timeline").await;
    fit_window(&client).await;
    assert!(!job.contains("pending") && !job.contains("failed delivery"), "{job}");
    let first = &job[job.find("Opened the CRM").unwrap()..job.find("Login rejected").unwrap()];
    assert!(first.contains("5 attempts"), "{first}");
    for status in ["500", "502", "503", "204"] {
        assert!(first.contains(&format!("{status} in")), "every attempt is listed ({status}):\n{first}");
    }
    // This page, a dead letter retried, is the job page docs/img/ shows.
    screenshot(&client, "retried").await;
    // On a phone-sized window the page still fits its width (tables scroll
    // inside their own box).
    client.set_window_size(390, 844).await.unwrap();
    client.goto(&format!("{base}/ui/")).await.unwrap();
    let width = client.execute("return document.documentElement.scrollWidth;", vec![]).await.unwrap();
    assert!(width.as_u64().unwrap() <= 400, "the overview is {width} px wide on a phone");
    screenshot(&client, "phone").await;
    client.close().await.unwrap();
    relay.stop().await;
}

/// A webhook paused by a 410 is resumed from the page; a form without its
/// CSRF token, or without the session, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_resume_and_refusals() {
    if !browsers_present() {
        return;
    }
    let dari = FakeDari::start().await;
    dari.script(CHAT_JOB, vec![job_answer("completed", &["Posted the summary"], false)]);
    let (relay, base, mut receivers, _dir) = relay_with_page(&dari).await;
    receivers[2].answer_with(&[410]);
    relay.store.add_watches(&[watch(CHAT_JOB, "acme/summary", "chat", &[])]).unwrap();
    let paused = || !relay.store.paused_webhooks().unwrap().is_empty();
    eventually(Duration::from_secs(10), || "the 410 never paused the webhook".to_owned(), paused).await;

    let (_driver, client) = browser().await;
    log_in(&client, &base).await;
    client.goto(&format!("{base}/ui/deliveries?status=failed")).await.unwrap();
    let page = shown(&client, "Paused webhooks").await;
    assert!(page.contains("receiver answered 410 Gone"), "{page}");

    // A forged CSRF token is refused, and nothing changes.
    client
        .execute(
            "document.querySelector(\"form[action='/ui/webhooks/chat/resume'] input[name=csrf]\").value = 'forged';",
            vec![],
        )
        .await
        .unwrap();
    client.find(Locator::Css("form[action='/ui/webhooks/chat/resume'] button")).await.unwrap().click().await.unwrap();
    shown(&client, "CSRF token is missing or stale").await;
    assert_eq!(relay.store.paused_webhooks().unwrap().len(), 1);

    // The real button resumes it, and the waiting delivery goes out.
    client.goto(&format!("{base}/ui/deliveries?status=failed")).await.unwrap();
    client.find(Locator::Css("form[action='/ui/webhooks/chat/resume'] button")).await.unwrap().click().await.unwrap();
    shown(&client, "The webhook was resumed").await;
    receivers[2].until_delivered("job.completed").await;
    assert!(relay.store.paused_webhooks().unwrap().is_empty());
    until_delivery(&relay, CHAT_JOB, "delivered").await;
    let overview = until_text(&client, &format!("{base}/ui/"), "active").await;
    assert!(!overview.contains("Resume chat"), "{overview}");
    screenshot(&client, "resumed").await;

    // Without the session cookie, a form (here: Log out) is refused.
    client.goto(&format!("{base}/ui/jobs/{CHAT_JOB}")).await.unwrap();
    client.delete_all_cookies().await.unwrap();
    client.find(Locator::Css("form[action='/ui/logout'] button")).await.unwrap().click().await.unwrap();
    shown(&client, "no session").await;
    client.goto(&format!("{base}/ui/")).await.unwrap();
    assert_eq!(client.current_url().await.unwrap().path(), "/ui/login", "a page without a session asks for the token");
    client.close().await.unwrap();
    relay.stop().await;
}

/// Over plain HTTP: the session and CSRF rules, the cookie's attributes,
/// the Host check, and no secret on any page.
#[tokio::test]
async fn status_page_refusals_and_secrets() {
    let dari = FakeDari::start().await;
    dari.script(FORM_JOB, vec![job_answer("completed", &["Done"], true)]);
    let (relay, base, mut receivers, _dir) = relay_with_page(&dari).await;
    relay
        .store
        .add_watches(&[watch(FORM_JOB, "acme/contact_form", "backend", &[("note", "<script>alert(1)</script>")])])
        .unwrap();
    receivers[0].until_delivered("job.completed").await;
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();

    // No session: pages go to the login, POSTs are refused.
    let r = http.get(format!("{base}/ui/")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui/login?next=%2Fui%2F");
    let r = http.post(format!("{base}/ui/webhooks/backend/resume")).form(&[("csrf", "x")]).send().await.unwrap();
    assert_eq!(r.status(), 403);
    // The bearer token of the API is not a session.
    let r = http.get(format!("{base}/ui/")).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 303);

    // A wrong token, then the right one behind a TLS proxy: the cookie.
    let r = http.post(format!("{base}/ui/login")).form(&[("token", "guess")]).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    let r = http
        .post(format!("{base}/ui/login"))
        .header("x-forwarded-proto", "https")
        .form(&[("token", ADMIN_TOKEN), ("next", "https://evil.example/")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui/", "never redirected off the page");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/ui", "Max-Age=43200"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    let session = cookie.split(';').next().unwrap().to_owned();
    let plain = http.post(format!("{base}/ui/login")).form(&[("token", ADMIN_TOKEN)]).send().await.unwrap();
    assert!(!plain.headers()["set-cookie"].to_str().unwrap().contains("Secure"), "no TLS, no Secure");

    // With the session: every page, and none shows a secret.
    let mut pages = Vec::new();
    for path in ["/ui/", "/ui/watches", &format!("/ui/jobs/{FORM_JOB}"), "/ui/deliveries?status=all"] {
        let r = http.get(format!("{base}{path}")).header("cookie", &session).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["cache-control"], "no-store");
        pages.push(r.text().await.unwrap());
    }
    for page in &pages {
        for secret in [API_KEY, SECRET, ADMIN_TOKEN, receivers[0].url.as_str(), receivers[1].url.as_str()] {
            assert!(!page.contains(secret), "a page shows a secret ({secret})");
        }
    }
    // What Dari or a label says is text, never markup.
    let label = pages[2].split("note=").nth(1).map(|rest| &rest[..40]);
    assert!(!pages[2].contains("<script>alert"), "escaped: {label:?}");
    assert!(label.is_some_and(|l| l.starts_with("&lt;script&gt;alert(1)&lt;")), "escaped: {label:?}");
    let csrf = pages[0].split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();

    // A POST with the session but without (or with another) CSRF token: 403.
    for form in [vec![], vec![("csrf", "0".repeat(64))]] {
        let r = http
            .post(format!("{base}/ui/jobs/{FORM_JOB}/remove"))
            .header("cookie", &session)
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
    }
    assert_eq!(relay.store.list_watches(true).unwrap()[0].state, "finished", "nothing was removed");
    // Another site's form: refused by the admin API's guard first.
    let r = http
        .post(format!("{base}/ui/jobs/{FORM_JOB}/remove"))
        .header("cookie", &session)
        .header("origin", "https://evil.example")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r =
        http.get(format!("{base}/ui/")).header("host", "evil.example").header("cookie", &session).send().await.unwrap();
    assert_eq!(r.status(), 403, "the Host check applies to the page");
    // The admin API itself still refuses forms.
    let r = http
        .post(format!("{base}/v1/deliveries/1/retry"))
        .bearer_auth(ADMIN_TOKEN)
        .form(&[("a", "b")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    // Poll now: a finished watch is not polled; an active one is asked for
    // (the trigger's own rules are tested in poller::trigger and inbound).
    let poll = |job: &'static str| {
        http.post(format!("{base}/ui/jobs/{job}/poll"))
            .header("cookie", &session)
            .form(&[("csrf", csrf.as_str()), ("back", &format!("/ui/jobs/{job}"))])
            .send()
    };
    let r = poll(FORM_JOB).await.unwrap();
    assert_eq!(r.headers()["location"], format!("/ui/jobs/{FORM_JOB}?notice=nothing"));
    dari.script(CHAT_JOB, vec![job_answer("running", &["Working"], false)]);
    relay.store.add_watches(&[watch(CHAT_JOB, "acme/chat", "backend", &[])]).unwrap();
    let r = poll(CHAT_JOB).await.unwrap();
    assert_eq!(r.headers()["location"], format!("/ui/jobs/{CHAT_JOB}?notice=polled"));
    // With the token, the button works.
    let r = http
        .post(format!("{base}/ui/jobs/{FORM_JOB}/remove"))
        .header("cookie", &session)
        .form(&[("csrf", csrf.as_str()), ("back", &format!("/ui/jobs/{FORM_JOB}"))])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], format!("/ui/jobs/{FORM_JOB}?notice=removed"));
    assert_eq!(relay.store.list_watches(true).unwrap()[0].state, "removed");
    // Retry all failed of one webhook.
    dari.script(CRM_JOB, vec![job_answer("completed", &[], false)]);
    receivers[1].answer_with(&[500, 500, 500, 500]);
    relay.store.add_watches(&[watch(CRM_JOB, "acme/crm_sync", "crm", &[])]).unwrap();
    until_delivery(&relay, CRM_JOB, "failed").await;
    let r = http
        .post(format!("{base}/ui/webhooks/crm/retry"))
        .header("cookie", &session)
        .form(&[("csrf", csrf.as_str()), ("back", "/ui/deliveries?status=failed")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["location"], "/ui/deliveries?status=failed&notice=retried-all");
    until_delivery(&relay, CRM_JOB, "delivered").await;
    // Logging out ends the session.
    let r = http
        .post(format!("{base}/ui/logout"))
        .header("cookie", &session)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let r = http.get(format!("{base}/ui/")).header("cookie", &session).send().await.unwrap();
    assert_eq!(r.status(), 303);
    relay.stop().await;
}
