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
use secrecy::SecretString;
use serde::Deserialize;
use toml::Spanned;

use super::defaults::{self, CountBounds, DurationBounds, MAX_LIST_LEN, MAX_NAME_LEN};
use super::raw::{DurationValue, RawAdmin, RawConfig, RawDelivery, RawInbound, RawUpstream};
use super::{ConfigError, Webhook};

/// The resolved configuration. Built by [`Config::load`] (or
/// [`Config::from_toml`] in tests and the demo), then shared read-only.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, for messages.
    pub path: PathBuf,
    /// The SQLite database file; with PostgreSQL, the URL without its
    /// password (for messages and to notice a change on reload).
    pub database: PathBuf,
    /// The PostgreSQL database, when `database` is a `postgres://` URL or
    /// `database_url_env` names one; `None`: SQLite at `database`.
    pub postgres: Option<super::PostgresDatabase>,
    /// `[cluster]` (PostgreSQL only).
    pub cluster: Option<super::Cluster>,
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
    /// The listener for Dari's own webhook, when `[inbound] listen` is set.
    pub inbound: Option<Inbound>,
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
    /// Extra names (lower-case, optionally `name:port`) that the API accepts
    /// in `Host` and `Origin`, besides its own address and localhost.
    pub allowed_hosts: Vec<String>,
}

impl fmt::Debug for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admin")
            .field("listen", &self.listen)
            .field("token", &self.token_source)
            .field("allowed_hosts", &self.allowed_hosts)
            .finish()
    }
}

/// `[inbound]`: the listener for Dari's own webhook (push assist), apart
/// from the admin API because it faces the internet.
#[derive(Clone)]
pub struct Inbound {
    /// Where it listens (TCP; TLS is a reverse proxy's job).
    pub listen: std::net::SocketAddr,
    /// The key of `X-Webhook-Signature` (HMAC-SHA256 of the body), if set;
    /// without it the signature is not checked.
    pub webhook_key: Option<SecretString>,
    /// Where the key came from.
    pub webhook_key_source: Option<SecretSource>,
    /// Portal patterns whose announced, unwatched jobs are watched.
    pub auto_watch: Vec<crate::glob::Glob>,
}

impl fmt::Debug for Inbound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbound")
            .field("listen", &self.listen)
            .field("webhook_key", &self.webhook_key_source)
            .field("auto_watch", &self.auto_watch)
            .finish()
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

/// Turns a [`RawConfig`] into a [`Config`], with the text at hand to turn
/// byte spans into line numbers.
pub(super) struct Resolver<'a> {
    pub(super) text: &'a str,
    pub(super) path: &'a Path,
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
}

