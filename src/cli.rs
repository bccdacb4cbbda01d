//! The command line: clap definitions, raw arguments validated once, and one
//! function per command.
//!
//! Every command returns `Result<(), Failure>`; a [`Failure`] knows its exit
//! code (2 for bad usage, config or argument; 1 for a runtime failure), and
//! `main` prints its whole error chain. Argument checks that clap can do
//! (UUIDs, portal ids, `KEY=VALUE`) are value parsers, so clap reports them
//! with the argument's name and exits 2 on its own.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow};
use clap::{CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DEFAULT_CONFIG_PATH, LogFormat};
use crate::store::Store;
use crate::vocab::{DeliveryState, NewWatch, PortalId};

mod logging;

/// Turns Dari job polling into push: every transition of a watched job,
/// delivered to signed webhooks, Slack and Discord, in order.
#[derive(Debug, Parser)]
#[command(name = "dari-relay", version, about, max_term_width = 100)]
pub struct Cli {
    /// Log format on stderr [default: for `run`, the config's log_format; else text].
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// The config file [default: $DARI_RELAY_CONFIG, else /etc/dari-relay/config.toml].
    // Global, so it may come before or after the subcommand (`dari-relay -c
    // FILE watch list` and `dari-relay watch list -c FILE`).
    #[arg(short = 'c', long, global = true, value_name = "FILE", env = "DARI_RELAY_CONFIG", default_value = DEFAULT_CONFIG_PATH, hide_default_value = true, hide_env = true)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon; stops cleanly on SIGTERM or SIGINT.
    Run,
    /// Run the whole pipeline against a built-in simulated portal (no credentials, no network).
    Demo,
    /// Validate the config and print it resolved, secrets redacted.
    CheckConfig,
    /// Add, import, list or remove watched jobs.
    #[command(subcommand)]
    Watch(WatchCommand),
    /// List deliveries or retry failed ones.
    #[command(subcommand)]
    Deliveries(DeliveriesCommand),
    /// Show webhooks' state and backlog, or resume a paused one.
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
    /// Start a Dari job and watch it, in one step.
    Start {
        /// The portal, as <org_id>/<endpoint_name>.
        #[arg(value_parser = parse_portal)]
        portal: PortalId,
        /// The JSON body for Dari's start endpoint, from a file or - for standard input.
        #[arg(long, value_name = "FILE")]
        body: PathBuf,
        /// Deliver to this webhook (repeatable) instead of those whose `portals` match.
        #[arg(long = "webhook", value_name = "NAME")]
        webhooks: Vec<String>,
        /// A label passed through in every notification (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Send a sample notification of each type a webhook accepts and show its answers.
    SendTest {
        /// The webhook's name.
        webhook: String,
        /// Send only a sample of this type (job.event, job.<status> or watch.failed), even one
        /// the webhook's `types` filter leaves out.
        #[arg(long = "type", value_name = "TYPE", value_parser = parse_kind)]
        kind: Option<String>,
    },
    /// Print a shell completion script (bash, zsh or fish) on standard output; the package installs them.
    #[command(hide = true)]
    Completions {
        /// The shell.
        shell: CompletionShell,
    },
    /// Print the man page (roff) on standard output; the package installs it as dari-relay(1).
    #[command(hide = true)]
    Man,
}

/// The shells `completions` writes a script for.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// `watch ...`
#[derive(Debug, Subcommand)]
pub enum WatchCommand {
    /// Watch a job. Writes to the database; a running daemon polls it within a second.
    Add {
        /// The portal, as <org_id>/<endpoint_name>.
        #[arg(value_parser = parse_portal)]
        portal: PortalId,
        /// The job's UUID.
        #[arg(value_parser = parse_job_id)]
        job_id: String,
        /// Deliver to this webhook (repeatable) instead of those whose `portals` match.
        #[arg(long = "webhook", value_name = "NAME")]
        webhooks: Vec<String>,
        /// A label passed through in every notification (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Treat what the first poll sees as already known.
        #[arg(long)]
        from_now: bool,
    },
    /// Add many watches from JSON lines, in one transaction.
    Import {
        /// A file of JSON lines, or - for standard input.
        file: PathBuf,
    },
    /// List watches.
    List {
        /// Include finished, failed and removed watches.
        #[arg(long)]
        all: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop watching a job (its pending deliveries are still sent).
    Rm {
        /// The job's UUID.
        #[arg(value_parser = parse_job_id)]
        job_id: String,
    },
}

/// `deliveries ...`
#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// List deliveries, newest first.
    List {
        /// Only deliveries in this state.
        #[arg(long, value_parser = ["pending", "delivered", "failed"])]
        status: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send failed deliveries again, same webhook-id, on a fresh schedule.
    #[command(group = clap::ArgGroup::new("which").required(true))]
    Retry {
        /// The delivery's id (see `deliveries list`).
        #[arg(group = "which")]
        delivery_id: Option<i64>,
        /// Every failed delivery.
        #[arg(long, group = "which")]
        all_failed: bool,
    },
}

/// `webhooks ...`
#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Each webhook's state (active or paused) and backlog.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Resume a webhook paused by a 410 Gone; its waiting deliveries go out in order.
    Resume {
        /// The webhook's name.
        webhook: String,
    },
}

/// A command's failure, with the exit code it maps to.
#[derive(Debug)]
pub enum Failure {
    /// Bad usage, config or argument: exit 2.
    Usage(anyhow::Error),
    /// Something failed at run time: exit 1.
    Runtime(anyhow::Error),
}

impl Failure {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) => 2,
            Failure::Runtime(_) => 1,
        }
    }

    /// The error, for printing with its chain.
    pub fn error(&self) -> &anyhow::Error {
        match self {
            Failure::Usage(e) | Failure::Runtime(e) => e,
        }
    }
}

