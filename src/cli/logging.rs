//! Where the process logs, and how: the systemd journal natively when
//! systemd connected stderr to it, else stderr in text or JSON lines.
//!
//! The choice is a pure function of what the environment says
//! ([`LogEnv`] → [`choose_sink`]) so it is tested without a journal. Under
//! the journal every event is one entry, with its level as `PRIORITY` and its
//! fields (the span's `job_id` as `JOB_ID`) as journal fields. On stderr,
//! colours are written only to a terminal and never with `NO_COLOR`, and each
//! event is one line: a multi-line value (a TOML error with its excerpt) has
//! its line breaks written as `\n`, so a line-based collector (the journal's
//! stream, a pipe) never splits one event into several.

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// Where events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSink {
    /// The systemd journal's native protocol: one entry per event.
    Journal,
    /// Standard error, with ANSI colours only if `ansi`.
    Stderr { ansi: bool },
}

/// What the process's environment says about its stderr, read once.
#[derive(Debug, Clone, Default)]
pub struct LogEnv {
    /// `$JOURNAL_STREAM`: `<device>:<inode>` of the stream systemd connected
    /// to the service's stdout/stderr.
    pub journal_stream: Option<OsString>,
    /// The device and inode of this process's stderr, if it can be read.
    pub stderr_id: Option<(u64, u64)>,
    /// Whether stderr is a terminal.
    pub stderr_is_terminal: bool,
    /// `$NO_COLOR`.
    pub no_color: Option<OsString>,
}

impl LogEnv {
    /// Reads the environment of this process.
    pub fn from_process() -> LogEnv {
        LogEnv {
            journal_stream: std::env::var_os("JOURNAL_STREAM"),
            stderr_id: stderr_id(),
            stderr_is_terminal: std::io::stderr().is_terminal(),
            no_color: std::env::var_os("NO_COLOR"),
        }
    }

    /// Whether stderr is the journal stream systemd set up. systemd.exec(5)
    /// says to compare `JOURNAL_STREAM` with stderr's device and inode
    /// rather than trust the variable alone: a child whose stderr was
    /// redirected (`dari-relay watch list 2>file` run from a service's
    /// shell) inherits the variable but not the stream.
    pub fn stderr_is_journal(&self) -> bool {
        let Some((dev, ino)) = self.stderr_id else { return false };
        let Some(stream) = self.journal_stream.as_ref().and_then(|s| s.to_str()) else { return false };
        stream.split_once(':').is_some_and(|(d, i)| d.parse() == Ok(dev) && i.parse() == Ok(ino))
    }
}

/// The device and inode of fd 2, through a duplicate of it (std has no
/// fstat on a borrowed descriptor).
fn stderr_id() -> Option<(u64, u64)> {
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Picks where `format` logs go: the journal for text logs when stderr is
/// the journal stream (JSON is an explicit request for JSON lines on
/// stderr, for a collector that reads them), else stderr, in colour only on
/// a terminal and without a non-empty `NO_COLOR` (no-color.org).
pub fn choose_sink(format: LogFormat, env: &LogEnv) -> LogSink {
    if format == LogFormat::Text && env.stderr_is_journal() {
        return LogSink::Journal;
    }
    let no_color = env.no_color.as_ref().is_some_and(|v| !v.is_empty());
    LogSink::Stderr { ansi: format == LogFormat::Text && env.stderr_is_terminal && !no_color }
}

/// Sets up logging: `format` (or text), filtered by `RUST_LOG`, else at
/// `default_level`, to the sink [`choose_sink`] picks. A journal that cannot
/// be reached (the socket is missing) falls back to plain stderr, saying so
/// at info: stderr is then still the journal's stream, so nothing is lost,
/// only the fields and priorities.
pub fn init(format: Option<LogFormat>, default_level: &str) {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let format = format.unwrap_or(LogFormat::Text);
    let env = LogEnv::from_process();
    let mut unreachable = None;
    match choose_sink(format, &env) {
        LogSink::Journal => match tracing_journald::layer() {
            Ok(layer) => {
                let _ = tracing_subscriber::registry().with(filter()).with(journal_layer(layer)).try_init();
                return;
            }
            Err(e) => {
                unreachable = Some(e);
                init_stderr(format, false, filter());
            }
        },
        LogSink::Stderr { ansi } => init_stderr(format, ansi, filter()),
    }
    if let Some(e) = unreachable {
        tracing::info!(error = %e, "JOURNAL_STREAM is set but the journal socket cannot be reached; logging to stderr");
    }
}

/// The journal layer: fields without a prefix (`JOB_ID`, `WEBHOOK`,
/// `ERROR`), and syslog priorities that keep info apart from notice (the
/// crate's default maps info to notice).
fn journal_layer(layer: tracing_journald::Layer) -> tracing_journald::Layer {
    use tracing_journald::{Priority, PriorityMappings};
    layer.with_field_prefix(None).with_syslog_identifier("dari-relay".to_owned()).with_priority_mappings(
        PriorityMappings {
            error: Priority::Error,
            warn: Priority::Warning,
            info: Priority::Informational,
            debug: Priority::Debug,
            trace: Priority::Debug,
        },
    )
}

fn init_stderr(format: LogFormat, ansi: bool, filter: EnvFilter) {
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.with_writer(|| OneLine(std::io::stderr())).try_init(),
        // serde_json escapes line breaks already.
        LogFormat::Json => {
            builder.with_writer(std::io::stderr).json().flatten_event(true).with_current_span(true).try_init()
        }
    };
}

