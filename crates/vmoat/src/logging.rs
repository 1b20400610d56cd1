//! Logging to stderr through `tracing`: warnings by default, more with `-v`, errors only with
//! `-q`. `VMOAT_LOG` (an env-filter directive) overrides both.

use tracing_subscriber::EnvFilter;

/// Installs the stderr logger for this process.
pub fn init(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_env("VMOAT_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},russh=warn,hyper=warn")));

    // Colours only on a terminal: logs written to files (the agent's ha.stderr.log, CI)
    // stay plain text.
    let _ = tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(verbose >= 2)
        .without_time()
        .try_init();
}
