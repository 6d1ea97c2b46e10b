//! The `synod-broker` binary: parse flags, set up logging, run the library
//! until SIGTERM/SIGINT, then drain. Exit codes: 0 clean shutdown, 1 runtime
//! failure, 2 bad configuration. `synod-broker local-cluster` runs a cluster
//! of several such processes on this machine instead (see `local`).

use clap::Parser;
use synod_broker::config::{Args, Config};

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SYNOD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if std::env::args().nth(1).as_deref() == Some("local-cluster") {
        return local_cluster();
    }
    let config = match Config::from_args(Args::parse()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("synod-broker: {err}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("synod-broker: cannot start the runtime: {err}");
            return std::process::ExitCode::from(1);
        }
    };
    match runtime.block_on(synod_broker::run(config, shutdown_signal())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("synod-broker: {err}");
            std::process::ExitCode::from(err.exit_code())
        }
    }
}

fn local_cluster() -> std::process::ExitCode {
    let args = synod_broker::local::LocalArgs::parse_from(std::env::args().skip(1));
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("synod-broker: cannot start the runtime: {err}");
            return std::process::ExitCode::from(1);
        }
    };
    match runtime.block_on(synod_broker::local::run(args, shutdown_signal())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("synod-broker local-cluster: {err}");
            std::process::ExitCode::from(1)
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
