//! Adding watches, the use case the CLI and the admin API share: the one
//! watch request type ([`WatchRequest`], what a `watch import` line and a
//! `POST /v1/watches` body hold, and what the CLI posts to the API), and
//! start-and-watch ([`start_and_watch`], behind `dari-relay start` and
//! `POST /v1/jobs/{org_id}/{endpoint_name}/start`).
//!
//! Below both `cli` and `admin`, above `config`, `upstream` and `store`:
//! the callers keep only what is theirs, reading a file or a request and
//! printing a line or answering JSON.

use std::collections::BTreeMap;
use std::future::Future;

use serde_json::{Value, json};

use crate::config::{Config, InvalidWatch};
use crate::upstream::{UpstreamClient, UpstreamError};
use crate::vocab::{NewWatch, PortalId, parse_job_id};

/// The fields of a watch request, in the order a request is checked.
pub const FIELDS: [&str; 5] = ["portal_id", "job_id", "webhooks", "labels", "from_now"];

/// A watch as a client asks for it: `{portal_id, job_id, webhooks?, labels?,
/// from_now?}` (INTERFACE.md). [`WatchRequest::from_json`] reads one with
/// the schema's types; [`WatchRequest::check`] turns it into the
/// [`NewWatch`] the store takes, by the rules every new watch follows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WatchRequest {
    /// `org_id/endpoint_name`, as written (checked by [`WatchRequest::check`]).
    pub portal_id: Option<String>,
    /// The job's UUID, as written (checked by [`WatchRequest::check`]).
    pub job_id: Option<String>,
    /// The webhooks to deliver to; `None` (or an empty list) for every
    /// webhook whose filters match.
    pub webhooks: Option<Vec<String>>,
    /// Labels, shown with the watch and offered to the webhooks' filters.
    pub labels: BTreeMap<String, String>,
    /// Skip the job's history and notify only of what happens from now.
    pub from_now: bool,
}

/// A watch request that is wrong, naming the field at fault (the admin
/// API's `{"error", "field"}`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidRequest {
    /// One of [`FIELDS`], or `body` for a body that is not an object.
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl InvalidRequest {
    fn new(field: &'static str, message: impl Into<String>) -> InvalidRequest {
        InvalidRequest { field, message: message.into() }
    }
}

impl From<InvalidWatch> for InvalidRequest {
    fn from(e: InvalidWatch) -> InvalidRequest {
        InvalidRequest { field: e.field, message: e.message }
    }
}

