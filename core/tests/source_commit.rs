//! The build records the git commit it was built from: 12 hex digits inside a git checkout
//! (the commit `git rev-parse` names for this checkout's HEAD), `unknown` outside one.

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
    assert!(dynrobust_core::VERSION_LINE.ends_with(&format!("(commit {commit})")), "{}", dynrobust_core::VERSION_LINE);
}
