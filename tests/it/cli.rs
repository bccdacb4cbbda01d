//! The binary's command line: bad config and bad arguments exit 2 with one
//! message naming what is wrong; good ones work; the demo runs.

use std::path::{Path, PathBuf};

use assert_cmd::Command;

const JOB: &str = "550e8400-e29b-41d4-a716-446655440000";

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env { dir: tempfile::tempdir().unwrap() }
    }

    /// Writes a config with a valid database path and `body` after it.
    fn config(&self, body: &str) -> PathBuf {
        let path = self.dir.path().join("config.toml");
        let db = self.dir.path().join("state/relay.db");
        std::fs::write(&path, format!("database = \"{}\"\n{body}", db.display())).unwrap();
        path
    }

    fn cmd(&self, config: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dari-relay"));
        cmd.args(args).arg("--config").arg(config);
        cmd.env("DARI_API_KEY", "sk-live-0123456789").env("HOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        cmd.env_remove("RUST_LOG");
        cmd
    }
}

const GOOD: &str = r#"
[orgs.acme]
api_key_env = "DARI_API_KEY"

[[webhooks]]
name = "backend"
url = "http://127.0.0.1:9/hook"
secret_env = "HOOK_SECRET"
"#;

/// Runs `check-config` on `body` and returns stderr, asserting exit 2.
fn bad_config(body: &str) -> String {
    let env = Env::new();
    let config = env.config(body);
    let out = env.cmd(&config, &["check-config"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "stdout: {}", String::from_utf8_lossy(&out.stdout));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("config.toml"), "names the file: {stderr}");
    stderr
}

#[test]
fn unknown_key_is_refused_with_its_line() {
    let err = bad_config("[upstream]\npoll_interval = \"2s\"\npoll_intervall = \"3s\"\n");
    assert!(err.contains("unknown field `poll_intervall`") && err.contains("line 4"), "{err}");
}

#[test]
fn bad_duration_is_refused_with_its_line() {
    let err = bad_config("[upstream]\nmax_poll_interval = \"sixty\"\n");
    assert!(
        err.contains("invalid duration \"sixty\"") && err.contains("line 3") && err.contains("max_poll_interval"),
        "{err}"
    );
}

#[test]
fn bad_url_is_refused_with_its_line() {
    let err = bad_config(&format!("{GOOD}[[webhooks]]\nname = \"x\"\nurl = \"not a url\"\n"));
    assert!(err.contains("invalid URL \"not a url\"") && err.contains("line 12"), "{err}");
}

#[test]
fn missing_environment_variable_is_named() {
    let err = bad_config("[orgs.acme]\napi_key_env = \"ACME_KEY_NOT_SET\"\n");
    assert!(err.contains(":3: orgs.acme.api_key_env: environment variable ACME_KEY_NOT_SET is not set"), "{err}");
}

#[test]
fn webhook_name_used_twice_is_refused() {
    let err = bad_config(&format!("{GOOD}[[webhooks]]\nname = \"backend\"\nurl = \"http://127.0.0.1:9/other\"\n"));
    assert!(err.contains("webhooks[1].name") && err.contains("\"backend\" is used twice"), "{err}");
}