fn usage(e: impl Into<anyhow::Error>) -> Failure {
    Failure::Usage(e.into())
}

fn runtime(e: impl Into<anyhow::Error>) -> Failure {
    Failure::Runtime(e.into())
}

/// Parses a job id (a UUID); see [`crate::vocab::parse_job_id`].
pub fn parse_job_id(s: &str) -> Result<String, String> {
    crate::vocab::parse_job_id(s)
}

fn parse_portal(s: &str) -> Result<PortalId, String> {
    s.parse()
}

/// Parses a notification type: `job.event`, `watch.failed` or `job.<status>`
/// with the status in its normalised form.
pub fn parse_kind(s: &str) -> Result<String, String> {
    let s = s.trim();
    let status_ok = |status: &str| !status.is_empty() && crate::vocab::normalize_status(status) == status;
    match s.strip_prefix("job.") {
        _ if s == "watch.failed" => Ok(s.to_owned()),
        Some(status) if status_ok(status) => Ok(s.to_owned()),
        _ => Err(format!(
            "{s:?} is not a notification type (job.event, job.<status> in lower case such as job.completed, or watch.failed)"
        )),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Sets up logging (see [`logging::init`]): `format` (or text), filtered by
/// `RUST_LOG`, else at `default_level`.
pub fn init_logging(format: Option<LogFormat>, default_level: &str) {
    logging::init(format, default_level);
}

/// An error and its causes, each said once. Errors here often show their
/// source in their own message (`cannot read config file x: No such file or
/// directory (os error 2)`) and also return it as `source()`; printing the
/// chain as it is would repeat it.
pub fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

/// Prints a command's failure on stderr as `error: ...`. Off a terminal it
/// is one line (line breaks as `\n`), so the journal or a log collector
/// keeps it as one entry; on the journal's stream it carries the `<3>`
/// prefix that systemd reads as priority err.
pub fn print_error(failure: &Failure) {
    let env = logging::LogEnv::from_process();
    let text = error_text(failure.error());
    let line = if env.stderr_is_terminal { text } else { logging::one_line(&text) };
    let prefix = if env.stderr_is_journal() { "<3>" } else { "" };
    eprintln!("{prefix}error: {line}");
}

/// Runs a parsed command line.
pub fn execute(cli: Cli) -> Result<(), Failure> {
    // The daemon logs its work at info, once its config says in which format;
    // one-shot commands print their own output and only log problems.
    match &cli.command {
        Command::Run => {}
        Command::Demo => init_logging(cli.log_format, "error"),
        _ => init_logging(cli.log_format, "warn"),
    }
    let path = cli.config.as_path();
    match cli.command {
        Command::Run => run(path, cli.log_format),
        Command::Start { portal, body, webhooks, labels } => start(path, portal, &body, webhooks, labels),
        Command::Demo => block_on(crate::demo::run(std::io::stdout())).map_err(runtime),
        Command::CheckConfig => {
            let config = load_config(path)?;
            print!("{}", config.redacted_toml());
            Ok(())
        }
        Command::Watch(w) => watch(path, w),
        Command::Deliveries(d) => deliveries(path, d),
        Command::Webhooks(w) => webhooks(path, w),
        Command::SendTest { webhook, kind } => send_test(path, &webhook, kind.as_deref()),
        Command::Completions { shell } => {
            let shell = match shell {
                CompletionShell::Bash => clap_complete::Shell::Bash,
                CompletionShell::Zsh => clap_complete::Shell::Zsh,
                CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            clap_complete::generate(shell, &mut Cli::command(), "dari-relay", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            let mut out = std::io::stdout().lock();
            match clap_mangen::Man::new(Cli::command()).render(&mut out).and_then(|()| out.flush()) {
                // `dari-relay man | head`: the reader has what it wanted.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(runtime(e)),
                _ => Ok(()),
            }
        }
    }
}

/// `n` and the noun, singular for 1: "1 failed delivery", "2 failed deliveries".
fn count(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Runs `f` on a single-threaded tokio runtime. The relay's async work is
/// HTTP and scheduling; SQLite, the diff and the bodies run on the store's
/// writer thread and tokio's blocking pool. One async thread avoids a
/// cross-thread wake-up per poll: measured with `cargo bench --bench relay`,
/// 30.4 µs of CPU per unchanged poll on two workers, 18.0 µs on one, with
/// more polls a second too.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("the tokio runtime starts").block_on(f)
}

/// Loads the config; any problem is a usage failure (exit 2).
pub fn load_config(path: &Path) -> Result<Config, Failure> {
    Config::load(path).map_err(usage)
}

fn open_store(config: &Config) -> Result<Store, Failure> {
    let opened =
        Store::open(&config.database).with_context(|| format!("cannot open database {}", config.database.display()));
    opened.map_err(|e| runtime(database_hint(e, &config.database)))
}

/// Adds what to do to an error opening the database, when the cause is a
/// lack of permission: the example config's `/var/lib/dari-relay` belongs to
/// the service user, and a first local run as oneself meets it there.
fn database_hint(error: anyhow::Error, path: &Path) -> anyhow::Error {
    if !permission_denied(&error, path) {
        return error;
    }
    error.context(format!(
        "no permission to create or open the database {}; for a local run, set database = \"./relay.db\" in the \
         config; for the installed service, run the command as its user (sudo -u dari-relay dari-relay ...)",
        path.display()
    ))
}

/// Whether a failure to open the database at `path` comes from permissions:
/// an OS error saying so, or SQLite unable to open a file this user may not
/// write.
fn permission_denied(error: &anyhow::Error, path: &Path) -> bool {
    let denied = |e: &std::io::Error| e.kind() == std::io::ErrorKind::PermissionDenied;
    if error.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(denied)) {
        return true;
    }
    let sqlite_cannot_open = error.chain().any(|c| {
        c.downcast_ref::<rusqlite::Error>().and_then(rusqlite::Error::sqlite_error_code).is_some_and(|code| {
            matches!(
                code,
                rusqlite::ErrorCode::CannotOpen | rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::PermissionDenied
            )
        })
    });
    sqlite_cannot_open && std::fs::OpenOptions::new().read(true).write(true).open(path).is_err_and(|e| denied(&e))
}

fn run(path: &Path, log_format: Option<LogFormat>) -> Result<(), Failure> {
    let config = Arc::new(load_config(path)?);
    init_logging(log_format.or(config.log_format), "info");
    let database = config.database.clone();
    let path = path.to_owned();
    block_on(async move {
        let (config_tx, config_rx) = tokio::sync::watch::channel(config);
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            handle_signals(&path, &config_tx).await;
            signals.cancel();
        });
        crate::app::run(config_rx, shutdown).await.map_err(|e| runtime(database_hint(e.into(), &database)))
    })
}

/// Waits for SIGTERM or SIGINT (then returns, to stop the relay); on each
/// SIGHUP reads the config again and hands it to the loops, or, if the new
/// file is invalid, logs why and keeps the running config.
async fn handle_signals(path: &Path, config: &tokio::sync::watch::Sender<Arc<Config>>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match Config::load(path) {
                Ok(new) => {
                    tracing::info!(config = %path.display(), "SIGHUP: config reloaded");
                    config.send_replace(Arc::new(new));
                }
                Err(e) => tracing::error!(error = %e, "SIGHUP: the new config is invalid; keeping the running one"),
            },
        }
    }
    tracing::info!("shutdown requested");
}

