//! The operator commands (`watch add|import|list|rm`, `deliveries ...`,
//! `webhooks ...`), each against a [`Target`]: the database itself, or the
//! running daemon's admin API with `--admin`.
//!
//! Commands that only read or change the database need no secret: locally
//! they read just `database` (or `database_url_env`), the webhook names and
//! the `[admin]` table from the config file ([`LocalView`]), so `watch list`
//! works without `DARI_API_KEY`, on SQLite or PostgreSQL alike. `watch add` and `watch import` check watches against the
//! whole config (orgs, webhook names) locally; through the API the daemon
//! checks them. Both paths print the same text from the same JSON rows.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use serde_json::Value;

use super::remote::{Admin, Answer};
use super::watch::{ignored_options, read_import};
use super::{Database, DeliveriesCommand, Failure, WatchCommand, WebhooksCommand, count, load_config, runtime, usage};
use crate::config::PostgresDatabase;
use crate::store::{DeliveryFilter, OperatorStore, WatchQuery};
use crate::vocab::{DeliveryState, NewWatch, WatchState};
use crate::watches::WatchRequest;

/// Where an operator command goes.
pub enum Target {
    /// The database named by the config.
    Local(LocalView),
    /// The running daemon's admin API.
    Remote(Admin),
}

/// What the database commands need from the config file, read without
/// resolving it: no secret is loaded, so none is asked for (but the
/// PostgreSQL URL, from `database_url_env` when the file names one).
pub struct LocalView {
    pub path: PathBuf,
    pub database: Database,
    pub webhooks: Vec<String>,
    pub admin_listen: Option<String>,
    pub admin_token_env: Option<String>,
    pub admin_token_file: Option<String>,
}

impl LocalView {
    /// Reads `path` as TOML (a syntax error is a usage failure, as with the
    /// whole config) and picks out the few keys the database commands use.
    pub fn read(path: &Path) -> Result<LocalView, Failure> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| usage(crate::config::ConfigError::Read { path: path.to_owned(), source }))?;
        let table: toml::Table = toml::from_str(&text)
            .map_err(|e| usage(anyhow!("invalid config file {}: {}", path.display(), e.to_string().trim_end())))?;
        let text_of = |v: Option<&toml::Value>| v.and_then(toml::Value::as_str).map(str::to_owned);
        let (database, url_env) = (text_of(table.get("database")), text_of(table.get("database_url_env")));
        let postgres = PostgresDatabase::from_keys(database.as_deref(), url_env.as_deref(), &|v| std::env::var(v).ok())
            .map_err(|e| usage(anyhow!("invalid config file {}: {e}", path.display())))?;
        let database = match postgres {
            Some(pg) => Database::Postgres(pg),
            None => Database::Sqlite(PathBuf::from(
                database.unwrap_or_else(|| crate::config::defaults::DATABASE.to_owned()),
            )),
        };
        let webhooks = table
            .get("webhooks")
            .and_then(toml::Value::as_array)
            .map(|list| list.iter().filter_map(|w| text_of(w.get("name"))).collect())
            .unwrap_or_default();
        let admin = table.get("admin");
        Ok(LocalView {
            path: path.to_owned(),
            database,
            webhooks,
            admin_listen: text_of(admin.and_then(|a| a.get("listen"))),
            admin_token_env: text_of(admin.and_then(|a| a.get("token_env"))),
            admin_token_file: text_of(admin.and_then(|a| a.get("token_file"))),
        })
    }

    /// Opens the database, either engine, and runs `f` on it.
    fn with<T>(&self, f: impl AsyncFnOnce(&dyn OperatorStore) -> Result<T, Failure>) -> Result<T, Failure> {
        self.database.with(f)
    }
}

