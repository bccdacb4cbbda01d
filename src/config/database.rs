//! `database`, `database_url_env` and `[cluster]`: which engine the relay
//! stores in, and how instances share a PostgreSQL database.
//!
//! A `database` starting with `postgres://` or `postgresql://` selects
//! PostgreSQL; anything else is a SQLite path. A password written in the
//! config text is refused (the file is often world-readable, and
//! `check-config` prints it back): the whole URL goes in the environment
//! variable `database_url_env` names. `[cluster]` needs PostgreSQL.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use toml::Spanned;

use super::ConfigError;
use super::defaults;
use super::raw::RawCluster;
use super::resolved::Resolver;
use crate::vocab::is_postgres_url;

/// A PostgreSQL database to store in.
#[derive(Clone)]
pub struct PostgresDatabase {
    /// The full URL, password included when it came from the environment.
    pub url: SecretString,
    /// The URL without its password, for messages.
    pub shown: String,
    /// The variable it came from (`database_url_env`), if any.
    pub env: Option<String>,
}

impl std::fmt::Debug for PostgresDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresDatabase").field("shown", &self.shown).field("env", &self.env).finish()
    }
}

/// `[cluster]`: this instance among others on one PostgreSQL database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// The instance's name in logs, metrics and the API.
    pub instance: String,
    /// How long a silent instance keeps its watches.
    pub lease_ttl: Duration,
}

/// The default instance name: `<hostname>-<pid>`.
pub fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}

/// `url` with any password replaced by `***` (in its user info, or as a
/// `password=` parameter), for messages.
pub fn without_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else { return url.to_owned() };
    let authority_end = url[scheme_end..].find(['/', '?']).map_or(url.len(), |i| scheme_end + i);
    let authority = &url[scheme_end..authority_end];
    let shown = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let rest = &url[authority_end..];
    // A `password=` parameter is hidden too.
    let rest = match rest.find("password=") {
        Some(i) => {
            let end = rest[i..].find('&').map_or(rest.len(), |j| i + j);
            format!("{}password=***{}", &rest[..i], &rest[end..])
        }
        None => rest.to_owned(),
    };
    format!("{}{shown}{rest}", &url[..scheme_end])
}

/// Parses a PostgreSQL URL; the error never repeats the URL (it may hold
/// a password).
fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    let config: tokio_postgres::Config = url.parse().map_err(|e| format!("not a valid PostgreSQL URL ({e})"))?;
    if config.get_hosts().is_empty() {
        return Err("the PostgreSQL URL names no host".into());
    }
    Ok(config)
}