fn watch(path: &Path, command: WatchCommand) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match command {
        WatchCommand::Add { portal, job_id, webhooks, labels, from_now } => {
            let config = load_config(path)?;
            let watch = NewWatch {
                job_id,
                portal,
                webhooks: (!webhooks.is_empty()).then_some(webhooks),
                labels: labels.into_iter().collect(),
                from_now,
            };
            config.check_watch(&watch).map_err(usage)?;
            let store = open_store(&config)?;
            let summary = store.add_watches(std::slice::from_ref(&watch)).map_err(runtime)?;
            if summary.added == 1 {
                let _ = writeln!(out, "watching job {} on {}", watch.job_id, watch.portal);
                return Ok(());
            }
            // INTERFACE.md: adding a watched job changes nothing and exits 0.
            // Options that would have changed it are named, not dropped silently.
            let query = crate::store::WatchQuery { job_id: Some(watch.job_id.clone()), ..Default::default() };
            let existing = store.query_watches(&query).map_err(runtime)?.into_iter().next();
            let portal = existing.as_ref().map_or_else(|| watch.portal.to_string(), |w| w.portal_id.clone());
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
            let config = load_config(path)?;
            let watches = read_import(&config, &file)?;
            let store = open_store(&config)?;
            let summary = store.add_watches(&watches).map_err(runtime)?;
            let _ = writeln!(
                out,
                "imported {} ({} new, {} already watched)",
                count(watches.len(), "watch", "watches"),
                summary.added,
                summary.existing
            );
            Ok(())
        }
        WatchCommand::List { all, json } => {
            let config = load_config(path)?;
            let watches = open_store(&config)?.list_watches(all).map_err(runtime)?;
            if json {
                let _ = writeln!(out, "{}", serde_json::to_string_pretty(&watches).expect("rows serialise"));
                return Ok(());
            }
            let _ = writeln!(out, "{:<36}  {:<28}  {:<9}  {:<18}  LABELS", "JOB_ID", "PORTAL", "STATE", "LAST_STATUS");
            for w in &watches {
                let labels: Vec<String> =
                    w.labels.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default())).collect();
                let _ = writeln!(
                    out,
                    "{:<36}  {:<28}  {:<9}  {:<18}  {}",
                    w.job_id,
                    w.portal_id,
                    w.state,
                    w.last_status.as_deref().unwrap_or("-"),
                    labels.join(",")
                );
            }
            Ok(())
        }
        WatchCommand::Rm { job_id } => {
            let config = load_config(path)?;
            if open_store(&config)?.remove_watch(&job_id).map_err(runtime)? {
                let _ = writeln!(out, "stopped watching job {job_id}");
                Ok(())
            } else {
                Err(usage(anyhow!("job {job_id} is not watched (see `dari-relay watch list --all`)")))
            }
        }
    }
}

