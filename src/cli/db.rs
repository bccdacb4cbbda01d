//! `db copy --from <path-or-url> --to <path-or-url>`: every row a running
//! relay needs, from one database to another (SQLite or PostgreSQL, either
//! way), through `store::copy`. A value starting with `postgres://` or
//! `postgresql://` is PostgreSQL, anything else a SQLite path;
//! `--from-env VAR` / `--to-env VAR` read it from the environment, so a
//! password need not be on the command line (or in the shell's history).
//!
//! Refusals exit 2: the same database on both ends, a source or target a
//! running relay uses, a target that holds watches. A failure on the way
//! exits 1, saying what state the target is in. A URL is only ever shown
//! without its password. Progress goes to stderr (a bar on a terminal,
//! `copied 5000 of 12000 deliveries` lines otherwise), the summary to stdout.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use indicatif::{ProgressBar, ProgressStyle};
use secrecy::{ExposeSecret, SecretString};

use super::{Failure, block_on, runtime, usage};
use crate::config::without_password;
use crate::store::copy::{self, CopyError, CopySource, CopySummary, CopyTarget, Progress, Table};
use crate::store::{PostgresCopy, SqliteCopy, StoreError};
use crate::vocab::is_postgres_url;

/// `db ...`
#[derive(Debug, clap::Subcommand)]
pub enum DbCommand {
    /// Copy every watch, last-seen state, notification, delivery and attempt to a new database
    /// (SQLite or PostgreSQL, either way), webhook-ids kept; refuses a target holding watches
    /// and a database a running relay uses.
    Copy {
        /// The source: a SQLite path, or a postgres:// or postgresql:// URL.
        #[arg(long, value_name = "PATH_OR_URL", required_unless_present = "from_env", conflicts_with = "from_env")]
        from: Option<String>,
        /// The environment variable holding the source, so no password is on the command line.
        #[arg(long, value_name = "VAR")]
        from_env: Option<String>,
        /// The target: a SQLite path (created if missing), or a PostgreSQL URL.
        #[arg(long, value_name = "PATH_OR_URL", required_unless_present = "to_env", conflicts_with = "to_env")]
        to: Option<String>,
        /// The environment variable holding the target.
        #[arg(long, value_name = "VAR")]
        to_env: Option<String>,
    },
}

/// Runs a `db` command.
pub fn execute(command: DbCommand) -> Result<(), Failure> {
    match command {
        DbCommand::Copy { from, from_env, to, to_env } => copy(from, from_env, to, to_env),
    }
}

/// One end of a copy, as the command line named it.
enum Location {
    Sqlite(PathBuf),
    Postgres {
        url: SecretString,
        /// The URL without its password: what messages show.
        shown: String,
    },
}

impl Location {
    /// The database named by `value`, or by the variable `env` names.
    fn resolve(value: Option<String>, env: Option<String>, side: &str) -> Result<Location, Failure> {
        let value = match (value, env) {
            (Some(v), None) => v,
            (None, Some(name)) => match std::env::var(&name) {
                Ok(v) if !v.trim().is_empty() => v,
                _ => return Err(usage(anyhow!("--{side}-env: environment variable {name} is not set or empty"))),
            },
            // clap makes them exclusive and one of them required.
            _ => return Err(usage(anyhow!("give one of --{side} and --{side}-env"))),
        };
        let value = value.trim().to_owned();
        if value.is_empty() {
            return Err(usage(anyhow!("--{side} must not be empty")));
        }
        if is_postgres_url(&value) {
            crate::store::postgres::parse_url(&value).map_err(|e| usage(anyhow!("--{side}: {e}")))?;
            let shown = without_password(&value);
            return Ok(Location::Postgres { url: SecretString::from(value), shown });
        }
        Ok(Location::Sqlite(PathBuf::from(value)))
    }

    fn shown(&self) -> String {
        match self {
            Location::Sqlite(path) => path.display().to_string(),
            Location::Postgres { shown, .. } => shown.clone(),
        }
    }

