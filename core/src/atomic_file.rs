//! Files written so that readers never see them half-done: a temporary name of the writer's
//! own beside the target, fsync, rename over the target, fsync of the directory. Used by the
//! result store, the craft cache and checkpoints.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::SystemTime;

use crate::{Error, Result};

/// A temporary name beside `path` that no other writer uses: `NAME.tmp.PID.NONCE.N`, with N
/// counted per process and NONCE drawn once per process from the clock. The process id alone
/// is not enough: the worker threads of one run can write the same file at once (two cells
/// finishing the same craft-cache batch), and one thread's rename would then take the file
/// from under the other's; Slurm tasks on different nodes (or in their own PID namespaces)
/// sharing one output directory can have the same process id.
pub fn temporary_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static NONCE: OnceLock<u32> = OnceLock::new();
    let nonce = NONCE.get_or_init(|| {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        (nanos as u64 ^ (nanos >> 64) as u64 ^ u64::from(std::process::id()).rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15) as u32
    });
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!("{name}.tmp.{}.{nonce:08x}.{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)))
}

/// Writes `bytes` to `path` atomically ([`replace_atomic`] through [`temporary_path`]).
/// Concurrent writers of the same path each succeed; the file is always one writer's whole
/// content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_atomic(path, &temporary_path(path), |tmp| {
        let mut f = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// Replaces `path` by what `write` puts into the temporary file `tmp` (a name of the caller's
/// own beside `path`, usually [`temporary_path`]; some writers pick their format by the
/// extension): fsync of `tmp`, rename over `path`, fsync of the directory. On any failure
/// `tmp` is removed and `path` is left as it was.
pub fn replace_atomic(path: &Path, tmp: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let written = write(tmp).and_then(|()| File::open(tmp).and_then(|f| f.sync_all()).map_err(|e| Error::io(tmp, e)));
    if let Err(e) = written.and_then(|()| fs::rename(tmp, path).map_err(|e| Error::io(path, e))) {
        let _ = fs::remove_file(tmp);
        return Err(e);
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

/// True when `name` is a [`temporary_path`] name (`NAME.tmp.PID.NONCE.N`).
pub fn is_temporary_name(name: &str) -> bool {
    let mut parts = name.rsplitn(4, '.');
    let (Some(n), Some(nonce), Some(pid), Some(rest)) = (parts.next(), parts.next(), parts.next(), parts.next()) else { return false };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    rest.ends_with(".tmp") && digits(n) && digits(pid) && nonce.len() == 8 && nonce.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Removes the temporary files in `dir` (not below it) that a writer killed mid-write left
/// behind: [`temporary_path`] names last modified more than `older_than` ago (a live writer
/// renames its file within seconds). Returns how many were removed; a missing `dir` is fine.
pub fn sweep_stale_temporaries(dir: &Path, older_than: std::time::Duration) -> Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let stale = entry.file_name().to_str().is_some_and(is_temporary_name)
            && entry.metadata().ok().filter(fs::Metadata::is_file).and_then(|m| m.modified().ok()).is_some_and(|t| now.duration_since(t).unwrap_or_default() > older_than);
        if stale && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn temporary_names_are_recognised_and_nothing_else() {
        let tmp = temporary_path(Path::new("/x/cell-1.json"));
        assert!(is_temporary_name(tmp.file_name().unwrap().to_str().unwrap()), "{}", tmp.display());
        for name in ["cell-1.json", "cell.tmp", "a.tmp.12.0000000g.3", "a.tmp.12.00ab.3", "a.tmp.x.0000abcd.3", "a.tmp.12.0000abcd.", "a.txt.12.0000abcd.3"] {
            assert!(!is_temporary_name(name), "{name}");
        }
    }

    #[test]
    fn the_sweep_removes_only_old_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let finished = dir.path().join("cell-1.json");
        let old_tmp = temporary_path(&finished);
        let fresh_tmp = temporary_path(&finished);
        let old_plain = dir.path().join("notes.txt");
        for p in [&finished, &old_tmp, &fresh_tmp, &old_plain] {
            fs::write(p, b"x").unwrap();
        }
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        for p in [&finished, &old_tmp, &old_plain] {
            File::options().write(true).open(p).unwrap().set_modified(two_hours_ago).unwrap();
        }
        assert_eq!(sweep_stale_temporaries(dir.path(), Duration::from_secs(3600)).unwrap(), 1);
        assert!(!old_tmp.exists());
        assert!(finished.exists() && fresh_tmp.exists() && old_plain.exists());
        assert_eq!(sweep_stale_temporaries(&dir.path().join("absent"), Duration::ZERO).unwrap(), 0);
    }
}
