//! `poolsocks`: parse arguments, set up logging and signals, run the server library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use poolsocks::config::{Config, LogFormat, DEFAULT_CONFIG_TOML};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

/// A SOCKS5 proxy whose upstream connection pool keeps warm spares to frequent destinations.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML config file; without it the embedded default config is used (127.0.0.1:1080).
    #[arg(short, long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate the config and exit (0 if valid).
    #[arg(long)]
    check: bool,
    /// Print the embedded default config (fully commented) and exit.
    #[arg(long)]
    print_default_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_default_config {
        print!("{DEFAULT_CONFIG_TOML}");
        return ExitCode::SUCCESS;
    }
    let config = match &args.config {
        Some(path) => Config::load(path),
        None => Config::embedded_default(),
    };
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("poolsocks: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        let origin = args
            .config
            .as_ref()
            .map_or("embedded default config".into(), |p| p.display().to_string());
        println!("{origin}: ok");
        return ExitCode::SUCCESS;
    }
    init_logging(&config);
    poolsocks::server::fd_limit::apply(&config);
    poolsocks::server::memory::return_large_blocks();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    // Served from a worker thread, not from `block_on`'s thread: a session task spawned by an
    // accept loop on a worker starts on that worker's queue instead of waking another thread
    // (context switches per session fell from 1.7-3.6 to 1.0-1.2 on loopback load).
    match runtime.block_on(async { tokio::spawn(serve(config)).await }) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            error!(error = %e, "poolsocks stopped");
            ExitCode::FAILURE
        }
        Err(e) => {
            error!(error = %e, "poolsocks stopped: the server task failed");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> Result<(), poolsocks::server::ServerError> {
    let listener = poolsocks::server::bind(&config).await?;
    if let Ok(addr) = listener.local_addr() {
        // Tests and scripts read this line to learn the port when bind_port = 0.
        info!(%addr, pool = config.server.pool.enabled, "listening");
    }
    poolsocks::server::run(config, listener, shutdown_signal()).await
}

fn init_logging(config: &Config) {
    // RUST_LOG wins over the config so an operator can raise verbosity without editing files.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.logging.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.logging.format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => info!("SIGINT received"),
                    _ = terminate.recv() => info!("SIGTERM received"),
                }
            }
            Err(e) => {
                error!(error = %e, "cannot watch SIGTERM; only SIGINT will stop the server");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
        info!("interrupt received");
    }
}
