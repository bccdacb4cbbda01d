//! The PostgreSQL phases of `cargo bench --bench relay` (`-- --engine
//! postgres`, included by relay.rs with `#[path]`): the same unchanged,
//! changed and delivery phases on a fresh database of the server named by
//! `DARI_RELAY_TEST_PG_URL` (or 127.0.0.1:5432), the database round trips
//! of a changed poll counted by a proxy, and three instances sharing the
//! watches. Without a server it says so in one line.

use std::sync::atomic::AtomicU64;

use dari_relay::store::{DelivererStore, OperatorStore, Postgres};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// The server the bench may create a database on.
fn server() -> String {
    std::env::var("DARI_RELAY_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// `url` with its database replaced by `name` (and its host and port by
/// `host` when given).
fn with_database(url: &str, name: &str, host: Option<&str>) -> String {
    let (head, query) = url.split_once('?').map_or((url, None), |(h, q)| (h, Some(q)));
    let scheme_end = head.find("://").map_or(0, |i| i + 3);
    let (authority, _) = head[scheme_end..].split_once('/').unwrap_or((&head[scheme_end..], ""));
    let authority = match host {
        Some(host) => match authority.rsplit_once('@') {
            Some((user, _)) => format!("{user}@{host}"),
            None => host.to_owned(),
        },
        None => authority.to_owned(),
    };
    let mut out = format!("{}{authority}/{name}", &head[..scheme_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

async fn exec(url: &str, sql: &str) -> Result<(), tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);
    let result = client.batch_execute(sql).await;
    drop(client);
    let _ = driver.await;
    result
}

/// Creates database `name` on the server, dropping any left by an earlier run.
async fn fresh(admin: &str, name: &str) {
    // One statement per call: CREATE DATABASE cannot run in the implicit
    // transaction of a multi-statement batch.
    for sql in [format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"), format!("CREATE DATABASE {name}")] {
        if let Err(e) = exec(admin, &sql).await {
            panic!("{sql}: {}", e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_owned()));
        }
    }
}

/// A TCP proxy to `target` that counts the chunks clients send: one per
/// request flush, so one per database round trip.
async fn counting_proxy(target: String) -> (String, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&target).await else { continue };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = cr.read(&mut buf).await {
                    if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
        }
    });
    (addr, count)
}

/// Runs `serve_postgres` on `store` until `body` is done.
async fn with_pg_relay<F, Fut, T>(config: Arc<Config>, store: Arc<Postgres>, body: F) -> T
where
    F: FnOnce(Arc<Metrics>) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let metrics = Arc::new(Metrics::default());
    let shutdown = CancellationToken::new();
    let (_tx, rx) = tokio::sync::watch::channel(config);
    let relay = tokio::spawn(dari_relay::app::serve_postgres(rx, store, Arc::clone(&metrics), shutdown.clone()));
    let out = body(metrics).await;
    shutdown.cancel();
    relay.await.unwrap().unwrap();
    out
}

