//! Shared build script of every crate:
//! - bakes libtorch's library directory into every binary, test and bench of the crate as an
//!   rpath, so `dynrobust` runs with no LD_LIBRARY_PATH set;
//! - sets `DYNROBUST_SOURCE_COMMIT` to the git commit of the workspace's checkout (12 hex
//!   digits; `unknown` outside a git checkout of this workspace or without git);
//! - in the `dynrobust` binary's crate only, sets `DYNROBUST_BUILD_SOURCE`: that commit, with
//!   `+dirty.<8 hex digits>` appended when the sources that go into the binary (every workspace
//!   member's `src/` and manifest, the root manifest, `Cargo.lock`, `build-support/`,
//!   `.cargo/config.toml`) differ from the commit — the digits digest which files differ and
//!   their contents, so two different edits of one commit practically never share a name
//!   (`+dirty.unknown` when git cannot say). Results, sidecars and the craft cache record this.
//!   Only the binary's crate watches the sources (every source edit recompiles it anyway, so a
//!   rerun there adds little); the library crates keep the bare commit. Untracked files count
//!   when they are `*.rs` or `*.toml` (an editor's swap file does not); git's index is not
//!   watched, so a change of the index alone (`git rm --cached`) shows at the next edit;
//! - in `dynrobust-core` only, sets `DYNROBUST_TCH_VERSION` (tch's version in `Cargo.lock`)
//!   and `DYNROBUST_LIBTORCH_VERSION` (the version of the libtorch under `LIBTORCH`, read from
//!   its `build-version` file or, for a PyTorch wheel, its `version.py`; `unknown` if neither).
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let libtorch = std::env::var("LIBTORCH").ok();
    if let Some(libtorch) = &libtorch {
        let dir = Path::new(libtorch).join("lib");
        let dir = dir.canonicalize().unwrap_or(dir);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    }
    let commit = source_commit();
    println!("cargo:rustc-env=DYNROBUST_SOURCE_COMMIT={}", commit.as_deref().unwrap_or("unknown"));
    match std::env::var("CARGO_PKG_NAME").as_deref() {
        Ok("dynrobust") => {
            let source = match &commit {
                Some(commit) => format!("{commit}{}", dirty_suffix().unwrap_or_default()),
                None => "unknown".into(),
            };
            println!("cargo:rustc-env=DYNROBUST_BUILD_SOURCE={source}");
        }
        Ok("dynrobust-core") => {
            println!("cargo:rustc-env=DYNROBUST_TCH_VERSION={}", tch_version().unwrap_or_else(|| "unknown".into()));
            let torch = libtorch.as_deref().and_then(|dir| libtorch_version(Path::new(dir)));
            println!("cargo:rustc-env=DYNROBUST_LIBTORCH_VERSION={}", torch.unwrap_or_else(|| "unknown".into()));
        }
        _ => {}
    }
}

/// The workspace root: the crate's parent directory.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("a crate directory has a parent").to_path_buf()
}

/// The workspace's `members`, as the root `Cargo.toml` lists them on its `members = [...]`
/// line.
fn workspace_members() -> Vec<String> {
    let manifest = std::fs::read_to_string(workspace().join("Cargo.toml")).unwrap_or_default();
    let line = manifest.lines().find_map(|l| l.trim().strip_prefix("members")).unwrap_or_default();
    let list = line.trim_start_matches([' ', '=']).trim().trim_start_matches('[').trim_end_matches(']');
    list.split(',').map(|m| m.trim().trim_matches('"').to_string()).filter(|m| !m.is_empty()).collect()
}

/// The paths, relative to the workspace root, whose contents go into the binary.
fn source_paths() -> Vec<String> {
    let mut paths: Vec<String> = workspace_members().iter().flat_map(|c| [format!("{c}/src"), format!("{c}/Cargo.toml")]).collect();
    paths.extend(["Cargo.toml", "Cargo.lock", "build-support", ".cargo/config.toml"].map(String::from));
    paths
}

/// `+dirty.<digest>` when `git status` lists a change (a modified, added or deleted file, an
/// untracked `*.rs` or `*.toml`) under [`source_paths`], `+dirty.unknown` when git cannot
/// tell; `None` for a clean tree. Watches those paths (and `.gitignore`), so the script reruns
/// when a source is edited, added, removed or restored.
fn dirty_suffix() -> Option<String> {
    let root = workspace();
    let paths = source_paths();
    for path in paths.iter().map(String::as_str).chain([".gitignore"]).map(|p| root.join(p)).filter(|p| p.exists()) {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    // --no-optional-locks: git status must not rewrite the index as a side effect; -z entries
    // are `XY path` with no quoting; --no-renames keeps a rename's two paths apart
    let mut args = vec!["--no-optional-locks", "status", "--porcelain=v1", "-z", "--no-renames", "--untracked-files=all", "--"];
    args.extend(paths.iter().map(String::as_str));
    let Some(out) = Command::new("git").args(&args).current_dir(&root).output().ok().filter(|out| out.status.success()) else {
        println!("cargo:warning=`git status` failed in {}: the binary's source is marked +dirty.unknown", root.display());
        return Some("+dirty.unknown".into());
    };
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    let source_file = |path: &str| path.ends_with(".rs") || path.ends_with(".toml");
    let mut changed: Vec<&str> = status
        .split('\0')
        .filter_map(|entry| Some((entry.get(..2)?, entry.get(3..)?)))
        .filter(|(code, path)| !path.is_empty() && (*code != "??" || source_file(path)))
        .map(|(_, path)| path)
        .collect();
    if changed.is_empty() {
        return None;
    }
    changed.sort_unstable();
    // FNV-1a over each changed path and its contents now (a deleted file: its path only)
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash = (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for path in changed {
        feed(path.as_bytes());
        feed(&[0]);
        feed(&std::fs::read(root.join(path)).unwrap_or_default());
        feed(&[0]);
    }
    Some(format!("+dirty.{:08x}", hash >> 32))
}

/// tch's version as `Cargo.lock` pins it.
fn tch_version() -> Option<String> {
    let lock = workspace().join("Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let text = std::fs::read_to_string(lock).ok()?;
    let entry = text.split("[[package]]").find(|p| p.lines().any(|l| l.trim() == "name = \"tch\""))?;
    let line = entry.lines().find_map(|l| l.trim().strip_prefix("version = "))?;
    Some(line.trim_matches('"').to_string())
}

/// The version of the libtorch in `dir`: a libtorch archive's `build-version` (`2.13.0+cpu`),
/// else a PyTorch wheel's `version.py` (`__version__ = '2.13.0+cu130'`).
fn libtorch_version(dir: &Path) -> Option<String> {
    let (archive, wheel) = (dir.join("build-version"), dir.join("version.py"));
    for file in [&archive, &wheel].into_iter().filter(|f| f.exists()) {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    if let Ok(text) = std::fs::read_to_string(&archive) {
        return Some(text.trim().to_string()).filter(|v| !v.is_empty());
    }
    let text = std::fs::read_to_string(&wheel).ok()?;
    let line = text.lines().find_map(|l| l.trim().strip_prefix("__version__"))?;
    Some(line.trim_start_matches([' ', '=']).trim().trim_matches(['\'', '"']).to_string())
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
    let workspace = workspace().canonicalize().ok()?;
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
