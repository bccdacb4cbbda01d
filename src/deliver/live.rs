//! The live path (`mode = "live"`): one chat message per (job, webhook),
//! posted by the job's first notification and edited by the later ones,
//! with a short follow-up for what needs people.
//!
//! An attempt takes the head of a chain like any other, but covers the
//! chain's whole pending run (up to [`COVER_MAX`]): it renders the newest
//! of them, with the job's recent events, into the live message, creates
//! it (Discord `POST {url}?wait=true`, Slack `chat.postMessage`) or edits
//! it (Discord `PATCH {url}/messages/{id}`, Slack `chat.update`), then
//! posts the follow-up of every covered notification that has one, in
//! order, and records each covered delivery. So notifications that waited
//! while an edit was out are coalesced into the next edit (the message
//! catches up, no queue of stale edits), and still each question, failure
//! and end gets its follow-up.
//!
//! The message's id is stored (`DelivererStore::save_live_message`) as
//! soon as the platform answers, before any delivery is recorded, so a
//! restart edits the same message. The one window: a crash after the
//! platform created the message and before its id is stored posts one
//! more message after the restart. Edits show a whole state, so one made
//! again is harmless; a follow-up made again after such a crash is sent
//! twice (at least once, like every delivery).

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use reqwest::{Method, Url};
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::{info, warn};

use super::attempt::{Attempt, AttemptDone, load_signal, observe, write_outcome};
use super::send::{exchange, webhook_headers};
use super::{Response, Signal, classify, is_rate_limit};
use crate::config::{SlackBot, Webhook};
use crate::format::{discord, live, slack};
use crate::retry;
use crate::store::{AttemptRecord, DeliveryOutcome, LiveMessage, OutboundDelivery};
use crate::vocab::Format;

/// The most pending notifications of one chain that one edit covers; the
/// rest wait for the next attempt, which starts as soon as this one ends.
pub(super) const COVER_MAX: usize = 50;
/// The most bytes of a platform's answer read, to find the message's id
/// (Discord answers the whole message, embeds included).
const ANSWER_MAX: usize = 64 * 1024;
/// The longest message id or Slack `ts` accepted from an answer.
const MESSAGE_ID_MAX: usize = 64;
/// Slack errors that no retry fixes: the delivery fails at once with the
/// reason (shown by `deliveries list`). Any other `ok: false` is retried
/// per the schedule; `ratelimited` waits like a 429.
pub const SLACK_FATAL: &[&str] = &[
    "channel_not_found",
    "not_in_channel",
    "is_archived",
    "invalid_auth",
    "not_authed",
    "account_inactive",
    "token_revoked",
    "token_expired",
    "no_permission",
    "missing_scope",
    "not_allowed_token_type",
    "restricted_action",
    "ekm_access_denied",
    "invalid_blocks",
    "invalid_blocks_format",
    "msg_too_long",
    "no_text",
    "too_many_attachments",
    "invalid_arguments",
    "cant_update_message",
    "edit_window_closed",
];

/// One request of the live path.
#[derive(Debug, Clone, Copy)]
pub enum Step<'a> {
    /// Post the live message.
    Create,
    /// Edit the live message.
    Edit(&'a LiveMessage),
    /// Post a follow-up under the live message; `broadcast`: Slack's
    /// `reply_broadcast`, so the reply shows in the channel too.
    FollowUp { message: &'a LiveMessage, broadcast: bool },
}

/// What the platform's answer to one request means.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Done; the answer as JSON (`Null` when it was not JSON).
    Done(Value),
    /// The message to edit is gone (deleted in the chat): post a new one.
    MessageGone,
    /// Failed; the answer, for `classify` (a Slack `ok: false` becomes a
    /// 429 when rate limited, else an error without a status).
    Failed(Response),
    /// Failed for good: a Slack error no retry fixes.
    Fatal(String),
}

/// Reads a Discord answer: a 2xx is done; a 404 to an edit means the
/// message is gone; anything else is for `classify`.
pub fn discord_reply(response: Response, answer: &[u8], editing: bool) -> Reply {
    if response.is_success() {
        return Reply::Done(serde_json::from_slice(answer).unwrap_or(Value::Null));
    }
    if editing && response.status == Some(404) {
        return Reply::MessageGone;
    }
    Reply::Failed(response)
}

