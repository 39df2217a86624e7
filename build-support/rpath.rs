//! Shared build script of every crate:
//! - bakes libtorch's library directory into every binary, test and bench of the crate as an
//!   rpath, so `dynrobust` runs with no LD_LIBRARY_PATH set;
//! - sets `DYNROBUST_SOURCE_COMMIT` to the git commit of the workspace's checkout (12 hex
//!   digits; `unknown` outside a git checkout of this workspace or without git), which results
//!   and sidecars record. It names the last commit: uncommitted changes are not recorded.
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

/// `git` in the crate's directory: its trimmed stdout, if it succeeds.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// HEAD's commit, when the workspace root (the crate's parent) is the top of a git checkout;
/// asks cargo to rerun when HEAD moves. Only files that exist are watched: cargo reruns a
/// build script on every build when a watched path is missing.
fn source_commit() -> Option<String> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?.canonicalize().ok()?;
    let Some(top) = git(&["rev-parse", "--show-toplevel"]) else {
        if workspace.join(".git").exists() {
            println!("cargo:warning=git cannot read {} (not installed, or another user's checkout?): results will record commit `unknown`", workspace.display());
        }
        return None;
    };
    // a source tree unpacked inside some other repository is not that repository's commit
    if Path::new(&top).canonicalize().ok()? != workspace {
        return None;
    }
    // where git keeps a file (worktrees keep HEAD apart from the shared refs)
    let git_path = |name: &str| -> Option<PathBuf> {
        let path = PathBuf::from(git(&["rev-parse", "--git-path", name])?);
        Some(if path.is_absolute() { path } else { Path::new(env!("CARGO_MANIFEST_DIR")).join(path) })
    };
    let mut watched = vec![git_path("HEAD")?, git_path("packed-refs")?];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        let loose = git_path(&branch)?;
        // a branch packed away (after `git gc`) gets a loose ref again at the next commit
        watched.push(if loose.exists() { loose.clone() } else { loose.parent()?.to_path_buf() });
    }
    for path in watched.iter().filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    git(&["rev-parse", "--short=12", "HEAD"])
}