pub async fn bench_postgres(b: &Bench, smoke: bool) {
    let admin = server();
    let name = format!("dari_relay_bench_{}", std::process::id());
    if let Err(e) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await {
        println!("postgres: skipped, no server at DARI_RELAY_TEST_PG_URL or 127.0.0.1:5432 ({e})");
        return;
    }
    fresh(&admin, &name).await;
    let url = with_database(&admin, &name, None);
    let jobs = if smoke { 1_000 } else { 10_000 };
    let secs = b.seconds;
    let store = Arc::new(Postgres::open(&url).await.unwrap());
    store.add_watches(Bench::watches(0..jobs)).await.unwrap();
    let db = Path::new(&url);
    println!("postgres:            {jobs} watches on a fresh database, {secs} s per phase");

    // Unchanged polls at full speed.
    control(&b.control, "changing=0").await;
    let fast = b.config(db, "1ms", "1ms", 64);
    let (n, median, low, high) = with_pg_relay(Arc::clone(&fast), Arc::clone(&store), |m| async move {
        // Every watch's first answer is a baseline, stored (a transaction
        // each); measure only once they all are, and count only unchanged.
        while polls(&m) < jobs as u64 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        windows(secs, || m.polls("bench", "unchanged")).await
    })
    .await;
    println!(
        "pg unchanged polls:  {:.0} polls/s, {median:.1} µs CPU per unchanged poll (median of {secs} 1-s windows; {low:.1} to {high:.1})",
        n as f64 / secs as f64
    );

    // Changed polls, the webhook paused so that only the polls are measured.
    control(&b.control, "changing=1").await;
    store.pause_webhook("receiver".into(), "bench: measuring polls alone".into()).await.unwrap();
    let (n, median, low, high, commits) = with_pg_relay(Arc::clone(&fast), Arc::clone(&store), |m| {
        let store = Arc::clone(&store);
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let t0 = store.commits();
            let (n, median, low, high) = windows(secs, || m.polls("bench", "changed")).await;
            (n, median, low, high, store.commits() - t0)
        }
    })
    .await;
    println!(
        "pg changed polls:    {:.0} polls/s, {median:.1} µs CPU per changed poll, parsed, diffed, stored and enqueued (median of {secs} 1-s windows; {low:.1} to {high:.1}); {:.0} transactions/s",
        n as f64 / secs as f64,
        commits as f64 / secs as f64
    );

    // Round trips per changed poll, through a counting proxy (a separate
    // run: the proxy's own CPU is not in the figures above).
    let host = tokio_postgres::Config::from_str(&url).unwrap();
    let target = match (host.get_hosts().first(), host.get_ports().first()) {
        (Some(tokio_postgres::config::Host::Tcp(h)), Some(p)) => format!("{h}:{p}"),
        _ => "127.0.0.1:5432".to_owned(),
    };
    let (proxy, chunks) = counting_proxy(target).await;
    let proxied = Arc::new(Postgres::open(&with_database(&admin, &name, Some(&proxy))).await.unwrap());
    let (changed, sent) = with_pg_relay(b.config(db, "1ms", "1ms", 64), proxied, |m| {
        let chunks = Arc::clone(&chunks);
        async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (c0, p0) = (chunks.load(Ordering::Relaxed), m.polls("bench", "changed"));
            tokio::time::sleep(Duration::from_secs(secs.min(5))).await;
            (m.polls("bench", "changed") - p0, chunks.load(Ordering::Relaxed) - c0)
        }
    })
    .await;
    println!(
        "pg round trips:      {:.2} per changed poll ({sent} client flushes over {changed} changed polls, the scans and the paused deliverer's reads included)",
        sent as f64 / changed.max(1) as f64
    );

    // The backlog, sent with polling idle.
    control(&b.control, "changing=0").await;
    store.resume_webhook("receiver".into()).await.unwrap();
    let backlog = store.delivery_counts().await.unwrap().get("pending").copied().unwrap_or(0) as u64;
    let idle = b.config(db, "30s", "60s", 64);
    let (sent, cpu, took) = with_pg_relay(Arc::clone(&idle), Arc::clone(&store), |m| async move {
        let (c0, t0) = (support::cpu_time(), Instant::now());
        let deadline = Instant::now() + Duration::from_secs(secs * 6);
        while m.deliveries("receiver", "delivered") < backlog && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (m.deliveries("receiver", "delivered"), support::cpu_time() - c0, t0.elapsed())
    })
    .await;
    println!(
        "pg deliveries:       {sent} sent in {:.1} s, {:.0} deliveries/s, {:.1} µs CPU per delivery (signed, sent, recorded)",
        took.as_secs_f64(),
        sent as f64 / took.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / sent.max(1) as f64
    );

    // Three instances (in this process, each with its own pool, membership
    // and loops) on one more database: how the watches and polls spread.
    let name3 = format!("{name}_three");
    fresh(&admin, &name3).await;
    let url3 = with_database(&admin, &name3, None);
    let seed = Postgres::open(&url3).await.unwrap();
    let spread_jobs = jobs.min(3_000);
    seed.add_watches(Bench::watches(0..spread_jobs)).await.unwrap();
    control(&b.control, "changing=0").await;
    let config = b.config(Path::new(&url3), "1s", "1s", 64);
    let shutdown = CancellationToken::new();
    let mut relays = Vec::new();
    for i in 0..3 {
        let store = Arc::new(Postgres::open(&url3).await.unwrap());
        let name = format!("bench-{i}");
        let membership =
            dari_relay::store::postgres::join(&store, &name, Duration::from_secs(15), Duration::from_secs(3))
                .await
                .unwrap();
        let metrics = Arc::new(Metrics::default());
        let (_tx, rx) = tokio::sync::watch::channel(Arc::clone(&config));
        let serving = tokio::spawn(dari_relay::app::serve_postgres(
            rx,
            Arc::clone(&store),
            Arc::clone(&metrics),
            shutdown.clone(),
        ));
        let keeper_store = Arc::clone(&store);
        let stop = shutdown.clone();
        let keeper = tokio::spawn(async move {
            tokio::select! {
                reason = membership.keep(&keeper_store, |_| {}) => panic!("bench instance lost its membership: {reason}"),
                _ = stop.cancelled() => {}
            }
        });
        relays.push((name, store, metrics, serving, keeper, _tx));
    }
    // Until the shares settle (hand-overs wait 3 s), then a measured window.
    let settle = Instant::now();
    loop {
        let live = seed.instances().await.unwrap();
        let fair = spread_jobs.div_ceil(3) as i64;
        if live.len() == 3
            && live.iter().map(|i| i.watches).sum::<i64>() == spread_jobs as i64
            && live.iter().all(|i| i.watches <= fair + 1)
        {
            break;
        }
        assert!(settle.elapsed() < Duration::from_secs(60), "the shares never settled: {live:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let p0: Vec<u64> = relays.iter().map(|r| polls(&r.2)).collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let live = seed.instances().await.unwrap();
    let mut line = String::new();
    for ((name, _, metrics, _, _, _), p0) in relays.iter().zip(&p0) {
        let owned = live.iter().find(|i| &i.instance == name).map_or(0, |i| i.watches);
        line.push_str(&format!("{name}: {owned} watches, {:.0} polls/s; ", (polls(metrics) - p0) as f64 / secs as f64));
    }
    println!(
        "pg three instances:  {spread_jobs} watches polled every second, settled in {:.1} s; {}",
        settle.elapsed().as_secs_f64(),
        line.trim_end_matches("; ")
    );
    shutdown.cancel();
    for (_, store, _, serving, keeper, _) in relays {
        serving.await.unwrap().unwrap();
        let _ = keeper.await;
        store.close();
    }
    seed.close();
    store.close();
    for db in [name, name3] {
        let _ = exec(&admin, &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
    }
}
