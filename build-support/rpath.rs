//! Shared build script of every crate:
//! - bakes libtorch's library directory into every binary, test and bench of the crate as an
//!   rpath, so `dynrobust` runs with no LD_LIBRARY_PATH set;
//! - sets `DYNROBUST_SOURCE_COMMIT` to the git commit being built (12 hex digits; `unknown`
//!   outside a git checkout or without git), which results and sidecars record. Uncommitted
//!   changes are not detected: the commit names the last one the sources started from.
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let dir = Path::new(&libtorch).join("lib");
        let dir = dir.canonicalize().unwrap_or(dir);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    }
    println!("cargo:rustc-env=DYNROBUST_SOURCE_COMMIT={}", source_commit().unwrap_or_else(|| "unknown".into()));
}

/// `git rev-parse` in the crate's directory, asking cargo to rerun when HEAD moves.
fn source_commit() -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let git_dir = PathBuf::from(git(&["rev-parse", "--absolute-git-dir"])?);
    // HEAD itself (a checkout), the branch it points at (a commit) and packed refs
    println!("cargo:rerun-if-changed={}", git_dir.join("HEAD").display());
    println!("cargo:rerun-if-changed={}", git_dir.join("packed-refs").display());
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        println!("cargo:rerun-if-changed={}", git_dir.join(branch).display());
    }
    git(&["rev-parse", "--short=12", "HEAD"])
}