/// Reads a Slack Web API answer. Slack answers 200 with `{"ok": false,
/// "error": …}` when a call fails: `ratelimited` waits like a 429, the
/// errors of [`SLACK_FATAL`] fail the delivery with the reason,
/// `message_not_found` to an edit posts a new message, and the rest are
/// retried. A non-2xx status goes to `classify` as it is.
pub fn slack_reply(response: Response, answer: &[u8], editing: bool) -> Reply {
    if !response.is_success() {
        return Reply::Failed(response);
    }
    let Ok(answer) = serde_json::from_slice::<Value>(answer) else {
        let error = Some("Slack answered without a JSON body".to_owned());
        return Reply::Failed(Response { status: None, error, ..response });
    };
    if answer["ok"] == true {
        return Reply::Done(answer);
    }
    let error: String = answer["error"].as_str().unwrap_or("unknown_error").chars().take(100).collect();
    match error.as_str() {
        "ratelimited" => {
            Reply::Failed(Response { status: Some(429), error: Some(format!("Slack: {error}")), ..response })
        }
        "message_not_found" if editing => Reply::MessageGone,
        e if SLACK_FATAL.contains(&e) => Reply::Fatal(format!("Slack: {error}{}", slack_hint(e))),
        _ => Reply::Failed(Response { status: None, error: Some(format!("Slack: {error}")), ..response }),
    }
}

/// What to do about a fatal Slack error, for `deliveries list`.
fn slack_hint(error: &str) -> &'static str {
    match error {
        "channel_not_found" => " (check the webhook's channel id, and that the bot can see the channel)",
        "not_in_channel" => " (invite the bot to the channel: /invite @your-bot)",
        "invalid_auth" | "not_authed" | "token_revoked" | "token_expired" | "account_inactive" => {
            " (check the bot token in bot_token_env)"
        }
        "missing_scope" | "no_permission" => " (give the bot the chat:write scope and reinstall it)",
        _ => "",
    }
}

/// The live message a create's answer names: Discord's `id`, Slack's `ts`
/// with its `channel` (the configured one if the answer has none). `None`
/// when the answer holds no usable id.
pub fn created_message(format: Format, answer: &Value, bot: Option<&SlackBot>) -> Option<LiveMessage> {
    let id_like = |s: &str, extra: &str| {
        !s.is_empty() && s.len() <= MESSAGE_ID_MAX && s.chars().all(|c| c.is_ascii_digit() || extra.contains(c))
    };
    match format {
        Format::Slack => {
            let ts = answer["ts"].as_str().filter(|ts| id_like(ts, "."))?;
            let channel = answer["channel"]
                .as_str()
                .filter(|c| !c.is_empty() && c.len() <= MESSAGE_ID_MAX && c.chars().all(|c| c.is_ascii_alphanumeric()))
                .map(str::to_owned)
                .or_else(|| bot.map(|b| b.channel.clone()))?;
            Some(LiveMessage { id: ts.to_owned(), channel: Some(channel) })
        }
        _ => {
            let id = answer["id"].as_str().filter(|id| id_like(id, ""))?;
            Some(LiveMessage { id: id.to_owned(), channel: None })
        }
    }
}

/// The request of one step: method, URL, body (as JSON). `message` is the
/// live view rendered for the platform; `follow_up` the follow-up's text.
pub fn request_of(webhook: &Webhook, step: Step<'_>, message: &Value, follow_up: &str) -> (Method, Url, Value) {
    match (&webhook.slack_bot, step) {
        (Some(bot), Step::Create) => {
            let mut body = message.clone();
            body["channel"] = bot.channel.clone().into();
            (Method::POST, bot.method_url("chat.postMessage"), body)
        }
        (Some(bot), Step::Edit(m)) => {
            let mut body = message.clone();
            body["channel"] = m.channel.clone().unwrap_or_else(|| bot.channel.clone()).into();
            body["ts"] = m.id.clone().into();
            (Method::POST, bot.method_url("chat.update"), body)
        }
        (Some(bot), Step::FollowUp { message: m, broadcast }) => {
            let channel = m.channel.clone().unwrap_or_else(|| bot.channel.clone());
            let body = json!({"channel": channel, "thread_ts": m.id, "text": slack::escape(follow_up),
                "reply_broadcast": broadcast, "unfurl_links": false});
            (Method::POST, bot.method_url("chat.postMessage"), body)
        }
        (None, Step::Create) => {
            let mut url = webhook.url.clone();
            url.query_pairs_mut().append_pair("wait", "true");
            (Method::POST, url, message.clone())
        }
        (None, Step::Edit(m)) => {
            let mut url = webhook.url.clone();
            let path = format!("{}/messages/{}", url.path().trim_end_matches('/'), m.id);
            url.set_path(&path);
            (Method::PATCH, url, message.clone())
        }
        (None, Step::FollowUp { .. }) => {
            let body = json!({"content": discord::escape(follow_up), "allowed_mentions": {"parse": []}});
            (Method::POST, webhook.url.clone(), body)
        }
    }
}

