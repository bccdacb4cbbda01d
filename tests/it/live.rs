//! Issue 15, live chat messages (`mode = "live"`): against a fake Discord
//! webhook and a fake Slack Web API on 127.0.0.1, per job and webhook
//! exactly one message is created and the later notifications edit it, in
//! order, coalesced while an edit is out; follow-ups only for questions,
//! failures and ends; every create and edit within the platform's limits;
//! Slack's `ok: false` classified; the bot token only in `Authorization`;
//! and, with the real binary killed by SIGKILL, the same message edited
//! after the restart. `check-config` refuses what cannot be live.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use dari_relay::format::live;
use dari_relay::store::Store;
use dari_relay::vocab::{DeliveryState, Format};
use serde_json::{Value, json};

use crate::fakes::{
    API_KEY, FakeDari, Relay, Reply, SLACK_BOT_TOKEN, config_text, eventually, eventually_async, watch_on,
};
use crate::formats::{block_kit_problems, bodies, discord_problems, settings};

const JOB: &str = "550e8400-e29b-41d4-a716-446655440000";
const JOB2: &str = "550e8400-e29b-41d4-a716-446655440001";
const WAIT: Duration = Duration::from_secs(15);

/// A request the fake chat server got.
#[derive(Debug, Clone)]
struct ChatRequest {
    method: Method,
    path: String,
    query: String,
    headers: HeaderMap,
    raw: String,
    body: Value,
}

/// How the fake answers the next request.
#[derive(Debug, Clone)]
enum Forced {
    /// This HTTP status, `{}` as the body.
    Status(u16),
    /// Slack's 200 with `{"ok": false, "error": ...}`.
    SlackError(&'static str),
}

#[derive(Default)]
struct ChatState {
    requests: Vec<ChatRequest>,
    /// Live messages by id (Discord) or ts (Slack), with their last body.
    messages: HashMap<String, Value>,
    next: u64,
    forced: VecDeque<Forced>,
    delay: Duration,
}

/// A fake Discord webhook (`/discord/hook`) and Slack Web API (`/slack/api`).
#[derive(Clone)]
struct FakeChat {
    url: String,
    state: Arc<Mutex<ChatState>>,
}

impl FakeChat {
    async fn start() -> FakeChat {
        let state = Arc::new(Mutex::new(ChatState { next: 1000, ..ChatState::default() }));
        let router = Router::new().fallback(answer).with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        FakeChat { url: format!("http://{addr}"), state }
    }

    fn requests(&self) -> Vec<ChatRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    fn force(&self, answers: &[Forced]) {
        self.state.lock().unwrap().forced.extend(answers.iter().cloned());
    }

    fn delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    /// Forgets every message, as if deleted in the chat.
    fn delete_messages(&self) {
        self.state.lock().unwrap().messages.clear();
    }

    /// The requests that created a live message.
    fn creates(&self) -> Vec<ChatRequest> {
        self.requests().into_iter().filter(is_create).collect()
    }

    /// The requests that edited one.
    fn edits(&self) -> Vec<ChatRequest> {
        self.requests().into_iter().filter(|r| r.method == Method::PATCH || r.path.ends_with("chat.update")).collect()
    }

    /// The follow-ups.
    fn follow_ups(&self) -> Vec<ChatRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == Method::POST && !is_create(r) && !r.path.ends_with("chat.update"))
            .collect()
    }
}

fn is_create(r: &ChatRequest) -> bool {
    r.method == Method::POST
        && ((r.path == "/discord/hook" && r.query.contains("wait=true"))
            || (r.path.ends_with("chat.postMessage") && r.body.get("thread_ts").is_none()))
}

