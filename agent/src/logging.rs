//! Log output: human-readable lines on stderr.

use tracing_subscriber::EnvFilter;

/// `MOAT_LOG` (an `EnvFilter` directive such as `debug` or `moat=trace`) overrides `level`.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_env("MOAT_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .init();
}
