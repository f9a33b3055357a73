//! The `urbanstream` binary.

use clap::Parser;
use tracing_subscriber::EnvFilter;
use urbanstream::cli::{Cli, Command, LogFormat, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The demo's live view owns the terminal: only warnings and errors are logged under it.
    let default = match cli.command {
        None | Some(Command::Demo(_)) => "warn",
        _ => "info",
    };
    let filter = EnvFilter::try_new(cli.log.as_deref().unwrap_or(default))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    run(cli).await?;
    Ok(())
}