async fn answer(
    State(state): State<Arc<Mutex<ChatState>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    raw: String,
) -> Response {
    let body: Value = serde_json::from_str(&raw).unwrap_or(Value::Null);
    let path = uri.path().to_owned();
    let query = uri.query().unwrap_or_default().to_owned();
    let delay = {
        let mut s = state.lock().unwrap();
        s.requests.push(ChatRequest {
            method: method.clone(),
            path: path.clone(),
            query: query.clone(),
            headers: headers.clone(),
            raw,
            body: body.clone(),
        });
        s.delay
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let json = |v: Value| (StatusCode::OK, [("content-type", "application/json")], v.to_string()).into_response();
    let mut s = state.lock().unwrap();
    if let Some(forced) = s.forced.pop_front() {
        return match forced {
            Forced::Status(code) => (StatusCode::from_u16(code).unwrap(), "{}").into_response(),
            Forced::SlackError(error) => json(json!({"ok": false, "error": error})),
        };
    }
    if let Some(method_name) = path.strip_prefix("/slack/api/") {
        let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
        if auth != format!("Bearer {SLACK_BOT_TOKEN}") {
            return json(json!({"ok": false, "error": "invalid_auth"}));
        }
        return match method_name {
            "chat.postMessage" if body.get("thread_ts").is_some() => {
                s.next += 1;
                json(json!({"ok": true, "channel": body["channel"], "ts": format!("1700000000.{:06}", s.next)}))
            }
            "chat.postMessage" => {
                s.next += 1;
                let ts = format!("1700000000.{:06}", s.next);
                s.messages.insert(ts.clone(), body.clone());
                json(json!({"ok": true, "channel": body["channel"], "ts": ts, "message": {"text": body["text"]}}))
            }
            "chat.update" => {
                let ts = body["ts"].as_str().unwrap_or_default().to_owned();
                match s.messages.get_mut(&ts) {
                    Some(m) => {
                        *m = body.clone();
                        json(json!({"ok": true, "channel": body["channel"], "ts": ts}))
                    }
                    None => json(json!({"ok": false, "error": "message_not_found"})),
                }
            }
            _ => json(json!({"ok": false, "error": "unknown_method"})),
        };
    }
    match (method, path.strip_prefix("/discord/hook")) {
        (Method::POST, Some("")) if query.contains("wait=true") => {
            s.next += 1;
            let id = format!("{}", 1_300_000_000_000_000_000u64 + s.next);
            s.messages.insert(id.clone(), body.clone());
            let mut message = body.clone();
            message["id"] = id.into();
            message["channel_id"] = "42".into();
            json(message)
        }
        (Method::POST, Some("")) => StatusCode::NO_CONTENT.into_response(),
        (Method::PATCH, Some(rest)) => {
            let id = rest.trim_start_matches("/messages/").to_owned();
            match s.messages.get_mut(&id) {
                Some(m) => {
                    *m = body.clone();
                    let mut message = body.clone();
                    message["id"] = id.into();
                    json(message)
                }
                None => (StatusCode::NOT_FOUND, r#"{"message": "Unknown Message", "code": 10008}"#).into_response(),
            }
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

fn event(i: usize) -> Value {
    json!({"event_type": "step_completed", "message": format!("Step {i} done"), "data": {"i": i}})
}

fn question() -> Value {
    json!({"event_type": "question", "message": "Which plan: Basic or Pro?", "data": {"question_id": "q_1"}})
}

/// A job's answers, one per poll: running with events, a question, running
/// again, then `end` (the last answer, which stays).
fn timeline(end: Value) -> Vec<Reply> {
    let mut events = vec![event(1)];
    let mut out = vec![Reply::Json(json!({"status": "running", "events": events, "current_step": "Open the form"}))];
    events.push(event(2));
    out.push(Reply::Json(json!({"status": "running", "events": events, "current_step": "Fill in the form"})));
    events.push(question());
    out.push(Reply::Json(json!({"status": "waiting_for_input", "events": events, "current_step": "Ask"})));
    events.push(event(3));
    out.push(Reply::Json(json!({"status": "running", "events": events, "current_step": "Submit"})));
    let mut end = end;
    end["events"] = events.into();
    out.push(Reply::Json(end));
    out
}

fn discord_hook(chat: &FakeChat) -> String {
    format!(
        "\n[[webhooks]]\nname = \"live\"\nurl = \"{}/discord/hook\"\nformat = \"discord\"\nmode = \"live\"\n",
        chat.url
    )
}

fn slack_hook(chat: &FakeChat) -> String {
    format!(
        "\n[[webhooks]]\nname = \"live\"\nformat = \"slack\"\nmode = \"live\"\nbot_token_env = \"SLACK_BOT_TOKEN\"\n\
         channel = \"C0123456789\"\napi_url = \"{}/slack/api\"\n",
        chat.url
    )
}

/// The notifications of `job` that the webhook got, in order, as (type, state).
fn deliveries(store: &Store, job: &str) -> Vec<(String, DeliveryState)> {
    store
        .notifications_of(job)
        .unwrap()
        .into_iter()
        .flat_map(|n| n.deliveries.into_iter().map(move |d| (n.kind.clone(), d.state)))
        .collect()
}

/// Waits until every delivery of `job` is delivered and the job has ended.
async fn all_delivered(relay: &Relay, job: &str, last: &str) {
    eventually(
        WAIT,
        || format!("{:?}", deliveries(&relay.store, job)),
        || {
            let d = deliveries(&relay.store, job);
            d.last().is_some_and(|(k, _)| k == last) && d.iter().all(|(_, s)| *s == DeliveryState::Delivered)
        },
    )
    .await;
}

/// A live message body without the Slack API's own keys, for the Block Kit check.
fn slack_message(body: &Value) -> Value {
    let mut m = body.clone();
    if let Some(o) = m.as_object_mut() {
        o.remove("channel");
        o.remove("ts");
    }
    m
}

fn text_of(r: &ChatRequest) -> String {
    r.body.to_string()
}

#[tokio::test]
async fn discord_live_posts_once_then_edits_in_order_with_follow_ups_for_questions_and_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let chat = FakeChat::start().await;
    dari.script(JOB, timeline(json!({"status": "completed", "final_result": {"quote": "Pro, 49 EUR"}})));
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[], &discord_hook(&chat))).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    all_delivered(&relay, JOB, "job.completed").await;

    let creates = chat.creates();
    assert_eq!(creates.len(), 1, "one live message per job: {:?}", chat.requests());
    let id = chat.state.lock().unwrap().messages.keys().next().cloned().unwrap();
    let edits = chat.edits();
    assert!(!edits.is_empty());
    for edit in &edits {
        assert_eq!(edit.path, format!("/discord/hook/messages/{id}"), "every edit is of the one message");
    }
    for r in creates.iter().chain(&edits) {
        assert!(discord_problems(&r.body).is_empty(), "{:?}: {}", discord_problems(&r.body), r.raw);
    }
    // The last edit shows the end and the job.
    let last = edits.last().unwrap();
    assert!(text_of(last).contains("Job completed"), "{}", last.raw);
    assert!(text_of(last).contains(JOB), "{}", last.raw);
    assert!(text_of(last).contains("Recent events"), "{}", last.raw);
    // Follow-ups: the question and the end, in that order, nothing else.
    let follow_ups: Vec<String> =
        chat.follow_ups().iter().map(|r| r.body["content"].as_str().unwrap_or_default().to_owned()).collect();
    assert_eq!(follow_ups.len(), 2, "{follow_ups:?}");
    assert!(follow_ups[0].contains("Basic or Pro"), "{follow_ups:?}");
    assert!(follow_ups[1].contains("Job completed"), "{follow_ups:?}");
    // In order: the follow-up of the question comes after a message that
    // shows the question, the end's after the message shows the end.
    let requests = chat.requests();
    let at = |pred: &dyn Fn(&ChatRequest) -> bool| requests.iter().position(pred).unwrap();
    let q_reply = at(&|r| r.method == Method::POST && !is_create(r) && text_of(r).contains("Basic or Pro"));
    let q_shown = at(&|r| (is_create(r) || r.method == Method::PATCH) && text_of(r).contains("Basic or Pro"));
    assert!(q_shown < q_reply);
    let end_shown = at(&|r| r.method == Method::PATCH && text_of(r).contains("Job completed"));
    let end_reply = at(&|r| r.method == Method::POST && !is_create(r) && text_of(r).contains("Job completed"));
    assert!(q_reply < end_shown && end_shown < end_reply, "{q_reply} {end_shown} {end_reply}");
    assert_eq!(requests.last().unwrap().method, Method::POST, "the end's follow-up comes last");
    // The store keeps the message with the deliveries.
    let kept = relay.store.live_message(JOB, "live").unwrap().unwrap();
    assert_eq!(kept.id, id);
    relay.stop().await;
}

#[tokio::test]
async fn edits_are_coalesced_while_one_is_out_and_every_follow_up_is_still_sent() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let chat = FakeChat::start().await;
    // A slow chat: each request takes 400 ms, while the job moves every poll (50 ms).
    chat.delay(Duration::from_millis(400));
    let mut answers = Vec::new();
    let mut events = Vec::new();
    for i in 0..12 {
        events.push(event(i));
        if i == 6 {
            events.push(question());
            answers.push(Reply::Json(json!({"status": "waiting_for_input", "events": events})));
        } else {
            answers.push(Reply::Json(json!({"status": "running", "events": events})));
        }
    }
    answers.push(Reply::Json(json!({"status": "completed", "events": events, "final_result": "done"})));
    dari.script(JOB, answers);
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[], &discord_hook(&chat))).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    all_delivered(&relay, JOB, "job.completed").await;
    let notifications = deliveries(&relay.store, JOB).len();
    let (creates, edits) = (chat.creates().len(), chat.edits().len());
    assert_eq!(creates, 1);
    assert!(creates + edits < notifications, "{notifications} notifications, {creates} create and {edits} edits");
    let last = chat.edits().last().cloned().unwrap();
    assert!(text_of(&last).contains("Job completed") && text_of(&last).contains("Step 11 done"), "{}", last.raw);
    let follow_ups = chat.follow_ups();
    assert_eq!(follow_ups.len(), 2, "the question's and the end's: {follow_ups:?}");
    // Coalesced deliveries are delivered, and say which edit covered them.
    let rows = relay.store.list_deliveries(None, 100).unwrap();
    assert!(rows.iter().all(|d| d.state == "delivered"), "{rows:?}");
    let covered = rows
        .iter()
        .filter(|d| {
            relay.store.attempts(d.id).unwrap().iter().any(|a| {
                a.response_excerpt.as_deref().is_some_and(|e| e.starts_with("covered by the live edit of delivery"))
            })
        })
        .count();
    assert!(covered >= notifications - creates - edits, "{covered} of {notifications} covered by another's edit");
    relay.stop().await;
}