/// Sends one step and reads what the platform said. Discord requests carry
/// the webhook's headers (as `deliver::send`'s do); Slack's carry the bot
/// token, in `Authorization` only.
pub async fn send_step(
    http: &reqwest::Client,
    webhook: &Webhook,
    msg_id: &str,
    step: Step<'_>,
    message: &Value,
    follow_up: &str,
) -> (Response, Reply) {
    let (method, url, body) = request_of(webhook, step, message, follow_up);
    let body = body.to_string();
    let headers = match &webhook.slack_bot {
        Some(bot) => {
            let mut headers = HeaderMap::new();
            for extra in &webhook.headers {
                headers.insert(extra.name.clone(), extra.value.clone());
            }
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
            headers.insert(AUTHORIZATION, bot.authorization());
            headers
        }
        None => match webhook_headers(webhook, msg_id, body.as_bytes()) {
            Ok(headers) => headers,
            Err(response) => return (response.clone(), Reply::Failed(response)),
        },
    };
    let request = http.request(method, url).headers(headers).body(body);
    let (response, answer) = exchange(request, webhook.format, ANSWER_MAX).await;
    let editing = matches!(step, Step::Edit(_));
    let reply = match webhook.format {
        Format::Slack => slack_reply(response.clone(), &answer, editing),
        _ => discord_reply(response.clone(), &answer, editing),
    };
    (response, reply)
}

/// The live message of a standard body and recent events, for the webhook's
/// platform.
pub fn render(format: Format, latest: &Value, events: &[Value]) -> Value {
    let view = live::LiveView { latest, events };
    match format {
        Format::Slack => live::slack(view),
        _ => live::discord(view),
    }
}

/// Whether a follow-up of this notification type is also shown in the
/// channel (Slack's `reply_broadcast`): the end and questions.
fn broadcast(kind: &str) -> bool {
    kind != "job.event"
}

/// The follow-up of a notification, if it has one (`live::follow_up`),
/// except for a question event detected with the job already waiting for
/// input: that poll's `job.waiting_for_input` asks the same question, and
/// one reply is enough.
pub fn follow_up_of(kind: &str, body: &Value) -> Option<String> {
    if kind == "job.event" && body["data"]["status"] == "waiting_for_input" {
        return None;
    }
    live::follow_up(body)
}

/// What `send-test` does with a live webhook: posts a sample live message
/// (a running job), then edits it (the job completed), as the deliverer
/// would; each step's answer, labelled, and `None` for the failure when
/// it was done. It stops at the first step that fails.
pub async fn send_test_live(
    http: &reqwest::Client,
    webhook: &Webhook,
    labels: &serde_json::Map<String, Value>,
    timestamp: &str,
) -> Vec<(&'static str, Response, Option<String>)> {
    let sample = |kind: &str| -> Value {
        serde_json::from_str(&crate::notification::sample(kind, labels, timestamp).body.compose()).unwrap_or_default()
    };
    let msg_id = crate::poller::new_msg_id();
    let mut out = Vec::new();
    let created = render(webhook.format, &sample("job.running"), &[sample("job.event")]);
    let (response, reply) = send_step(http, webhook, &msg_id, Step::Create, &created, "").await;
    let message = match &reply {
        Reply::Done(answer) => created_message(webhook.format, answer, webhook.slack_bot.as_ref()),
        _ => None,
    };
    let Some(message) = message else {
        let why = match reply {
            Reply::Done(_) => "the answer names no message id".to_owned(),
            Reply::Fatal(error) => error,
            Reply::Failed(r) => r.error.unwrap_or_else(|| format!("HTTP {}", r.status.unwrap_or_default())),
            Reply::MessageGone => "the message is gone".to_owned(),
        };
        out.push(("post", response, Some(why)));
        return out;
    };
    out.push(("post", response, None));
    let edited = render(webhook.format, &sample("job.completed"), &[sample("job.event")]);
    let (response, reply) = send_step(http, webhook, &msg_id, Step::Edit(&message), &edited, "").await;
    let why = match reply {
        Reply::Done(_) => None,
        Reply::Fatal(error) => Some(error),
        Reply::Failed(r) => Some(r.error.unwrap_or_else(|| format!("HTTP {}", r.status.unwrap_or_default()))),
        Reply::MessageGone => Some("the message is gone".to_owned()),
    };
    out.push(("edit", response, why));
    out
}

