//! PostgreSQL for the tests: the server named by `DARI_RELAY_TEST_PG_URL`
//! (or, when it is unset, one answering at 127.0.0.1:5432), and a fresh
//! database on it per test, dropped when the test ends.
//!
//! Without the variable and without a server, every PostgreSQL test says
//! so in one line and passes without running, so `cargo test` passes on a
//! machine without PostgreSQL; with the variable set, a server that does
//! not answer fails them.

use std::time::Duration;

/// The variable naming the server (an administrative URL: the tests create
/// and drop databases through it).
pub const URL_VAR: &str = "DARI_RELAY_TEST_PG_URL";

/// The server tried when the variable is unset.
const LOCAL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The server to use, or `None` (after saying so) when there is none.
pub fn server() -> Option<String> {
    if let Ok(url) = std::env::var(URL_VAR) {
        return Some(url);
    }
    let addr = "127.0.0.1:5432".parse().expect("an address");
    if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
        return Some(LOCAL.to_owned());
    }
    println!("PostgreSQL tests skipped: {URL_VAR} unset and no server at 127.0.0.1:5432");
    None
}

/// A database of its own for one test; dropped (connections and all) when
/// this is dropped.
pub struct TestDatabase {
    /// The URL of the fresh database.
    pub url: String,
    admin: String,
    name: String,
}

impl TestDatabase {
    /// Creates `dari_relay_test_<random>` on the server, or `None` when
    /// there is no server (see [`server`]). Panics if a named server fails.
    pub fn create() -> Option<TestDatabase> {
        let admin = server()?;
        let name = format!("dari_relay_test_{}", uuid::Uuid::new_v4().simple());
        let sql = format!("CREATE DATABASE {name}");
        on_own_runtime(&admin, &sql).unwrap_or_else(|e| panic!("cannot create a test database on {URL_VAR}: {e}"));
        Some(TestDatabase { url: with_database(&admin, &name), admin, name })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // FORCE: the pool of the store under test may still hold connections.
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = on_own_runtime(&self.admin, &sql) {
            eprintln!("cannot drop test database {}: {e}", self.name);
        }
    }
}

/// Runs one statement on `url` from a thread with a runtime of its own, so
/// that it works from sync code and from inside a test's runtime alike.
fn on_own_runtime(url: &str, sql: &str) -> Result<(), String> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let connect = tokio_postgres::connect(&url, tokio_postgres::NoTls);
            let (client, connection) = tokio::time::timeout(Duration::from_secs(10), connect)
                .await
                .map_err(|_| "no answer within 10 s".to_owned())?
                .map_err(|e| e.to_string())?;
            let driver = tokio::spawn(connection);
            let result = client.batch_execute(&sql).await.map_err(|e| match e.as_db_error() {
                Some(db) => db.message().to_owned(),
                None => e.to_string(),
            });
            drop(client);
            let _ = driver.await;
            result
        })
    })
    .join()
    .map_err(|_| "the database thread panicked".to_owned())?
}

/// `url` with its database name replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let end = base[authority_start..].find('/').map_or(base.len(), |i| authority_start + i);
    format!("{}/{name}{query}", &base[..end])
}

#[test]
fn with_database_replaces_only_the_name() {
    assert_eq!(with_database("postgres://u@h:5432/postgres", "x"), "postgres://u@h:5432/x");
    assert_eq!(with_database("postgres://u@h/db?sslmode=disable", "x"), "postgres://u@h/x?sslmode=disable");
    assert_eq!(with_database("postgresql://h", "x"), "postgresql://h/x");
}
