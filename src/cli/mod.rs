//! The command line: clap definitions, raw arguments validated once, and one
//! function per command: [`daemon`] (`run`), [`operate`] (the operator
//! commands, on the database or through the admin API with [`remote`]),
//! [`watch`] (`start`, `watch import`), [`send_test`], and [`logging`].
//!
//! Every command returns `Result<(), Failure>`; a [`Failure`] knows its exit
//! code (2 for bad usage, config or argument; 1 for a runtime failure), and
//! `main` prints its whole error chain. Argument checks that clap can do
//! (UUIDs, portal ids, `KEY=VALUE`) are value parsers, so clap reports them
//! with the argument's name and exits 2 on its own.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};

use crate::config::{Config, DEFAULT_CONFIG_PATH, LogFormat, PostgresDatabase};
use crate::store::{OperatorStore, Postgres, Sqlite, Store};
use crate::vocab::PortalId;

pub use db::DbCommand;

mod check;
mod daemon;
mod db;
mod logging;
mod operate;
mod remote;
mod send_test;
mod watch;

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
    /// Send `watch`, `deliveries` and `webhooks` commands to the running daemon's admin API:
    /// `--admin=ADDR` (host:port or unix:PATH), or `--admin` alone for the config's [admin] listen.
    // `require_equals`, so `--admin watch list` is not read as the address "watch".
    #[arg(long, global = true, value_name = "ADDR", num_args = 0..=1, require_equals = true, default_missing_value = "")]
    pub admin: Option<String>,
    /// The environment variable holding the admin API's token [default: the config's [admin] token_env].
    #[arg(long, global = true, value_name = "NAME")]
    pub admin_token_env: Option<String>,
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
    /// Copy a relay's database to another (SQLite or PostgreSQL, either way).
    #[command(subcommand)]
    Db(DbCommand),
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
    /// Follow notifications and delivery outcomes live, from the running daemon's admin API
    /// (`--admin`, else the config's [admin] listen).
    Tail {
        /// One JSON object per line (with its "event": notification or delivery) instead of text.
        #[arg(long)]
        json: bool,
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
    /// Add many watches from JSON lines, in one transaction (with --admin:
    /// one request per line, each refused line reported, the rest imported).
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
        #[arg(long, visible_alias = "state", value_parser = ["pending", "delivered", "failed"])]
        status: Option<String>,
        /// Only deliveries to this webhook.
        #[arg(long, value_name = "NAME")]
        webhook: Option<String>,
        /// Only deliveries of this job.
        #[arg(long, value_name = "JOB_ID", value_parser = parse_job_id)]
        job: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one delivery: the body sent as rendered for its webhook, its headers (secrets
    /// redacted) and every attempt.
    Show {
        /// The delivery's id (see `deliveries list`).
        delivery_id: i64,
        /// Print JSON instead of text.
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
    // `--admin` alone (an empty value) means the config's `[admin] listen`.
    let admin = cli.admin.as_ref().map(|a| Some(a.clone()).filter(|a| !a.is_empty()));
    let target = || operate::target(path, admin.as_ref(), cli.admin_token_env.as_deref());
    match cli.command {
        Command::Run => daemon::run(path, cli.log_format),
        Command::Start { portal, body, webhooks, labels } => watch::start(path, portal, &body, webhooks, labels),
        Command::Demo => block_on(crate::demo::run(std::io::stdout())).map_err(runtime),
        Command::CheckConfig => check::check_config(path),
        Command::Watch(w) => operate::watch(path, target()?, w),
        Command::Deliveries(d) => operate::deliveries(target()?, d),
        Command::Webhooks(w) => operate::webhooks(target()?, w),
        Command::Tail { json } => {
            // Always through the API: the daemon is what is followed.
            let admin = Some(admin.clone().unwrap_or(None));
            match operate::target(path, admin.as_ref(), cli.admin_token_env.as_deref())? {
                operate::Target::Remote(api) => operate::tail(&api, json),
                operate::Target::Local(_) => Err(usage(anyhow::anyhow!("tail needs the admin API"))),
            }
        }
        Command::Db(d) => db::execute(d),
        Command::SendTest { webhook, kind } => send_test::send_test(path, &webhook, kind.as_deref()),
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

/// The database a command works on: a SQLite file, or a PostgreSQL URL
/// (kept secret: messages show it without its password).
pub(crate) enum Database {
    Sqlite(PathBuf),
    Postgres(PostgresDatabase),
}

impl Database {
    /// The database the resolved config names.
    fn of(config: &Config) -> Database {
        match &config.postgres {
            Some(pg) => Database::Postgres(pg.clone()),
            None => Database::Sqlite(config.database.clone()),
        }
    }

    /// Opens it, whichever engine it is: the schema is created or migrated.
    /// A database that cannot be opened (a file not ours, a server that
    /// does not answer) is a runtime failure naming it, never with its
    /// password.
    async fn open(&self) -> Result<Arc<dyn OperatorStore>, Failure> {
        match self {
            Database::Sqlite(path) => {
                let opened = Store::open(path).with_context(|| format!("cannot open database {}", path.display()));
                let store = opened.map_err(|e| runtime(database_hint(e, path)))?;
                Ok(Arc::new(Sqlite(Arc::new(store))))
            }
            Database::Postgres(pg) => {
                let opened =
                    Postgres::open(pg.url()).await.with_context(|| format!("cannot open database {}", pg.shown));
                Ok(Arc::new(opened.map_err(runtime)?))
            }
        }
    }

    /// Opens it and runs `f` on it, on the command's runtime (a PostgreSQL
    /// pool lives as long as the runtime that made its connections).
    fn with<T>(&self, f: impl AsyncFnOnce(&dyn OperatorStore) -> Result<T, Failure>) -> Result<T, Failure> {
        block_on(async {
            let store = self.open().await?;
            f(store.as_ref()).await
        })
    }
}

/// Opens the database the config names, either engine.
async fn open_store(config: &Config) -> Result<Arc<dyn OperatorStore>, Failure> {
    Database::of(config).open().await
}

/// [`open_store`] and `f` on it, for a command without a runtime of its own.
fn with_store<T>(config: &Config, f: impl AsyncFnOnce(&dyn OperatorStore) -> Result<T, Failure>) -> Result<T, Failure> {
    Database::of(config).with(f)
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
