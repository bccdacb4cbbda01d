//! A small client of the running relay's admin API, for `--admin`: the
//! operator commands ask the daemon instead of opening the database, so
//! they need neither the service user's rights nor the org secrets, only
//! the admin token.
//!
//! It speaks HTTP/1.0 over a TCP or Unix socket with the standard library:
//! one request per connection, the answer read to its end (an HTTP/1.0
//! answer is never chunked). reqwest cannot reach a Unix socket, and the
//! packaged config listens on one.

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

/// How long connecting and each read or write may take.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read (a page of 1,000 deliveries with their attempts fits).
const MAX_ANSWER: u64 = 64 * 1024 * 1024;
/// Longest line of `watch import --admin` sent; a longer one is refused
/// without reading the rest of it into memory.
pub const MAX_IMPORT_LINE: usize = 64 * 1024;

/// Where the admin API listens, and the token to present.
pub struct Admin {
    addr: Addr,
    token: Option<String>,
}

enum Addr {
    /// `host:port`, also sent as `Host` (the API refuses foreign hosts).
    Tcp(String),
    Unix(PathBuf),
}

/// An answer: the status and the body as JSON (`Null` when empty, a string
/// when it is not JSON).
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    /// The API's `error` text, or the body itself.
    pub fn error(&self) -> String {
        match self.body.get("error").and_then(Value::as_str) {
            Some(e) => e.to_owned(),
            None => self.body.to_string(),
        }
    }
}