#[test]
fn missing_config_file_exits_2_naming_it() {
    let env = Env::new();
    let out = env.cmd(&env.dir.path().join("nope.toml"), &["check-config"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.toml"));
}

#[test]
fn check_config_prints_the_resolved_config_without_secrets() {
    let env = Env::new();
    let config = env.config(GOOD);
    let out = env.cmd(&config, &["check-config"]).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("poll_interval = \"2s\"") && text.contains("<redacted, from $DARI_API_KEY>"), "{text}");
    assert!(!text.contains("sk-live") && !text.contains("MfKQ9r8"), "{text}");
}

#[test]
fn non_uuid_job_id_is_refused() {
    let env = Env::new();
    let config = env.config(GOOD);
    let out = env.cmd(&config, &["watch", "add", "acme/contact_form", "job-42"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("\"job-42\" is not a UUID") && stderr.contains("<JOB_ID>"), "{stderr}");
}

#[test]
fn bad_portal_unknown_webhook_and_unknown_org_are_refused() {
    let env = Env::new();
    let config = env.config(GOOD);
    let cases: [(&[&str], &str); 4] = [
        (&["watch", "add", "acme", JOB], "is not a portal id"),
        (&["watch", "add", "acme/form", JOB, "--webhook", "nope"], "--webhook \"nope\" is not a webhook"),
        (&["watch", "add", "other/form", JOB], "org \"other\" has no [orgs.other] table"),
        (&["watch", "add", "acme/form", JOB, "--label", "novalue"], "is not KEY=VALUE"),
    ];
    for (args, want) in cases {
        let out = env.cmd(&config, args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}

#[test]
fn watch_add_list_rm_round_trip_and_database_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let config = env.config(GOOD);
    let add = ["watch", "add", "acme/contact_form", JOB, "--label", "customer=acme", "--webhook", "backend"];
    env.cmd(&config, &add).assert().success().stdout(format!("watching job {JOB} on acme/contact_form\n"));
    // Adding again changes nothing and exits 0.
    env.cmd(&config, &add).assert().success().stdout(format!("already watching job {JOB} on acme/contact_form\n"));
    let db = env.dir.path().join("state/relay.db");
    assert_eq!(std::fs::metadata(&db).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(db.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);

    let out = env.cmd(&config, &["watch", "list", "--json"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["job_id"], JOB);
    assert_eq!(list[0]["labels"]["customer"], "acme");
    assert_eq!(list[0]["webhooks"][0], "backend");
    assert_eq!(list[0]["state"], "active");

    env.cmd(&config, &["watch", "rm", JOB]).assert().success();
    let out = env.cmd(&config, &["watch", "list", "--json"]).output().unwrap();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(), serde_json::json!([]));
    let out = env.cmd(&config, &["watch", "list", "--all"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed"));
    env.cmd(&config, &["watch", "rm", JOB]).assert().code(2);
    // The key never reaches the database.
    let bytes = std::fs::read(env.dir.path().join("state/relay.db")).unwrap();
    assert!(!bytes.windows(7).any(|w| w == b"sk-live"));
}

#[test]
fn import_reports_the_bad_line_and_imports_nothing() {
    let env = Env::new();
    let config = env.config(GOOD);
    let lines = format!(
        "{{\"portal_id\":\"acme/a\",\"job_id\":\"{JOB}\"}}\n\n{{\"portal_id\":\"acme/a\",\"job_id\":\"not-a-uuid\"}}\n"
    );
    let out = env.cmd(&config, &["watch", "import", "-"]).write_stdin(lines).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("<stdin>:3:") && stderr.contains("nothing was imported"), "{stderr}");
    let out = env.cmd(&config, &["watch", "list", "--json"]).output().unwrap();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(), serde_json::json!([]));
}

/// 100,000 lines go in through one transaction (timed in docs/performance.md, not here).
#[test]
fn import_takes_a_hundred_thousand_lines() {
    use std::fmt::Write as _;
    let env = Env::new();
    let config = env.config(GOOD);
    let mut lines = String::new();
    for i in 0..100_000u32 {
        let _ = writeln!(
            lines,
            "{{\"portal_id\":\"acme/form\",\"job_id\":\"{i:08x}-0000-4000-8000-000000000000\",\"labels\":{{\"n\":\"{i}\"}}}}"
        );
    }
    let file = env.dir.path().join("jobs.jsonl");
    std::fs::write(&file, lines).unwrap();
    env.cmd(&config, &["watch", "import", file.to_str().unwrap()])
        .assert()
        .success()
        .stdout("imported 100000 watches (100000 new, 0 already watched)\n");
}

#[test]
fn demo_runs_the_whole_pipeline() {
    let out = Command::new(env!("CARGO_BIN_EXE_dari-relay")).arg("demo").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("10 notifications delivered in order, every signature verified"), "{stdout}");
    assert!(stdout.contains("will be retried, same id"));
}

#[test]
fn admin_api_on_a_public_address_needs_a_token() {
    let err = bad_config("[admin]\nlisten = \"0.0.0.0:9187\"\n");
    assert!(err.contains(":3: admin.listen: 0.0.0.0:9187 is reachable from other machines"), "{err}");
    let err = bad_config("[admin]\nlisten = \"localhost\"\n");
    assert!(err.contains("admin.listen") && err.contains("is not an address"), "{err}");
}

/// `--log-format json`: one JSON object per line, and every line about a job
/// carries its job id (through the span).
#[test]
fn json_logs_carry_the_job_id() {
    use std::io::{BufRead, BufReader};
    let env = Env::new();
    // A portal that answers nothing: the relay logs a failed poll for the job.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = env.config(&format!(
        "[upstream]\nbase_url = \"http://{closed}\"\npoll_interval = \"50ms\"\nmax_poll_interval = \"100ms\"\n{GOOD}"
    ));
    env.cmd(&config, &["watch", "add", "acme/form", JOB]).assert().success();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_dari-relay"))
        .args(["run", "--log-format", "json", "--config"])
        .arg(&config)
        .env("DARI_API_KEY", "sk-live-0123456789")
        .env("HOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut about_job = 0;
    while about_job < 2 {
        let line = lines.next().expect("the daemon keeps logging").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["message"] == "poll failed" {
            // As an event field, or through the span the line was logged in.
            assert!(v["job_id"] == JOB || v["span"]["job_id"] == JOB, "{line}");
            about_job += 1;
        }
    }
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success());
}

/// Without `--config`, the config file is `$DARI_RELAY_CONFIG`.
#[test]
fn config_path_comes_from_the_environment_without_the_flag() {
    let env = Env::new();
    let config = env.config(GOOD);
    let out = Command::new(env!("CARGO_BIN_EXE_dari-relay"))
        .arg("check-config")
        .env("DARI_RELAY_CONFIG", &config)
        .env("DARI_API_KEY", "sk-live-0123456789")
        .env("HOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("# resolved from {}", config.display())));
}

/// Runs the binary with the test secrets and `args` exactly as given (no
/// `--config` appended), so a test decides where the option goes.
fn bare(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dari-relay"));
    cmd.args(args)
        .env("DARI_API_KEY", "sk-live-0123456789")
        .env("HOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    cmd.env_remove("RUST_LOG").env_remove("DARI_RELAY_CONFIG").env_remove("JOURNAL_STREAM");
    cmd
}

/// Issue 17 item 9: an OS error is said once, not once by the error that
/// names the file and again as its source.
#[test]
fn an_os_error_is_printed_once() {
    let env = Env::new();
    let missing = env.dir.path().join("nope.toml");
    let out = bare(&["check-config", "--config", missing.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr,
        format!("error: cannot read config file {}: No such file or directory (os error 2)\n", missing.display())
    );
}

/// `--config` is global and has `-c`: before or after the subcommand.
#[test]
fn config_option_is_global_with_a_short_form() {
    let env = Env::new();
    let config = env.config(GOOD);
    let config = config.to_str().unwrap();
    for args in [
        &["-c", config, "check-config"][..],
        &["check-config", "-c", config],
        &["--config", config, "watch", "list"],
        &["watch", "list", "-c", config, "--json"],
        &["deliveries", "-c", config, "list"],
    ] {
        let out = bare(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// `watch add` of a job already watched changes nothing (exit 0), and says
/// which options it ignored, with what the watch keeps.
#[test]
fn watch_add_of_a_watched_job_names_the_ignored_options() {
    let env = Env::new();
    let config = env.config(&format!("{GOOD}[[webhooks]]\nname = \"ops\"\nurl = \"http://127.0.0.1:9/ops\"\n"));
    env.cmd(&config, &["watch", "add", "acme/form", JOB, "--label", "customer=acme"]).assert().success();
    let again =
        ["watch", "add", "acme/form", JOB, "--label", "customer=other", "--label", "tier=gold", "--webhook", "ops"];
    env.cmd(&config, &again).assert().success().stdout(format!("already watching job {JOB} on acme/form\n")).stderr(
        "note: the existing watch was kept unchanged; ignored --label customer=other (it keeps customer=acme), \
             --label tier=gold, --webhook ops (it delivers to every matching webhook) (see `dari-relay watch list \
             --json`)\n",
    );
    // The same options again: nothing was ignored, nothing to say.
    env.cmd(&config, &["watch", "add", "acme/form", JOB, "--label", "customer=acme"]).assert().success().stderr("");
    let out = env.cmd(&config, &["watch", "list", "--json"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["labels"], serde_json::json!({"customer": "acme"}));
    assert_eq!(list[0]["webhooks"], serde_json::Value::Null);
}

/// `deliveries list` says a 500 once ("status 500", not "status 500  HTTP
/// 500"), and `deliveries retry` of one delivery speaks in the singular.
#[tokio::test]
async fn delivery_messages_say_the_status_once_and_count_in_the_singular() {
    use crate::fakes::{FakeDari, FakeReceiver, Relay, Reply, config_text, watch_on};
    let dir = tempfile::tempdir().unwrap();
    let dari = FakeDari::start().await;
    let receiver = FakeReceiver::start().await;
    dari.script(JOB, vec![Reply::Json(serde_json::json!({"status": "completed", "events": []}))]);
    receiver.answer_with(&[500, 500]);
    let text = config_text(&dir.path().join("r.db"), &dari, &[("h", &receiver.url)], "")
        .replace("retry_schedule = [\"100ms\", \"200ms\", \"300ms\"]", "retry_schedule = [\"20ms\"]");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, &text).unwrap();
    let relay = Relay::start(&text).await;
    relay.store.add_watches(&[watch_on("acme/form", JOB)]).unwrap();
    let failed = || relay.store.delivery_counts().unwrap().get("failed").copied().unwrap_or(0);
    crate::fakes::eventually(
        std::time::Duration::from_secs(10),
        || "the delivery never failed".into(),
        || failed() > 0,
    )
    .await;
    relay.stop().await;

    let config = config.to_str().unwrap();
    let out = bare(&["deliveries", "list", "-c", config]).output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let attempts: Vec<&str> = stdout.lines().filter(|l| l.trim_start().starts_with("attempt at")).collect();
    assert_eq!(attempts.len(), 2, "{stdout}");
    for line in attempts {
        assert!(line.contains("status 500") && !line.contains("HTTP 500"), "{line}");
    }
    let id = relay_failed_id(&dir.path().join("r.db"));
    bare(&["deliveries", "retry", &id, "-c", config])
        .assert()
        .success()
        .stdout("requeued 1 failed delivery; a running daemon sends it within a second\n");
    bare(&["deliveries", "retry", "--all-failed", "-c", config])
        .assert()
        .success()
        .stdout("requeued 0 failed deliveries; a running daemon sends them within a second\n");
}

fn relay_failed_id(db: &Path) -> String {
    let store = dari_relay::store::Store::open(db).unwrap();
    store.list_deliveries(Some(dari_relay::vocab::DeliveryState::Failed), 10).unwrap()[0].id.to_string()
}

/// `watch import` of one line counts it in the singular.
#[test]
fn import_of_one_line_is_singular() {
    let env = Env::new();
    let config = env.config(GOOD);
    env.cmd(&config, &["watch", "import", "-"])
        .write_stdin(format!("{{\"portal_id\":\"acme/a\",\"job_id\":\"{JOB}\"}}\n"))
        .assert()
        .success()
        .stdout("imported 1 watch (1 new, 0 already watched)\n");
}

/// A database folder this user may not create: the error names the path
/// and says what to do. As root (who may create anything), the command runs
/// as `nobody` through setpriv, so the test checks the same thing either way.
#[test]
fn permission_denied_on_the_database_names_the_path_and_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let locked = env.dir.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let db = locked.join("state/relay.db");
    let config = env.dir.path().join("c.toml");
    std::fs::write(&config, format!("database = \"{}\"\n{GOOD}", db.display())).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let root = std::fs::metadata(&config).map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap();
    let mut cmd = if root {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_dari-relay")]);
        cmd
    } else {
        Command::new(env!("CARGO_BIN_EXE_dari-relay"))
    };
    cmd.args(["watch", "list", "-c"]).arg(&config);
    cmd.env("DARI_API_KEY", "sk-live-0123456789").env("HOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(&format!("no permission to create or open the database {}", db.display()))
            && stderr.contains("set database = \"./relay.db\"")
            && stderr.contains("sudo -u dari-relay")
            && stderr.matches("Permission denied (os error 13)").count() == 1,
        "{stderr}"
    );
}

/// A config whose portal answers nothing (a closed port), polled fast: the
/// daemon logs a failed poll for `JOB` every 100 ms.
fn silent_portal_config(env: &Env) -> PathBuf {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = env.config(&format!(
        "[upstream]\nbase_url = \"http://{closed}\"\npoll_interval = \"50ms\"\nmax_poll_interval = \"100ms\"\n{GOOD}"
    ));
    env.cmd(&config, &["watch", "add", "acme/form", JOB]).assert().success();
    config
}

/// `dari-relay run -c config`, stderr to `stderr`, with `extra` environment.
fn spawn_daemon(config: &Path, stderr: impl Into<std::process::Stdio>, extra: &[(&str, &str)]) -> std::process::Child {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dari-relay"));
    cmd.args(["run", "-c"]).arg(config).stderr(stderr);
    cmd.env("DARI_API_KEY", "sk-live-0123456789").env("HOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    cmd.env_remove("RUST_LOG").env_remove("JOURNAL_STREAM").env_remove("NO_COLOR");
    cmd.envs(extra.iter().copied());
    cmd.spawn().unwrap()
}

fn stop(mut child: std::process::Child) {
    std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(child.wait().unwrap().success());
}

/// Reads lines until one contains `want`, returning all read; panics at EOF.
fn lines_until(lines: &mut impl Iterator<Item = std::io::Result<String>>, want: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let line = lines.next().unwrap_or_else(|| panic!("no line with {want:?} in {seen:#?}")).unwrap();
        let done = line.contains(want);
        seen.push(line);
        if done {
            return seen;
        }
    }
}

/// Issue 17 item 2: with stderr not a terminal, text logs carry no ANSI
/// codes, and each event is one line, even a multi-line config error
/// (a TOML syntax error with its excerpt, refused on SIGHUP).
#[test]
fn text_logs_off_a_terminal_have_no_colour_and_one_line_per_event() {
    use std::io::{BufRead, BufReader};
    let env = Env::new();
    let config = silent_portal_config(&env);
    let mut child = spawn_daemon(&config, std::process::Stdio::piped(), &[]);
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = lines_until(&mut lines, "poll failed");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{good}\n[delivery\n")).unwrap();
    std::process::Command::new("kill").arg("-HUP").arg(child.id().to_string()).status().unwrap();
    seen.extend(lines_until(&mut lines, "SIGHUP"));
    stop(child);
    for line in &seen {
        assert!(!line.contains('\x1b'), "an ANSI escape: {line:?}");
        // Every line is an event: it starts with its timestamp.
        assert!(line.starts_with("20") && line.as_bytes().get(10) == Some(&b'T'), "not an event's start: {line:?}");
    }
    let reload = seen.last().unwrap();
    assert!(reload.contains("TOML parse error") && reload.contains("\\n") && reload.contains("expected"), "{reload}");
}

/// The device and inode of a pipe's write end, as systemd writes them into
/// `JOURNAL_STREAM` for the stream it gives a service.
fn stream_id(writer: &std::io::PipeWriter) -> String {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::File::from(std::os::fd::OwnedFd::from(writer.try_clone().unwrap())).metadata().unwrap();
    format!("{}:{}", meta.dev(), meta.ino())
}

/// Under systemd (`JOURNAL_STREAM` names stderr), text logs go to the
/// journal's socket. tracing-journald's socket path is fixed
/// (/run/systemd/journal/socket), so a test cannot stand in for journald:
/// where the socket is missing (CI, containers) the daemon says so once
/// and logs to stderr (still the journal's stream) as plain lines; where it exists, nothing goes to stderr.
#[test]
fn journal_stream_without_a_journal_falls_back_to_stderr() {
    use std::io::{BufRead, BufReader};
    let env = Env::new();
    let config = silent_portal_config(&env);
    let (reader, writer) = std::io::pipe().unwrap();
    let id = stream_id(&writer);
    let child = spawn_daemon(&config, writer, &[("JOURNAL_STREAM", &id)]);
    let mut lines = BufReader::new(reader).lines();
    if std::path::Path::new("/run/systemd/journal/socket").exists() {
        stop(child);
        let rest: Vec<String> = lines.map(Result::unwrap).collect();
        assert!(rest.iter().all(|l| !l.contains("poll failed")), "logged to stderr, not the journal: {rest:#?}");
        return;
    }
    let seen = lines_until(&mut lines, "poll failed");
    stop(child);
    assert!(
        seen[0].contains("INFO") && seen[0].contains("the journal socket cannot be reached; logging to stderr"),
        "{seen:#?}"
    );
    assert!(seen.iter().all(|l| !l.contains('\x1b')), "{seen:#?}");
}

/// A command's error on the journal's stream carries the `<3>` prefix
/// (priority err) and is one line; on any other pipe, no prefix.
#[test]
fn errors_on_the_journal_stream_have_error_priority() {
    use std::io::Read;
    let env = Env::new();
    let bad = env.dir.path().join("bad.toml");
    std::fs::write(&bad, "x = [\n").unwrap();
    let (mut reader, writer) = std::io::pipe().unwrap();
    let id = stream_id(&writer);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dari-relay"));
    cmd.args(["check-config", "-c"]).arg(&bad).env("JOURNAL_STREAM", &id).stderr(writer);
    let status = cmd.status().unwrap();
    drop(cmd);
    assert_eq!(status.code(), Some(2));
    let mut stderr = String::new();
    reader.read_to_string(&mut stderr).unwrap();
    assert!(stderr.starts_with("<3>error: invalid config file") && stderr.lines().count() == 1, "{stderr:?}");

    let out = bare(&["check-config", "-c", bad.to_str().unwrap()]).env("JOURNAL_STREAM", &id).output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.starts_with("error: invalid config file") && stderr.lines().count() == 1, "{stderr:?}");
}

/// Completions and the man page come from the real clap definitions, and
/// the commands that print them stay out of `--help`.
#[test]
fn completions_and_man_page_are_generated_from_the_cli() {
    let run = |args: &[&str]| {
        let out = bare(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = run(&["completions", "bash"]);
    assert!(
        bash.contains("_dari__relay()") && bash.contains("check-config") && bash.contains("--all-failed"),
        "{bash}"
    );
    let zsh = run(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef dari-relay") && zsh.contains("send-test"), "{zsh}");
    let fish = run(&["completions", "fish"]);
    assert!(fish.contains("complete -c dari-relay") && fish.contains("from-now"), "{fish}");
    let man = run(&["man"]);
    assert!(
        man.contains(".TH dari-relay 1") && man.contains("check\\-config") && man.contains("\\-\\-config"),
        "{man}"
    );
    assert!(!man.contains("completions"), "hidden commands stay out of the man page");
    let help = run(&["--help"]);
    assert!(!help.contains("completions") && !help.contains("  man"), "{help}");
    let out = bare(&["completions", "powershell"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