impl WatchRequest {
    /// Reads a request from a JSON object: no field beyond [`FIELDS`], each
    /// of its type (`null` is the same as leaving a field out).
    pub fn from_json(body: &Value) -> Result<WatchRequest, InvalidRequest> {
        let Value::Object(fields) = body else {
            return Err(InvalidRequest::new("body", "the body must be a JSON object"));
        };
        if let Some(unknown) = fields.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(InvalidRequest::new("body", format!("unknown field {unknown:?}")));
        }
        let text = |field: &'static str, what: &str| match fields.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(InvalidRequest::new(field, format!("{field} must be a string: {what}"))),
        };
        let portal_id = text("portal_id", "\"<org_id>/<endpoint_name>\"")?;
        let job_id = text("job_id", "a UUID")?;
        let webhooks = match fields.get("webhooks") {
            None | Some(Value::Null) => None,
            Some(Value::Array(names)) => Some(
                names
                    .iter()
                    .map(|n| n.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| InvalidRequest::new("webhooks", "webhooks must be a list of webhook names"))?,
            ),
            Some(_) => return Err(InvalidRequest::new("webhooks", "webhooks must be a list of webhook names")),
        };
        let labels = match fields.get("labels") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect::<Option<_>>()
                .ok_or_else(|| InvalidRequest::new("labels", "labels must be an object of strings"))?,
            Some(_) => return Err(InvalidRequest::new("labels", "labels must be an object of strings")),
        };
        let from_now = match fields.get("from_now") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(InvalidRequest::new("from_now", "from_now must be true or false")),
        };
        Ok(WatchRequest { portal_id, job_id, webhooks, labels, from_now })
    }

    /// The request for `watch` as it stands (what the CLI posts to the API).
    pub fn of(watch: &NewWatch) -> WatchRequest {
        WatchRequest {
            portal_id: Some(watch.portal.to_string()),
            job_id: Some(watch.job_id.clone()),
            webhooks: watch.webhooks.clone(),
            labels: watch.labels.clone(),
            from_now: watch.from_now,
        }
    }

    /// The request as JSON, which [`WatchRequest::from_json`] reads back.
    pub fn to_json(&self) -> Value {
        json!({
            "portal_id": self.portal_id,
            "job_id": self.job_id,
            "webhooks": self.webhooks,
            "labels": self.labels,
            "from_now": self.from_now,
        })
    }

    /// The watch this request asks for, if `config` allows it: a valid
    /// portal and job id, an org with credentials, webhooks that exist,
    /// bounded labels ([`Config::check_watch`]). An empty webhook list is
    /// the same as none.
    pub fn check(self, config: &Config) -> Result<NewWatch, InvalidRequest> {
        let portal: PortalId = match self.portal_id {
            Some(s) => s.parse().map_err(|e: String| InvalidRequest::new("portal_id", e))?,
            None => {
                return Err(InvalidRequest::new("portal_id", "portal_id is required: \"<org_id>/<endpoint_name>\""));
            }
        };
        let job_id = match self.job_id {
            Some(s) => parse_job_id(&s).map_err(|e| InvalidRequest::new("job_id", e))?,
            None => return Err(InvalidRequest::new("job_id", "job_id is required: a UUID")),
        };
        let watch = NewWatch {
            job_id,
            portal,
            webhooks: self.webhooks.filter(|w| !w.is_empty()),
            labels: self.labels,
            from_now: self.from_now,
        };
        config.check_watch(&watch)?;
        Ok(watch)
    }
}

/// A job Dari started and the relay watches.
#[derive(Debug)]
pub struct Started<T> {
    /// The job's id, from Dari's answer.
    pub job_id: String,
    /// Dari's answer to the start call, as it came.
    pub dari: Value,
    /// The watch that was added.
    pub watch: NewWatch,
    /// What the caller's `add` gave back (the stored row, a summary).
    pub stored: T,
}

/// Why start-and-watch did not end with a watched job.
#[derive(Debug, thiserror::Error)]
pub enum StartError<E> {
    /// The watch options are wrong; no job was started.
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    /// The HTTP client for Dari could not be built; no job was started.
    #[error("HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// Dari did not start the job.
    #[error("Dari did not start the job: {0}")]
    Dari(#[source] UpstreamError),
    /// Dari started the job, but it could not be watched: the caller says
    /// how to add it by hand, naming `job_id`.
    #[error("Dari started job {job_id}, but it could not be watched")]
    NotWatched {
        /// The running (and paid for) job.
        job_id: String,
        /// What `add` failed with.
        #[source]
        error: E,
    },
}

/// Starts a Dari job with its org's key and watches it. `request` is the
/// watch without its job id (the one it names, if any, is replaced by
/// Dari's); it is checked against `config` first, so a bad webhook name
/// never starts a paid job. `body` goes to Dari unchanged. `add` stores the
/// watch (the CLI through its own store, the admin API through the
/// daemon's); only its failure leaves a started job unwatched.
pub async fn start_and_watch<T, E, F, Fut>(
    config: &Config,
    mut request: WatchRequest,
    body: Vec<u8>,
    add: F,
) -> Result<Started<T>, StartError<E>>
where
    F: FnOnce(NewWatch) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    // A placeholder id, so the options are checked before the job exists.
    request.job_id = Some("00000000-0000-4000-8000-000000000000".to_owned());
    let mut watch = request.check(config)?;
    let org = &config.orgs[&watch.portal.org];
    let client = UpstreamClient::new(&config.upstream).map_err(StartError::Client)?;
    let (job_id, dari) = client.start_job(&watch.portal, body, &org.api_key).await.map_err(StartError::Dari)?;
    watch.job_id = job_id.clone();
    // The job is running and paid for: if it cannot be watched, say which it is.
    let stored = add(watch.clone()).await.map_err(|error| StartError::NotWatched { job_id: job_id.clone(), error })?;
    Ok(Started { job_id, dari, watch, stored })
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "550e8400-e29b-41d4-a716-446655440000";