#[tokio::test]
async fn a_live_message_deleted_in_the_chat_is_posted_again() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let chat = FakeChat::start().await;
    dari.script(JOB, vec![Reply::Json(json!({"status": "running", "events": [event(1)]}))]);
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[], &discord_hook(&chat))).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    eventually(WAIT, || format!("{:?}", chat.requests()), || !chat.creates().is_empty()).await;
    relay.settle().await;
    chat.delete_messages();
    dari.script(JOB, vec![Reply::Json(json!({"status": "completed", "events": [event(1)], "final_result": 1}))]);
    all_delivered(&relay, JOB, "job.completed").await;
    let creates = chat.creates();
    assert_eq!(creates.len(), 2, "{:?}", chat.requests());
    let second = chat.state.lock().unwrap().messages.keys().next().cloned().unwrap();
    assert_eq!(relay.store.live_message(JOB, "live").unwrap().unwrap().id, second);
    relay.stop().await;
}

#[tokio::test]
async fn huge_results_and_errors_stay_within_the_limits_of_both_platforms() {
    let body = |name: &str| bodies().into_iter().find(|(n, _)| n == name).unwrap().1;
    let big_result = body("job.completed.20kb_result");
    let long_error = body("job.failed.5000_char_error");
    for format in [Format::Discord, Format::Slack] {
        for latest in [&big_result, &long_error] {
            let latest: Value = serde_json::from_str(latest).unwrap();
            let events: Vec<Value> =
                (0..8).map(|_| serde_json::from_str(&body("job.event.question")).unwrap()).collect();
            let msg = dari_relay::deliver::render_live(format, &latest, &events);
            let problems = match format {
                Format::Slack => block_kit_problems(&msg),
                _ => discord_problems(&msg),
            };
            assert!(problems.is_empty(), "{format:?}: {problems:?}");
            assert!(msg.to_string().contains(latest["data"]["job_id"].as_str().unwrap()));
        }
    }
    let failed: Value = serde_json::from_str(&long_error).unwrap();
    let text = live::follow_up(&failed).unwrap();
    assert!(text.chars().count() <= live::FOLLOW_UP_MAX);
    assert!(text.contains("Traceback (most recent call last)"), "{text}");
}

