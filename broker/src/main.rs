//! The `synod-broker` binary: parse flags, set up logging, run the library.

use clap::Parser;
use synod_broker::config::{Args, Config};

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SYNOD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = match Config::from_args(Args::parse()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("synod-broker: {err}");
            return std::process::ExitCode::from(2);
        }
    };
    tracing::info!(node = %config.node_name, "configuration accepted; the broker is not built yet");
    std::process::ExitCode::SUCCESS
}
