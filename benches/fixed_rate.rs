//! The fixed-rate phase: the relay polling N watches once a second each, as a
//! deployment does, against nginx serving a static 4 KB status body on
//! 127.0.0.1, side by side with `wrk -t1 -c64` against the same nginx as the
//! floor (a bare HTTP client's CPU per request).
//!
//! `cargo bench --bench fixed_rate -- [--smoke] [--watches 1000,10000,40000]
//! [--rounds 3]`. Each round is adjacent windows: the relay frozen with
//! SIGSTOP while wrk runs (5 s), then resumed, 5 s to settle, 10 s measured.
//! CPU is read from `/proc` (all the relay's threads; wrk's through this
//! process's `cutime`/`cstime` once it is waited for), and the stolen time
//! of each window from `/proc/stat`. Shared guests lose CPU to neighbours:
//! compare the round with the least stolen time, and the median.
//!
//! `FIXED_RATE_RELAY=<path>` runs another build of `dari-relay` instead of
//! this one, so two builds can be measured alternately in one run.
//!
//! Needs nginx and wrk (Debian: `apt-get install nginx wrk`); without them
//! it says so and skips. `--smoke` runs one small round quickly, for CI.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dari_relay::store::Store;
use dari_relay::vocab::NewWatch;

/// Orgs the watches are spread over (each org has its own rate limit).
const ORGS: usize = 8;

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Clock ticks per second for `/proc` CPU times (100 on Linux).
const TICKS: f64 = 100.0;

/// utime + stime of a process, in seconds.
fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // After the command: state is field 0, utime 11, stime 12, cutime 13, cstime 14.
    (field(11) + field(12)) / TICKS
}

/// CPU of this process's waited-for children (cutime + cstime), in seconds.
fn children_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (field(13) + field(14)) / TICKS
}

/// (total, steal) jiffies of all CPUs, from the first line of `/proc/stat`.
fn cpu_totals() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    let values: Vec<f64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let total: f64 = values.iter().take(8).sum();
    (total, values.get(7).copied().unwrap_or(0.0))
}

