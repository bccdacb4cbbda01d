//! Whether a relay runs on a SQLite database: `dari-relay run` holds an
//! advisory lock (`flock`) on a file beside the database, `<database>-lock`
//! (next to SQLite's own `-wal` and `-shm`), for as long as it runs, with
//! its pid written in it; `db copy` takes the same lock on its source and
//! its target for as long as it copies.
//!
//! Why a file of its own: the daemon must not lock the database file
//! itself, since every CLI command opens it while the daemon runs (and
//! [`super::Store::open`] takes a short `flock` on it to migrate), and a
//! heartbeat in the database would need a timeout to tell a dead daemon
//! from a slow one. The kernel drops a `flock` when its process ends, however
//! it ends (SIGKILL, a crash), so a stale lock cannot outlive its holder and
//! nothing needs cleaning up.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::store::StoreError;

/// The lock, held until dropped.
#[derive(Debug)]
pub struct RunningLock {
    /// The open lock file: closing it releases the lock.
    _file: File,
}

/// The lock file of the database at `database`: its name with `-lock`.
pub fn lock_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push("-lock");
    PathBuf::from(name)
}

impl RunningLock {
    /// Takes the lock of the database at `database` for `who` (what a later
    /// refusal names, e.g. `dari-relay run, pid 42`). Fails with
    /// [`StoreError::InUse`] naming the holder if another process (or
    /// another handle in this one) holds it.
    pub fn take(database: &Path, who: &str) -> Result<RunningLock, StoreError> {
        let path = lock_path(database);
        let create = |source| StoreError::Create { path: path.clone(), source };
        // 0644: it holds only a pid, and a daemon must be able to take a
        // lock file that a command run as another user (root) created.
        let opened = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o644).open(&path);
        let (mut file, writable) = match opened {
            Ok(file) => (file, true),
            // Another user's file: a read-only descriptor takes the same
            // lock, it just cannot say who holds it.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => (File::open(&path).map_err(create)?, false),
            Err(e) => return Err(create(e)),
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { "another process" } else { holder };
                return Err(StoreError::InUse(holder.chars().take(200).collect()));
            }
            Err(TryLockError::Error(e)) => return Err(create(e)),
        }
        // Who holds it, for the refusal; the lock is what counts, so a
        // failure to say so is not one.
        if writable {
            let _ = file.set_len(0).and_then(|()| file.rewind()).and_then(|()| file.write_all(who.as_bytes()));
        }
        Ok(RunningLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("relay.db");
        assert_eq!(lock_path(&db), dir.path().join("relay.db-lock"));
        let first = RunningLock::take(&db, "dari-relay run, pid 42").unwrap();
        match RunningLock::take(&db, "db copy") {
            Err(StoreError::InUse(by)) => assert_eq!(by, "dari-relay run, pid 42"),
            other => panic!("not refused: {other:?}"),
        }
        drop(first);
        RunningLock::take(&db, "db copy").unwrap();
    }
}
