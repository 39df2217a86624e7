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

/// A temporary name beside `path` that no other writer uses: `NAME.tmp.HOST.PID.NONCE.N`, with
/// N counted per process and NONCE drawn once per process from the clock. The process id alone
/// is not enough: the worker threads of one run can write the same file at once (two cells
/// finishing the same craft-cache batch), and one thread's rename would then take the file
/// from under the other's; Slurm tasks on different nodes (or in their own PID namespaces)
/// sharing one output directory can have the same process id. HOST and PID also tell
/// [`sweep_stale_temporaries`] whose file it is.
pub fn temporary_path(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static NONCE: OnceLock<u32> = OnceLock::new();
    let nonce = NONCE.get_or_init(|| {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        (nanos as u64 ^ (nanos >> 64) as u64 ^ u64::from(std::process::id()).rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15) as u32
    });
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (host, pid, n) = (host_tag(), std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    path.with_file_name(format!("{name}.tmp.{host}.{pid}.{nonce:08x}.{n}"))
}

/// This machine's name as it goes into temporary names: ASCII letters, digits and `-` only (so
/// the name still splits on `.`), at most 40 characters; `host` when it cannot be read.
pub fn host_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer it is given
        let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
        let raw = if ok { String::from_utf8_lossy(buf.split(|&b| b == 0).next().unwrap_or(&[])).into_owned() } else { String::new() };
        let tag: String = raw.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).take(40).collect();
        if tag.is_empty() {
            "host".to_string()
        } else {
            tag
        }
    })
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

/// Who wrote a temporary file, read from its [`temporary_path`] name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemporaryWriter {
    /// The writer's host tag; `None` for the older `NAME.tmp.PID.NONCE.N` names.
    pub host: Option<String>,
    /// The writer's process id.
    pub pid: u32,
}

/// The writer of `name` when it is a [`temporary_path`] name (`NAME.tmp.HOST.PID.NONCE.N`, or
/// the older `NAME.tmp.PID.NONCE.N`); `None` for every other name.
pub fn temporary_writer(name: &str) -> Option<TemporaryWriter> {
    let parts: Vec<&str> = name.split('.').collect();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let len = parts.len();
    if len < 5 || !digits(parts[len - 1]) || parts[len - 2].len() != 8 || !parts[len - 2].bytes().all(|b| b.is_ascii_hexdigit()) || !digits(parts[len - 3]) {
        return None;
    }
    let pid = parts[len - 3].parse().ok()?;
    let host_like = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if len >= 6 && parts[len - 5] == "tmp" && host_like(parts[len - 4]) {
        Some(TemporaryWriter { host: Some(parts[len - 4].to_string()), pid })
    } else if parts[len - 4] == "tmp" {
        Some(TemporaryWriter { host: None, pid })
    } else {
        None
    }
}

/// How old a temporary file must be before a sweep takes it for a leftover even when its
/// writer cannot be checked (another node's, or an older name without a host): a write takes
/// milliseconds.
pub const STALE_TEMPORARY_AGE: std::time::Duration = std::time::Duration::from_secs(60);

/// True when a process `pid` exists on this machine (a zombie counts; a permission error means
/// it exists).
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return true };
    // SAFETY: signal 0 only checks that the process exists; nothing is sent
    let exists = unsafe { libc::kill(pid, 0) } == 0;
    exists || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes `path` when it is a temporary file (a name with `.tmp.` in it, as every writer of
/// this project has named them) that a writer killed mid-write left behind: a
/// [`temporary_path`] name whose writer ran on this machine and no longer exists (at once), or
/// any that was last modified more than `older_than` ago (a writer on another node of a shared
/// directory cannot be checked; a live one renames its file within milliseconds). True when it
/// was removed; best effort (another sweeper may have removed it first). A writer in another
/// PID namespace of the same machine with the same host name would look gone (its store would
/// then fail and the cell be retried by the next run; nothing finished is lost): containers
/// sharing an output directory should keep their own host names, as Docker's do by default.
pub fn remove_if_stale_temporary(path: &Path, older_than: std::time::Duration) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()).filter(|n| n.contains(".tmp.")) else { return false };
    let Some(modified) = fs::metadata(path).ok().filter(fs::Metadata::is_file).and_then(|m| m.modified().ok()) else { return false };
    let dead_here = temporary_writer(name)
        .is_some_and(|w| w.host.as_deref() == Some(host_tag()) && w.pid != std::process::id() && !process_exists(w.pid));
    let old = modified.elapsed().unwrap_or_default() > older_than;
    (dead_here || old) && fs::remove_file(path).is_ok()
}

/// [`remove_if_stale_temporary`] over the files in `dir` (not below it); returns how many were
/// removed. A missing `dir` is fine.
pub fn sweep_stale_temporaries(dir: &Path, older_than: std::time::Duration) -> Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(dir, e)),
    };
    Ok(entries.flatten().filter(|entry| remove_if_stale_temporary(&entry.path(), older_than)).count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn temporary_names_are_recognised_and_nothing_else() {
        let tmp = temporary_path(Path::new("/x/cell-1.json"));
        let name = tmp.file_name().unwrap().to_str().unwrap();
        assert_eq!(temporary_writer(name), Some(TemporaryWriter { host: Some(host_tag().to_string()), pid: std::process::id() }), "{name}");
        assert_eq!(temporary_writer("cell.json.tmp.12.0000abcd.3"), Some(TemporaryWriter { host: None, pid: 12 }));
        assert_eq!(temporary_writer("cell.json.tmp.node-7.12.0000abcd.3"), Some(TemporaryWriter { host: Some("node-7".into()), pid: 12 }));
        for name in ["cell-1.json", "cell.tmp", "a.tmp.12.0000000g.3", "a.tmp.12.00ab.3", "a.tmp.x.0000abcd.3", "a.tmp.12.0000abcd.", "a.txt.12.0000abcd.3", "tmp.12.0000abcd.3"] {
            assert_eq!(temporary_writer(name), None, "{name}");
        }
    }

    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn the_sweep_removes_old_temporaries_and_those_of_dead_writers_here() {
        let dir = tempfile::tempdir().unwrap();
        let finished = dir.path().join("cell-1.json");
        let old_tmp = temporary_path(&finished);
        let own_fresh = temporary_path(&finished);
        let old_plain = dir.path().join("notes.txt");
        let dead = dead_pid();
        let dead_here = dir.path().join(format!("cell-2.json.tmp.{}.{dead}.0badf00d.0", host_tag()));
        let dead_elsewhere = dir.path().join(format!("cell-3.json.tmp.{}x.{dead}.0badf00d.0", host_tag()));
        let old_format = dir.path().join(format!("cell-4.json.tmp.{dead}.0badf00d.0"));
        for p in [&finished, &old_tmp, &own_fresh, &old_plain, &dead_here, &dead_elsewhere, &old_format] {
            fs::write(p, b"x").unwrap();
        }
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        for p in [&finished, &old_tmp, &old_plain] {
            File::options().write(true).open(p).unwrap().set_modified(two_hours_ago).unwrap();
        }
        // old (any writer) and dead-here go; this process's fresh file, a fresh file of another
        // host's writer and a fresh old-format file (no host to check) stay
        assert_eq!(sweep_stale_temporaries(dir.path(), Duration::from_secs(3600)).unwrap(), 2);
        assert!(!old_tmp.exists() && !dead_here.exists());
        assert!(finished.exists() && own_fresh.exists() && old_plain.exists() && dead_elsewhere.exists() && old_format.exists());
        assert_eq!(sweep_stale_temporaries(&dir.path().join("absent"), Duration::ZERO).unwrap(), 0);
    }
}
