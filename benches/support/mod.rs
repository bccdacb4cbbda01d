//! What the benches that run their fakes in a child process share (each
//! includes this file with `#[path]`; a folder, so cargo does not take it
//! for a bench of its own): the child's two listeners, and this process's
//! CPU time and resident memory from `/proc`.

use std::io::Write;
use std::time::Duration;

use axum::Router;

/// Serves `dari` and `receiver` on two 127.0.0.1 ports, printing
/// `ports <dari> <receiver>` for the parent first; runs until killed.
pub async fn serve_fakes(dari: Router, receiver: Router) {
    let l1 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let l2 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("ports {} {}", l1.local_addr().unwrap().port(), l2.local_addr().unwrap().port());
    std::io::stdout().flush().unwrap();
    tokio::spawn(async move { axum::serve(l1, dari).await.unwrap() });
    axum::serve(l2, receiver).await.unwrap();
}

/// (user + system) CPU time of this process, all threads.
pub fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line, in clock ticks (100 Hz).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// This process's resident memory.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm.split(' ').nth(1).unwrap().parse::<u64>().unwrap() * 4096
}