/// The target for `--admin` (`admin`: `None` without it, `Some(None)` for
/// `--admin` alone, which takes `[admin] listen` from the config) and
/// `--admin-token-env`.
pub fn target(path: &Path, admin: Option<&Option<String>>, token_env: Option<&str>) -> Result<Target, Failure> {
    let Some(addr) = admin else { return Ok(Target::Local(LocalView::read(path)?)) };
    // With an address and a token variable, no config file is needed at all.
    let view = match (addr, token_env) {
        (Some(_), Some(_)) => LocalView::read(path).ok(),
        _ => Some(LocalView::read(path)?),
    };
    let listen = match (addr, &view) {
        (Some(addr), _) => addr.clone(),
        (None, Some(view)) => view.admin_listen.clone().ok_or_else(|| {
            usage(anyhow!("--admin without an address needs [admin] listen in {}", view.path.display()))
        })?,
        (None, None) => return Err(usage(anyhow!("--admin needs an address or a readable config file"))),
    };
    let token = match (token_env, view.as_ref().and_then(|v| v.admin_token_env.as_deref())) {
        (Some(var), _) | (None, Some(var)) => Some(
            std::env::var(var)
                .ok()
                .filter(|t| !t.trim().is_empty())
                .ok_or_else(|| usage(anyhow!("environment variable {var} (the admin token) is not set")))?,
        ),
        (None, None) => match view.as_ref().and_then(|v| v.admin_token_file.as_deref()) {
            Some(file) => Some(
                std::fs::read_to_string(file)
                    .with_context(|| format!("cannot read the admin token file {file}"))
                    .map_err(usage)?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        },
    };
    Ok(Target::Remote(Admin::new(&listen, token).map_err(usage)?))
}

/// An answer that is not what the command expects: 4xx is the user's
/// (exit 2), anything else the relay's (exit 1).
fn refused(answer: &Answer) -> Failure {
    let e = anyhow!("the admin API answered {}: {}", answer.status, answer.error());
    if (400..500).contains(&answer.status) { usage(e) } else { runtime(e) }
}

fn call(admin: &Admin, method: &str, path: &str, body: Option<&Value>) -> Result<Answer, Failure> {
    admin.call(method, path, body).map_err(runtime)
}

/// Percent-encodes a query value (names and UUIDs rarely need it).
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn watch(path: &Path, target: Target, command: WatchCommand) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match command {
        WatchCommand::Add { portal, job_id, webhooks, labels, from_now } => {
            let watch = NewWatch {
                job_id,
                portal,
                webhooks: (!webhooks.is_empty()).then_some(webhooks),
                labels: labels.into_iter().collect(),
                from_now,
            };
            let (added, existing) = match target {
                Target::Local(_) => {
                    let config = load_config(path)?;
                    config.check_watch(&watch).map_err(usage)?;
                    super::with_store(&config, async |store| {
                        let summary = store.add_watches(vec![watch.clone()]).await.map_err(runtime)?;
                        let query = WatchQuery { job_id: Some(watch.job_id.clone()), ..Default::default() };
                        let existing = store.query_watches(query).await.map_err(runtime)?.into_iter().next();
                        Ok((summary.added == 1, existing.map(|w| serde_json::to_value(w).expect("rows serialise"))))
                    })?
                }
                Target::Remote(admin) => {
                    let answer = call(&admin, "POST", "/v1/watches", Some(&WatchRequest::of(&watch).to_json()))?;
                    match answer.status {
                        201 | 200 => (answer.status == 201, Some(answer.body)),
                        _ => return Err(refused(&answer)),
                    }
                }
            };
            if added {
                let _ = writeln!(out, "watching job {} on {}", watch.job_id, watch.portal);
                return Ok(());
            }
            // INTERFACE.md: adding a watched job changes nothing and exits 0.
            // Options that would have changed it are named, not dropped silently.
            let portal = existing
                .as_ref()
                .and_then(|w| w["portal_id"].as_str().map(str::to_owned))
                .unwrap_or_else(|| watch.portal.to_string());
            let _ = writeln!(out, "already watching job {} on {portal}", watch.job_id);
            let ignored = existing.map(|w| ignored_options(&watch, &w)).unwrap_or_default();
            if !ignored.is_empty() {
                eprintln!(
                    "note: the existing watch was kept unchanged; ignored {} (see `dari-relay watch list --json`)",
                    ignored.join(", ")
                );
            }
            Ok(())
        }
        WatchCommand::Import { file } => {
            let admin = match target {
                Target::Remote(admin) => admin,
                Target::Local(_) => {
                    let config = load_config(path)?;
                    let watches = read_import(&config, &file)?;
                    let (count_of, watches) = (watches.len(), watches);
                    let summary =
                        super::with_store(&config, async |store| store.add_watches(watches).await.map_err(runtime))?;
                    let (added, existing) = (summary.added, summary.existing);
                    let _ = writeln!(
                        out,
                        "imported {} ({added} new, {existing} already watched)",
                        count(count_of, "watch", "watches")
                    );
                    return Ok(());
                }
            };
            // Through the daemon: no config file and no secret needed here,
            // one request per line (see remote::import).
            let (reader, name): (Box<dyn std::io::BufRead>, String) = if file == Path::new("-") {
                (Box::new(std::io::stdin().lock()), "<stdin>".to_owned())
            } else {
                let f = std::fs::File::open(&file)
                    .with_context(|| format!("cannot read {}", file.display()))
                    .map_err(usage)?;
                (Box::new(std::io::BufReader::new(f)), file.display().to_string())
            };
            let report = super::remote::import(&admin, reader).map_err(|e| runtime(e.context(name.clone())))?;
            for refused in &report.refused {
                eprintln!("{name}:{refused}");
            }
            let _ = writeln!(
                out,
                "imported {} of {} ({} new, {} already watched); {} refused",
                report.added + report.existing,
                count(report.lines, "line", "lines"),
                report.added,
                report.existing,
                report.refused.len()
            );
            if report.refused.is_empty() {
                Ok(())
            } else {
                Err(usage(anyhow!(
                    "{} of {} not imported (listed above)",
                    report.refused.len(),
                    count(report.lines, "line", "lines")
                )))
            }
        }
        WatchCommand::List { all, json } => {
            let watches: Vec<Value> = match target {
                Target::Local(view) => {
                    let query = WatchQuery { state: (!all).then_some(WatchState::Active), ..WatchQuery::default() };
                    let rows = view.with(async |store| store.query_watches(query).await.map_err(runtime))?;
                    rows.into_iter().map(|w| serde_json::to_value(w).expect("rows serialise")).collect()
                }
                Target::Remote(admin) => remote_watches(&admin, all)?,
            };
            if json {
                let _ = writeln!(out, "{}", serde_json::to_string_pretty(&watches).expect("rows serialise"));
                return Ok(());
            }
            let _ = writeln!(out, "{:<36}  {:<28}  {:<9}  {:<18}  LABELS", "JOB_ID", "PORTAL", "STATE", "LAST_STATUS");
            for w in &watches {
                let labels: Vec<String> = w["labels"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                    .collect();
                let _ = writeln!(
                    out,
                    "{:<36}  {:<28}  {:<9}  {:<18}  {}",
                    text(&w["job_id"]),
                    text(&w["portal_id"]),
                    text(&w["state"]),
                    w["last_status"].as_str().unwrap_or("-"),
                    labels.join(",")
                );
            }
            Ok(())
        }
        WatchCommand::Rm { job_id } => {
            let removed = match target {
                Target::Local(view) => {
                    let id = job_id.clone();
                    view.with(async |store| store.remove_watch(id).await.map_err(runtime))?
                }
                Target::Remote(admin) => {
                    let answer = call(&admin, "DELETE", &format!("/v1/watches/{job_id}"), None)?;
                    match answer.status {
                        204 => true,
                        404 => false,
                        _ => return Err(refused(&answer)),
                    }
                }
            };
            if removed {
                let _ = writeln!(out, "stopped watching job {job_id}");
                Ok(())
            } else {
                Err(usage(anyhow!("job {job_id} is not watched (see `dari-relay watch list --all`)")))
            }
        }
    }
}

/// Every watch from the API, page by page: the active ones (as `watch list`
/// shows locally) or, with `all`, every state.
fn remote_watches(admin: &Admin, all: bool) -> Result<Vec<Value>, Failure> {
    let mut rows = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = format!("/v1/watches?limit={}", crate::admin::MAX_PAGE);
        if !all {
            path.push_str("&state=active");
        }
        if let Some(after) = &after {
            path.push_str(&format!("&after={after}"));
        }
        let answer = call(admin, "GET", &path, None)?;
        if answer.status != 200 {
            return Err(refused(&answer));
        }
        rows.extend(answer.body["watches"].as_array().cloned().unwrap_or_default());
        match answer.body["next_after"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => return Ok(rows),
        }
    }
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

pub fn deliveries(target: Target, command: DeliveriesCommand) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match command {
        DeliveriesCommand::List { status, webhook, job, json } => {
            let state = status.as_deref().and_then(DeliveryState::parse);
            let rows: Vec<Value> = match target {
                Target::Local(view) => {
                    let filter = DeliveryFilter { webhook, job_id: job, state, limit: crate::admin::MAX_PAGE };
                    // Failed deliveries come with every attempt: that is what
                    // a dead letter is for.
                    view.with(async |store| crate::admin::delivery_rows(store, filter).await.map_err(runtime))?
                }
                Target::Remote(admin) => {
                    let mut query = Vec::new();
                    if let Some(s) = &status {
                        query.push(format!("state={}", encode(s)));
                    }
                    if let Some(w) = &webhook {
                        query.push(format!("webhook={}", encode(w)));
                    }
                    if let Some(j) = &job {
                        query.push(format!("job={}", encode(j)));
                    }
                    let answer = call(&admin, "GET", &format!("/v1/deliveries?{}", query.join("&")), None)?;
                    if answer.status != 200 {
                        return Err(refused(&answer));
                    }
                    answer.body["deliveries"].as_array().cloned().unwrap_or_default()
                }
            };
            if json {
                let _ = writeln!(out, "{}", serde_json::to_string_pretty(&rows).expect("rows serialise"));
                return Ok(());
            }
            let _ = writeln!(
                out,
                "{:>6}  {:<22}  {:<14}  {:<36}  {:<9}  {:>8}  LAST_ERROR",
                "ID", "TYPE", "WEBHOOK", "JOB_ID", "STATE", "ATTEMPTS"
            );
            for d in &rows {
                let _ = writeln!(
                    out,
                    "{:>6}  {:<22}  {:<14}  {:<36}  {:<9}  {:>8}  {}",
                    d["id"],
                    text(&d["type"]),
                    text(&d["webhook"]),
                    text(&d["job_id"]),
                    text(&d["state"]),
                    d["attempts"],
                    text(&d["last_error"])
                );
                print_attempts(&mut out, d);
            }
            Ok(())
        }
        DeliveriesCommand::Show { delivery_id, json } => {
            let detail = match target {
                Target::Local(view) => {
                    let found = view.with(async |store| store.delivery(delivery_id).await.map_err(runtime))?;
                    // Rendering needs the whole config (templates, secrets);
                    // without it the standard body is shown, and says so.
                    found
                        .map(|d| crate::admin::delivery_json(crate::config::Config::load(&view.path).ok().as_ref(), &d))
                }
                Target::Remote(admin) => {
                    let answer = call(&admin, "GET", &format!("/v1/deliveries/{delivery_id}"), None)?;
                    match answer.status {
                        200 => Some(answer.body),
                        404 => None,
                        _ => return Err(refused(&answer)),
                    }
                }
            };
            let Some(d) = detail else {
                return Err(usage(anyhow!("there is no delivery {delivery_id} (see `dari-relay deliveries list`)")));
            };
            if json {
                let _ = writeln!(out, "{}", serde_json::to_string_pretty(&d).expect("rows serialise"));
                return Ok(());
            }
            print_delivery(&mut out, &d);
            Ok(())
        }
        DeliveriesCommand::Retry { delivery_id, all_failed } => {
            let id = if all_failed { None } else { delivery_id };
            let requeued = match target {
                Target::Local(view) => view.with(async |store| store.retry_failed(id).await.map_err(runtime))?,
                Target::Remote(admin) => {
                    let ids: Vec<i64> = match id {
                        Some(id) => vec![id],
                        None => {
                            let answer = call(&admin, "GET", "/v1/deliveries?state=failed", None)?;
                            if answer.status != 200 {
                                return Err(refused(&answer));
                            }
                            let rows = answer.body["deliveries"].as_array().cloned().unwrap_or_default();
                            rows.iter().filter_map(|d| d["id"].as_i64()).collect()
                        }
                    };
                    let mut requeued = 0;
                    for id in ids {
                        let answer = call(&admin, "POST", &format!("/v1/deliveries/{id}/retry"), None)?;
                        match answer.status {
                            200 => requeued += 1,
                            409 => {}
                            _ => return Err(refused(&answer)),
                        }
                    }
                    requeued
                }
            };
            if requeued == 0 && id.is_some() {
                return Err(usage(anyhow!("delivery {} does not exist or is not failed", id.unwrap_or_default())));
            }
            let them = if requeued == 1 { "it" } else { "them" };
            let requeued = count(requeued, "failed delivery", "failed deliveries");
            let _ = writeln!(out, "requeued {requeued}; a running daemon sends {them} within a second");
            Ok(())
        }
    }
}

