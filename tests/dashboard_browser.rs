//! The dashboard in a real browser: headless Debian chromium loads `/` from a running stats
//! endpoint while SOCKS traffic flows through the proxy, and the rendered DOM must show the
//! live figures (checked against the JSON API around the same moment) and the highlighted
//! warnings. A screenshot is saved under the target directory as an artifact.
//!
//! Without chromium the test skips with a message, except in CI (`CI` set), where it fails:
//! `.ci/run` installs it.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::udp::{datagram, Association, UdpEcho};
use common::{connect, round_trip, test_config, EchoServer, TestProxy};
use poolsocks::pool::checkout_wait::BOUNDS_US;
use poolsocks::pool::DestStats;
use poolsocks::socks::{ReplyCode, TargetAddr};
use poolsocks::stats::{self, Readiness, StatsContext, StatsOptions};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::sync::{oneshot, watch};

const DEADLINE: Duration = Duration::from_secs(10);
/// A cold chromium start on a busy 2-core machine takes a few seconds; this only bounds a hang.
const BROWSER_DEADLINE: Duration = Duration::from_secs(90);

/// The browser binary: `$CHROMIUM`, else Debian's `chromium`, else `chromium-browser`.
async fn find_chromium() -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match std::env::var_os("CHROMIUM") {
        Some(path) => vec![path.into()],
        None => vec!["chromium".into(), "chromium-browser".into()],
    };
    for candidate in candidates {
        let found = Command::new(&candidate)
            .arg("--version")
            .output()
            .await
            .is_ok_and(|out| out.status.success());
        if found {
            return Some(candidate);
        }
    }
    None
}

