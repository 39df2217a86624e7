//! The build records the git commit it was built from: 12 hex digits inside a git checkout
//! (the commit `git rev-parse` names for this checkout's HEAD), `unknown` outside one; and the
//! tch and libtorch versions it was built with.

use std::process::Command;

#[test]
fn source_commit_is_heads_commit_or_unknown() {
    let commit = dynrobust_core::SOURCE_COMMIT;
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string());
    match head {
        Some(head) => assert_eq!(commit, head, "built from {commit}, HEAD is {head}"),
        None => assert_eq!(commit, "unknown"),
    }
    // nothing set it in a library's tests: the bare commit
    assert_eq!(dynrobust_core::build_source(), commit);
}

#[test]
fn the_tch_and_libtorch_versions_are_the_builds() {
    // Cargo.toml pins tch; torch-sys refuses a libtorch of another version
    assert_eq!(dynrobust_core::TCH_VERSION, "0.26.0");
    let libtorch = dynrobust_core::LIBTORCH_VERSION;
    assert!(libtorch == "2.13.0" || libtorch.starts_with("2.13.0+"), "libtorch {libtorch}");
}
