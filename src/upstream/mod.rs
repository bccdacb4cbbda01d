//! The Dari API client: one status request per call, classified into a typed
//! answer, and the parser that turns a 200 body into a [`StatusAnswer`].
//!
//! The client knows nothing about scheduling or state; the poller decides what
//! each [`UpstreamError`] means for the watch. Bodies are read with a size
//! cap, so a runaway response cannot exhaust memory, and the API key travels
//! only in the `X-API-Key` header: errors are built without it.

use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};

use crate::vocab::{PortalId, parse_job_id};

mod direct;

/// What went wrong with one status request.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// 404: Dari does not know the job (yet).
    #[error("job not found (404)")]
    NotFound,
    /// 401 or 403: the org's API key was rejected.
    #[error("API key rejected ({0})")]
    Unauthorized(u16),
    /// 429: too many requests for this org.
    #[error("rate limited (429)")]
    RateLimited {
        /// The server's `Retry-After`, when it sent a usable one.
        retry_after: Option<Duration>,
    },
    /// Any other non-2xx status.
    #[error("unexpected HTTP status {0}")]
    Status(u16),
    /// No complete answer within `request_timeout`.
    #[error("timed out")]
    Timeout,
    /// Connecting, TLS, or reading the answer failed.
    #[error("transport error: {0}")]
    Transport(String),
    /// The body is larger than `max_response_bytes`.
    #[error("response larger than {0} bytes, refused")]
    TooLarge(usize),
    /// The 200 body is not a status answer.
    #[error("malformed status answer: {0}")]
    Malformed(String),
}

impl UpstreamError {
    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            UpstreamError::NotFound => "not_found",
            UpstreamError::Unauthorized(_) => "unauthorized",
            UpstreamError::RateLimited { .. } => "rate_limited",
            UpstreamError::Status(_) => "http_error",
            UpstreamError::Timeout => "timeout",
            UpstreamError::Transport(_) => "transport_error",
            UpstreamError::TooLarge(_) => "too_large",
            UpstreamError::Malformed(_) => "malformed",
        }
    }
}

/// A parsed 200 answer of the status endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusAnswer {
    /// The job's status as Dari wrote it.
    pub status: String,
    /// The append-only event list, in order.
    pub events: Vec<Value>,
    /// Every other field, passed through to receivers unchanged.
    pub fields: Map<String, Value>,
}

/// Parses a status body. Unknown fields are kept (and passed through);
/// `events` may be missing or null (no events yet); a body that is not a
/// JSON object with a string `status` is malformed.
pub fn parse_status(body: &[u8]) -> Result<StatusAnswer, UpstreamError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| UpstreamError::Malformed(format!("{e}; body starts {:?}", excerpt(body, 120))))?;
    let Value::Object(mut fields) = value else {
        return Err(UpstreamError::Malformed("the body is not a JSON object".into()));
    };
    let status = match fields.get("status") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(_) => {
            return Err(UpstreamError::Malformed("`status` is not a non-empty string".into()));
        }
        None => return Err(UpstreamError::Malformed("`status` is missing".into())),
    };
    let events = match fields.remove("events") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(events)) => events,
        Some(_) => return Err(UpstreamError::Malformed("`events` is not a list".into())),
    };
    Ok(StatusAnswer { status, events, fields })
}

/// The first `max` bytes of `body` as text, for logs.
pub fn excerpt(body: &[u8], max: usize) -> String {
    let cut = &body[..body.len().min(max)];
    let mut text = String::from_utf8_lossy(cut).into_owned();
    if body.len() > max {
        text.push('…');
    }
    text
}

/// The HTTP client for Dari. Cheap to clone; all clones share one connection
/// pool, which is what keeps polls on warm keep-alive connections. Status
/// polls go through hyper's client directly ([`direct`]) unless a proxy is
/// set in the environment; starting a job, and every poll behind a proxy,
/// through reqwest.
#[derive(Debug, Clone)]
pub struct UpstreamClient {
    http: reqwest::Client,
    direct: Option<direct::Direct>,
    base_url: Url,
    max_response_bytes: usize,
}

