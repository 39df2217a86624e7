//! Process-wide tuning of glibc's `malloc` for libtorch's tensor buffers.
//!
//! libtorch's CPU allocator takes every tensor buffer from `malloc`. A batch of 128
//! Fashion-MNIST activations is 0.4–3.2 MB, so an attack step allocates and frees tens of
//! megabytes. glibc serves such blocks with fresh `mmap`s or, in the per-thread arenas that
//! the runner's worker threads use, trims freed memory back to the kernel; either way the next
//! allocation page-faults on every page it touches. Measured on the grid-throughput benchmark
//! (BENCHMARKS.md): with two worker threads, 3.2 million minor page faults and 8.7 s of kernel
//! time in a 54 s run; with the thresholds below, 94 thousand faults and 0.4 s.
//!
//! [`keep_freed_memory`] raises the `mmap` threshold to 32 MiB (glibc's ceiling for it on 64-bit targets) and the trim threshold to
//! 1 GiB (with 64 MiB top padding), so freed buffers stay in the process for reuse. The price
//! is a resident set that does not shrink after a peak. A user who sets any of glibc's own
//! `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` or `MALLOC_TOP_PAD_` variables keeps
//! them: the function then changes nothing.

/// The glibc tunables set by [`keep_freed_memory`], in bytes.
pub const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of a heap above this is returned to the kernel.
pub const TRIM_THRESHOLD: i32 = 1 << 30;
/// Extra memory requested whenever a heap grows.
pub const TOP_PAD: i32 = 64 << 20;

/// What [`keep_freed_memory`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocatorTuning {
    /// The thresholds were set.
    Applied,
    /// The user set glibc's own variables; left as they are.
    LeftToEnvironment,
    /// Not a glibc target (musl, macOS, Windows): nothing to do.
    Unsupported,
}

/// Keeps freed tensor buffers in the process instead of returning them to the kernel (see the
/// module docs). Call once, early in `main`, before worker threads start.
pub fn keep_freed_memory() -> AllocatorTuning {
    let user_set = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"].iter().any(|v| std::env::var_os(v).is_some());
    if user_set {
        return AllocatorTuning::LeftToEnvironment;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> AllocatorTuning {
    // SAFETY: mallopt only adjusts allocator parameters; it is safe to call at any time.
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            && libc::mallopt(libc::M_TOP_PAD, TOP_PAD) == 1
    };
    if ok {
        AllocatorTuning::Applied
    } else {
        AllocatorTuning::Unsupported
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> AllocatorTuning {
    AllocatorTuning::Unsupported
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_thresholds() {
        // mallopt returns 1 for each accepted value (glibc refuses an mmap threshold above
        // 32 MiB on 64-bit targets, which is why MMAP_THRESHOLD is that ceiling).
        assert_eq!(apply(), AllocatorTuning::Applied);
    }
}