/// The attempts of a listed delivery, one line each, under its row.
fn print_attempts(out: &mut impl Write, d: &Value) {
    for a in d["attempts_log"].as_array().into_iter().flatten() {
        let excerpt = a["response_excerpt"]
            .as_str()
            .map(|e| format!("  answer: {}", crate::format::truncate(e, 120)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "          attempt at {}  {}ms  status {}  {}{excerpt}",
            text(&a["at"]),
            a["duration_ms"],
            a["http_status"].as_u64().map_or("-".to_owned(), |s| s.to_string()),
            attempt_error(a),
        );
    }
}

/// What an attempt's error adds to its status: nothing when it only
/// restates it (a 500 is stored as "HTTP 500").
fn attempt_error(a: &Value) -> &str {
    let error = a["error"].as_str().unwrap_or("");
    match a["http_status"].as_u64() {
        Some(status) if error == format!("HTTP {status}") => "",
        _ => error,
    }
}

/// `deliveries show` as text: the facts, the headers, the body, the attempts.
fn print_delivery(out: &mut impl Write, d: &Value) {
    let _ = writeln!(
        out,
        "delivery {}  {}  to {}  job {}",
        d["id"],
        text(&d["type"]),
        text(&d["webhook"]),
        text(&d["job_id"])
    );
    let _ =
        writeln!(out, "state {}  attempts {}  created {}", text(&d["state"]), d["attempts"], text(&d["created_at"]));
    if let Some(next) = d["next_attempt_at"].as_str() {
        let _ = writeln!(out, "next attempt at {next}");
    }
    let _ = writeln!(out, "\nheaders:");
    for (name, value) in d["headers"].as_object().into_iter().flatten() {
        let _ = writeln!(out, "  {name}: {}", value.as_str().unwrap_or_default());
    }
    let body = match &d["body"] {
        Value::String(s) => s.clone(),
        other => serde_json::to_string_pretty(other).expect("values serialise"),
    };
    let note = d["body_note"].as_str().map(|n| format!(" ({n})")).unwrap_or_default();
    let _ = writeln!(out, "\nbody{note}:\n{body}");
    let attempts = d["attempts_log"].as_array().map_or(0, Vec::len);
    let _ = writeln!(out, "\n{}:", count(attempts, "attempt", "attempts"));
    print_attempts(out, d);
}

pub fn webhooks(target: Target, command: WebhooksCommand) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match command {
        WebhooksCommand::List { json } => {
            let rows: Vec<crate::admin::WebhookRow> = match target {
                Target::Local(view) => {
                    view.with(async |store| crate::admin::webhook_rows(&view.webhooks, store).await.map_err(runtime))?
                }
                Target::Remote(admin) => {
                    let answer = call(&admin, "GET", "/v1/webhooks", None)?;
                    if answer.status != 200 {
                        return Err(refused(&answer));
                    }
                    serde_json::from_value(answer.body["webhooks"].clone())
                        .context("the admin API's webhook list")
                        .map_err(runtime)?
                }
            };
            if json {
                let _ = writeln!(out, "{}", serde_json::to_string_pretty(&rows).expect("rows serialise"));
                return Ok(());
            }
            let _ = writeln!(
                out,
                "{:<20}  {:<7}  {:>8}  {:>7}  {:>12}  {:>11}  NOTE",
                "NAME", "STATE", "PENDING", "FAILED", "OLDEST_AGE", "CONCURRENCY"
            );
            for r in &rows {
                let age = r.oldest_pending_age_seconds.map_or("-".to_owned(), |s| format!("{s}s"));
                let concurrency = r.concurrency.map_or("-".to_owned(), |n| n.to_string());
                let note = match (&r.paused_reason, r.in_config) {
                    (Some(reason), _) => reason.clone(),
                    (None, false) => "not in the config: its deliveries wait".to_owned(),
                    (None, true) => String::new(),
                };
                let _ = writeln!(
                    out,
                    "{:<20}  {:<7}  {:>8}  {:>7}  {:>12}  {:>11}  {note}",
                    r.name, r.state, r.pending, r.failed, age, concurrency
                );
            }
            Ok(())
        }
        WebhooksCommand::Resume { webhook } => {
            let resumed = match target {
                Target::Local(view) => {
                    let name = webhook.clone();
                    view.with(async |store| store.resume_webhook(name).await.map_err(runtime))?
                }
                Target::Remote(admin) => {
                    let answer = call(&admin, "POST", &format!("/v1/webhooks/{}/resume", encode(&webhook)), None)?;
                    match answer.status {
                        200 => true,
                        409 => false,
                        _ => return Err(refused(&answer)),
                    }
                }
            };
            if resumed {
                let _ = writeln!(out, "resumed webhook {webhook}; a running daemon sends its backlog within a second");
                Ok(())
            } else {
                Err(usage(anyhow!("webhook {webhook:?} is not paused (see `dari-relay webhooks list`)")))
            }
        }
    }
}

