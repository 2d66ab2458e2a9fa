//! Log output: human-readable lines on a terminal, JSON lines for the journal and for tools.

use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON under systemd (its journal sets JOURNAL_STREAM), human lines otherwise.
    #[default]
    Auto,
    Human,
    /// One JSON object per line, the event's fields at the top level.
    Json,
}

impl LogFormat {
    fn is_json(self) -> bool {
        match self {
            Self::Auto => std::env::var_os("JOURNAL_STREAM").is_some(),
            Self::Human => false,
            Self::Json => true,
        }
    }
}

/// `MOAT_LOG` (an `EnvFilter` directive such as `debug` or `moat=trace`) overrides `level`.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_env("MOAT_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    if format.is_json() {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        builder.with_ansi(ansi).init();
    }
}