/// Stolen share of the CPU time that passed since `before`.
fn steal_since(before: (f64, f64)) -> f64 {
    let now = cpu_totals();
    let total = now.0 - before.0;
    if total <= 0.0 { 0.0 } else { (now.1 - before.1) / total }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

/// The polls the relay counted so far, from its metrics.
fn polls(admin: &str) -> f64 {
    let out = Command::new("curl").args(["-s", &format!("http://{admin}/metrics")]).output();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("dari_relay_polls_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, n)| n.parse::<f64>().ok()))
        .sum()
}

struct Nginx {
    child: Child,
    port: u16,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM: the master stops its worker too (a KILL would orphan the
        // worker, which keeps this process's stdout open).
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_nginx(nginx: &Path, dir: &Path) -> Nginx {
    let mut body = String::from(r#"{"status":"running","current_step":"Filling in the form","events":["#);
    let mut i = 0;
    while body.len() < 3900 {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&format!(
            r#"{{"event_type":"step_completed","message":"Step {i} of the form is filled in","timestamp":"2026-11-30T10:30:{:02}.000Z"}}"#,
            i % 60
        ));
        i += 1;
    }
    body.push_str("]}");
    while body.len() < 4096 {
        body.insert(body.len() - 1, ' ');
    }
    std::fs::write(dir.join("status.json"), &body).unwrap();
    let port = free_port();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {dir}/tmp;\n  proxy_temp_path {dir}/tmp;\n  fastcgi_temp_path {dir}/tmp;\n  uwsgi_temp_path {dir}/tmp;\n  scgi_temp_path {dir}/tmp;\n  keepalive_requests 1000000;\n\
         server {{\n    listen 127.0.0.1:{port};\n    location / {{ root {dir}; default_type application/json; try_files /status.json =404; }}\n  }}\n}}\n",
        dir = dir.display()
    );
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new(nginx)
        .args(["-c", &dir.join("nginx.conf").display().to_string(), "-p", &dir.display().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start: see {}/nginx-error.log", dir.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    Nginx { child, port }
}

fn job_id(i: usize) -> String {
    format!("{i:08x}-0000-4000-8000-00000000f1ed")
}

/// Runs wrk for `secs` and returns (requests, its CPU in seconds).
fn wrk(wrk: &Path, port: u16, secs: u64) -> (f64, f64) {
    let before = children_cpu();
    let out = Command::new(wrk)
        .args(["-t1", "-c64", &format!("-d{secs}s")])
        .arg(format!("http://127.0.0.1:{port}/task/acme0/form/status?job_id={}", job_id(0)))
        .output()
        .unwrap();
    let cpu = children_cpu() - before;
    let text = String::from_utf8_lossy(&out.stdout);
    // "  123456 requests in 5.00s, ..."
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or(0.0);
    (requests, cpu)
}

struct Row {
    watches: usize,
    polls_per_second: f64,
    relay_us: f64,
    wrk_us: f64,
    steal: f64,
}

fn measure(watches: usize, rounds: usize, smoke: bool, nginx: &Nginx, wrk_path: &Path) -> Vec<Row> {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("relay.db");
    let store = Store::open(&db).unwrap();
    let all: Vec<NewWatch> = (0..watches)
        .map(|i| NewWatch {
            job_id: job_id(i),
            portal: format!("acme{}/form", i % ORGS).parse().unwrap(),
            webhooks: None,
            labels: Default::default(),
            from_now: true,
        })
        .collect();
    for chunk in all.chunks(10_000) {
        store.add_watches(chunk).unwrap();
    }
    drop(store);
    let admin = format!("127.0.0.1:{}", free_port());
    let orgs: String = (0..ORGS).map(|o| format!("[orgs.acme{o}]\napi_key_env = \"DARI_API_KEY\"\n")).collect();
    let config = format!(
        "database = \"{}\"\nlog_format = \"text\"\n[upstream]\nbase_url = \"http://127.0.0.1:{}\"\n\
         poll_interval = \"1s\"\nmax_poll_interval = \"1s\"\nmax_in_flight = 1024\n[admin]\nlisten = \"{admin}\"\n{orgs}",
        db.display(),
        nginx.port
    );
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config).unwrap();
    // FIXED_RATE_RELAY names another build of the binary, to compare two
    // builds in one run (before and after a change, alternating).
    let binary = std::env::var_os("FIXED_RATE_RELAY").unwrap_or_else(|| env!("CARGO_BIN_EXE_dari-relay").into());
    let mut relay = Command::new(binary)
        .args(["run", "--config"])
        .arg(&config_path)
        .env("DARI_API_KEY", "bench-key")
        .env("RUST_LOG", "warn")
        .stderr(std::fs::File::create(dir.path().join("relay.log")).unwrap())
        .spawn()
        .unwrap();
    let pid = relay.id();
    let (warm_up, wrk_secs, settle, window) = if smoke { (2, 1, 1, 2) } else { (8, 5, 5, 10) };
    std::thread::sleep(Duration::from_secs(warm_up));
    let mut rows = Vec::new();
    for _ in 0..rounds {
        signal(pid, "STOP");
        let before = cpu_totals();
        let (requests, wrk_cpu) = wrk(wrk_path, nginx.port, wrk_secs);
        let wrk_steal = steal_since(before);
        signal(pid, "CONT");
        std::thread::sleep(Duration::from_secs(settle));
        let (cpu0, polls0, at0, totals) = (cpu_of(pid), polls(&admin), Instant::now(), cpu_totals());
        std::thread::sleep(Duration::from_secs(window));
        let (cpu1, polls1, elapsed) = (cpu_of(pid), polls(&admin), at0.elapsed().as_secs_f64());
        let relay_steal = steal_since(totals);
        let done = (polls1 - polls0).max(1.0);
        rows.push(Row {
            watches,
            polls_per_second: done / elapsed,
            relay_us: (cpu1 - cpu0) * 1e6 / done,
            wrk_us: wrk_cpu * 1e6 / requests.max(1.0),
            steal: relay_steal.max(wrk_steal),
        });
    }
    signal(pid, "TERM");
    let _ = relay.wait();
    rows
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench` asks benches to list themselves.
    }
    let smoke = args.iter().any(|a| a == "--smoke");
    let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let (Some(nginx_path), Some(wrk_path)) = (which("nginx"), which("wrk")) else {
        println!("fixed-rate bench skipped: nginx and wrk are not installed (apt-get install nginx wrk)");
        return;
    };
    if which("curl").is_none() {
        println!("fixed-rate bench skipped: curl is not installed (it reads the relay's metrics)");
        return;
    }
    let watches: Vec<usize> = match value("--watches") {
        Some(list) => list.split(',').map(|n| n.trim().parse().expect("--watches 1000,10000")).collect(),
        None if smoke => vec![200],
        None => vec![1_000, 10_000, 40_000],
    };
    let rounds: usize = value("--rounds").map_or(if smoke { 1 } else { 3 }, |n| n.parse().expect("--rounds N"));
    let dir = tempfile::tempdir().unwrap();
    let nginx = start_nginx(&nginx_path, dir.path());
    println!("fixed-rate bench: nginx (1 worker, 4 KB body) on 127.0.0.1:{}, {rounds} round(s) per size", nginx.port);
    println!("| watches | round | relay polls/s | relay CPU µs/poll | wrk CPU µs/request | ratio | stolen |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for n in watches {
        let rows = measure(n, rounds, smoke, &nginx, &wrk_path);
        for (i, r) in rows.iter().enumerate() {
            println!(
                "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1}× | {:.1}% |",
                r.watches,
                i + 1,
                r.polls_per_second,
                r.relay_us,
                r.wrk_us,
                r.relay_us / r.wrk_us.max(0.001),
                r.steal * 100.0
            );
        }
        let mut ratios: Vec<f64> = rows.iter().map(|r| r.relay_us / r.wrk_us.max(0.001)).collect();
        ratios.sort_by(f64::total_cmp);
        let least = rows.iter().min_by(|a, b| a.steal.total_cmp(&b.steal)).unwrap();
        println!(
            "| {n} | median of {} | | | | {:.1}× | least stolen: round with {:.1}%, {:.1}× |",
            rows.len(),
            ratios[ratios.len() / 2],
            least.steal * 100.0,
            least.relay_us / least.wrk_us.max(0.001)
        );
    }
}