/// `tail`: each event on its own line as it comes, readable or (`json`) as
/// a JSON object with its `event` name; stops when stdout is closed.
pub fn tail(admin: &Admin, json: bool) -> Result<(), Failure> {
    let mut out = std::io::stdout();
    admin
        .stream("/v1/events", |name, data| {
            let Ok(mut v) = serde_json::from_str::<Value>(data) else { return true };
            let line = if json {
                v["event"] = name.into();
                v.to_string()
            } else if name == "notification" {
                format!(
                    "{}  {:<22}  job {} on {}",
                    text(&v["at"]),
                    text(&v["type"]),
                    text(&v["job_id"]),
                    text(&v["portal_id"])
                )
            } else {
                let answer = match (v["http_status"].as_u64(), v["error"].as_str()) {
                    (Some(status), _) => format!("HTTP {status}"),
                    (None, Some(e)) => e.to_owned(),
                    (None, None) => "-".to_owned(),
                };
                let outcome = match text(&v["state"]) {
                    "pending" => "will retry",
                    other => other,
                };
                format!(
                    "{}  {:<22}  to {} ({outcome}, {answer}, {}ms)  job {}  delivery {}",
                    text(&v["at"]),
                    text(&v["type"]),
                    text(&v["webhook"]),
                    v["duration_ms"],
                    text(&v["job_id"]),
                    v["delivery_id"]
                )
            };
            // A closed stdout (`tail | head`) ends the stream.
            writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
        })
        .map_err(runtime)
}
