//! Shared build script: bake libtorch's library directory into every binary, test and bench
//! of the crate as an rpath, so `dynrobust` runs with no LD_LIBRARY_PATH set.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let dir = std::path::Path::new(&libtorch).join("lib");
        let dir = dir.canonicalize().unwrap_or(dir);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    }
}