impl Resolver<'_> {
    /// The SQLite path, and the PostgreSQL database when one is named.
    pub(super) fn database(
        &self,
        database: Option<Spanned<String>>,
        url_env: Option<Spanned<String>>,
    ) -> Result<(PathBuf, Option<PostgresDatabase>), ConfigError> {
        match (database, url_env) {
            (Some(db), Some(_)) => {
                Err(self.error(Some(db.span()), "database", "set either database or database_url_env, not both"))
            }
            (None, None) => Ok((PathBuf::from(defaults::DATABASE), None)),
            (Some(db), None) if db.get_ref().trim().is_empty() => {
                Err(self.error(Some(db.span()), "database", "must not be empty"))
            }
            (Some(db), None) if is_postgres_url(db.get_ref().trim()) => {
                let url = db.get_ref().trim();
                let parsed = parse_url(url).map_err(|e| self.error(Some(db.span()), "database", e))?;
                if parsed.get_password().is_some() {
                    return Err(self.error(
                        Some(db.span()),
                        "database",
                        "a password must not be written in the config file: put the whole URL in an \
                         environment variable and name it with database_url_env",
                    ));
                }
                let shown = without_password(url);
                let pg = PostgresDatabase { url: SecretString::from(url.to_owned()), shown: shown.clone(), env: None };
                Ok((PathBuf::from(shown), Some(pg)))
            }
            (Some(db), None) => Ok((PathBuf::from(db.into_inner()), None)),
            (None, Some(var)) => {
                let name = var.get_ref().trim();
                let value = (self.env)(name).map(|v| v.trim().to_owned()).unwrap_or_default();
                let fail = |message: String| self.error(Some(var.span()), "database_url_env", message);
                if value.is_empty() {
                    return Err(fail(format!("environment variable {name} is not set or empty")));
                }
                if !is_postgres_url(&value) {
                    return Err(fail(format!(
                        "environment variable {name} must hold a postgres:// or postgresql:// URL"
                    )));
                }
                parse_url(&value).map_err(|e| fail(format!("environment variable {name}: {e}")))?;
                let shown = without_password(&value);
                let pg =
                    PostgresDatabase { url: SecretString::from(value), shown: shown.clone(), env: Some(name.into()) };
                Ok((PathBuf::from(shown), Some(pg)))
            }
        }
    }

    /// `[cluster]`, refused unless the database is PostgreSQL.
    pub(super) fn cluster(
        &self,
        raw: Option<Spanned<RawCluster>>,
        postgres: bool,
    ) -> Result<Option<Cluster>, ConfigError> {
        let Some(raw) = raw else { return Ok(None) };
        if !postgres {
            return Err(self.error(
                Some(raw.span()),
                "cluster",
                "[cluster] needs a PostgreSQL database (database = \"postgres://...\" or database_url_env); \
                 SQLite serves one instance",
            ));
        }
        let raw = raw.into_inner();
        let instance = match raw.instance {
            Some(name) => {
                let value = name.get_ref().trim();
                if !crate::vocab::is_valid_segment(value) || value.len() > defaults::MAX_NAME_LEN {
                    return Err(self.error(
                        Some(name.span()),
                        "cluster.instance",
                        format!(
                            "must be 1 to {} bytes, without '/', spaces or control characters",
                            defaults::MAX_NAME_LEN
                        ),
                    ));
                }
                value.to_owned()
            }
            None => default_instance(),
        };
        let lease_ttl = self.duration("cluster.lease_ttl", raw.lease_ttl, defaults::LEASE_TTL)?;
        Ok(Some(Cluster { instance, lease_ttl }))
    }
}

impl PostgresDatabase {
    /// The URL to connect with.
    pub fn url(&self) -> &str {
        self.url.expose_secret()
    }