/// The options of a `watch add` that differ from the watch already stored,
/// as the user wrote them, with what the watch keeps.
fn ignored_options(new: &NewWatch, existing: &crate::store::WatchSummary) -> Vec<String> {
    let mut ignored = Vec::new();
    if new.portal.to_string() != existing.portal_id {
        ignored.push(format!("the portal {} (it stays on {})", new.portal, existing.portal_id));
    }
    let kept_labels: BTreeMap<&str, &str> =
        existing.labels.iter().map(|(k, v)| (k.as_str(), v.as_str().unwrap_or_default())).collect();
    for (k, v) in &new.labels {
        match kept_labels.get(k.as_str()) {
            Some(kept) if kept == v => {}
            Some(kept) => ignored.push(format!("--label {k}={v} (it keeps {k}={kept})")),
            None => ignored.push(format!("--label {k}={v}")),
        }
    }
    if let Some(webhooks) = &new.webhooks {
        let sorted = |w: &[String]| {
            let mut w = w.to_vec();
            w.sort();
            w
        };
        if existing.webhooks.as_deref().map(sorted) != Some(sorted(webhooks)) {
            let kept = existing.webhooks.as_ref().map_or("every matching webhook".to_owned(), |w| w.join(", "));
            let given: Vec<String> = webhooks.iter().map(|w| format!("--webhook {w}")).collect();
            ignored.push(format!("{} (it delivers to {kept})", given.join(" ")));
        }
    }
    if new.from_now {
        ignored.push("--from-now".to_owned());
    }
    ignored
}