/// One covered delivery's result, to record.
struct Done {
    delivery: OutboundDelivery,
    outcome: DeliveryOutcome,
    response: Response,
    note: Option<String>,
}

impl Attempt {
    /// The live attempt of a chain: see the module's documentation. Returns
    /// what the loop needs, like [`Attempt::run`].
    pub(super) async fn run_live(self) -> AttemptDone {
        let started_ms = self.clock.now_ms();
        let clock = Instant::now();
        let head = self.delivery.clone();
        let (job_id, name) = (head.job_id.clone(), head.webhook.clone());
        let mut covered = match self.store.pending_chain(job_id.clone(), name.clone(), COVER_MAX).await {
            Ok(chain) if chain.first().is_some_and(|d| d.id == head.id) => chain,
            Ok(_) => vec![head.clone()],
            Err(e) => {
                warn!(error = %e, "cannot read the chain's pending run; this edit covers its head only");
                vec![head.clone()]
            }
        };
        let newest = covered.last().cloned().unwrap_or_else(|| head.clone());
        let events = match self.store.recent_events(job_id.clone(), name.clone(), newest.id, live::RECENT_EVENTS).await
        {
            Ok(events) => events.iter().filter_map(|b| serde_json::from_str(b).ok()).collect(),
            Err(e) => {
                warn!(error = %e, "cannot read the job's recent events; the message shows none");
                Vec::new()
            }
        };
        let mut results = Vec::new();
        let mut signal = (Duration::ZERO, Signal::Neutral);
        'steps: {
            let message = match self.store.live_message(job_id.clone(), name.clone()).await {
                Ok(message) => message,
                Err(e) => {
                    // Posting now could make a second message: wait.
                    let response = failure(format!("cannot read the live message's id: {e}"));
                    results.push(self.failed(&head, response).await);
                    break 'steps;
                }
            };
            let latest: Value = match serde_json::from_str(&newest.body) {
                Ok(latest) => latest,
                Err(e) => {
                    let error = format!("the stored body is not JSON: {e}");
                    let outcome = DeliveryOutcome::GaveUp { error: error.clone() };
                    results.push(Done { delivery: head.clone(), outcome, response: failure(error), note: None });
                    break 'steps;
                }
            };
            let rendered = render(self.webhook.format, &latest, &events);
            let sent = Instant::now();
            let step = message.as_ref().map_or(Step::Create, Step::Edit);
            let (mut response, mut reply) =
                send_step(&self.http, &self.webhook, &head.msg_id, step, &rendered, "").await;
            signal = (sent.elapsed(), load_signal(&response));
            let mut message = message;
            if reply == Reply::MessageGone {
                info!("the live message is gone from the chat; posting a new one");
                message = None;
                (response, reply) =
                    send_step(&self.http, &self.webhook, &head.msg_id, Step::Create, &rendered, "").await;
            }
            let message = match (reply, message) {
                (Reply::Done(_), Some(message)) => message,
                (Reply::Done(answer), None) => {
                    let Some(created) = created_message(self.webhook.format, &answer, self.webhook.slack_bot.as_ref())
                    else {
                        let response = Response {
                            error: Some("the platform's answer names no message id".to_owned()),
                            status: None,
                            ..response
                        };
                        results.push(self.failed(&head, response).await);
                        break 'steps;
                    };
                    let store = &*self.store;
                    let save =
                        || async { store.save_live_message(job_id.clone(), name.clone(), created.clone()).await };
                    use backon::Retryable;
                    if let Err(e) = save.retry(retry::policy::attempt_record()).await {
                        let response = failure(format!(
                            "the live message was posted but its id could not be stored ({e}); the next attempt posts another"
                        ));
                        results.push(self.failed(&head, response).await);
                        break 'steps;
                    }
                    info!(message_id = %created.id, "live message posted");
                    created
                }
                (Reply::Fatal(error), _) => {
                    let outcome = DeliveryOutcome::GaveUp { error: error.clone() };
                    results.push(Done { delivery: head.clone(), outcome, response, note: None });
                    break 'steps;
                }
                (Reply::Failed(failed), _) => {
                    results.push(self.failed(&head, failed).await);
                    break 'steps;
                }
                (Reply::MessageGone, _) => {
                    results.push(self.failed(&head, failure("the new live message is gone at once".into())).await);
                    break 'steps;
                }
            };
            let edit_status = response.status.unwrap_or(200);
            // The follow-ups, in order; the first that fails ends the run
            // there: its delivery is tried again (the edit again, which is
            // harmless, then its follow-up), the ones after it wait.
            for delivery in std::mem::take(&mut covered) {
                let body: Value = serde_json::from_str(&delivery.body).unwrap_or(Value::Null);
                let mut status = edit_status;
                let mut answer = response.clone();
                if let Some(text) = follow_up_of(&delivery.kind, &body) {
                    let step = Step::FollowUp { message: &message, broadcast: broadcast(&delivery.kind) };
                    let (r, reply) =
                        send_step(&self.http, &self.webhook, &delivery.msg_id, step, &Value::Null, &text).await;
                    match reply {
                        Reply::Done(_) => {
                            status = r.status.unwrap_or(200);
                            answer = r;
                        }
                        Reply::Fatal(error) => {
                            let outcome = DeliveryOutcome::GaveUp { error };
                            results.push(Done { delivery, outcome, response: r, note: None });
                            break;
                        }
                        Reply::Failed(r) => {
                            results.push(self.failed(&delivery, r).await);
                            break;
                        }
                        // Only an edit can find its message gone.
                        Reply::MessageGone => {
                            results.push(self.failed(&delivery, failure("the live message is gone".into())).await);
                            break;
                        }
                    }
                }
                let note =
                    (delivery.id != head.id).then(|| format!("covered by the live edit of delivery {}", head.id));
                let outcome = DeliveryOutcome::Delivered { status };
                results.push(Done { delivery, outcome, response: answer, note });
            }
        }
        // Count, log and record each covered delivery in order; the first
        // refused write goes back to the loop, and the ones after it stay
        // pending (the next attempt covers them again).
        let mut slow_down: Option<Duration> = None;
        let mut gone = false;
        let mut unrecorded = None;
        for done in results {
            let Done { delivery, outcome, response, note } = done;
            let span = tracing::info_span!("covered", delivery_id = delivery.id);
            let _enter = span.enter();
            if let Some(wait) =
                observe(&self.metrics, &self.webhook.name, &delivery, response.quota, &outcome, self.clock.now_ms())
            {
                slow_down = Some(slow_down.map_or(wait, |w| w.max(wait)));
            }
            gone |= matches!(outcome, DeliveryOutcome::Paused);
            let error = outcome.error().map(str::to_owned);
            let record = AttemptRecord {
                attempted_at: started_ms,
                duration_ms: i64::try_from(clock.elapsed().as_millis()).unwrap_or(i64::MAX),
                http_status: response.status,
                response_excerpt: note.or(response.excerpt),
                error: error.or(response.error),
            };
            drop(_enter);
            if let Some(u) = write_outcome(&*self.store, delivery.id, record, outcome).await {
                unrecorded = Some(u);
                break;
            }
        }
        AttemptDone { gone, slow_down, signal, unrecorded }
    }

    /// A failed request's outcome for `delivery`, by `classify` (a rate
    /// limit looks up when the delivery was first tried).
    async fn failed(&self, delivery: &OutboundDelivery, response: Response) -> Done {
        let first = match is_rate_limit(&response) {
            true => self.store.first_attempt_at(delivery.id).await.unwrap_or(None),
            false => None,
        };
        let outcome =
            classify(&response, delivery.attempts, &self.schedule, self.clock.now_ms(), fastrand::f64(), first);
        Done { delivery: delivery.clone(), outcome, response, note: None }
    }
}

