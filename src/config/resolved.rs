//! The resolved configuration ([`Config`] and the types it holds) and the
//! [`Resolver`] that builds it from the raw file, once: defaults filled in
//! from [`defaults`](super::defaults), every value checked against its
//! bounds, secrets loaded, templates compiled.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Url;
use reqwest::header::{HeaderName, HeaderValue};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::{Map, Value};
use toml::Spanned;

use super::raw::{
    DurationValue, RawAdmin, RawConfig, RawDelivery, RawUpstream, RawWebhook, parse_duration, parse_http_url,
};
use super::{ConfigError, RESERVED_HEADERS};
use crate::format::{BodyTemplate, TemplateSource};
use crate::glob::Glob;
use crate::signature::SigningKey;

/// The resolved configuration. Built by [`Config::load`] (or
/// [`Config::from_toml`] in tests and the demo), then shared read-only.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, for messages.
    pub path: PathBuf,
    /// The SQLite database file.
    pub database: PathBuf,
    /// How long delivered deliveries and ended watches are kept.
    pub retention: Duration,
    /// How Dari is polled.
    pub upstream: Upstream,
    /// How webhooks are delivered.
    pub delivery: Delivery,
    /// Credentials per org id, sorted by id.
    pub orgs: BTreeMap<String, Org>,
    /// Every configured webhook, in file order; names are unique.
    pub webhooks: Vec<Webhook>,
    /// The admin HTTP API, when `[admin] listen` is set.
    pub admin: Option<Admin>,
    /// Log format of `run`, unless `--log-format` says otherwise.
    pub log_format: Option<LogFormat>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[admin]`: the admin HTTP API.
#[derive(Clone)]
pub struct Admin {
    /// Where it listens.
    pub listen: ListenAddr,
    /// The bearer token every request must carry, if set.
    pub token: Option<SecretString>,
    /// Where the token came from.
    pub token_source: Option<SecretSource>,
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin").field("listen", &self.listen).field("token", &self.token_source).finish()
    }
}

/// Where the admin API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address.
    Tcp(std::net::SocketAddr),
    /// A Unix socket path (`unix:/run/dari-relay/admin.sock`).
    Unix(PathBuf),
}

impl ListenAddr {
    /// Whether only this machine can reach it: loopback TCP or a Unix socket.
    pub fn is_local(&self) -> bool {
        match self {
            ListenAddr::Tcp(addr) => addr.ip().is_loopback(),
            ListenAddr::Unix(_) => true,
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// `[upstream]`: the Dari API and the polling rhythm.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Base URL of the Dari API, without a trailing path.
    pub base_url: Url,
    /// Interval while a job keeps changing; also the first backoff step.
    pub poll_interval: Duration,
    /// Ceiling for the interval of an unchanged or failing job.
    pub max_poll_interval: Duration,
    /// Timeout of one status request, connect to last byte.
    pub request_timeout: Duration,
    /// Status requests in flight at once, all orgs together.
    pub max_in_flight: usize,
    /// Normalised statuses that end polling; always holds `completed` and `failed`.
    pub terminal_statuses: Vec<String>,
    /// Largest status body read; a longer one is refused unread.
    pub max_response_bytes: usize,
    /// How long a job may stay unknown (404) before `watch.failed`.
    pub not_found_grace: Duration,
    /// How long an org's key may stay rejected (401/403) before its watches fail.
    pub auth_grace: Duration,
    /// Age after which a watch is given up (`watch.failed`), whatever its job does.
    pub max_watch_age: Duration,
}

/// `[delivery]`: retries and timeouts of webhook deliveries.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Waits before retries 1..n; after the last one a delivery is `failed`.
    pub retry_schedule: Vec<Duration>,
    /// Timeout of one delivery attempt.
    pub request_timeout: Duration,
    /// How long `run` lets in-flight deliveries finish after SIGTERM.
    pub shutdown_timeout: Duration,
}

/// `[orgs.<org_id>]`: one Dari org and its API key.
#[derive(Clone)]
pub struct Org {
    /// The org id, as in portal ids `org_id/endpoint_name`.
    pub id: String,
    /// The `X-API-Key` value. Never printed.
    pub api_key: SecretString,
    /// Where the key came from, which is what `check-config` prints.
    pub api_key_source: SecretSource,
    /// Status requests per second for this org, on top of the global
    /// `max_in_flight`; `None` for no limit.
    pub max_requests_per_second: Option<f64>,
}

impl fmt::Debug for Org {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Org")
            .field("id", &self.id)
            .field("api_key", &self.api_key_source)
            .field("max_requests_per_second", &self.max_requests_per_second)
            .finish()
    }
}

/// Where a secret was loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable, by name.
    Env(String),
    /// A file, by path.
    File(PathBuf),
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Env(name) => write!(f, "<redacted, from ${name}>"),
            SecretSource::File(path) => write!(f, "<redacted, from {}>", path.display()),
        }
    }
}

/// Body format of a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The Standard Webhooks JSON body of INTERFACE.md.
    Standard,
    /// A Slack incoming-webhook message.
    Slack,
    /// A Discord webhook message.
    Discord,
}

impl Format {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Standard => "standard",
            Format::Slack => "slack",
            Format::Discord => "discord",
        }
    }
}

/// `[[webhooks]]`: one receiver.
#[derive(Clone)]
pub struct Webhook {
    /// Unique name, used by `--webhook`, in the database and in logs.
    pub name: String,
    /// Where deliveries are POSTed. Chat URLs are secrets, so this is never
    /// logged; `url_source` says whether it may be shown.
    pub url: Url,
    /// `None` when the URL is written in the config, else where it came from.
    pub url_source: Option<SecretSource>,
    /// Body format.
    pub format: Format,
    /// Standard Webhooks signing key, when the webhook has a secret.
    pub secret: Option<SigningKey>,
    /// Where the secret came from.
    pub secret_source: Option<SecretSource>,
    /// Notification types this webhook accepts; empty means all.
    pub types: Vec<Glob>,
    /// Portal ids this webhook follows when a watch names no webhooks; empty means all.
    pub portals: Vec<Glob>,
    /// Labels this webhook follows when a watch names no webhooks: the
    /// watch's labels must hold every pair; empty means all.
    pub labels: BTreeMap<String, String>,
    /// Extra headers of every delivery, sorted by name.
    pub headers: Vec<ExtraHeader>,
    /// The webhook's own body template, compiled; it replaces the format's body.
    pub template: Option<BodyTemplate>,
    /// Attempts in flight to this webhook at once (different jobs in parallel).
    pub max_in_flight: usize,
    /// Attempts per second to this webhook; `None` for no limit.
    pub max_per_second: Option<f64>,
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Webhook")
            .field("name", &self.name)
            .field("format", &self.format)
            .field("signed", &self.secret.is_some())
            .field("headers", &self.headers)
            .field("template", &self.template)
            .finish_non_exhaustive()
    }
}

impl Webhook {
    /// Whether a notification of `kind` for a watch on `portal_id` with
    /// `labels` goes to this webhook. `named` is the watch's own webhook
    /// list: when present, it replaces the `portals` and `labels` filters
    /// (they choose watches), but the `types` filter still applies (it
    /// chooses what the receiver wants to hear).
    pub fn accepts(&self, kind: &str, portal_id: &str, named: Option<&[String]>, labels: &Map<String, Value>) -> bool {
        let chosen = match named {
            Some(names) => names.iter().any(|n| n == &self.name),
            None => crate::glob::any_matches(&self.portals, portal_id) && self.follows_labels(labels),
        };
        chosen && crate::glob::any_matches(&self.types, kind)
    }

    /// Whether a watch's labels hold every `key = value` of this webhook's
    /// `labels` filter.
    pub fn follows_labels(&self, labels: &Map<String, Value>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k).and_then(Value::as_str) == Some(v.as_str()))
    }

    /// The `content-type` of this webhook's bodies.
    pub fn content_type(&self) -> &str {
        self.template.as_ref().map_or("application/json", |t| t.content_type.as_str())
    }
}

/// One of a webhook's extra headers.
#[derive(Clone)]
pub struct ExtraHeader {
    /// The header's name, lower-case.
    pub name: HeaderName,
    /// Its value; marked sensitive when it came from the environment.
    pub value: HeaderValue,
    /// `None` when the value is written in the config, else where it came
    /// from (and then it is a secret, never printed).
    pub source: Option<SecretSource>,
}

impl fmt::Debug for ExtraHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            None => write!(f, "{}: {:?}", self.name, self.value),
            Some(source) => write!(f, "{}: {source}", self.name),
        }
    }
}

/// Turns a [`RawConfig`] into a [`Config`], with the text at hand to turn
/// byte spans into line numbers.
pub(super) struct Resolver<'a> {
    pub(super) text: &'a str,
    pub(super) path: &'a Path,
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
}

impl Resolver<'_> {
    fn error(&self, span: Option<Range<usize>>, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line: span.map(|s| self.text[..s.start.min(self.text.len())].matches('\n').count() + 1),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    pub(super) fn resolve(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let database = match raw.database {
            Some(db) if db.get_ref().trim().is_empty() => {
                return Err(self.error(Some(db.span()), "database", "must not be empty"));
            }
            Some(db) => PathBuf::from(db.into_inner()),
            None => PathBuf::from("/var/lib/dari-relay/relay.db"),
        };
        let upstream = self.upstream(raw.upstream)?;
        let delivery = self.delivery(raw.delivery)?;
        let mut orgs = BTreeMap::new();
        for (id, org) in raw.orgs {
            let span = org.span();
            let key = format!("orgs.{id}");
            if !crate::upstream::is_valid_segment(&id) {
                return Err(self.error(
                    Some(span),
                    &key,
                    "an org id must be non-empty, without '/', spaces or control characters",
                ));
            }
            let org = org.into_inner();
            let (api_key, api_key_source) = self.secret(
                &key,
                Some(span.clone()),
                ("api_key_env", org.api_key_env),
                ("api_key_file", org.api_key_file),
            )?;
            let api_key = api_key.ok_or_else(|| self.error(Some(span), &key, "needs api_key_env or api_key_file"))?;
            let api_key_source = api_key_source.expect("source is set with the key");
            let max_requests_per_second =
                self.rate(&format!("{key}.max_requests_per_second"), org.max_requests_per_second)?;
            orgs.insert(
                id.clone(),
                Org { id, api_key: SecretString::from(api_key), api_key_source, max_requests_per_second },
            );
        }
        let mut webhooks = Vec::new();
        let mut names = HashSet::new();
        for (i, hook) in raw.webhooks.into_iter().enumerate() {
            let span = hook.span();
            let hook = hook.into_inner();
            let webhook = self.webhook(i, span.clone(), hook)?;
            if !names.insert(webhook.name.clone()) {
                return Err(self.error(
                    Some(span),
                    &format!("webhooks[{i}].name"),
                    format!("webhook name {:?} is used twice; names must be unique", webhook.name),
                ));
            }
            webhooks.push(webhook);
        }
        let retention = self.positive("retention", raw.retention, 7 * 24 * 3_600_000)?;
        let admin = raw.admin.map(|a| self.admin(a)).transpose()?;
        Ok(Config {
            path: self.path.to_owned(),
            database,
            retention,
            upstream,
            delivery,
            orgs,
            webhooks,
            admin,
            log_format: raw.log_format,
        })
    }

    fn upstream(&self, raw: RawUpstream) -> Result<Upstream, ConfigError> {
        let base_url = match raw.base_url {
            Some(url) => url.into_inner().0,
            None => Url::parse("https://agent.usedari.com").expect("default URL parses"),
        };
        let poll_interval = self.positive("upstream.poll_interval", raw.poll_interval, 2_000)?;
        let max_poll_interval = self.positive("upstream.max_poll_interval", raw.max_poll_interval.clone(), 60_000)?;
        if max_poll_interval < poll_interval {
            let span = raw.max_poll_interval.map(|s| s.span());
            return Err(self.error(span, "upstream.max_poll_interval", "must be at least upstream.poll_interval"));
        }
        let request_timeout = self.positive("upstream.request_timeout", raw.request_timeout, 15_000)?;
        let max_in_flight = self.count("upstream.max_in_flight", raw.max_in_flight, 64)?;
        let mut terminal_statuses: Vec<String> = raw
            .terminal_statuses
            .unwrap_or_else(|| ["completed", "failed", "stopped", "cancelled"].map(String::from).to_vec())
            .iter()
            .map(|s| crate::diff::normalize_status(s))
            .collect();
        // completed and failed end a job whatever the list says (INTERFACE.md).
        for always in ["completed", "failed"] {
            if !terminal_statuses.iter().any(|s| s == always) {
                terminal_statuses.push(always.to_owned());
            }
        }
        let max_response_bytes = self.count("upstream.max_response_bytes", raw.max_response_bytes, 10 * 1024 * 1024)?;
        Ok(Upstream {
            base_url,
            poll_interval,
            max_poll_interval,
            request_timeout,
            max_in_flight,
            terminal_statuses,
            max_response_bytes,
            not_found_grace: self.positive("upstream.not_found_grace", raw.not_found_grace, 10 * 60_000)?,
            auth_grace: self.positive("upstream.auth_grace", raw.auth_grace, 3_600_000)?,
            max_watch_age: self.positive("upstream.max_watch_age", raw.max_watch_age, 7 * 24 * 3_600_000)?,
        })
    }

    fn delivery(&self, raw: RawDelivery) -> Result<Delivery, ConfigError> {
        let retry_schedule = match raw.retry_schedule {
            Some(list) => list.into_iter().map(|d| d.0).collect(),
            None => ["5s", "5m", "30m", "2h", "5h", "10h", "10h"]
                .iter()
                .map(|s| parse_duration(s).expect("default schedule parses"))
                .collect(),
        };
        Ok(Delivery {
            retry_schedule,
            request_timeout: self.positive("delivery.request_timeout", raw.request_timeout, 15_000)?,
            shutdown_timeout: match raw.shutdown_timeout {
                Some(d) => d.into_inner().0,
                None => Duration::from_secs(10),
            },
        })
    }

    fn positive(
        &self,
        key: &str,
        value: Option<Spanned<DurationValue>>,
        default_ms: u64,
    ) -> Result<Duration, ConfigError> {
        match value {
            None => Ok(Duration::from_millis(default_ms)),
            Some(v) if v.get_ref().0.is_zero() => Err(self.error(Some(v.span()), key, "must be more than zero")),
            Some(v) => Ok(v.into_inner().0),
        }
    }

    fn count(&self, key: &str, value: Option<Spanned<i64>>, default: usize) -> Result<usize, ConfigError> {
        match value {
            None => Ok(default),
            Some(v) => usize::try_from(*v.get_ref())
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| self.error(Some(v.span()), key, "must be a whole number of at least 1")),
        }
    }

    fn admin(&self, raw: Spanned<RawAdmin>) -> Result<Admin, ConfigError> {
        let span = raw.span();
        let raw = raw.into_inner();
        let text = raw.listen.get_ref().trim();
        let listen = match text.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => ListenAddr::Unix(PathBuf::from(path)),
            Some(_) => return Err(self.error(Some(raw.listen.span()), "admin.listen", "unix: needs a socket path")),
            None => ListenAddr::Tcp(text.parse().map_err(|_| {
                self.error(
                    Some(raw.listen.span()),
                    "admin.listen",
                    format!(
                        "{text:?} is not an address such as \"127.0.0.1:9187\" or \"unix:/run/dari-relay/admin.sock\""
                    ),
                )
            })?),
        };
        let (token, token_source) =
            self.secret("admin", Some(span.clone()), ("token_env", raw.token_env), ("token_file", raw.token_file))?;
        if token.is_none() && !listen.is_local() {
            return Err(self.error(
                Some(raw.listen.span()),
                "admin.listen",
                format!("{listen} is reachable from other machines: set admin.token_env or admin.token_file"),
            ));
        }
        Ok(Admin { listen, token: token.map(SecretString::from), token_source })
    }

    fn rate(&self, key: &str, value: Option<Spanned<f64>>) -> Result<Option<f64>, ConfigError> {
        match value {
            Some(rate) if !(rate.get_ref().is_finite() && *rate.get_ref() > 0.0) => {
                Err(self.error(Some(rate.span()), key, "must be a number above 0"))
            }
            rate => Ok(rate.map(Spanned::into_inner)),
        }
    }

    /// Loads a secret given either as `<name>_env` or `<name>_file` (not both).
    /// Returns `(None, None)` when neither is set.
    fn secret(
        &self,
        table: &str,
        table_span: Option<Range<usize>>,
        env_key: (&str, Option<Spanned<String>>),
        file_key: (&str, Option<Spanned<String>>),
    ) -> Result<(Option<String>, Option<SecretSource>), ConfigError> {
        match (env_key.1, file_key.1) {
            (Some(_), Some(_)) => {
                Err(self.error(table_span, table, format!("set either {} or {}, not both", env_key.0, file_key.0)))
            }
            (Some(name), None) => {
                let key = format!("{table}.{}", env_key.0);
                let var = name.get_ref().trim();
                match (self.env)(var) {
                    Some(value) if !value.trim().is_empty() => {
                        Ok((Some(value.trim().to_owned()), Some(SecretSource::Env(var.to_owned()))))
                    }
                    Some(_) => Err(self.error(Some(name.span()), &key, format!("environment variable {var} is empty"))),
                    None => Err(self.error(Some(name.span()), &key, format!("environment variable {var} is not set"))),
                }
            }
            (None, Some(file)) => {
                let key = format!("{table}.{}", file_key.0);
                let path = PathBuf::from(file.get_ref().trim());
                match std::fs::read_to_string(&path) {
                    Ok(value) if !value.trim().is_empty() => {
                        Ok((Some(value.trim().to_owned()), Some(SecretSource::File(path))))
                    }
                    Ok(_) => Err(self.error(Some(file.span()), &key, format!("{} is empty", path.display()))),
                    Err(e) => Err(self.error(Some(file.span()), &key, format!("cannot read {}: {e}", path.display()))),
                }
            }
            (None, None) => Ok((None, None)),
        }
    }

    fn webhook(&self, index: usize, span: Range<usize>, raw: RawWebhook) -> Result<Webhook, ConfigError> {
        let name_span = raw.name.span();
        let name = raw.name.into_inner();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(self.error(
                Some(name_span),
                &format!("webhooks[{index}].name"),
                format!("{name:?} is not a valid webhook name: use letters, digits, '-', '_' or '.'"),
            ));
        }
        let key = format!("webhooks[{index}] ({name})");
        let (url, url_source) = match (raw.url, raw.url_env) {
            (Some(_), Some(_)) => {
                return Err(self.error(Some(span), &key, "set either url or url_env, not both"));
            }
            (None, None) => return Err(self.error(Some(span), &key, "needs url or url_env")),
            (Some(url), None) => (url.into_inner().0, None),
            (None, Some(var_name)) => {
                let var = var_name.get_ref().trim().to_owned();
                let k = format!("{key}.url_env");
                let value = (self.env)(&var).filter(|v| !v.trim().is_empty()).ok_or_else(|| {
                    self.error(Some(var_name.span()), &k, format!("environment variable {var} is not set"))
                })?;
                // The value is a secret: the message names the variable only.
                let url = parse_http_url(&value).map_err(|_| {
                    self.error(Some(var_name.span()), &k, format!("environment variable {var} is not an http(s) URL"))
                })?;
                (url, Some(SecretSource::Env(var)))
            }
        };
        let (secret, secret_source) =
            self.secret(&key, Some(span.clone()), ("secret_env", raw.secret_env), ("secret_file", raw.secret_file))?;
        let secret = match secret {
            None => None,
            Some(text) => Some(
                SigningKey::parse(&text)
                    .map_err(|e| self.error(Some(span.clone()), &format!("{key}.secret"), e.to_string()))?,
            ),
        };
        let globs = |field: &str, list: Vec<Spanned<String>>| -> Result<Vec<Glob>, ConfigError> {
            list.into_iter()
                .map(|p| {
                    Glob::new(p.get_ref()).ok_or_else(|| {
                        self.error(Some(p.span()), &format!("{key}.{field}"), "a pattern must not be empty")
                    })
                })
                .collect()
        };
        let max_in_flight = self.count(&format!("{key}.max_in_flight"), raw.max_in_flight, 4)?;
        let max_per_second = self.rate(&format!("{key}.max_per_second"), raw.max_per_second)?;
        let mut labels = BTreeMap::new();
        for (label, value) in raw.labels {
            if label.trim().is_empty() {
                return Err(self.error(Some(value.span()), &format!("{key}.labels"), "a label name must not be empty"));
            }
            labels.insert(label, value.into_inner());
        }
        let headers = self.headers(&key, raw.headers, raw.headers_env)?;
        let template = self.template(&key, span, raw.template, raw.body_template, raw.content_type)?;
        Ok(Webhook {
            max_in_flight,
            max_per_second,
            name,
            url,
            url_source,
            format: raw.format,
            secret,
            secret_source,
            types: globs("types", raw.types)?,
            portals: globs("portals", raw.portals)?,
            labels,
            headers,
            template,
        })
    }

    /// Resolves `headers` (values as written) and `headers_env` (values from
    /// the environment, secrets) into one list sorted by name.
    fn headers(
        &self,
        key: &str,
        literal: BTreeMap<String, Spanned<String>>,
        from_env: BTreeMap<String, Spanned<String>>,
    ) -> Result<Vec<ExtraHeader>, ConfigError> {
        let mut headers: BTreeMap<String, ExtraHeader> = BTreeMap::new();
        let entries =
            literal.into_iter().map(|(n, v)| (n, v, false)).chain(from_env.into_iter().map(|(n, v)| (n, v, true)));
        for (raw_name, value, is_env) in entries {
            let table = if is_env { "headers_env" } else { "headers" };
            let k = format!("{key}.{table}.{raw_name}");
            let span = Some(value.span());
            let name = HeaderName::from_bytes(raw_name.trim().as_bytes())
                .map_err(|_| self.error(span.clone(), &k, format!("{raw_name:?} is not a valid header name")))?;
            if RESERVED_HEADERS.contains(&name.as_str()) {
                return Err(self.error(
                    span,
                    &k,
                    format!("{name} is set by the relay itself and cannot be overridden"),
                ));
            }
            let header = if is_env {
                let var = value.get_ref().trim().to_owned();
                let text = (self.env)(&var)
                    .filter(|v| !v.trim().is_empty())
                    .ok_or_else(|| self.error(span.clone(), &k, format!("environment variable {var} is not set")))?;
                // The value is a secret: the message names the variable only.
                let mut value = HeaderValue::from_str(text.trim()).map_err(|_| {
                    self.error(span.clone(), &k, format!("environment variable {var} is not a valid header value"))
                })?;
                value.set_sensitive(true);
                ExtraHeader { name: name.clone(), value, source: Some(SecretSource::Env(var)) }
            } else {
                let value = HeaderValue::from_str(value.get_ref()).map_err(|_| {
                    self.error(span.clone(), &k, "not a valid header value (control characters or non-ASCII)")
                })?;
                ExtraHeader { name: name.clone(), value, source: None }
            };
            if headers.insert(name.as_str().to_owned(), header).is_some() {
                return Err(self.error(span, &k, format!("header {name} is set twice")));
            }
        }
        Ok(headers.into_values().collect())
    }

    /// Reads and compiles the body template given as `template` (a file) or
    /// `body_template` (inline), not both.
    fn template(
        &self,
        key: &str,
        table_span: Range<usize>,
        file: Option<Spanned<String>>,
        inline: Option<Spanned<String>>,
        content_type: Option<Spanned<String>>,
    ) -> Result<Option<BodyTemplate>, ConfigError> {
        let (source, text, span, k) = match (file, inline) {
            (Some(_), Some(_)) => {
                return Err(self.error(Some(table_span), key, "set either template or body_template, not both"));
            }
            (None, None) => {
                return match content_type {
                    Some(ct) => Err(self.error(
                        Some(ct.span()),
                        &format!("{key}.content_type"),
                        "only applies to a templated body: set template or body_template too",
                    )),
                    None => Ok(None),
                };
            }
            (Some(file), None) => {
                let k = format!("{key}.template");
                let written = PathBuf::from(file.get_ref().trim());
                // Relative to the config file, so a template can sit next to it.
                let path = self.path.parent().unwrap_or(Path::new("")).join(&written);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| self.error(Some(file.span()), &k, format!("cannot read {}: {e}", path.display())))?;
                (TemplateSource::File(path), text, file.span(), k)
            }
            (None, Some(text)) => {
                let k = format!("{key}.body_template");
                (TemplateSource::Inline(text.get_ref().clone()), text.get_ref().clone(), text.span(), k)
            }
        };
        if text.trim().is_empty() {
            return Err(self.error(Some(span), &k, "the template is empty"));
        }
        if let Some(ct) = &content_type {
            let essence = ct.get_ref().split(';').next().unwrap_or_default().trim();
            let (kind, sub) = essence.split_once('/').unwrap_or_default();
            if kind.is_empty() || sub.is_empty() || HeaderValue::from_str(ct.get_ref()).is_err() {
                return Err(self.error(
                    Some(ct.span()),
                    &format!("{key}.content_type"),
                    format!("{:?} is not a content type such as \"application/json\" or \"text/plain\"", ct.get_ref()),
                ));
            }
        }
        BodyTemplate::compile(source, text, content_type.as_ref().map(|c| c.get_ref().as_str()))
            .map(Some)
            .map_err(|e| self.error(Some(span), &k, format!("the template does not compile: {e}")))
    }
}