    fn config() -> Config {
        let text = "database = \"r.db\"\n[upstream]\nbase_url = \"http://127.0.0.1:9\"\n\
                    [orgs.acme]\napi_key_env = \"K\"\n[[webhooks]]\nname = \"h\"\nurl = \"http://127.0.0.1:9/h\"\n";
        let env = |name: &str| (name == "K").then(|| "k".to_owned());
        Config::from_toml(text, std::path::Path::new("t.toml"), &env).unwrap()
    }

    #[test]
    fn a_request_reads_back_what_it_writes() {
        let config = config();
        let watch = NewWatch {
            job_id: JOB.into(),
            portal: "acme/form".parse().unwrap(),
            webhooks: Some(vec!["h".into()]),
            labels: [("team".to_owned(), "growth".to_owned())].into(),
            from_now: true,
        };
        let json = WatchRequest::of(&watch).to_json();
        assert_eq!(WatchRequest::from_json(&json).unwrap().check(&config).unwrap(), watch);
        // Left out and null are the same; an empty webhook list is none.
        let short = serde_json::json!({"portal_id": "acme/form", "job_id": JOB, "labels": null, "webhooks": []});
        let read = WatchRequest::from_json(&short).unwrap().check(&config).unwrap();
        assert_eq!((read.webhooks, read.labels.len(), read.from_now), (None, 0, false));
    }

    #[test]
    fn every_fault_names_its_field() {
        let config = config();
        let bad = [
            (serde_json::json!([1]), "body"),
            (serde_json::json!({"portal_id": "acme/form", "job_id": JOB, "x": 1}), "body"),
            (serde_json::json!({"job_id": JOB}), "portal_id"),
            (serde_json::json!({"portal_id": 7, "job_id": JOB}), "portal_id"),
            (serde_json::json!({"portal_id": "acme", "job_id": JOB}), "portal_id"),
            (serde_json::json!({"portal_id": "other/form", "job_id": JOB}), "portal_id"),
            (serde_json::json!({"portal_id": "acme/form"}), "job_id"),
            (serde_json::json!({"portal_id": "acme/form", "job_id": "nope"}), "job_id"),
            (serde_json::json!({"portal_id": "acme/form", "job_id": JOB, "webhooks": ["nope"]}), "webhooks"),
            (serde_json::json!({"portal_id": "acme/form", "job_id": JOB, "webhooks": [1]}), "webhooks"),
            (serde_json::json!({"portal_id": "acme/form", "job_id": JOB, "labels": {"n": 1}}), "labels"),
            (serde_json::json!({"portal_id": "acme/form", "job_id": JOB, "labels": {"": "v"}}), "labels"),
            (serde_json::json!({"portal_id": "acme/form", "job_id": JOB, "from_now": "yes"}), "from_now"),
        ];
        for (body, field) in bad {
            let error = WatchRequest::from_json(&body).and_then(|r| r.check(&config)).unwrap_err();
            assert_eq!(error.field, field, "{body}: {error}");
        }
    }

    /// A bad option fails before Dari is asked (its URL here answers nothing).
    #[tokio::test]
    async fn start_checks_the_watch_before_starting_a_job() {
        let config = config();
        let request = WatchRequest {
            portal_id: Some("acme/form".into()),
            webhooks: Some(vec!["nope".into()]),
            ..WatchRequest::default()
        };
        let added = std::cell::Cell::new(false);
        let result = start_and_watch(&config, request, b"{}".to_vec(), |_| async {
            added.set(true);
            Ok::<(), String>(())
        })
        .await;
        assert!(matches!(result, Err(StartError::Invalid(InvalidRequest { field: "webhooks", .. }))), "{result:?}");
        assert!(!added.get());
    }
}
