//! `delayline`: a userspace delay line between this network namespace and another.
//!
//! Two TUN devices: one here, one moved into `--netns`. Every IP packet read from one is written
//! to the other after the one-way delay (RTT / 2), one queue and one pair of threads per
//! direction. The delay is on the path, so `connect()` itself costs a round trip, as on a WAN.
//! The devices vanish with the process; it exits by itself after `--duration`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
#[command(about = "Userspace delay line between this netns and another (needs root)")]
struct Args {
    /// Round-trip time added on the path; each direction holds packets for half of it.
    #[arg(long, default_value_t = 10.0)]
    rtt_ms: f64,
    /// Network namespace (already created, e.g. with `ip netns add`) for the far end.
    #[arg(long)]
    netns: String,
    #[arg(long, default_value = "dlnear0")]
    near_if: String,
    #[arg(long, default_value = "dlfar0")]
    far_if: String,
    /// Address of this end (198.18.0.0/15 only).
    #[arg(long, default_value = "198.18.0.1")]
    near_addr: Ipv4Addr,
    /// Address of the far end, inside the namespace (198.18.0.0/15 only).
    #[arg(long, default_value = "198.18.1.1")]
    far_addr: Ipv4Addr,
    /// Exit after this many seconds.
    #[arg(long, default_value_t = 3600.0)]
    duration: f64,
    /// Packets queued per direction before new ones are dropped, as a router queue would.
    #[arg(long, default_value_t = 65_536)]
    queue: usize,
    /// Run the forwarding threads at this SCHED_FIFO priority (0: ordinary threads). A real
    /// link does not wait for CPU the hosts under test are using; on a 2-core machine an
    /// ordinary thread does, and its late wake-ups show up as every proxy's tail latency.
    #[arg(long, default_value_t = 10)]
    realtime_priority: i32,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: the one thing that is safe in a signal handler.
    STOP.store(true, Ordering::Relaxed);
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("delayline: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    for addr in [args.near_addr, args.far_addr] {
        let [a, b, _, _] = addr.octets();
        if !(a == 198 && (b == 18 || b == 19)) {
            return Err(format!("{addr} is outside 198.18.0.0/15"));
        }
    }
    if !(args.rtt_ms >= 0.0 && args.rtt_ms <= 10_000.0) {
        return Err("--rtt-ms must be between 0 and 10000".into());
    }
    let near = tun_create(&args.near_if)?;
    let far = tun_create(&args.far_if)?;
    configure(&args)?;

    let one_way = Duration::from_secs_f64(args.rtt_ms / 2000.0);
    let stats = Arc::new(Counters::default());
    for (from, to, name) in [(&near, &far, "near->far"), (&far, &near, "far->near")] {
        let reader = from.try_clone().map_err(|e| e.to_string())?;
        let writer = to.try_clone().map_err(|e| e.to_string())?;
        let (tx, rx) = sync_channel(args.queue.max(1));
        let stats_in = stats.clone();
        let stats_out = stats.clone();
        let priority = args.realtime_priority;
        thread::Builder::new()
            .name(format!("{name} in"))
            .spawn(move || {
                make_realtime(priority);
                read_side(reader, tx, one_way, &stats_in)
            })
            .map_err(|e| e.to_string())?;
        thread::Builder::new()
            .name(format!("{name} out"))
            .spawn(move || {
                make_realtime(priority);
                write_side(writer, rx, &stats_out)
            })
            .map_err(|e| e.to_string())?;
    }

    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t);
    }
    println!(
        "ready: {} ({}) <-> {} ({} in netns {}), RTT {} ms",
        args.near_addr, args.near_if, args.far_addr, args.far_if, args.netns, args.rtt_ms
    );
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    while !STOP.load(Ordering::Relaxed) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "delayline: forwarded {} packets, dropped {} (queue full or write error)",
        stats.forwarded.load(Ordering::Relaxed),
        stats.dropped.load(Ordering::Relaxed)
    );
    // Exiting closes the TUN descriptors, and with them the devices.
    std::process::exit(0);
}

/// Puts the calling thread in SCHED_FIFO at `priority` (no-op for 0). It falls back to an
/// ordinary thread with a warning: the line still works, with a looser delay.
fn make_realtime(priority: i32) {
    if priority <= 0 {
        return;
    }
    let param = libc::sched_param { sched_priority: priority };
    // SAFETY: pid 0 is the calling thread; `param` outlives the call.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc != 0 {
        eprintln!(
            "delayline: SCHED_FIFO {priority} refused ({}); forwarding at normal priority",
            std::io::Error::last_os_error()
        );
    }
}

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    dropped: AtomicU64,
}

fn tun_create(name: &str) -> Result<File, String> {
    loadgen::tun::create(name)
}

fn configure(args: &Args) -> Result<(), String> {
    let ns = args.netns.as_str();
    let near_addr = format!("{}/32", args.near_addr);
    let far_addr = format!("{}/32", args.far_addr);
    let near_route = format!("{}/32", args.far_addr);
    let far_route = format!("{}/32", args.near_addr);
    let steps: [&[&str]; 8] = [
        &["link", "set", &args.far_if, "netns", ns],
        &["addr", "add", &near_addr, "dev", &args.near_if],
        &["link", "set", &args.near_if, "up"],
        &["route", "replace", &near_route, "dev", &args.near_if],
        &["-n", ns, "link", "set", "lo", "up"],
        &["-n", ns, "addr", "add", &far_addr, "dev", &args.far_if],
        &["-n", ns, "link", "set", &args.far_if, "up"],
        &["-n", ns, "route", "replace", &far_route, "dev", &args.far_if],
    ];
    for step in steps {
        let out = Command::new("ip").args(step).output().map_err(|e| format!("run ip: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "ip {}: {}",
                step.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

fn read_side(
    mut from: File,
    tx: SyncSender<(Instant, Vec<u8>)>,
    one_way: Duration,
    stats: &Counters,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = match from.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        // The release time is stamped on arrival; FIFO order then equals release order.
        match tx.try_send((Instant::now() + one_way, buf[..n].to_vec())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => return,
        }
    }
}

fn write_side(mut to: File, rx: Receiver<(Instant, Vec<u8>)>, stats: &Counters) {
    while let Ok((due, packet)) = rx.recv() {
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        // A TUN write takes the whole packet or fails; write_all never loops here.
        match to.write_all(&packet) {
            Ok(_) => stats.forwarded.fetch_add(1, Ordering::Relaxed),
            Err(_) => stats.dropped.fetch_add(1, Ordering::Relaxed),
        };
    }
}