/// A writer that keeps each event on one line. tracing-subscriber's fmt
/// layer formats an event into a buffer and writes it with one `write_all`,
/// so each `write` here is one whole event: every line break but the last
/// is written as `\n`.
struct OneLine<W>(W);

impl<W: Write> Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        if !body.iter().any(|&b| b == b'\n' || b == b'\r') {
            self.0.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut line = one_line(&String::from_utf8_lossy(body)).into_bytes();
        if body.len() < buf.len() {
            line.push(b'\n');
        }
        self.0.write_all(&line)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// `text` with its line breaks written as `\n` (and `\r` as `\r`).
pub fn one_line(text: &str) -> String {
    text.replace('\r', "\\r").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(journal_stream: Option<&str>, terminal: bool, no_color: Option<&str>) -> LogEnv {
        LogEnv {
            journal_stream: journal_stream.map(Into::into),
            stderr_id: Some((64769, 4242)),
            stderr_is_terminal: terminal,
            no_color: no_color.map(Into::into),
        }
    }

    #[test]
    fn the_journal_is_chosen_only_when_stderr_is_its_stream() {
        let cases = [
            (Some("64769:4242"), LogFormat::Text, LogSink::Journal),
            // Inherited variable, stderr redirected elsewhere.
            (Some("64769:9999"), LogFormat::Text, LogSink::Stderr { ansi: false }),
            (Some("garbage"), LogFormat::Text, LogSink::Stderr { ansi: false }),
            (Some(""), LogFormat::Text, LogSink::Stderr { ansi: false }),
            (None, LogFormat::Text, LogSink::Stderr { ansi: false }),
            // JSON lines were asked for: they stay on stderr.
            (Some("64769:4242"), LogFormat::Json, LogSink::Stderr { ansi: false }),
        ];
        for (stream, format, want) in cases {
            assert_eq!(choose_sink(format, &env(stream, false, None)), want, "{stream:?} {format:?}");
        }
        let unknown = LogEnv { stderr_id: None, ..env(Some("64769:4242"), false, None) };
        assert_eq!(choose_sink(LogFormat::Text, &unknown), LogSink::Stderr { ansi: false });
    }

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        let cases = [
            (true, None, LogFormat::Text, true),
            (false, None, LogFormat::Text, false),
            (true, Some("1"), LogFormat::Text, false),
            // An empty NO_COLOR does not count (no-color.org).
            (true, Some(""), LogFormat::Text, true),
            (true, None, LogFormat::Json, false),
        ];
        for (terminal, no_color, format, ansi) in cases {
            assert_eq!(
                choose_sink(format, &env(None, terminal, no_color)),
                LogSink::Stderr { ansi },
                "{terminal} {no_color:?} {format:?}"
            );
        }
    }

    #[test]
    fn one_event_is_one_line() {
        let mut out = OneLine(Vec::new());
        out.write_all(b"ERROR bad config: line 3\n  |\n3 | x\n").unwrap();
        out.write_all(b"INFO plain\n").unwrap();
        assert_eq!(String::from_utf8(out.0).unwrap(), "ERROR bad config: line 3\\n  |\\n3 | x\nINFO plain\n");
    }

    #[test]
    fn stderr_is_read_from_the_process() {
        // fd 2 exists in a test process; its id is readable.
        assert!(stderr_id().is_some());
    }
}