    /// Whether `self` and `other` name the same database: the same file
    /// (through any path), or the same URL.
    fn same_as(&self, other: &Location) -> bool {
        match (self, other) {
            (Location::Sqlite(a), Location::Sqlite(b)) => {
                a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
            }
            (Location::Postgres { url: a, .. }, Location::Postgres { url: b, .. }) => {
                a.expose_secret() == b.expose_secret()
            }
            _ => false,
        }
    }

    /// The password in the URL, if any, so that an error quoting it can be
    /// cleaned (the store's errors never repeat the URL; this is the
    /// belt to those braces).
    fn password(&self) -> Option<String> {
        let Location::Postgres { url, .. } = self else { return None };
        let config = crate::store::postgres::parse_url(url.expose_secret()).ok()?;
        config.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).filter(|p| !p.is_empty())
    }
}

/// `db copy`.
pub fn copy(
    from: Option<String>,
    from_env: Option<String>,
    to: Option<String>,
    to_env: Option<String>,
) -> Result<(), Failure> {
    let source = Location::resolve(from, from_env, "from")?;
    let target = Location::resolve(to, to_env, "to")?;
    // Opening a missing file would create it: a mistyped path must not
    // become an empty database copied as "nothing".
    if let Location::Sqlite(path) = &source
        && !path.is_file()
    {
        return Err(usage(anyhow!("there is no SQLite database at {}", path.display())));
    }
    if source.same_as(&target) {
        return Err(usage(anyhow!("--from and --to name the same database ({})", source.shown())));
    }
    let secrets: Vec<String> = [source.password(), target.password()].into_iter().flatten().collect();
    let what = format!("cannot copy {} to {}", source.shown(), target.shown());
    let mut progress = Shown::new(std::io::stderr().is_terminal());
    let result = block_on(run(&source, &target, &mut progress));
    progress.clear();
    match result {
        Ok(summary) => {
            print_summary(&mut std::io::stdout().lock(), &source, &target, &summary).map_err(runtime)?;
            Ok(())
        }
        Err(e) => {
            let refused = matches!(&e, Step::Copy(c) if c.is_refusal());
            let error = scrub(e.into_error().context(what), &secrets);
            Err(if refused { usage(error) } else { runtime(error) })
        }
    }
}

/// Where a copy stopped.
enum Step {
    OpenSource(StoreError),
    OpenTarget(StoreError),
    Copy(CopyError),
}

impl Step {
    fn into_error(self) -> anyhow::Error {
        match self {
            Step::OpenSource(e) => anyhow::Error::new(e).context("cannot open the source database"),
            Step::OpenTarget(e) => anyhow::Error::new(e).context("cannot open the target database"),
            Step::Copy(e) => anyhow::Error::new(e),
        }
    }
}

async fn run(source: &Location, target: &Location, progress: &mut Shown) -> Result<CopySummary, Step> {
    let mut from: Box<dyn CopySource> = match source {
        Location::Sqlite(path) => Box::new(SqliteCopy::open_source(path).map_err(Step::OpenSource)?),
        Location::Postgres { url, .. } => {
            Box::new(PostgresCopy::open(url.expose_secret()).await.map_err(Step::OpenSource)?)
        }
    };
    let mut to: Box<dyn CopyTarget> = match target {
        Location::Sqlite(path) => Box::new(SqliteCopy::open_target(path).map_err(Step::OpenTarget)?),
        Location::Postgres { url, .. } => {
            Box::new(PostgresCopy::open(url.expose_secret()).await.map_err(Step::OpenTarget)?)
        }
    };
    copy::copy(from.as_mut(), to.as_mut(), progress).await.map_err(Step::Copy)
}

/// `error`'s whole chain as one error, with every secret replaced by `***`.
fn scrub(error: anyhow::Error, secrets: &[String]) -> anyhow::Error {
    let text = super::error_text(&error);
    if !secrets.iter().any(|s| text.contains(s.as_str())) {
        return error;
    }
    anyhow!(secrets.iter().fold(text, |text, s| text.replace(s.as_str(), "***")))
}