/// One line of `watch import`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportLine {
    portal_id: String,
    job_id: String,
    #[serde(default)]
    webhooks: Option<Vec<String>>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    from_now: bool,
}

/// Reads and validates every line before anything is imported, so a bad
/// line imports nothing.
fn read_import(config: &Config, file: &Path) -> Result<Vec<NewWatch>, Failure> {
    let reader: Box<dyn BufRead> = if file == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display())).map_err(usage)?;
        Box::new(std::io::BufReader::new(f))
    };
    let name = if file == Path::new("-") { "<stdin>".to_owned() } else { file.display().to_string() };
    let mut watches = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let at = |e: String| usage(anyhow!("{name}:{}: {e}; nothing was imported", i + 1));
        let line = line.map_err(|e| at(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let raw: ImportLine = serde_json::from_str(&line).map_err(|e| at(e.to_string()))?;
        let watch = NewWatch {
            job_id: parse_job_id(&raw.job_id).map_err(at)?,
            portal: parse_portal(&raw.portal_id).map_err(at)?,
            webhooks: raw.webhooks.filter(|w| !w.is_empty()),
            labels: raw.labels,
            from_now: raw.from_now,
        };
        config.check_watch(&watch).map_err(|e| at(e.to_string()))?;
        watches.push(watch);
    }
    Ok(watches)
}