#[tokio::test]
async fn through_the_relay_a_failure_shows_its_error_start_in_the_last_edit_and_its_follow_up() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let chat = FakeChat::start().await;
    let error: String =
        format!("Timed out waiting for the Submit button. {}", "x".repeat(5000)).chars().take(5000).collect();
    let result: Value = json!({"rows": (0..600).map(|i| json!({"id": i, "name": format!("Customer {i:04} of the acme portal")})).collect::<Vec<_>>()});
    assert!(result.to_string().len() > 20_000);
    dari.script(JOB, timeline(json!({"status": "failed", "error": error})));
    dari.script(JOB2, vec![Reply::Json(json!({"status": "completed", "events": [event(1)], "final_result": result}))]);
    let extra = format!("{}{}", discord_hook(&chat), slack_hook(&chat).replace("name = \"live\"", "name = \"slack\""));
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[], &extra)).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB), watch_on("acme/form", JOB2)]).unwrap();
    all_delivered(&relay, JOB, "job.failed").await;
    all_delivered(&relay, JOB2, "job.completed").await;
    let requests = chat.requests();
    for r in requests.iter().filter(|r| is_create(r) || r.method == Method::PATCH || r.path.ends_with("chat.update")) {
        let problems = if r.path.starts_with("/slack") {
            block_kit_problems(&slack_message(&r.body))
        } else {
            discord_problems(&r.body)
        };
        assert!(problems.is_empty(), "{}: {problems:?}", r.path);
    }
    // Per job and webhook: one create.
    let creates = chat.creates();
    assert_eq!(creates.len(), 4, "two jobs, two webhooks: {creates:?}");
    // The failure's last Discord edit and its follow-up show the error's start.
    let last_edit =
        chat.edits().into_iter().filter(|r| r.method == Method::PATCH && text_of(r).contains(JOB)).last().unwrap();
    assert!(text_of(&last_edit).contains("Timed out waiting for the Submit button"), "{}", last_edit.raw);
    let failure_reply = chat
        .follow_ups()
        .into_iter()
        .find(|r| r.path == "/discord/hook" && text_of(r).contains("Timed out waiting"))
        .expect("the failure's follow-up");
    assert!(failure_reply.body["content"].as_str().unwrap().chars().count() <= 2000);
    let slack_replies: Vec<_> = chat.follow_ups().into_iter().filter(|r| r.path.starts_with("/slack")).collect();
    assert!(slack_replies.iter().any(|r| text_of(r).contains("Timed out waiting")), "{slack_replies:?}");
    relay.stop().await;
}