impl Resolver<'_> {
    pub(super) fn error(&self, span: Option<Range<usize>>, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line: span.map(|s| self.text[..s.start.min(self.text.len())].matches('\n').count() + 1),
            key: key.to_owned(),
            message: message.into(),
        }
    }

    pub(super) fn resolve(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let (database, postgres) = self.database(raw.database, raw.database_url_env)?;
        let cluster = self.cluster(raw.cluster, postgres.is_some())?;
        let upstream = self.upstream(raw.upstream)?;
        let delivery = self.delivery(raw.delivery)?;
        let mut orgs = BTreeMap::new();
        for (id, org) in raw.orgs {
            let span = org.span();
            let key = format!("orgs.{id}");
            if orgs.len() == defaults::MAX_ORGS {
                return Err(self.error(Some(span), &key, format!("at most {} [orgs.*] tables", defaults::MAX_ORGS)));
            }
            if !crate::vocab::is_valid_segment(&id) || id.len() > MAX_NAME_LEN {
                return Err(self.error(
                    Some(span),
                    &key,
                    format!("an org id must be 1 to {MAX_NAME_LEN} bytes, without '/', spaces or control characters"),
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
            if i == defaults::MAX_WEBHOOKS {
                let message = format!("at most {} [[webhooks]] tables", defaults::MAX_WEBHOOKS);
                return Err(self.error(Some(span), &format!("webhooks[{i}]"), message));
            }
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
        let retention = self.duration("retention", raw.retention, defaults::RETENTION)?;
        let admin = raw.admin.map(|a| self.admin(a)).transpose()?;
        let inbound = raw.inbound.map(|i| self.inbound(i)).transpose()?;
        Ok(Config {
            path: self.path.to_owned(),
            database,
            postgres,
            cluster,
            retention,
            upstream,
            delivery,
            orgs,
            webhooks,
            admin,
            inbound,
            log_format: raw.log_format,
        })
    }

    fn upstream(&self, raw: RawUpstream) -> Result<Upstream, ConfigError> {
        let base_url = match raw.base_url {
            Some(url) => url.into_inner().0,
            None => Url::parse(defaults::BASE_URL).expect("default URL parses"),
        };
        let poll_interval =
            self.duration("upstream.poll_interval", raw.poll_interval.clone(), defaults::POLL_INTERVAL)?;
        let max_poll_interval =
            self.duration("upstream.max_poll_interval", raw.max_poll_interval.clone(), defaults::MAX_POLL_INTERVAL)?;
        if max_poll_interval < poll_interval {
            // Blame the key that was written: a poll_interval raised above
            // the default ceiling ("5 mins") is poll_interval's fault, not
            // that of a max_poll_interval the file never mentions.
            return Err(match (raw.max_poll_interval, raw.poll_interval) {
                (None, Some(p)) => self.error(
                    Some(p.span()),
                    "upstream.poll_interval",
                    format!(
                        "{} is longer than upstream.max_poll_interval ({}, its default); set max_poll_interval too",
                        show(poll_interval),
                        show(max_poll_interval)
                    ),
                ),
                (m, _) => self.error(
                    m.map(|m| m.span()),
                    "upstream.max_poll_interval",
                    format!(
                        "{} must be at least upstream.poll_interval ({})",
                        show(max_poll_interval),
                        show(poll_interval)
                    ),
                ),
            });
        }
        let request_timeout =
            self.duration("upstream.request_timeout", raw.request_timeout, defaults::UPSTREAM_REQUEST_TIMEOUT)?;
        let max_in_flight =
            self.count("upstream.max_in_flight", raw.max_in_flight, defaults::UPSTREAM_MAX_IN_FLIGHT)?;
        let terminal_statuses = self.terminal_statuses(raw.terminal_statuses)?;
        let max_response_bytes =
            self.count("upstream.max_response_bytes", raw.max_response_bytes, defaults::MAX_RESPONSE_BYTES)?;
        Ok(Upstream {
            base_url,
            poll_interval,
            max_poll_interval,
            request_timeout,
            max_in_flight,
            terminal_statuses,
            max_response_bytes,
            not_found_grace: self.duration(
                "upstream.not_found_grace",
                raw.not_found_grace,
                defaults::NOT_FOUND_GRACE,
            )?,
            auth_grace: self.duration("upstream.auth_grace", raw.auth_grace, defaults::AUTH_GRACE)?,
            max_watch_age: self.duration("upstream.max_watch_age", raw.max_watch_age, defaults::MAX_WATCH_AGE)?,
        })
    }

    fn terminal_statuses(&self, raw: Option<Spanned<Vec<Spanned<String>>>>) -> Result<Vec<String>, ConfigError> {
        const KEY: &str = "upstream.terminal_statuses";
        let mut statuses = Vec::new();
        match raw {
            None => statuses.extend(defaults::TERMINAL_STATUSES.map(String::from)),
            Some(list) if list.get_ref().len() > defaults::MAX_TERMINAL_STATUSES => {
                let message = format!("at most {} statuses", defaults::MAX_TERMINAL_STATUSES);
                return Err(self.error(Some(list.span()), KEY, message));
            }
            Some(list) => {
                for status in list.into_inner() {
                    let normal = crate::vocab::normalize_status(status.get_ref());
                    if status.get_ref().trim().is_empty() || normal.len() > MAX_NAME_LEN {
                        let message = format!("a status must be 1 to {MAX_NAME_LEN} characters");
                        return Err(self.error(Some(status.span()), KEY, message));
                    }
                    statuses.push(normal);
                }
            }
        }
        // completed and failed end a job whatever the list says (INTERFACE.md).
        for always in ["completed", "failed"] {
            if !statuses.iter().any(|s| s == always) {
                statuses.push(always.to_owned());
            }
        }
        Ok(statuses)
    }

    fn delivery(&self, raw: RawDelivery) -> Result<Delivery, ConfigError> {
        const KEY: &str = "delivery.retry_schedule";
        let retry_schedule = match raw.retry_schedule {
            None => defaults::RETRY_SCHEDULE.to_vec(),
            Some(list) if list.get_ref().len() > defaults::MAX_RETRIES => {
                let message = format!("at most {} retries", defaults::MAX_RETRIES);
                return Err(self.error(Some(list.span()), KEY, message));
            }
            Some(list) => list
                .into_inner()
                .into_iter()
                .map(|wait| self.duration(KEY, Some(wait), defaults::RETRY_WAIT))
                .collect::<Result<_, _>>()?,
        };
        Ok(Delivery {
            retry_schedule,
            request_timeout: self.duration(
                "delivery.request_timeout",
                raw.request_timeout,
                defaults::DELIVERY_REQUEST_TIMEOUT,
            )?,
            shutdown_timeout: self.duration(
                "delivery.shutdown_timeout",
                raw.shutdown_timeout,
                defaults::SHUTDOWN_TIMEOUT,
            )?,
        })
    }

    /// A duration within its bounds, or its default when absent.
    pub(super) fn duration(
        &self,
        key: &str,
        value: Option<Spanned<DurationValue>>,
        bounds: DurationBounds,
    ) -> Result<Duration, ConfigError> {
        let Some(value) = value else { return Ok(bounds.default) };
        let d = value.get_ref().0;
        if (bounds.min..=bounds.max).contains(&d) {
            return Ok(d);
        }
        let message =
            format!("{} is out of bounds: it must be from {} to {}", show(d), show(bounds.min), show(bounds.max));
        Err(self.error(Some(value.span()), key, message))
    }

    /// A whole number within its bounds, or its default when absent.
    pub(super) fn count(
        &self,
        key: &str,
        value: Option<Spanned<i64>>,
        bounds: CountBounds,
    ) -> Result<usize, ConfigError> {
        let Some(value) = value else { return Ok(bounds.default) };
        usize::try_from(*value.get_ref()).ok().filter(|n| (bounds.min..=bounds.max).contains(n)).ok_or_else(|| {
            let message =
                format!("must be a whole number from {} to {}, not {}", bounds.min, bounds.max, value.get_ref());
            self.error(Some(value.span()), key, message)
        })
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
        let mut allowed_hosts = Vec::new();
        for (i, host) in raw.allowed_hosts.into_iter().enumerate() {
            if i == MAX_LIST_LEN {
                let message = format!("at most {MAX_LIST_LEN} names");
                return Err(self.error(Some(host.span()), "admin.allowed_hosts", message));
            }
            let name = host.get_ref().trim().to_ascii_lowercase();
            if !is_host_name(&name) {
                return Err(self.error(
                    Some(host.span()),
                    "admin.allowed_hosts",
                    format!(
                        "{:?} is not a host name such as \"relay.internal\" or \"relay.internal:9187\"",
                        host.get_ref()
                    ),
                ));
            }
            allowed_hosts.push(name);
        }
        Ok(Admin { listen, token: token.map(SecretString::from), token_source, allowed_hosts })
    }

    fn inbound(&self, raw: Spanned<RawInbound>) -> Result<Inbound, ConfigError> {
        let span = raw.span();
        let raw = raw.into_inner();
        let text = raw.listen.get_ref().trim();
        let listen = text.parse().map_err(|_| {
            self.error(
                Some(raw.listen.span()),
                "inbound.listen",
                format!("{text:?} is not a TCP address such as \"0.0.0.0:8443\" or \"127.0.0.1:8443\""),
            )
        })?;
        let (key, webhook_key_source) = self.secret(
            "inbound",
            Some(span),
            ("dari_webhook_key_env", raw.dari_webhook_key_env),
            ("dari_webhook_key_file", raw.dari_webhook_key_file),
        )?;
        let mut auto_watch = Vec::new();
        for (i, pattern) in raw.auto_watch.into_iter().enumerate() {
            let too_long = pattern.get_ref().len() > defaults::MAX_VALUE_LEN;
            if i == MAX_LIST_LEN || too_long {
                let message =
                    format!("at most {MAX_LIST_LEN} patterns, each at most {} bytes", defaults::MAX_VALUE_LEN);
                return Err(self.error(Some(pattern.span()), "inbound.auto_watch", message));
            }
            let glob = crate::glob::Glob::new(pattern.get_ref())
                .ok_or_else(|| self.error(Some(pattern.span()), "inbound.auto_watch", "a pattern must not be empty"))?;
            auto_watch.push(glob);
        }
        Ok(Inbound { listen, webhook_key: key.map(SecretString::from), webhook_key_source, auto_watch })
    }

    /// A rate (per second) within [`MIN_RATE`](defaults::MIN_RATE) and
    /// [`MAX_RATE`](defaults::MAX_RATE), or `None` when absent (no limit).
    pub(super) fn rate(&self, key: &str, value: Option<Spanned<f64>>) -> Result<Option<f64>, ConfigError> {
        match value {
            Some(rate) if !(defaults::MIN_RATE..=defaults::MAX_RATE).contains(rate.get_ref()) => Err(self.error(
                Some(rate.span()),
                key,
                format!(
                    "must be a number from {} to {}, not {}",
                    defaults::MIN_RATE,
                    defaults::MAX_RATE,
                    rate.get_ref()
                ),
            )),
            rate => Ok(rate.map(Spanned::into_inner)),
        }
    }

    /// Loads a secret given either as `<name>_env` or `<name>_file` (not both).
    /// Returns `(None, None)` when neither is set.
    pub(super) fn secret(
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
                match read_capped(&path, defaults::MAX_SECRET_BYTES) {
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
}

/// A duration as the file would write it, in the largest unit that divides
/// it (`"3650d"`, `"90s"`, `"1500ms"`), so a bound reads as it is documented.
pub(crate) fn show(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return humantime::format_duration(d).to_string();
    }
    let units = [(86_400_000, "d"), (3_600_000, "h"), (60_000, "m"), (1000, "s"), (1, "ms")];
    let (size, unit) =
        units.into_iter().find(|(size, _)| ms.is_multiple_of(*size)).expect("1 ms divides every whole ms");
    format!("{}{unit}", ms / size)
}

/// Whether `text` is a host name or IP literal, optionally with `:port`, as a
/// `Host` header carries it (`relay.internal`, `10.0.0.5:9187`, `[::1]:9187`).
fn is_host_name(text: &str) -> bool {
    let Some((host, _port)) = super::split_host_port(text) else { return false };
    !host.is_empty()
        && host.len() <= 253
        && (host.parse::<std::net::IpAddr>().is_ok()
            || host.split('.').all(|label| {
                !label.is_empty() && label.len() <= 63 && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            }))
}

/// Reads a text file the config names (a secret, a template), refusing one
/// longer than `max` bytes without reading it all: `api_key_file =
/// "/dev/zero"` is an error, not an endless read.
pub(super) fn read_capped(path: &Path, max: usize) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path)?.take(max as u64 + 1).read_to_string(&mut text)?;
    if text.len() > max {
        return Err(std::io::Error::other(format!("it is longer than {max} bytes")));
    }
    Ok(text)
}