impl UpstreamClient {
    /// Builds the client from `[upstream]`. Like the receivers' client it
    /// takes reqwest's system proxy: `HTTPS_PROXY` / `HTTP_PROXY` /
    /// `ALL_PROXY` unless `NO_PROXY` exempts Dari's host, read now.
    pub fn new(config: &crate::config::Upstream) -> Result<UpstreamClient, reqwest::Error> {
        let http = reqwest::Client::builder()
            .user_agent(crate::USER_AGENT)
            // A redirect could carry X-API-Key to another host: never follow
            // one. A 3xx is an unexpected status, retried with backoff.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.request_timeout)
            .connect_timeout(config.request_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()?;
        Ok(UpstreamClient {
            http,
            direct: direct::Direct::from_env(config),
            base_url: config.base_url.clone(),
            max_response_bytes: config.max_response_bytes,
        })
    }

    /// `GET {base}/task/{org}/{endpoint}/status?job_id={job_id}`. Returns the
    /// raw body of a 200 answer: the poller hashes it before parsing, so an
    /// unchanged answer costs no JSON work.
    pub async fn fetch_status(
        &self,
        portal: &PortalId,
        job_id: &str,
        api_key: &SecretString,
    ) -> Result<Bytes, UpstreamError> {
        if let Some(direct) = &self.direct {
            return direct.fetch_status(portal, job_id, api_key, self.max_response_bytes).await;
        }
        let mut url = self.url(["task", &portal.org, &portal.endpoint, "status"])?;
        url.query_pairs_mut().append_pair("job_id", job_id);
        let response =
            self.http.get(url).header("X-API-Key", api_key.expose_secret()).send().await.map_err(transport_error)?;
        classify(response.status(), response.headers())?;
        read_reqwest(response, self.max_response_bytes).await
    }

    /// Whether status polls bypass reqwest (no proxy in the environment).
    pub fn polls_directly(&self) -> bool {
        self.direct.is_some()
    }
}

impl UpstreamClient {
    /// `POST {base}/jobs/{org}/{endpoint}/start` with `body` passed through
    /// as JSON. Returns Dari's answer and the `job_id` it names.
    pub async fn start_job(
        &self,
        portal: &PortalId,
        body: Vec<u8>,
        api_key: &SecretString,
    ) -> Result<(String, Value), UpstreamError> {
        let url = self.url(["jobs", &portal.org, &portal.endpoint, "start"])?;
        let response = self
            .http
            .post(url)
            .header("X-API-Key", api_key.expose_secret())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(transport_error)?;
        classify(response.status(), response.headers())?;
        let bytes = read_reqwest(response, self.max_response_bytes).await?;
        let answer: Value = serde_json::from_slice(&bytes)
            .map_err(|e| UpstreamError::Malformed(format!("{e}; body starts {:?}", excerpt(&bytes, 120))))?;
        let job_id = answer
            .get("job_id")
            .and_then(Value::as_str)
            .and_then(|id| parse_job_id(id).ok())
            .ok_or_else(|| UpstreamError::Malformed("the start answer has no job_id UUID".into()))?;
        Ok((job_id, answer))
    }
}

impl UpstreamClient {
    /// `{base_url}/{segments...}`, each segment percent-encoded.
    fn url(&self, segments: [&str; 4]) -> Result<Url, UpstreamError> {
        let mut url = self.base_url.clone();
        url.path_segments_mut()
            .map_err(|_| UpstreamError::Transport("base_url cannot take a path".into()))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }
}

/// Passes a 2xx status; turns any other into its error (a 429's usable
/// `Retry-After` kept). Both HTTP paths answer through here.
fn classify(status: StatusCode, headers: &reqwest::header::HeaderMap) -> Result<(), UpstreamError> {
    match status {
        s if s.is_success() => Ok(()),
        StatusCode::NOT_FOUND => Err(UpstreamError::NotFound),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(UpstreamError::Unauthorized(status.as_u16())),
        StatusCode::TOO_MANY_REQUESTS => {
            let retry_after = headers
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| crate::retry::parse_retry_after(v, SystemTime::now()));
            Err(UpstreamError::RateLimited { retry_after })
        }
        s => Err(UpstreamError::Status(s.as_u16())),
    }
}