#[tokio::test]
async fn slack_live_posts_updates_and_replies_in_the_thread_with_the_token_only_in_authorization() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let chat = FakeChat::start().await;
    dari.script(JOB, timeline(json!({"status": "completed", "final_result": {"quote": "Pro"}})));
    let db = dir.path().join("r.db");
    let relay = Relay::start(&config_text(&db, &dari, &[], &slack_hook(&chat))).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    all_delivered(&relay, JOB, "job.completed").await;
    let creates = chat.creates();
    assert_eq!(creates.len(), 1, "{:?}", chat.requests());
    assert_eq!(creates[0].path, "/slack/api/chat.postMessage");
    assert_eq!(creates[0].body["channel"], "C0123456789");
    let ts = chat.state.lock().unwrap().messages.keys().next().cloned().unwrap();
    let edits = chat.edits();
    assert!(!edits.is_empty());
    for edit in &edits {
        assert_eq!(edit.path, "/slack/api/chat.update");
        assert_eq!(edit.body["ts"], ts.as_str());
        assert!(block_kit_problems(&slack_message(&edit.body)).is_empty(), "{}", edit.raw);
    }
    assert!(text_of(edits.last().unwrap()).contains("Job completed"));
    let replies = chat.follow_ups();
    assert_eq!(replies.len(), 2, "{replies:?}");
    for reply in &replies {
        assert_eq!(reply.body["thread_ts"], ts.as_str(), "replies go in the message's thread");
        assert_eq!(reply.body["reply_broadcast"], true, "questions and the end are shown in the channel too");
    }
    // The token: in every request's Authorization, nowhere else.
    for r in chat.requests() {
        assert_eq!(r.headers["authorization"], format!("Bearer {SLACK_BOT_TOKEN}").as_str());
        assert!(!r.raw.contains(SLACK_BOT_TOKEN), "the token is in a body: {}", r.raw);
        for (name, value) in &r.headers {
            if name != "authorization" {
                assert!(!value.to_str().unwrap_or_default().contains(SLACK_BOT_TOKEN), "{name}");
            }
        }
    }
    let stored = relay.store.live_message(JOB, "live").unwrap().unwrap();
    assert_eq!((stored.id.as_str(), stored.channel.as_deref()), (ts.as_str(), Some("C0123456789")));
    relay.stop().await;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        // A -wal or -shm file may go as the last connection closes.
        let Ok(bytes) = std::fs::read(entry.unwrap().path()) else { continue };
        assert!(
            !bytes.windows(SLACK_BOT_TOKEN.len()).any(|w| w == SLACK_BOT_TOKEN.as_bytes()),
            "token in the database"
        );
    }
}

