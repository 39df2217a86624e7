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