impl Admin {
    /// `listen` as `[admin] listen` writes it: `127.0.0.1:9187`, or
    /// `unix:/run/dari-relay/admin.sock`.
    pub fn new(listen: &str, token: Option<String>) -> anyhow::Result<Admin> {
        let listen = listen.trim();
        let addr = match listen.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Addr::Unix(PathBuf::from(path)),
            None if listen.contains(':') && !listen.contains('/') => Addr::Tcp(listen.to_owned()),
            _ => {
                bail!("--admin {listen:?} is not an address such as 127.0.0.1:9187 or unix:/run/dari-relay/admin.sock")
            }
        };
        Ok(Admin { addr, token })
    }

    fn describe(&self) -> String {
        match &self.addr {
            Addr::Tcp(a) => a.clone(),
            Addr::Unix(p) => format!("unix:{}", p.display()),
        }
    }

    /// Sends one request; `body` goes as JSON. A 401 is an error here, since
    /// no command can do anything with it but say so.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Answer> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let host = match &self.addr {
            Addr::Tcp(a) => a.as_str(),
            Addr::Unix(_) => "localhost",
        };
        let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\n");
        if let Some(token) = &self.token {
            request.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        if !body.is_empty() {
            request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        request.push_str(&body);
        let raw = self.exchange(request.as_bytes()).with_context(|| {
            format!("cannot reach the admin API at {} (is the daemon running with [admin] listen?)", self.describe())
        })?;
        let answer = parse(&raw)?;
        if answer.status == 401 {
            bail!(
                "the admin API at {} refused the token: {}; give it with --admin-token-env NAME or [admin] token_env",
                self.describe(),
                answer.error()
            );
        }
        Ok(answer)
    }

    /// Sends a GET for a server-sent event stream and calls `on_event` with
    /// each event's name and data until the stream ends or `on_event`
    /// returns `false`. Comments (keepalives) are skipped.
    pub fn stream(&self, path: &str, mut on_event: impl FnMut(&str, &str) -> bool) -> anyhow::Result<()> {
        let host = match &self.addr {
            Addr::Tcp(a) => a.as_str(),
            Addr::Unix(_) => "localhost",
        };
        let mut request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: text/event-stream\r\n");
        if let Some(token) = &self.token {
            request.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        request.push_str("\r\n");
        let context = || {
            format!("cannot reach the admin API at {} (is the daemon running with [admin] listen?)", self.describe())
        };
        // Keepalives come every 15 s; four missed ones mean the relay is gone.
        let idle = Some(Duration::from_secs(60));
        let stream: Box<dyn Read> = match &self.addr {
            Addr::Tcp(addr) => {
                use std::net::ToSocketAddrs;
                let target =
                    addr.to_socket_addrs().with_context(context)?.next().ok_or_else(|| anyhow!("no address"))?;
                let mut s = std::net::TcpStream::connect_timeout(&target, TIMEOUT).with_context(context)?;
                s.set_read_timeout(idle)?;
                s.write_all(request.as_bytes())?;
                Box::new(s)
            }
            Addr::Unix(p) => {
                let mut s = std::os::unix::net::UnixStream::connect(p).with_context(context)?;
                s.set_read_timeout(idle)?;
                s.write_all(request.as_bytes())?;
                Box::new(s)
            }
        };
        let mut lines = std::io::BufReader::new(stream).lines();
        let status = lines.next().transpose()?.unwrap_or_default();
        let code: u16 = status.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        for line in lines.by_ref() {
            if line?.is_empty() {
                break;
            }
        }
        if code != 200 {
            let rest: Vec<String> = lines.map_while(Result::ok).collect();
            let answer = Answer { status: code, body: serde_json::from_str(&rest.join("\n")).unwrap_or(Value::Null) };
            bail!("the admin API answered {code}: {}", answer.error());
        }
        let (mut name, mut data) = (String::new(), String::new());
        for line in lines {
            let line = line.context("the event stream broke off")?;
            if line.is_empty() {
                if !data.is_empty() && !on_event(&name, &data) {
                    return Ok(());
                }
                name.clear();
                data.clear();
            } else if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
        Ok(())
    }

    fn exchange(&self, request: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut raw = Vec::new();
        match &self.addr {
            Addr::Tcp(addr) => {
                use std::net::ToSocketAddrs;
                let target = addr.to_socket_addrs()?.next().ok_or_else(|| std::io::Error::other("no address"))?;
                let mut stream = std::net::TcpStream::connect_timeout(&target, TIMEOUT)?;
                stream.set_read_timeout(Some(TIMEOUT))?;
                stream.set_write_timeout(Some(TIMEOUT))?;
                stream.write_all(request)?;
                stream.take(MAX_ANSWER).read_to_end(&mut raw)?;
            }
            Addr::Unix(path) => {
                let mut stream = std::os::unix::net::UnixStream::connect(path)?;
                stream.set_read_timeout(Some(TIMEOUT))?;
                stream.set_write_timeout(Some(TIMEOUT))?;
                stream.write_all(request)?;
                stream.take(MAX_ANSWER).read_to_end(&mut raw)?;
            }
        }
        Ok(raw)
    }
}

/// What `watch import --admin` did with its lines.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Lines that held a watch (blank lines are not counted).
    pub lines: usize,
    /// Watches the daemon added (201).
    pub added: usize,
    /// Lines whose job was already watched (200).
    pub existing: usize,
    /// `line number: reason` of each line not imported.
    pub refused: Vec<String>,
}

/// `watch import` through the API: one `POST /v1/watches` per line, the
/// line's JSON object as the body (an import line and the API's body are
/// the same object, and the daemon checks it against its own config). A
/// line that is not JSON, too long, or refused by the API (4xx) is reported
/// with its number and the reason, and the next line is sent: unlike the
/// local import it is not one transaction. An answer that says the daemon
/// itself failed (5xx, or no answer) stops the import with an error that
/// says how far it got, since the next lines would fail the same way.
pub fn import(admin: &Admin, mut reader: impl BufRead) -> anyhow::Result<ImportReport> {
    let mut report = ImportReport::default();
    let mut number = 0;
    loop {
        let mut raw = Vec::new();
        let read = (&mut reader).take(MAX_IMPORT_LINE as u64 + 1).read_until(b'\n', &mut raw)?;
        if read == 0 {
            return Ok(report);
        }
        number += 1;
        if raw.len() > MAX_IMPORT_LINE && !raw.ends_with(b"\n") {
            // Skip the rest of the overlong line, a bounded piece at a time.
            let mut rest = Vec::new();
            while (&mut reader).take(MAX_IMPORT_LINE as u64).read_until(b'\n', &mut rest)? > 0 {
                if rest.ends_with(b"\n") {
                    break;
                }
                rest.clear();
            }
            report.lines += 1;
            report.refused.push(format!("{number}: longer than {MAX_IMPORT_LINE} bytes"));
            continue;
        }
        let text = String::from_utf8_lossy(&raw);
        if text.trim().is_empty() {
            continue;
        }
        report.lines += 1;
        let body: Value = match serde_json::from_str(&text) {
            Ok(body) => body,
            Err(e) => {
                report.refused.push(format!("{number}: not JSON: {e}"));
                continue;
            }
        };
        let answer = admin.call("POST", "/v1/watches", Some(&body)).with_context(|| stopped(&report, number))?;
        match answer.status {
            201 => report.added += 1,
            200 => report.existing += 1,
            400..500 => report.refused.push(format!("{number}: {}", answer.error())),
            status => bail!("{}: the admin API answered {status}: {}", stopped(&report, number), answer.error()),
        }
    }
}

fn stopped(report: &ImportReport, number: usize) -> String {
    format!(
        "line {number}: import stopped; {} new and {} already watched before it, {} refused",
        report.added,
        report.existing,
        report.refused.len()
    )
}

/// Splits an HTTP/1.x answer into its status and JSON body.
fn parse(raw: &[u8]) -> anyhow::Result<Answer> {
    let split =
        raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| anyhow!("the admin API's answer was cut short"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("the admin API's answer has no status line"))?;
    let text = String::from_utf8_lossy(&raw[split + 4..]);
    let body = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.into_owned()))
    };
    Ok(Answer { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_and_addresses_are_checked() {
        let a = parse(b"HTTP/1.0 404 Not Found\r\ncontent-type: application/json\r\n\r\n{\"error\":\"no\"}").unwrap();
        assert_eq!((a.status, a.error()), (404, "no".to_owned()));
        assert_eq!(parse(b"HTTP/1.0 204 No Content\r\n\r\n").unwrap().body, Value::Null);
        assert!(parse(b"HTTP/1.0 200").is_err());
        assert!(Admin::new("127.0.0.1:9187", None).is_ok() && Admin::new("unix:/run/a.sock", None).is_ok());
        assert!(Admin::new("relay", None).is_err() && Admin::new("unix:", None).is_err());
    }
}