#[tokio::test]
async fn slack_errors_are_classified_rate_limits_and_server_errors_retried_the_rest_failed_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let chat = FakeChat::start().await;
    // Rate limited, then a server error, then Slack's own internal error: all retried.
    chat.force(&[Forced::SlackError("ratelimited"), Forced::Status(500), Forced::SlackError("internal_error")]);
    dari.script(JOB, vec![Reply::Json(json!({"status": "completed", "events": [], "final_result": 1}))]);
    let relay = Relay::start(&config_text(&dir.path().join("r.db"), &dari, &[], &slack_hook(&chat))).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    all_delivered(&relay, JOB, "job.completed").await;
    assert_eq!(chat.creates().len(), 4, "three refused posts, then the one that worked");
    assert_eq!(chat.state.lock().unwrap().messages.len(), 1);

    // A channel the bot is not in: failed at once, with the reason.
    chat.force(&[Forced::SlackError("not_in_channel")]);
    dari.script(JOB2, vec![Reply::Json(json!({"status": "completed", "events": [], "final_result": 1}))]);
    relay.store.add_watches(&[watch_on("acme/form", JOB2)]).unwrap();
    let failed = || relay.store.list_deliveries(Some(DeliveryState::Failed), 10).unwrap();
    eventually(WAIT, || format!("{:?}", failed()), || !failed().is_empty()).await;
    let row = &failed()[0];
    assert_eq!((row.job_id.as_str(), row.attempts), (JOB2, 1), "{row:?}");
    let error = row.last_error.clone().unwrap();
    assert!(error.contains("Slack: not_in_channel") && error.contains("invite the bot"), "{error}");
    relay.stop().await;
}

// ----- check-config ----------------------------------------------------------

