//! Process-wide set-up of the `dynrobust` binary: how it dies.
//!
//! - [`default_sigpipe`]: a closed stdout (`dynrobust … | head`) ends the process quietly,
//!   as for any Unix filter, instead of a "failed printing to stdout" panic. A study run killed
//!   that way loses only its cells in flight, like any other kill.
//! - [`install_panic_hook`]: a panic (a bug) prints one readable line — libtorch's C++ stack
//!   cut away ([`crate::error::libtorch_message`]) — and says it is a bug, not bad input.

/// Restores the default action of SIGPIPE (Rust ignores it, turning a closed pipe into errors
/// every `println!` panics on).
pub fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to the default is always sound; called once at
    // start-up before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Replaces the default panic message by one line with libtorch's text trimmed, marked as a
/// bug in dynrobust. The study runner still catches panics per cell; this only changes what
/// is printed.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let text = panic_message(info.payload());
        let place = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
        eprintln!(
            "internal error in dynrobust (a bug, not your input; please report it with the command) in thread '{thread}'{place}: {}",
            crate::error::libtorch_message(&text)
        );
        let trace = std::backtrace::Backtrace::capture(); // with RUST_BACKTRACE=1
        if trace.status() == std::backtrace::BacktraceStatus::Captured {
            eprintln!("{trace}");
        }
    }));
}

/// A panic payload's message (`panic!` gives a `&str` or a `String`), for the hook above and
/// for the study runner, which catches panics per cell.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".to_string())
}
