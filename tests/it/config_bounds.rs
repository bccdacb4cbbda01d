//! Issue 10 item 10 through the real binary: `check-config` refuses values
//! out of their documented bounds with exit 2, naming the file, line and key;
//! and it accepts the shipped example.

use std::process::Command;

/// Runs `dari-relay check-config` on `body`; returns the exit code, stdout
/// and stderr.
fn check_config(body: &str, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, body).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dari-relay"))
        .args(["check-config", "--config"])
        .arg(&path)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn check_config_refuses_absurd_values_naming_key_and_line() {
    let cases = [
        (
            "retention = \"1000000000y\"\n",
            "config.toml:1: retention: 365250000000d is out of bounds: it must be from 1s to 3650d",
        ),
        (
            "[orgs.a]\napi_key_env = \"K\"\nmax_requests_per_second = 1e-300\n",
            "config.toml:3: orgs.a.max_requests_per_second: must be a number from 0.001 to 10000",
        ),
        (
            "[upstream]\nmax_poll_interval = \"100000000h\"\n",
            "config.toml:2: upstream.max_poll_interval: 100000000h is out of bounds: it must be from 1ms to 1d",
        ),
        (
            "[upstream]\npoll_interval = \"5 mins\"\n",
            "config.toml:2: upstream.poll_interval: 5m is longer than upstream.max_poll_interval (1m, its default)",
        ),
    ];
    for (body, want) in cases {
        let (code, stdout, stderr) = check_config(body, &[("K", "sk")]);
        assert_eq!(code, Some(2), "{body}: {stderr}");
        assert!(stdout.is_empty(), "{stdout}");
        assert!(stderr.contains(want), "{body}\n  got:  {stderr}\n  want: {want}");
    }
}

#[test]
fn check_config_accepts_the_example() {
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml")).unwrap();
    let (code, stdout, stderr) = check_config(
        &example,
        &[("DARI_API_KEY", "sk-x"), ("BACKEND_WEBHOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")],
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("retention = \"7days\"") && stdout.contains("max_in_flight = 64"), "{stdout}");
}