fn check_config(body: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let db = dir.path().join("r.db");
    std::fs::write(
        &path,
        format!("database = \"{}\"\n[orgs.acme]\napi_key_env = \"DARI_API_KEY\"\n{body}", db.display()),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dari-relay"))
        .args(["check-config", "-c"])
        .arg(&path)
        .env_clear()
        .env("DARI_API_KEY", API_KEY)
        .env("SLACK_BOT_TOKEN", SLACK_BOT_TOKEN)
        .env("HOOK_URL", "https://discord.com/api/webhooks/1/abc")
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn check_config_refuses_what_cannot_be_live_and_never_prints_the_token() {
    let hook = "[[webhooks]]\nname = \"h\"\n";
    let cases = [
        (
            format!("{hook}url_env = \"HOOK_URL\"\nformat = \"teams\"\nmode = \"live\"\n"),
            "webhooks[0] (h).mode",
            "a Teams Workflows webhook can only post a new message, never edit one",
        ),
        (
            format!("{hook}url = \"http://127.0.0.1:9/h\"\nmode = \"live\"\n"),
            "webhooks[0] (h).mode",
            "mode = \"live\" is for format = \"discord\" or \"slack\"",
        ),
        (
            format!("{hook}url_env = \"HOOK_URL\"\nformat = \"discord\"\nmode = \"sometimes\"\n"),
            "mode",
            "unknown variant",
        ),
        (
            format!("{hook}url_env = \"HOOK_URL\"\nformat = \"discord\"\nmode = \"live\"\nbody_template = \"{{}}\"\n"),
            "webhooks[0] (h).mode",
            "remove template and body_template",
        ),
        (
            format!("{hook}format = \"slack\"\nmode = \"live\"\nchannel = \"C1\"\n"),
            "webhooks[0] (h).bot_token_env",
            "chat:write",
        ),
        (
            format!("{hook}format = \"slack\"\nmode = \"live\"\nbot_token_env = \"SLACK_BOT_TOKEN\"\n"),
            "webhooks[0] (h).channel",
            "needs channel",
        ),
        (
            format!("{hook}format = \"slack\"\nmode = \"live\"\nbot_token_env = \"NOPE\"\nchannel = \"C1\"\n"),
            "webhooks[0] (h).bot_token_env",
            "environment variable NOPE is not set",
        ),
        (
            format!(
                "{hook}format = \"slack\"\nmode = \"live\"\nbot_token_env = \"SLACK_BOT_TOKEN\"\nchannel = \"#a b\"\n"
            ),
            "webhooks[0] (h).channel",
            "is not a Slack channel id",
        ),
        (
            format!(
                "{hook}format = \"slack\"\nmode = \"live\"\nbot_token_env = \"SLACK_BOT_TOKEN\"\nchannel = \"C1\"\n\
                 api_url = \"ftp://slack.example/api\"\n"
            ),
            "api_url",
            "http",
        ),
        (
            format!(
                "{hook}format = \"slack\"\nmode = \"live\"\nbot_token_env = \"SLACK_BOT_TOKEN\"\nchannel = \"C1\"\n\
                 api_url = \"https://slack.example/api?x=1\"\n"
            ),
            "webhooks[0] (h).api_url",
            "without a query",
        ),
        (
            format!(
                "{hook}url_env = \"HOOK_URL\"\nformat = \"slack\"\nmode = \"live\"\nbot_token_env = \"SLACK_BOT_TOKEN\"\nchannel = \"C1\"\n"
            ),
            "webhooks[0] (h)",
            "remove url and url_env",
        ),
        (
            format!("{hook}url_env = \"HOOK_URL\"\nformat = \"discord\"\nchannel = \"C1\"\n"),
            "webhooks[0] (h).channel",
            "only applies to format = \"slack\" with mode = \"live\"",
        ),
    ];
    for (body, key, message) in cases {
        let (code, stdout, stderr) = check_config(&body);
        assert_eq!(code, Some(2), "{body}\n{stdout}{stderr}");
        assert!(stderr.contains(key) && stderr.contains(message), "{body}\nwanted {key}: {message}\ngot {stderr}");
        assert!(!stderr.contains(SLACK_BOT_TOKEN) && !stdout.contains(SLACK_BOT_TOKEN));
    }
    let (code, stdout, stderr) = check_config(
        "[[webhooks]]\nname = \"s\"\nformat = \"slack\"\nmode = \"live\"\nbot_token_env = \"SLACK_BOT_TOKEN\"\n\
         channel = \"C0123456789\"\n",
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("mode = \"live\"") && stdout.contains("channel = \"C0123456789\""), "{stdout}");
    assert!(stdout.contains("bot_token_env = \"<redacted, from $SLACK_BOT_TOKEN>\""), "{stdout}");
    assert!(stdout.contains("api_url = \"https://slack.com/api\""), "{stdout}");
    assert!(!stdout.contains("url = \"https://slack.com/<redacted>\""), "no URL of its own: {stdout}");
    assert!(!stderr.contains("warning"), "a live Slack webhook writes no secret URL: {stderr}");
    assert!(!stdout.contains(SLACK_BOT_TOKEN) && !stderr.contains(SLACK_BOT_TOKEN));
}

// ----- send-test -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_posts_a_live_sample_and_then_edits_it() {
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    for hook in [discord_hook as fn(&FakeChat) -> String, slack_hook] {
        let chat = FakeChat::start().await;
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_text(&dir.path().join("r.db"), &dari, &[], &hook(&chat))).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dari-relay"));
        cmd.args(["send-test", "live", "--config"]).arg(&config);
        cmd.env("DARI_API_KEY", API_KEY).env("SLACK_BOT_TOKEN", SLACK_BOT_TOKEN).env_remove("RUST_LOG");
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("live post: HTTP 200") && stdout.contains("live edit: HTTP 200"), "{stdout}");
        assert!(!stdout.contains(SLACK_BOT_TOKEN));
        assert_eq!((chat.creates().len(), chat.edits().len()), (1, 1), "{:?}", chat.requests());
        let (create, edit) = (&chat.creates()[0], &chat.edits()[0]);
        assert!(text_of(create).contains("Test:") && text_of(edit).contains("Test:"), "{}", create.raw);
        assert!(text_of(edit).contains("Job completed"), "{}", edit.raw);
        // A refusal is shown and fails the command.
        chat.force(&[Forced::SlackError("channel_not_found"), Forced::Status(500)]);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dari-relay"));
        cmd.args(["send-test", "live", "--config"]).arg(&config);
        cmd.env("DARI_API_KEY", API_KEY).env("SLACK_BOT_TOKEN", SLACK_BOT_TOKEN).env_remove("RUST_LOG");
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        assert!(stdout.contains("live post:"), "{stdout}");
    }
}

// ----- snapshots -------------------------------------------------------------