    /// The PostgreSQL database named by a config file's `database` and
    /// `database_url_env` as written, without resolving the rest of the
    /// file (the operator commands read only these keys, so they need no
    /// secret): by the resolver's rules, `None` for a SQLite path; `Err`
    /// names the key, never the URL.
    pub fn from_keys(
        database: Option<&str>,
        url_env: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<PostgresDatabase>, String> {
        match (database.map(str::trim), url_env.map(str::trim)) {
            (Some(_), Some(_)) => Err("database: set either database or database_url_env, not both".into()),
            (Some(url), None) if is_postgres_url(url) => {
                let parsed = parse_url(url).map_err(|e| format!("database: {e}"))?;
                if parsed.get_password().is_some() {
                    return Err("database: a password must not be written in the config file: put the whole URL \
                                in an environment variable and name it with database_url_env"
                        .into());
                }
                let shown = without_password(url);
                Ok(Some(PostgresDatabase { url: SecretString::from(url.to_owned()), shown, env: None }))
            }
            (_, None) => Ok(None),
            (None, Some(name)) => {
                let value = env(name).map(|v| v.trim().to_owned()).unwrap_or_default();
                if value.is_empty() {
                    return Err(format!("database_url_env: environment variable {name} is not set or empty"));
                }
                if !is_postgres_url(&value) {
                    return Err(format!(
                        "database_url_env: environment variable {name} must hold a postgres:// or postgresql:// URL"
                    ));
                }
                parse_url(&value).map_err(|e| format!("database_url_env: environment variable {name}: {e}"))?;
                let shown = without_password(&value);
                Ok(Some(PostgresDatabase { url: SecretString::from(value), shown, env: Some(name.into()) }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::without_password;
    use crate::config::{Config, ConfigError};

    fn load(text: &str) -> Result<Config, ConfigError> {
        let env = |name: &str| match name {
            "DB_URL" => Some("postgres://relay:s3cret@db.internal:5432/relay?sslmode=require".to_owned()),
            "NOT_PG" => Some("/var/lib/relay.db".to_owned()),
            _ => None,
        };
        Config::from_toml(text, Path::new("relay.toml"), &env)
    }

    fn refused(text: &str) -> String {
        load(text).expect_err("refused").to_string()
    }

    #[test]
    fn a_postgres_url_selects_postgres_and_a_path_sqlite() {
        let c = load(r#"database = "postgres://relay@db.internal:5432/relay""#).unwrap();
        let pg = c.postgres.as_ref().expect("postgres");
        assert_eq!(pg.url(), "postgres://relay@db.internal:5432/relay");
        assert_eq!(pg.env, None);
        let c = load(r#"database = "postgresql://db.internal/relay""#).unwrap();
        assert!(c.postgres.is_some());
        let c = load(r#"database = "/tmp/relay.db""#).unwrap();
        assert!(c.postgres.is_none());
        assert_eq!(c.database, Path::new("/tmp/relay.db"));
    }

    #[test]
    fn a_password_in_the_file_is_refused_naming_the_key() {
        for text in [
            r#"database = "postgres://relay:hunter2@db/relay""#,
            r#"database = "postgres://relay@db/relay?password=hunter2""#,
        ] {
            let e = refused(text);
            assert!(e.contains("relay.toml:1: database:"), "{e}");
            assert!(e.contains("database_url_env"), "{e}");
            assert!(!e.contains("hunter2"), "the password is not repeated: {e}");
        }
    }

    #[test]
    fn the_url_may_come_from_the_environment_with_its_password() {
        let c = load(r#"database_url_env = "DB_URL""#).unwrap();
        let pg = c.postgres.as_ref().unwrap();
        assert!(pg.url().contains("s3cret"));
        assert_eq!(pg.env.as_deref(), Some("DB_URL"));
        assert_eq!(c.database, Path::new("postgres://relay:***@db.internal:5432/relay?sslmode=require"));
        let shown = c.redacted_toml();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains(r#"database_url_env = "DB_URL""#), "{shown}");
        assert!(format!("{c:?}").find("s3cret").is_none(), "Debug hides it too");
        assert!(refused(r#"database_url_env = "UNSET""#).contains("UNSET is not set"));
        assert!(refused(r#"database_url_env = "NOT_PG""#).contains("postgres://"));
        let both = refused("database = \"/tmp/a.db\"\ndatabase_url_env = \"DB_URL\"");
        assert!(both.contains("not both"), "{both}");
        assert!(refused(r#"database = "postgres://""#).contains("database"));
    }

    #[test]
    fn cluster_needs_postgres() {
        let e = refused("database = \"/tmp/a.db\"\n[cluster]\ninstance = \"a\"\n");
        assert!(e.contains(": cluster:") && e.contains("PostgreSQL"), "{e}");
        assert!(refused("[cluster]\n").contains("cluster"), "the default database is SQLite");
        let c = load("database_url_env = \"DB_URL\"\n[cluster]\ninstance = \"relay-a\"\nlease_ttl = \"6s\"\n").unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!((cluster.instance.as_str(), cluster.lease_ttl), ("relay-a", Duration::from_secs(6)));
        let c = load("database_url_env = \"DB_URL\"\n[cluster]\n").unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!(cluster.lease_ttl, Duration::from_secs(15));
        assert!(cluster.instance.ends_with(&format!("-{}", std::process::id())), "{}", cluster.instance);
        let e = refused("database_url_env = \"DB_URL\"\n[cluster]\nlease_ttl = \"0s\"\n");
        assert!(e.contains("cluster.lease_ttl"), "{e}");
        assert!(refused("database_url_env = \"DB_URL\"\n[cluster]\ninstance = \"a b\"\n").contains("cluster.instance"));
    }

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(without_password("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(without_password("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            without_password("postgresql://h/db?password=secret&sslmode=require"),
            "postgresql://h/db?password=***&sslmode=require"
        );
    }
}
