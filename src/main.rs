fn main() -> std::process::ExitCode {
    // Past a file-size limit (`ulimit -f`) a write then fails with EFBIG, which is reported
    // like a full disk, instead of the signal killing the server.
    // SAFETY: setting a signal's disposition to "ignore" at start, before any thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    clawrl_model::background::init_global_pool();
    match clawrl_tui::cli::run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
