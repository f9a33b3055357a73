//! The `urbanstream` binary.

use clap::Parser;
use tracing_subscriber::EnvFilter;
use urbanstream::cli::{Cli, Command, LogFormat, run};
use urbanstream::service::config::{LogFormatConfig, ServiceConfig};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // An error is the user's to read: its message and causes, never a backtrace (a bug that
    // panics still prints one under RUST_BACKTRACE).
    match urbanstream_main().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Each cause once: an error that quotes its cause is not followed by it again.
            let mut text = e.to_string();
            for cause in e.chain().skip(1) {
                let cause = cause.to_string();
                if !text.contains(&cause) {
                    text.push_str(": ");
                    text.push_str(&cause);
                }
            }
            eprintln!("error: {text}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn urbanstream_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // `serve` reads its log settings from its configuration; the command line wins.
    let serve_config = match &cli.command {
        Some(Command::Serve(args)) if !args.print_defaults => {
            Some(ServiceConfig::load(args.config.as_deref())?)
        }
        _ => None,
    };
    // The demo's live view owns the terminal: only warnings and errors are logged under it.
    let default = match (&cli.command, &serve_config) {
        (_, Some(config)) => config.log.level.clone(),
        (None | Some(Command::Demo(_)), _) => "warn".into(),
        _ => "info".into(),
    };
    let format = cli.log_format.unwrap_or(match &serve_config {
        Some(config) if config.log.format == LogFormatConfig::Json => LogFormat::Json,
        _ => LogFormat::Plain,
    });
    let filter = EnvFilter::try_new(cli.log.as_deref().unwrap_or(&default))?;
    // Colours only on a terminal: a log file or collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    match serve_config {
        Some(config) => urbanstream::service::serve(config).await?,
        None => run(cli).await?,
    }
    Ok(())
}