#[test]
fn live_bodies_match_their_snapshots() {
    use dari_relay::deliver::{Step, render_live, request_of};
    use dari_relay::store::LiveMessage;
    let all = bodies();
    let body = |name: &str| -> Value { serde_json::from_str(&all.iter().find(|(n, _)| n == name).unwrap().1).unwrap() };
    let events: Vec<Value> = vec![body("job.event"), body("job.event.question")];
    let config_text =
        |hook: &str| format!("[orgs.acme]\napi_key_env = \"DARI_API_KEY\"\n[[webhooks]]\nname = \"live\"\n{hook}");
    let discord = dari_relay::config::Config::from_toml(
        &config_text("url = \"https://discord.com/api/webhooks/1/abc\"\nformat = \"discord\"\nmode = \"live\"\n"),
        Path::new("t.toml"),
        &crate::fakes::env,
    )
    .unwrap();
    let slack = dari_relay::config::Config::from_toml(
        &config_text(
            "format = \"slack\"\nmode = \"live\"\nbot_token_env = \"SLACK_BOT_TOKEN\"\nchannel = \"C0123456789\"\n",
        ),
        Path::new("t.toml"),
        &crate::fakes::env,
    )
    .unwrap();
    let discord_message = LiveMessage { id: "1300000000000000001".into(), channel: None };
    let slack_message = LiveMessage { id: "1700000000.000001".into(), channel: Some("C0123456789".into()) };
    settings().bind(|| {
        for (config, message, name) in [(&discord, &discord_message, "discord"), (&slack, &slack_message, "slack")] {
            let webhook = &config.webhooks[0];
            for kind in ["job.running", "job.waiting_for_input", "job.completed", "job.failed"] {
                let latest = body(kind);
                let rendered = render_live(webhook.format, &latest, &events);
                let step = if kind == "job.running" { Step::Create } else { Step::Edit(message) };
                let (method, url, request) = request_of(webhook, step, &rendered, "");
                insta::assert_json_snapshot!(
                    format!("live-{name}-{kind}"),
                    json!({"method": method.as_str(), "url": url.as_str(), "body": request})
                );
                if let Some(text) = live::follow_up(&latest) {
                    let step = Step::FollowUp { message, broadcast: true };
                    let (method, url, request) = request_of(webhook, step, &Value::Null, &text);
                    insta::assert_json_snapshot!(
                        format!("live-{name}-{kind}-follow-up"),
                        json!({"method": method.as_str(), "url": url.as_str(), "body": request})
                    );
                }
            }
        }
    });
}

// ----- kill -9 -------------------------------------------------------------------

fn spawn(config: &Path, log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_dari-relay"))
        .args(["run", "--config"])
        .arg(config)
        .env("DARI_API_KEY", API_KEY)
        .env("SLACK_BOT_TOKEN", SLACK_BOT_TOKEN)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap())
        .spawn()
        .unwrap()
}

/// The real binary, SIGKILLed once its live message is stored and the job
/// moves on: after the restart it edits that message, posts no other.
async fn killed_and_restarted(hook: fn(&FakeChat) -> String) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("relay.db");
    let log = dir.path().join("relay.log");
    let dari = FakeDari::start().await;
    let chat = FakeChat::start().await;
    dari.script(JOB, vec![Reply::Json(json!({"status": "running", "events": [event(1)]}))]);
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_text(&db, &dari, &[], &hook(&chat))).unwrap();
    Store::open(&db).unwrap().add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    let mut child = spawn(&config, &log);
    let store = Store::open(&db).unwrap();
    eventually(WAIT, || format!("{:?}", chat.requests()), || store.live_message(JOB, "live").ok().flatten().is_some())
        .await;
    // Slow the chat down so the kill lands while an edit may be out.
    chat.delay(Duration::from_millis(300));
    dari.script(JOB, timeline(json!({"status": "completed", "final_result": "done"})));
    eventually(WAIT, || format!("{:?}", chat.requests()), || !chat.edits().is_empty()).await;
    child.kill().unwrap();
    child.wait().unwrap();
    chat.delay(Duration::ZERO);
    let mut child = spawn(&config, &log);
    eventually_async(
        WAIT,
        || format!("{:?}", deliveries(&store, JOB)),
        async || {
            let d = deliveries(&store, JOB);
            d.last().is_some_and(|(k, _)| k == "job.completed") && d.iter().all(|(_, s)| *s == DeliveryState::Delivered)
        },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(chat.creates().len(), 1, "the same message is edited after the restart: {:?}", chat.requests());
    let id = store.live_message(JOB, "live").unwrap().unwrap().id;
    for edit in chat.edits() {
        assert!(edit.path.ends_with(&id) || edit.body["ts"] == id.as_str(), "{edit:?}");
    }
    assert!(text_of(chat.edits().last().unwrap()).contains("Job completed"));
    // The token (Slack) is in no log line and no database file.
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("live message posted"), "the debug log is captured");
    assert!(!log_text.contains(SLACK_BOT_TOKEN), "the token is in the log");
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        // A -wal or -shm file may go as the last connection closes.
        let Ok(bytes) = std::fs::read(entry.unwrap().path()) else { continue };
        assert!(!bytes.windows(SLACK_BOT_TOKEN.len()).any(|w| w == SLACK_BOT_TOKEN.as_bytes()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_live_after_sigkill_edits_the_same_message() {
    killed_and_restarted(discord_hook).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_live_after_sigkill_edits_the_same_message_and_the_token_stays_out_of_logs_and_database() {
    killed_and_restarted(slack_hook).await;
}
