//! `poolsocks`: parse arguments, set up logging and signals, run the server library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use poolsocks::config::{Config, LogFormat, DEFAULT_CONFIG_TOML};
use poolsocks::server::{LogLevelHook, Reloader};
use tracing::{error, info, warn};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{fmt, reload, EnvFilter};

/// A SOCKS5 proxy whose upstream connection pool keeps warm spares to frequent destinations.
/// SIGHUP re-reads the --config file and applies it without touching sessions in flight.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Tool>,
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

#[derive(Debug, clap::Subcommand)]
enum Tool {
    /// Read a password from standard input (one line; its line ending is not part of it) and
    /// print its argon2id PHC string for `[[auth.users]] password`.
    HashPassword,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Tool::HashPassword) = args.command {
        return hash_password();
    }
    if args.print_default_config {
        return print_out(DEFAULT_CONFIG_TOML);
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
        let summary = poolsocks::config::summary(&config);
        return print_out(&format!("{origin}: ok\n{summary}"));
    }
    let log_level = init_logging(&config);
    if !config.rustsocks.is_empty() {
        info!(
            accepted = %config.rustsocks.accepted.join(", "),
            "RustSocks settings accepted, not used (their features are off)"
        );
    }
    poolsocks::server::fd_limit::apply(&config);
    poolsocks::memory::return_large_blocks();
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
    let path = args.config.clone();
    match runtime.block_on(async { tokio::spawn(serve(config, path, log_level)).await }) {
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

async fn serve(
    config: Config,
    path: Option<PathBuf>,
    log_level: LogLevelHook,
) -> Result<(), poolsocks::server::ServerError> {
    let listener = poolsocks::server::bind(&config).await?;
    let pool = config.server.pool.enabled;
    let server = poolsocks::server::Server::build(config).await?.with_log_level_hook(log_level);
    // Watched before "listening" is logged: SIGHUP's default action would end the process.
    watch_sighup(server.reloader(), path);
    ignore_user_signals();
    // Also before "listening": until its handler is installed, SIGTERM's default action kills
    // the process at once, without a drain (a stop right after start did exactly that).
    let shutdown = shutdown_signal();
    if let Ok(addr) = listener.local_addr() {
        // Tests and scripts read this line to learn the port when bind_port = 0.
        info!(%addr, pool, "listening");
    }
    server.run(listener, shutdown).await
}

/// Writes `text` to standard output. A reader that went away (`| head -1`) is not an error:
/// what it wanted came first.
fn print_out(text: &str) -> ExitCode {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("poolsocks: cannot write to standard output: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `poolsocks hash-password`: the PHC string of the password on standard input, with the
/// parameters README recommends (argon2id, 19 MiB, 2 passes, 1 lane).
fn hash_password() -> ExitCode {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        eprintln!("poolsocks: cannot read the password: {e}");
        return ExitCode::from(2);
    }
    // `echo pw |` and a typed Enter add a line ending; it is not part of the password.
    let password = line.strip_suffix('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let password = password.unwrap_or(&line);
    if password.is_empty() || password.len() > 255 {
        eprintln!("poolsocks: a password is 1 to 255 bytes (RFC 1929)");
        return ExitCode::from(2);
    }
    let mut salt = [0u8; 16];
    if let Err(e) = getrandom::getrandom(&mut salt) {
        eprintln!("poolsocks: no random salt: {e}");
        return ExitCode::FAILURE;
    }
    let hashed = SaltString::encode_b64(&salt).and_then(|salt| {
        argon2::Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string())
    });
    match hashed {
        Ok(phc) => print_out(&format!("{phc}\n")),
        Err(e) => {
            eprintln!("poolsocks: cannot hash the password: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sets up logging; returns how a reload changes the level.
fn init_logging(config: &Config) -> LogLevelHook {
    // RUST_LOG wins over the config so an operator can raise verbosity without editing files.
    let from_env = std::env::var(EnvFilter::DEFAULT_ENV)
        .ok()
        .and_then(|directives| log_filter(&directives).ok());
    let env_set = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| {
        log_filter(&config.logging.level).unwrap_or_else(|_| EnvFilter::new(&config.logging.level))
    });
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::stderr().is_terminal();
    let registry = tracing_subscriber::registry().with(filter);
    match config.logging.format {
        LogFormat::Pretty => {
            registry.with(fmt::layer().with_writer(std::io::stderr).with_ansi(ansi)).init()
        }
        LogFormat::Json => {
            registry.with(fmt::layer().json().with_writer(std::io::stderr).with_ansi(ansi)).init()
        }
    }
    std::sync::Arc::new(move |level: &str| {
        if env_set {
            return Err("RUST_LOG is set and takes precedence over logging.level".into());
        }
        let filter = log_filter(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}

/// `directives` as a filter, with ractor's spans and info events off unless they name ractor.
/// ractor opens an INFO span for every live actor, so one per pool destination, and the
/// subscriber's registry keeps every slot it ever used with a small table of its own: after
/// 10,000 destinations were pruned, 10,000 such tables stayed scattered over the heap, each
/// keeping its page resident (about 20 MiB of RSS).
fn log_filter(directives: &str) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
    let filter = EnvFilter::try_new(directives)?;
    if directives.contains("ractor") {
        return Ok(filter);
    }
    Ok(filter.add_directive("ractor=warn".parse()?))
}

/// Each SIGHUP re-reads the `--config` file and reloads it (see `server::reload`).
fn watch_sighup(reloader: Reloader, path: Option<PathBuf>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(e) => {
                error!(error = %e, "cannot watch SIGHUP; reloads need a restart");
                return;
            }
        };
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                match &path {
                    Some(path) => {
                        info!(file = %path.display(), "SIGHUP received: reloading the config");
                        // The outcome is logged (and recorded) by the reload itself.
                        let _ = reloader.reload_file(path).await;
                    }
                    None => warn!("SIGHUP received, but there is no --config file to reload"),
                }
            }
        });
    }
    #[cfg(not(unix))]
    {
        let _ = (reloader, path);
    }
}

/// SIGUSR1 and SIGUSR2 have no meaning here; their default action would end the process with
/// no drain, so a stray `kill -USR1` (log rotation scripts send it) is logged and ignored.
fn ignore_user_signals() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        for (kind, name) in
            [(SignalKind::user_defined1(), "SIGUSR1"), (SignalKind::user_defined2(), "SIGUSR2")]
        {
            match signal(kind) {
                Ok(mut stream) => {
                    tokio::spawn(async move {
                        while stream.recv().await.is_some() {
                            warn!("{name} received: ignored (it has no meaning for poolsocks)");
                        }
                    });
                }
                Err(e) => warn!(error = %e, "cannot ignore {name}; it would stop the daemon"),
            }
        }
    }
}

/// Installs the SIGINT and SIGTERM handlers now; the future completes on the first of them.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        let install = |kind: SignalKind, name: &'static str| match signal(kind) {
            Ok(stream) => Some(stream),
            Err(e) => {
                error!(error = %e, "cannot watch {name}; only the other signal will stop the server");
                None
            }
        };
        let interrupt = install(SignalKind::interrupt(), "SIGINT");
        let terminate = install(SignalKind::terminate(), "SIGTERM");
        async fn next(stream: Option<Signal>) {
            match stream {
                Some(mut stream) => {
                    stream.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        async move {
            tokio::select! {
                _ = next(interrupt) => info!("SIGINT received"),
                _ = next(terminate) => info!("SIGTERM received"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        let interrupt = tokio::signal::ctrl_c();
        async move {
            let _ = interrupt.await;
            info!("interrupt received");
        }
    }
}