/// Runs headless chromium on `url` with `mode_args` (`--dump-dom`, `--screenshot=...`) and
/// returns its stdout. Virtual time lets the page's 2 s poll run several times quickly; the
/// browser waits for network fetches before advancing it.
async fn chromium(browser: &Path, url: &str, budget: Duration, mode_args: &[String]) -> String {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut command = Command::new(browser);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
        ])
        .arg(format!("--virtual-time-budget={}", budget.as_millis()))
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(mode_args)
        .arg(url)
        .kill_on_drop(true);
    let output = tokio::time::timeout(BROWSER_DEADLINE, command.output())
        .await
        .expect("chromium finished in time")
        .expect("chromium runs");
    assert!(
        output.status.success(),
        "chromium failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// One SOCKS session through the proxy: CONNECT, echo, close.
async fn session(proxy: SocketAddr, target: SocketAddr, payload: &[u8]) {
    let (mut stream, reply) = connect(proxy, TargetAddr::Ip(target)).await;
    assert_eq!(reply.code, ReplyCode::Succeeded, "CONNECT to {target}");
    assert_eq!(round_trip(&mut stream, payload).await, payload);
}

async fn settle(dest: &mut watch::Receiver<DestStats>, accept: impl Fn(&DestStats) -> bool) {
    tokio::time::timeout(DEADLINE, dest.wait_for(|s| accept(s)))
        .await
        .expect("destination settles in time")
        .expect("destination watch open");
}

async fn get_json(addr: SocketAddr, path: &str) -> Value {
    let mut stream = TcpStream::connect(addr).await.expect("connect to stats");
    let request = format!("GET {path} HTTP/1.1\r\nHost: stats\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut all = Vec::new();
    stream.read_to_end(&mut all).await.expect("read");
    let text = String::from_utf8(all).expect("UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    serde_json::from_str(body).expect("JSON body")
}

/// The number in `data-value="..."` right after `marker` in `dom`.
fn data_value_after(dom: &str, marker: &str) -> Option<f64> {
    let at = dom.find(marker)? + marker.len();
    let rest = &dom[at..];
    let start = rest.find("data-value=\"")? + "data-value=\"".len();
    let end = rest[start..].find('"')? + start;
    rest[start..end].parse().ok()
}

/// The `<tr>` of one destination in the destinations table.
fn destination_row<'a>(dom: &'a str, destination: &str) -> Option<&'a str> {
    let start = dom.find(&format!("<tr data-destination=\"{destination}\""))?;
    let end = dom[start..].find("</tr>")? + start;
    Some(&dom[start..end])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_renders_live_numbers_in_chromium() {
    let Some(browser) = find_chromium().await else {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty());
        assert!(!ci, "chromium is required in CI (apt-get install -y chromium)");
        eprintln!(
            "SKIPPED dashboard_renders_live_numbers_in_chromium: no chromium on PATH \
             (apt-get install -y chromium, or set CHROMIUM=/path/to/browser)"
        );
        return;
    };

    // One spare in the whole pool, so a second destination's spare evicts the first's: a real
    // warning for the telemetry feed.
    let mut config = test_config();
    config.server.pool.enabled = true;
    config.server.pool.max_idle_per_dest = 1;
    config.server.pool.max_total_idle = 1;
    let server = common::build_server(config.clone()).await.expect("server builds");
    let pool = server.pool().expect("the server built its pool");
    let ctx = StatsContext::new(config, server.telemetry(), server.metrics())
        .with_pool(Some(pool.clone()))
        .with_readiness(Readiness::listening())
        // Chromium's virtual time runs the page's 2 s polls a few real milliseconds apart; a
        // cached answer would make every interval look empty and leave the chart without a line.
        .with_options(StatsOptions { pool_stats_ttl: Duration::ZERO, ..StatsOptions::default() });
    let proxy = TestProxy::start_server(server).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind stats");
    let endpoint = stats::spawn(listener, ctx);
    let stats_addr = endpoint.addr().expect("stats addr");

    // Settled traffic whose figures the page must show exactly: A has 1 miss and 2 hits.
    let steady = EchoServer::start().await;
    let evictor = EchoServer::start().await;
    let busy = EchoServer::start().await;
    let mut steady_dest =
        pool.watch_destination(&TargetAddr::Ip(steady.addr)).await.expect("watch");
    for hits in 0..3 {
        session(proxy.addr, steady.addr, b"steady").await;
        settle(&mut steady_dest, |s| s.counters.hits == hits && s.idle == 1 && s.is_quiet()).await;
    }
    // A spare is evicted only for a destination steadily busier than its own: the evictor is
    // asked for until it has proven that and taken the one slot.
    let mut evictor_dest =
        pool.watch_destination(&TargetAddr::Ip(evictor.addr)).await.expect("watch");
    for _ in 0..40 {
        session(proxy.addr, evictor.addr, b"evict").await;
        settle(&mut evictor_dest, |s| s.is_quiet()).await;
        if steady_dest.borrow().counters.evicted == 1 {
            break;
        }
    }
    settle(&mut evictor_dest, |s| s.idle == 1 && s.is_quiet()).await;
    settle(&mut steady_dest, |s| s.counters.evicted == 1).await;

    // A UDP association with one datagram each way and one dropped fragment, held open.
    let udp_echo = UdpEcho::start().await;
    let association = Association::open(proxy.addr).await;
    let mut fragment = datagram(TargetAddr::Ip(udp_echo.addr), b"part");
    fragment[2] = 1;
    association.send_raw(&fragment).await;
    association.round_trip(TargetAddr::Ip(udp_echo.addr), b"udp", udp_echo.addr).await;

    // Traffic that keeps flowing while the browser looks.
    let running = Arc::new(AtomicBool::new(true));
    let sessions_done = Arc::new(AtomicU64::new(0));
    let (first_busy_tx, first_busy) = oneshot::channel::<()>();
    // Several clients, so that even the few real milliseconds between two polls see checkouts.
    let first_busy_tx = Arc::new(std::sync::Mutex::new(Some(first_busy_tx)));
    let traffic: Vec<_> = (0..4)
        .map(|_| {
            let running = running.clone();
            let sessions_done = sessions_done.clone();
            let first = first_busy_tx.clone();
            let (proxy, busy) = (proxy.addr, busy.addr);
            tokio::spawn(async move {
                while running.load(Ordering::Relaxed) {
                    session(proxy, busy, b"live traffic").await;
                    sessions_done.fetch_add(1, Ordering::Relaxed);
                    if let Some(tx) = first.lock().ok().and_then(|mut first| first.take()) {
                        let _ = tx.send(());
                    }
                }
            })
        })
        .collect();
    first_busy.await.expect("live traffic started");

    let before = get_json(stats_addr, "/api/pool/stats").await;
    let url = format!("http://{stats_addr}/");
    let dom = chromium(
        &browser,
        &url,
        Duration::from_secs(15),
        &["--dump-dom".to_string(), "--window-size=1400,1050".to_string()],
    )
    .await;
    let after = get_json(stats_addr, "/api/pool/stats").await;

    assert!(dom.contains("data-state=\"live\""), "the page never rendered a sample:\n{dom}");
    let updates = data_value_after(&dom.replace("data-updates", "data-value"), "<body");
    assert!(updates.is_some_and(|n| n >= 2.0), "the page polled once only: {updates:?}");
    assert!(dom.contains("class=\"pill live\""), "status pill is not live");

    // Settled destination: exactly what the traffic produced.
    let row = destination_row(&dom, &steady.addr.to_string())
        .unwrap_or_else(|| panic!("no row for {}:\n{dom}", steady.addr));
    assert_eq!(data_value_after(row, "data-field=\"hits\""), Some(2.0), "{row}");
    assert_eq!(data_value_after(row, "data-field=\"misses\""), Some(1.0), "{row}");
    assert_eq!(data_value_after(row, "data-field=\"evicted\""), Some(1.0), "{row}");
    assert!(row.contains("/ 1</span>"), "idle vs limit shown: {row}");
    // Busy destination: present, and its figures lie between the samples around the load.
    assert!(destination_row(&dom, &busy.addr.to_string()).is_some(), "no row for the busy one");
    let between = |field: &str, id: &str| {
        let shown = data_value_after(&dom, &format!("id=\"{id}\"")).expect(id);
        let low = before[field].as_f64().expect(field);
        let high = after[field].as_f64().expect(field);
        assert!(low <= shown && shown <= high, "{id} shows {shown}, outside {low}..={high}");
        shown
    };
    let hits = between("pool_hits", "kpi-hits");
    let misses = between("pool_misses", "kpi-misses");
    assert!(hits >= 2.0 && misses >= 3.0, "hits {hits}, misses {misses}");
    between("total_reused", "kpi-reused");
    // The pool's cost on the path, read off the checkout-wait buckets: one of their bounds.
    let wait = data_value_after(&dom, "id=\"kpi-wait-p99\"").expect("checkout wait p99 shown");
    assert!(BOUNDS_US.iter().any(|&bound| bound as f64 == wait), "p99 {wait} is not a bound");
    assert!(dom.contains(" checkouts</div>"), "checkout count shown");
    let sessions = data_value_after(&dom, "id=\"kpi-sessions-sub\"").expect("sessions");
    let low = before["server"]["sessions_total"].as_f64().expect("sessions before");
    let high = after["server"]["sessions_total"].as_f64().expect("sessions after");
    assert!(low <= sessions && sessions <= high, "sessions {sessions} outside {low}..={high}");
    assert!(sessions >= 5.0, "{sessions}");
    // The UDP ASSOCIATE & BIND card: the settled association's figures.
    for (field, expected) in [
        ("udp.associations_active", 1.0),
        ("udp.datagrams_client_to_destination", 1.0),
        ("udp.datagrams_destination_to_client", 1.0),
        ("udp.dropped.fragment", 1.0),
        ("udp.dropped.foreign_source", 0.0),
        ("bind.waits_active", 0.0),
    ] {
        let shown = data_value_after(&dom, &format!("data-field=\"{field}\""));
        assert_eq!(shown, Some(expected), "{field} on the dashboard");
    }
    // The eviction warning, highlighted.
    assert!(
        dom.contains("class=\"event sev-warning\" data-category=\"pool.limit\""),
        "no highlighted warning in the feed:\n{dom}"
    );
    assert!(dom.contains("evicted the least recently pooled spare"), "warning text missing");
    // The chart drew the hit-rate line.
    assert!(dom.contains("<path d=\"M"), "no hit-rate line in the chart");

    // The screenshot, as an artifact.
    let shot_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&shot_dir).expect("screenshot dir");
    let shot = shot_dir.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    // A longer virtual run, so the chart has a few dozen samples to draw.
    let budget = Duration::from_secs(60);
    chromium(
        &browser,
        &url,
        budget,
        &[format!("--screenshot={}", shot.display()), "--window-size=1400,830".to_string()],
    )
    .await;
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 10_000, "screenshot suspiciously small: {} bytes", png.len());
    eprintln!("dashboard screenshot: {}", shot.display());

    association.close().await;
    running.store(false, Ordering::Relaxed);
    for task in traffic {
        task.await.expect("traffic task");
    }
    assert!(sessions_done.load(Ordering::Relaxed) >= 1);
    let mut busy_dest = pool.watch_destination(&TargetAddr::Ip(busy.addr)).await.expect("watch");
    settle(&mut busy_dest, |s| s.is_quiet()).await;
    let final_stats = pool.stats().await.expect("stats");
    assert_eq!(final_stats.connections_in_use, 0);
    assert_eq!(final_stats.pending_creates, 0);
    endpoint.stop().await.expect("stats ran cleanly");
    proxy.stop().await; // stops the pool's actors too
}