fn deliveries(path: &Path, command: DeliveriesCommand) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match command {
        DeliveriesCommand::List { status, json } => {
            let config = load_config(path)?;
            let state = status.as_deref().and_then(DeliveryState::parse);
            let store = open_store(&config)?;
            let rows = store.list_deliveries(state, 1000).map_err(runtime)?;
            // Failed deliveries come with every attempt: that is what a dead
            // letter is for.
            let mut attempts = BTreeMap::new();
            for d in rows.iter().filter(|d| d.state == "failed") {
                attempts.insert(d.id, store.attempts(d.id).map_err(runtime)?);
            }
            if json {
                let rows: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|d| {
                        let mut v = serde_json::to_value(d).expect("rows serialise");
                        if let Some(list) = attempts.get(&d.id) {
                            v["attempts_log"] = list.iter().map(attempt_json).collect();
                        }
                        v
                    })
                    .collect();
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
                    d.id,
                    d.kind,
                    d.webhook,
                    d.job_id,
                    d.state,
                    d.attempts,
                    d.last_error.as_deref().unwrap_or("-")
                );
                for a in attempts.get(&d.id).into_iter().flatten() {
                    let v = attempt_json(a);
                    let _ = writeln!(
                        out,
                        "          attempt at {}  {}ms  status {}  {}{}",
                        v["at"].as_str().unwrap_or(""),
                        a.duration_ms,
                        a.http_status.map_or("-".to_owned(), |s| s.to_string()),
                        attempt_error(a),
                        a.response_excerpt
                            .as_deref()
                            .map(|e| format!("  answer: {}", crate::format::truncate(e, 120)))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(())
        }
        DeliveriesCommand::Retry { delivery_id, all_failed } => {
            let config = load_config(path)?;
            let store = open_store(&config)?;
            let id = if all_failed { None } else { delivery_id };
            let requeued = store.retry_failed(id).map_err(runtime)?;
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

/// `start`: asks Dari to start a job with the org's key, then watches it.
/// The watch options are checked first, so a bad `--webhook` never starts a
/// paid job.
fn start(
    path: &Path,
    portal: PortalId,
    body: &Path,
    webhooks: Vec<String>,
    labels: Vec<(String, String)>,
) -> Result<(), Failure> {
    let config = load_config(path)?;
    let body = if body == Path::new("-") {
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut text).map_err(usage)?;
        text
    } else {
        std::fs::read(body).with_context(|| format!("cannot read {}", body.display())).map_err(usage)?
    };
    serde_json::from_slice::<serde_json::Value>(&body).context("--body is not JSON").map_err(usage)?;
    let mut watch = NewWatch {
        job_id: String::new(),
        portal,
        webhooks: (!webhooks.is_empty()).then_some(webhooks),
        labels: labels.into_iter().collect(),
        from_now: false,
    };
    config.check_watch(&watch).map_err(usage)?;
    let org = &config.orgs[&watch.portal.org];
    let client = crate::upstream::UpstreamClient::new(&config.upstream).map_err(runtime)?;
    let (job_id, _) = block_on(client.start_job(&watch.portal, body, &org.api_key))
        .context("Dari did not start the job")
        .map_err(runtime)?;
    watch.job_id = job_id;
    // The job is running and paid for: if it cannot be watched, say which it is.
    open_store(&config).and_then(|store| store.add_watches(std::slice::from_ref(&watch)).map_err(runtime)).map_err(
        |f| {
            runtime(anyhow!(
                "Dari started job {}, but it could not be watched: {:#}; add it with `dari-relay watch add {} {}`",
                watch.job_id,
                f.error(),
                watch.portal,
                watch.job_id
            ))
        },
    )?;
    let _ = writeln!(std::io::stdout().lock(), "started job {} on {}; watching it", watch.job_id, watch.portal);
    Ok(())
}

/// One row of `webhooks list`.
#[derive(serde::Serialize)]
struct WebhookRow {
    name: String,
    state: &'static str,
    paused_reason: Option<String>,
    in_config: bool,
    pending: i64,
    failed: i64,
    oldest_pending_age_seconds: Option<i64>,
    /// The adaptive concurrency a running daemon published lately.
    concurrency: Option<u64>,
}

fn webhooks(path: &Path, command: WebhooksCommand) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match command {
        WebhooksCommand::List { json } => {
            let config = load_config(path)?;
            let store = open_store(&config)?;
            let paused = store.paused_webhooks().map_err(runtime)?;
            let backlog = store.backlog().map_err(runtime)?;
            let concurrency = store.webhook_concurrency().map_err(runtime)?;
            let stale_ms = crate::deliver::CONCURRENCY_STALE.as_millis() as i64;
            let mut names: Vec<String> = config.webhooks.iter().map(|w| w.name.clone()).collect();
            let gone: std::collections::BTreeSet<&String> =
                backlog.keys().chain(paused.keys()).filter(|n| config.webhook(n).is_none()).collect();
            names.extend(gone.into_iter().cloned());
            let now = crate::vocab::now_ms();
            let rows: Vec<WebhookRow> = names
                .into_iter()
                .map(|name| {
                    let b = backlog.get(&name).copied().unwrap_or_default();
                    WebhookRow {
                        state: if paused.contains_key(&name) { "paused" } else { "active" },
                        paused_reason: paused.get(&name).map(|(reason, _)| reason.clone()),
                        in_config: config.webhook(&name).is_some(),
                        pending: b.pending,
                        failed: b.failed,
                        oldest_pending_age_seconds: b.oldest_pending.map(|t| (now - t).max(0) / 1000),
                        concurrency: concurrency.get(&name).filter(|(_, at)| now - at <= stale_ms).map(|(n, _)| *n),
                        name,
                    }
                })
                .collect();
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
            let config = load_config(path)?;
            if open_store(&config)?.resume_webhook(&webhook).map_err(runtime)? {
                let _ = writeln!(out, "resumed webhook {webhook}; a running daemon sends its backlog within a second");
                Ok(())
            } else {
                Err(usage(anyhow!("webhook {webhook:?} is not paused (see `dari-relay webhooks list`)")))
            }
        }
    }
}

/// What an attempt's error adds to its status: nothing when it only
/// restates it (a 500 is stored as "HTTP 500").
fn attempt_error(a: &crate::store::AttemptRecord) -> &str {
    let error = a.error.as_deref().unwrap_or("");
    match a.http_status {
        Some(status) if error == format!("HTTP {status}") => "",
        _ => error,
    }
}

fn attempt_json(a: &crate::store::AttemptRecord) -> serde_json::Value {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(a.attempted_at.max(0) as u64);
    serde_json::json!({
        "at": humantime::format_rfc3339_millis(at).to_string(),
        "duration_ms": a.duration_ms,
        "http_status": a.http_status,
        "error": a.error,
        "response_excerpt": a.response_excerpt,
    })
}

/// Longest `Retry-After` that `send-test` waits out on a 429 before trying
/// again; Discord allows only a few messages per second to a webhook, and
/// one run sends up to eight.
const SEND_TEST_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

fn send_test(path: &Path, name: &str, kind: Option<&str>) -> Result<(), Failure> {
    use crate::notification::{SAMPLE_KINDS, now_timestamp, sample};
    let config = load_config(path)?;
    let webhook = config
        .webhook(name)
        .cloned()
        .ok_or_else(|| usage(anyhow!("{name:?} is not a webhook in {}", config.path.display())))?;
    let accepted = |k: &str| crate::glob::any_matches(&webhook.types, k);
    let kinds: Vec<&str> = match kind {
        Some(kind) => {
            if !accepted(kind) {
                eprintln!("note: the types filter of webhook {name} leaves out {kind}; sending it anyway");
            }
            vec![kind]
        }
        None => SAMPLE_KINDS.into_iter().filter(|k| accepted(k)).collect(),
    };
    if kinds.is_empty() {
        return Err(usage(anyhow!(
            "the types filter of webhook {name} accepts none of {}; pick a type with --type",
            SAMPLE_KINDS.join(", ")
        )));
    }
    let http = crate::deliver::http_client(&config).map_err(runtime)?;
    // The sample job carries the labels the webhook follows, as a real one would.
    let mut labels: serde_json::Map<String, serde_json::Value> =
        webhook.labels.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
    labels.insert("sent_by".into(), "dari-relay send-test".into());
    let timestamp = now_timestamp();
    let mut out = std::io::stdout().lock();
    let mut failed = 0;
    block_on(async {
        for kind in &kinds {
            let notification = sample(kind, &labels, &timestamp);
            let body = match webhook.render(&notification.body.compose()) {
                Ok(body) => body,
                Err(e) => {
                    let _ = writeln!(out, "{kind}: {e}");
                    failed += 1;
                    continue;
                }
            };
            let msg_id = crate::poller::new_msg_id();
            let mut response = crate::deliver::send(&http, &webhook, &msg_id, body.clone()).await;
            for _ in 0..3 {
                let wait = response.retry_after.unwrap_or(std::time::Duration::from_secs(1));
                if response.status != Some(429) || wait > SEND_TEST_MAX_WAIT {
                    break;
                }
                let _ = writeln!(out, "{kind}: HTTP 429, trying again in {:.1}s", wait.as_secs_f64());
                tokio::time::sleep(wait).await;
                response = crate::deliver::send(&http, &webhook, &msg_id, body.clone()).await;
            }
            match response.status {
                Some(status) => {
                    let _ = writeln!(out, "{kind}: HTTP {status}");
                }
                None => {
                    let _ =
                        writeln!(out, "{kind}: no answer: {}", response.error.as_deref().unwrap_or("unknown error"));
                }
            }
            if let Some(excerpt) = &response.excerpt {
                let line = excerpt.split_whitespace().collect::<Vec<_>>().join(" ");
                let _ = writeln!(out, "  answer: {}", crate::format::truncate(&line, 300));
            }
            if !response.is_success() {
                failed += 1;
            }
        }
    });
    if failed == 0 {
        Ok(())
    } else {
        Err(runtime(anyhow!("{failed} of {} samples to webhook {name} did not get a 2xx answer", kinds.len())))
    }
}