/// The declared `Content-Length` of an answer, if any.
fn content_length(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    headers.get(reqwest::header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// Reads a body of at most `limit` bytes, refusing a longer one as soon as
/// its declared length or the bytes read so far exceed the limit; `error`
/// names a failed read. A body that arrives in one frame (a status answer
/// usually does) is returned as it is, without a copy. Both HTTP paths
/// read through here.
async fn read_capped<B>(
    mut body: B,
    declared: Option<u64>,
    limit: usize,
    error: impl Fn(B::Error) -> UpstreamError,
) -> Result<Bytes, UpstreamError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(UpstreamError::TooLarge(limit));
    }
    let (mut only, mut joined, mut len) = (None::<Bytes>, BytesMut::new(), 0usize);
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(&error)?.into_data() else {
            continue; // trailers: not part of the body
        };
        len = len.saturating_add(data.len());
        if len > limit {
            return Err(UpstreamError::TooLarge(limit));
        }
        if only.is_none() && joined.is_empty() {
            only = Some(data);
            continue;
        }
        if let Some(head) = only.take() {
            joined.reserve(declared.map_or(len, |n| n as usize).max(len));
            joined.extend_from_slice(&head);
        }
        joined.extend_from_slice(&data);
    }
    Ok(only.unwrap_or_else(|| joined.freeze()))
}

/// A reqwest answer's body, read through [`read_capped`].
async fn read_reqwest(response: reqwest::Response, limit: usize) -> Result<Bytes, UpstreamError> {
    let declared = content_length(response.headers());
    let body = hyper::http::Response::<reqwest::Body>::from(response).into_body();
    read_capped(body, declared, limit, transport_error).await
}

fn transport_error(e: reqwest::Error) -> UpstreamError {
    if e.is_timeout() {
        return UpstreamError::Timeout;
    }
    // The URL carries no secret here, but the chain can be long.
    innermost(e)
}

/// A transport error as its innermost cause, the informative part
/// ("connection refused"): both HTTP paths report errors through here.
fn innermost(e: impl std::error::Error) -> UpstreamError {
    let mut cause: &dyn std::error::Error = &e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    UpstreamError::Transport(cause.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The body cap over any framing: one frame comes back as it is (no
    /// copy), several are joined, and a body over the limit, declared or
    /// read, is refused.
    #[tokio::test]
    async fn bodies_are_read_within_the_cap_and_one_frame_is_not_copied() {
        use http_body_util::StreamBody;
        use hyper::body::Frame;
        fn body(parts: &[&Bytes]) -> impl hyper::body::Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
            let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
                parts.iter().map(|p| Ok(Frame::data((*p).clone()))).collect();
            StreamBody::new(futures_util::stream::iter(frames))
        }
        let never = |e: std::convert::Infallible| match e {};
        let whole = Bytes::from_static(b"{\"status\":\"running\"}");
        let read = read_capped(body(&[&whole]), Some(whole.len() as u64), 100, never).await.unwrap();
        assert_eq!(read.as_ptr(), whole.as_ptr(), "one frame is returned without a copy");
        let (a, b, c) = (Bytes::from_static(b"ab"), Bytes::from_static(b"cd"), Bytes::from_static(b"ef"));
        assert_eq!(read_capped(body(&[&a, &b, &c]), None, 6, never).await.unwrap(), "abcdef");
        assert_eq!(read_capped(body(&[]), None, 6, never).await.unwrap(), "");
        for (declared, limit) in [(None, 5), (Some(7), 10), (Some(2), 5)] {
            let refused = read_capped(body(&[&a, &b, &c]), declared, limit, never).await;
            let expect_refused = limit < 6 || declared.is_some_and(|n| n > limit as u64);
            assert_eq!(matches!(refused, Err(UpstreamError::TooLarge(_))), expect_refused, "{declared:?} {limit}");
        }
    }

    #[test]
    fn portal_ids() {
        let p: PortalId = "acme/contact_form".parse().unwrap();
        assert_eq!((p.org.as_str(), p.endpoint.as_str()), ("acme", "contact_form"));
        for bad in ["acme", "/x", "acme/", "a/b/c", "a b/c"] {
            assert!(bad.parse::<PortalId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parse_accepts_missing_optionals_and_keeps_unknown_fields() {
        let a = parse_status(br#"{"status":"running","novel":1}"#).unwrap();
        assert_eq!(a.status, "running");
        assert!(a.events.is_empty());
        assert_eq!(a.fields["novel"], 1);
    }

    #[test]
    fn parse_refuses_malformed_bodies() {
        for body in [
            &b"not json"[..],
            br#"{"status":"run"#,
            br#"[1,2]"#,
            br#"{"events":[]}"#,
            br#"{"status":7}"#,
            br#"{"status":"running","events":{}}"#,
        ] {
            assert!(matches!(parse_status(body), Err(UpstreamError::Malformed(_))), "{body:?}");
        }
    }
}