/// An answer that never came, with why.
fn failure(error: String) -> Response {
    Response { error: Some(error), ..Response::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok200() -> Response {
        Response { status: Some(200), ..Response::default() }
    }

    #[test]
    fn slack_answers_are_classified() {
        let reply = |body: &str, editing: bool| slack_reply(ok200(), body.as_bytes(), editing);
        assert!(matches!(reply(r#"{"ok":true,"ts":"1.2"}"#, false), Reply::Done(_)));
        // Rate limited: a 429 for classify, which waits without spending a retry.
        let Reply::Failed(r) = reply(r#"{"ok":false,"error":"ratelimited"}"#, false) else { panic!() };
        assert_eq!(r.status, Some(429));
        assert!(is_rate_limit(&r));
        let outcome = classify(&r, 0, &[Duration::from_secs(1)], 0, 0.5, None);
        assert!(matches!(outcome, DeliveryOutcome::RateLimited { .. }), "{outcome:?}");
        // Fatal errors fail the delivery with the reason.
        for error in ["channel_not_found", "invalid_auth", "not_in_channel"] {
            let Reply::Fatal(text) = reply(&format!(r#"{{"ok":false,"error":"{error}"}}"#), false) else { panic!() };
            assert!(text.starts_with(&format!("Slack: {error}")), "{text}");
        }
        // Others are retried per the schedule.
        let Reply::Failed(r) = reply(r#"{"ok":false,"error":"internal_error"}"#, false) else { panic!() };
        let outcome = classify(&r, 0, &[Duration::from_secs(1)], 0, 0.5, None);
        assert!(matches!(outcome, DeliveryOutcome::RetryAt { ref error, .. } if error == "Slack: internal_error"));
        // A server error stays one; an answer that is not JSON is retried.
        let server = Response { status: Some(503), ..Response::default() };
        assert_eq!(slack_reply(server.clone(), b"", false), Reply::Failed(server));
        assert!(matches!(reply("<html>", false), Reply::Failed(Response { status: None, .. })));
        // A message gone: posted again, only when editing.
        assert_eq!(reply(r#"{"ok":false,"error":"message_not_found"}"#, true), Reply::MessageGone);
        assert!(matches!(reply(r#"{"ok":false,"error":"message_not_found"}"#, false), Reply::Failed(_)));
        // Slack's error text is bounded.
        let long = format!(r#"{{"ok":false,"error":"{}"}}"#, "e".repeat(10_000));
        let Reply::Failed(r) = reply(&long, false) else { panic!() };
        assert!(r.error.unwrap().len() < 200);
    }

    #[test]
    fn discord_answers_and_created_ids() {
        let gone = Response { status: Some(404), ..Response::default() };
        assert_eq!(discord_reply(gone.clone(), b"", true), Reply::MessageGone);
        assert_eq!(discord_reply(gone.clone(), b"", false), Reply::Failed(gone));
        let id = |v: Value| created_message(Format::Discord, &v, None);
        assert_eq!(id(json!({"id": "1300000000000000001"})).unwrap().id, "1300000000000000001");
        assert_eq!(id(json!({"id": "../../x"})), None, "only a snowflake makes a URL path");
        assert_eq!(id(json!({"id": "1".repeat(100)})), None);
        assert_eq!(id(json!({})), None);
        let ts = created_message(Format::Slack, &json!({"ok": true, "ts": "1700000000.000100", "channel": "C1"}), None);
        assert_eq!(ts, Some(LiveMessage { id: "1700000000.000100".into(), channel: Some("C1".into()) }));
        assert_eq!(created_message(Format::Slack, &json!({"ts": "1.2", "channel": "C/1"}), None), None);
    }

    #[test]
    fn a_question_event_the_status_asks_again_gets_no_follow_up_of_its_own() {
        let event = |status: &str| {
            json!({"type": "job.event", "timestamp": "2026-11-30T10:30:15.123Z", "data": {
                "job_id": "j", "portal_id": "a/b", "status": status, "labels": {},
                "event": {"event_type": "question", "message": "Basic or Pro?", "data": {"question_id": "q"}}}})
        };
        assert_eq!(follow_up_of("job.event", &event("waiting_for_input")), None);
        assert!(follow_up_of("job.event", &event("running")).is_some());
    }
}