fn print_summary(
    out: &mut impl Write,
    source: &Location,
    target: &Location,
    summary: &CopySummary,
) -> std::io::Result<()> {
    writeln!(out, "copied {} to {}", source.shown(), target.shown())?;
    for (table, n) in Table::ALL.into_iter().zip(summary.counts) {
        writeln!(out, "  {:<16}{n:>10}", table.name())?;
    }
    writeln!(out, "  {:<16}{:>10}", "watch revision", summary.watch_rev)?;
    out.flush()
}

/// How often a progress line is printed at most, off a terminal.
const LINE_EVERY: Duration = Duration::from_secs(2);

/// Progress on stderr. On a terminal, one bar for the table being copied,
/// with a line above it for each table done; otherwise a line now and then,
/// and one per table copied.
struct Shown {
    terminal: bool,
    /// The terminal's bar, made when the first table starts.
    bar: Option<ProgressBar>,
    last_line: Instant,
}

impl Shown {
    fn new(terminal: bool) -> Shown {
        Shown { terminal, bar: None, last_line: Instant::now() }
    }

    fn line(&mut self, table: Table, copied: u64, total: u64) {
        let text = format!("copied {copied} of {total} {}", table.name());
        match &self.bar {
            // Above the bar, which stays at the bottom.
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
        self.last_line = Instant::now();
    }

    /// Takes the bar off the terminal (done, or the copy failed).
    fn clear(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Progress for Shown {
    fn start(&mut self, table: Table, total: u64) {
        if !self.terminal {
            return;
        }
        let bar = self.bar.get_or_insert_with(|| {
            let bar = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template("{msg:<15} [{bar:40}] {pos}/{len} ({eta})") {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        bar.reset();
        bar.set_length(total);
        bar.set_message(table.name());
    }

    fn advance(&mut self, table: Table, copied: u64, total: u64) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(total);
                bar.set_position(copied);
            }
            None if self.last_line.elapsed() >= LINE_EVERY => self.line(table, copied, total),
            None => {}
        }
    }

    fn finish(&mut self, table: Table, copied: u64) {
        if copied > 0 || self.bar.is_some() {
            self.line(table, copied, copied);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_shown_without_its_password_and_its_engine_is_told() {
        let pg = Location::resolve(Some("postgres://relay:s3cret@db:5432/relay".into()), None, "to").unwrap();
        assert_eq!(pg.shown(), "postgres://relay:***@db:5432/relay");
        assert_eq!(pg.password().as_deref(), Some("s3cret"));
        let sqlite = Location::resolve(Some("./relay.db".into()), None, "from").unwrap();
        assert!(matches!(sqlite, Location::Sqlite(_)));
        assert!(!sqlite.same_as(&pg));
        let scrubbed = scrub(anyhow!("failed near s3cret"), &["s3cret".into()]);
        assert_eq!(scrubbed.to_string(), "failed near ***");
    }

    #[test]
    fn a_missing_variable_is_a_usage_error() {
        let failure = Location::resolve(None, Some("DARI_RELAY_NO_SUCH_VARIABLE".into()), "from").err().unwrap();
        assert_eq!(failure.exit_code(), 2);
        assert!(failure.error().to_string().contains("DARI_RELAY_NO_SUCH_VARIABLE"), "{}", failure.error());
    }

    #[test]
    fn the_summary_counts_every_table() {
        let source = Location::Sqlite("a.db".into());
        let target =
            Location::Postgres { url: SecretString::from("postgres://u:p@h/d"), shown: "postgres://u:***@h/d".into() };
        let mut out = Vec::new();
        let summary = CopySummary { counts: [3, 2, 5, 9, 12, 1, 0], watch_rev: 7 };
        print_summary(&mut out, &source, &target, &summary).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("copied a.db to postgres://u:***@h/d\n"), "{text}");
        assert!(text.contains("  deliveries               9\n"), "{text}");
        assert!(text.contains("  watch revision           7\n"), "{text}");
    }
}
