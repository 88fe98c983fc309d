//! `loadgen`: the poolsocks load harness. See loadtests/README.md for the scenarios.

use clap::{Parser, Subcommand};

use loadgen::stats::RunRecord;
use loadgen::{bulk, hold, report, run, udp, upstream};

#[derive(Parser)]
#[command(version, about = "Load generator, upstream server and report writer for poolsocks")]
struct Cli {
    /// Runtime worker threads. One by default: on a 2-core machine the proxy needs the other.
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Closed-loop SOCKS sessions (greeting, CONNECT, N requests, close); rps and latency.
    Run(run::RunArgs),
    /// One large download, MiB/s.
    Bulk(bulk::BulkArgs),
    /// Open N sessions and keep them idle; how many were served, memory per session.
    Hold(hold::HoldArgs),
    /// A counting keep-alive HTTP/1.1 server (small response, /bytes/N, /__stats).
    Upstream(upstream::UpstreamArgs),
    /// Closed-loop UDP round trips (direct or through a UDP association); datagrams/s, RTT.
    Udp(udp::UdpArgs),
    /// Open N UDP associations and keep them idle; memory per association.
    UdpHold(udp::UdpHoldArgs),
    /// A UDP echo server.
    UdpEcho(udp::UdpEchoArgs),
    /// Tables (markdown) and plots (SVG) from the JSON records of a scenario.
    Report(report::ReportArgs),
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => {
                let (json, strict) = (args.record.json.clone(), args.record.fail_on_errors);
                let record = run::run(args).await?;
                run::print_summary(&record);
                finish(record, json, strict)
            }
            Command::Bulk(args) => {
                let (json, strict) = (args.record.json.clone(), args.record.fail_on_errors);
                let record = bulk::bulk(args).await?;
                println!(
                    "{} [{}]: {} MiB in {:.2} s = {:.0} MiB/s",
                    record.label,
                    record.route,
                    record.bytes >> 20,
                    record.duration_secs,
                    record.mib_per_sec
                );
                finish(record, json, strict)
            }
            Command::Hold(args) => {
                let (json, strict) = (args.record.json.clone(), args.record.fail_on_errors);
                let record = hold::hold(args).await?;
                println!(
                    "{} [{}]: {} of {} sessions held, {} still answering after the idle period; proxy RSS {} -> {} KiB ({:.1} KiB per session)",
                    record.label,
                    record.route,
                    record.held,
                    record.attempted,
                    record.still_alive,
                    record.rss_before_kib,
                    record.rss_held_kib,
                    record.kib_per_session
                );
                finish(record, json, strict)
            }
            Command::Udp(args) => {
                let (json, strict) = (args.record.json.clone(), args.record.fail_on_errors);
                let record = udp::udp(args).await?;
                let latency = record.session_latency.as_ref().map(|l| l.text()).unwrap_or_default();
                println!(
                    "{} [{}]: {:.0} round trips/s of {} bytes, {latency}, errors {:?}",
                    record.label, record.route, record.rps, record.payload_bytes, record.errors
                );
                finish(record, json, strict)
            }
            Command::UdpHold(args) => {
                let (json, strict) = (args.record.json.clone(), args.record.fail_on_errors);
                let record = udp::hold(args).await?;
                println!(
                    "{} [{}]: {} of {} associations held, {} still answering; proxy memory {} -> {} KiB ({:.1} KiB per association)",
                    record.label,
                    record.route,
                    record.held,
                    record.attempted,
                    record.still_alive,
                    record.rss_before_kib,
                    record.rss_held_kib,
                    record.kib_per_session
                );
                finish(record, json, strict)
            }
            Command::UdpEcho(args) => udp::echo(args).await,
            Command::Upstream(args) => upstream::serve(args).await,
            Command::Report(args) => report::report(args),
        }
    });
    if let Err(e) = outcome {
        eprintln!("loadgen: {e}");
        std::process::exit(1);
    }
}

/// Writes the JSON record if asked, and fails the command when every unit of work failed (or
/// any, with --fail-on-errors), so scripts notice a broken configuration.
fn finish(record: RunRecord, json: Option<std::path::PathBuf>, strict: bool) -> Result<(), String> {
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&record).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    let succeeded = record.sessions + record.held + record.bytes;
    if succeeded == 0 {
        return Err(format!(
            "{}: nothing succeeded ({} errors)",
            record.label,
            record.error_total()
        ));
    }
    if strict && record.error_total() > 0 {
        return Err(format!(
            "{}: {} errors: {:?}",
            record.label,
            record.error_total(),
            record.errors
        ));
    }
    Ok(())
}
