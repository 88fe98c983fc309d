//! The stats endpoint over real sockets: each route with the pool on and off, with values that
//! follow from SOCKS traffic sent through the proxy in the test and checked against what the
//! upstream server really accepted; bad query parameters, unknown routes, wrong methods, the
//! token, and clients that misbehave.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::{connect, connect_with_password, round_trip, test_config, EchoServer, TestProxy};
use poolsocks::config::{Config, UserConfig};
use poolsocks::pool::{DestStats, Pool, PoolStats};
use poolsocks::secret::Secret;
use poolsocks::socks::{ReplyCode, TargetAddr};
use poolsocks::stats::{self, PoolStatsSource, Readiness, StatsContext, StatsOptions};
use poolsocks::upstream::BoxFuture;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

/// Upper bound for anything the tests await; reaching it means a failure, not a slow pass.
const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Rig: a proxy (with or without a pool) and a stats endpoint reading the same pool and metrics.

struct Rig {
    proxy: TestProxy,
    stats: SocketAddr,
    pool: Option<Pool>,
    endpoint: stats::StatsHandle,
}

struct RigOptions {
    config: Config,
    stats: StatsOptions,
    readiness: Readiness,
    /// Replaces the pool as the stats source (for a pool that never answers).
    source: Option<Arc<dyn PoolStatsSource>>,
}

impl RigOptions {
    fn new(pool_enabled: bool) -> Self {
        let mut config = test_config();
        config.server.pool.enabled = pool_enabled;
        RigOptions {
            config,
            // Fresh pool figures on every request: the tests compare them with traffic just sent.
            stats: StatsOptions { pool_stats_ttl: Duration::ZERO, ..StatsOptions::default() },
            readiness: Readiness::listening(),
            source: None,
        }
    }
}

impl Rig {
    async fn start(pool_enabled: bool) -> Rig {
        Rig::start_with(RigOptions::new(pool_enabled)).await
    }

    async fn start_with(options: RigOptions) -> Rig {
        let config = options.config;
        let server = common::build_server(config.clone()).await.expect("server builds");
        // The pool the server built and its connector uses: the endpoint reads the same actors.
        let pool = server.pool();
        assert_eq!(pool.is_some(), config.server.pool.enabled);
        let telemetry = server.telemetry();
        let metrics = server.metrics();
        let proxy = TestProxy::start_server(server).await;

        let mut ctx = StatsContext::new(config, telemetry, metrics)
            .with_pool(pool.clone())
            .with_readiness(options.readiness)
            .with_options(options.stats);
        if let Some(source) = options.source {
            ctx = ctx.with_pool_source(source);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind stats");
        let endpoint = stats::spawn(listener, ctx);
        let stats = endpoint.addr().expect("stats addr");
        Rig { proxy, stats, pool, endpoint }
    }

    fn pool(&self) -> &Pool {
        self.pool.as_ref().expect("this rig has a pool")
    }

    async fn watch(&self, target: SocketAddr) -> watch::Receiver<DestStats> {
        self.pool().watch_destination(&TargetAddr::Ip(target)).await.expect("watch destination")
    }

    async fn stop(self) {
        // Before the server stops: its shutdown stops the pool's actors too.
        if let Some(pool) = &self.pool {
            let stats = pool.stats().await.expect("final pool stats");
            assert_counters_settled(&stats);
        }
        tokio::time::timeout(DEADLINE, self.endpoint.stop())
            .await
            .expect("stats endpoint stops in time")
            .expect("stats endpoint ran cleanly");
        self.proxy.stop().await;
    }
}

/// Counters never lie: nothing in use or pending once the traffic is over.
fn assert_counters_settled(stats: &PoolStats) {
    assert_eq!(stats.connections_in_use, 0, "in use after the test: {stats:?}");
    assert_eq!(stats.pending_creates, 0, "pending after the test: {stats:?}");
}

/// Sessions to `evictor` until `victim`'s spare has been evicted for it: a spare is evicted
/// only for a destination steadily busier than its own (see the pool's budget).
async fn evict_by_demand(
    proxy: SocketAddr,
    evictor: SocketAddr,
    evictor_dest: &mut watch::Receiver<DestStats>,
    victim: &mut watch::Receiver<DestStats>,
) {
    for _ in 0..40 {
        session(proxy, evictor, b"evict").await;
        tokio::time::timeout(DEADLINE, evictor_dest.wait_for(|s| s.is_quiet()))
            .await
            .expect("evictor at rest")
            .expect("watch open");
        if victim.borrow().counters.evicted >= 1 {
            return;
        }
    }
    panic!("never evicted: {:?}", *victim.borrow());
}

/// One SOCKS session through the proxy: CONNECT, echo `payload`, close.
async fn session(proxy: SocketAddr, target: SocketAddr, payload: &[u8]) {
    let (mut stream, reply) = connect(proxy, TargetAddr::Ip(target)).await;
    assert_eq!(reply.code, ReplyCode::Succeeded, "CONNECT to {target}");
    assert_eq!(round_trip(&mut stream, payload).await, payload);
}

/// Waits until the destination's manager has a spare and nothing in flight: the state after
/// a session ended and its replacement spare arrived.
async fn settle(dest: &mut watch::Receiver<DestStats>, idle: usize) -> DestStats {
    let settled = tokio::time::timeout(DEADLINE, dest.wait_for(|s| s.idle == idle && s.is_quiet()))
        .await
        .expect("destination settles in time")
        .expect("destination watch open")
        .clone();
    settled
}

/// Receives exactly `n` accepted connections at the upstream, i.e. what really reached it.
async fn accepted(echo: &mut EchoServer, n: usize) {
    for i in 0..n {
        tokio::time::timeout(DEADLINE, echo.accepted.recv())
            .await
            .unwrap_or_else(|_| panic!("upstream accepted only {i} of {n} connections"))
            .expect("echo server running");
    }
}

// ---------------------------------------------------------------------------------------------
// A small HTTP/1.1 client on a raw socket, so tests also control exactly what goes on the wire.

#[derive(Debug)]
struct Http {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Http {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body))
        })
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("UTF-8 body")
    }
}

async fn send_raw(addr: SocketAddr, raw: &[u8]) -> Http {
    send_raw_from(Ipv4Addr::LOCALHOST, addr, raw).await
}

/// Sends `raw` from the loopback address `source` (any of 127.0.0.0/8).
async fn send_raw_from(source: Ipv4Addr, addr: SocketAddr, raw: &[u8]) -> Http {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(source.into(), 0)).expect("bind source");
    let mut stream = socket.connect(addr).await.expect("connect to stats endpoint");
    stream.write_all(raw).await.expect("send request");
    let mut all = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut all))
        .await
        .expect("response in time")
        .expect("read response");
    parse_response(&all)
}

fn parse_response(all: &[u8]) -> Http {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(all) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("incomplete HTTP response ({other:?}): {:?}", String::from_utf8_lossy(all)),
    };
    Http {
        status: response.code.expect("status code"),
        headers: response
            .headers
            .iter()
            .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
            .collect(),
        body: all[head_len..].to_vec(),
    }
}

async fn request(addr: SocketAddr, method: &str, path: &str, extra_headers: &[&str]) -> Http {
    request_from(Ipv4Addr::LOCALHOST, addr, method, path, extra_headers).await
}

async fn request_from(
    source: Ipv4Addr,
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra_headers: &[&str],
) -> Http {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: stats\r\nConnection: close\r\n");
    for header in extra_headers {
        raw.push_str(header);
        raw.push_str("\r\n");
    }
    raw.push_str("\r\n");
    send_raw_from(source, addr, raw.as_bytes()).await
}

async fn get(addr: SocketAddr, path: &str) -> Http {
    request(addr, "GET", path, &[]).await
}

async fn get_json(addr: SocketAddr, path: &str) -> Value {
    let response = get(addr, path).await;
    assert_eq!(response.status, 200, "GET {path}: {}", String::from_utf8_lossy(&response.body));
    assert_eq!(response.header("content-type"), Some("application/json"));
    response.json()
}

/// Polls `/api/pool/stats` until the handlers of ended sessions have recorded their bytes
/// (they do that after the client sees EOF, and there is no event to await without a pool).
async fn stats_when_sessions_ended(addr: SocketAddr, sessions: u64) -> Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let body = get_json(addr, "/api/pool/stats").await;
        let server = &body["server"];
        if server["sessions_total"] == sessions && server["sessions_active"] == 0 {
            return body;
        }
        assert!(tokio::time::Instant::now() < deadline, "sessions did not end: {server}");
        tokio::task::yield_now().await;
    }
}

fn metric_value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"));
    match sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name} has an unexpected type: {other:?}"),
    }
}

fn scrape_histogram(
    scrape: &prometheus_parse::Scrape,
    name: &str,
) -> Vec<prometheus_parse::HistogramCount> {
    match scrape.samples.iter().find(|s| s.metric == name).map(|s| &s.value) {
        Some(prometheus_parse::Value::Histogram(buckets)) => buckets.clone(),
        other => panic!("{name} is not a histogram: {other:?}"),
    }
}

async fn scrape(addr: SocketAddr) -> (prometheus_parse::Scrape, String) {
    let response = get(addr, "/metrics").await;
    assert_eq!(response.status, 200);
    assert!(
        response.header("content-type").is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        response.header("content-type")
    );
    let text = response.text();
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let parsed =
        prometheus_parse::Scrape::parse(lines).expect("/metrics parses as Prometheus text");
    (parsed, text)
}

// ---------------------------------------------------------------------------------------------
// GET /api/pool/stats

#[tokio::test]
async fn pool_stats_follow_real_traffic() {
    let rig = Rig::start(true).await;
    let mut echo = EchoServer::start().await;
    let mut dest = rig.watch(echo.addr).await;

    // One miss, then two hits; each checkout starts a background dial, so a spare is waiting.
    for round in 0..3 {
        session(rig.proxy.addr, echo.addr, b"hello pool").await;
        let settled = settle(&mut dest, 1).await;
        assert_eq!(settled.counters.hits, round);
    }
    // Miss dial + 3 spares: what the upstream really accepted.
    accepted(&mut echo, 4).await;

    let body = get_json(rig.stats, "/api/pool/stats").await;
    assert_eq!(body["enabled"], true);
    assert_eq!(body["available"], true);
    assert_eq!(body["pool_hits"], 2);
    assert_eq!(body["pool_misses"], 1);
    assert_eq!(body["total_reused"], 2);
    assert_eq!(body["total_created"], 4, "created must equal what the upstream accepted");
    assert_eq!(body["total_idle"], 1);
    assert_eq!(body["destinations"], 1);
    assert_eq!(body["connections_in_use"], 0);
    assert_eq!(body["pending_creates"], 0);
    for field in ["dropped_full", "expired", "evicted"] {
        assert_eq!(body[field], 0, "{field}");
    }
    let hit_rate = body["hit_rate"].as_f64().expect("hit_rate");
    assert!((hit_rate - 2.0 / 3.0).abs() < 1e-9, "{hit_rate}");
    assert_eq!(body["reuse_rate"], 0.5);
    // The pool's cost on each of the three sessions' path: its answer to their checkouts.
    let waits = &body["checkout_wait"];
    assert_eq!(waits["count"], 3, "{waits}");
    let buckets = waits["buckets"].as_array().expect("checkout_wait buckets");
    assert_eq!(buckets.len(), poolsocks::pool::checkout_wait::BOUNDS_US.len());
    assert!(buckets.iter().all(|b| b[1].as_u64() <= Some(3)), "{waits}");

    let per_dest = body["per_destination"].as_array().expect("per_destination");
    assert_eq!(per_dest.len(), 1);
    let row = &per_dest[0];
    assert_eq!(row["destination"], echo.addr.to_string());
    assert_eq!((row["idle"].clone(), row["limit"].clone()), (1.into(), 4.into()));
    assert_eq!((row["hits"].clone(), row["misses"].clone()), (2.into(), 1.into()));
    assert_eq!((row["created"].clone(), row["reused"].clone()), (4.into(), 2.into()));
    assert_eq!(row["in_use"], 0);
    // Last activity is wall-clock time of this test's traffic: within the last minute.
    let last = row["last_activity_ms"].as_u64().expect("last_activity_ms");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    assert!(last <= now_ms && now_ms - last < 60_000, "last activity {last}, now {now_ms}");

    let config = &body["config"]["pool"];
    assert_eq!(config["enabled"], true);
    assert_eq!(config["max_idle_per_dest"], 4);
    assert_eq!(config["max_total_idle"], 100);
    assert_eq!(body["server"]["sessions_total"], 3);
    // Every session ended before its lease came back, so its bytes are counted.
    assert_eq!(body["server"]["bytes_client_to_upstream"], 30);
    assert_eq!(body["server"]["bytes_upstream_to_client"], 30);
    rig.stop().await;
}

#[tokio::test]
async fn pool_stats_with_the_pool_disabled_report_zeros_and_real_sessions() {
    let rig = Rig::start(false).await;
    let mut echo = EchoServer::start().await;
    for _ in 0..3 {
        session(rig.proxy.addr, echo.addr, b"direct").await;
    }
    // Without a pool each session dials its own connection.
    accepted(&mut echo, 3).await;

    let body = stats_when_sessions_ended(rig.stats, 3).await;
    assert_eq!(body["enabled"], false);
    assert_eq!(body["config"]["pool"]["enabled"], false);
    for field in [
        "total_idle",
        "destinations",
        "total_created",
        "total_reused",
        "pool_hits",
        "pool_misses",
        "dropped_full",
        "expired",
        "evicted",
        "connections_in_use",
        "pending_creates",
    ] {
        assert_eq!(body[field], 0, "{field}");
    }
    assert_eq!(body["hit_rate"], 0.0);
    assert_eq!(body["per_destination"], Value::Array(vec![]));
    assert_eq!(body["server"]["bytes_client_to_upstream"], 18);
    assert_eq!(body["server"]["bytes_upstream_to_client"], 18);
    rig.stop().await;
}

#[tokio::test]
async fn pool_stats_never_show_passwords_or_the_token() {
    let mut options = RigOptions::new(true);
    options.config.auth.users =
        vec![UserConfig { username: "alice".into(), password: Secret::new("hunter2-password") }];
    options.config.sessions.stats_api_token = Some(Secret::new("token-xyzzy-42"));
    let rig = Rig::start_with(options).await;
    let echo = EchoServer::start().await;
    let mut dest = rig.watch(echo.addr).await;
    let (mut stream, reply) = connect_with_password(
        rig.proxy.addr,
        TargetAddr::Ip(echo.addr),
        "alice",
        "hunter2-password",
    )
    .await;
    assert_eq!(reply.code, ReplyCode::Succeeded);
    assert_eq!(round_trip(&mut stream, b"x").await, b"x");
    drop(stream);
    settle(&mut dest, 1).await;

    let auth = "Authorization: Bearer token-xyzzy-42";
    for path in ["/api/pool/stats", "/metrics", "/health", "/api/telemetry/events", "/"] {
        let response = request(rig.stats, "GET", path, &[auth]).await;
        assert_eq!(response.status, 200, "{path}");
        let text = String::from_utf8_lossy(&response.body);
        assert!(!text.contains("hunter2"), "{path} shows a password");
        assert!(!text.contains("xyzzy"), "{path} shows the token");
    }
    let body = request(rig.stats, "GET", "/api/pool/stats", &[auth]).await.json();
    assert_eq!(body["config"]["auth"]["users"], 1);
    assert_eq!(body["config"]["stats_api"]["token_required"], true);
    assert_eq!(body["pool_misses"], 1);
    rig.stop().await;
}

// ---------------------------------------------------------------------------------------------
// GET /metrics

#[tokio::test]
async fn metrics_follow_real_traffic_and_parse() {
    let rig = Rig::start(true).await;
    let mut echo = EchoServer::start().await;
    let mut dest = rig.watch(echo.addr).await;
    for _ in 0..3 {
        session(rig.proxy.addr, echo.addr, b"0123456789").await;
        settle(&mut dest, 1).await;
    }
    accepted(&mut echo, 4).await;

    let (parsed, text) = scrape(rig.stats).await;
    let value = |name: &str| metric_value(&parsed, name, &[]);
    assert_eq!(value("poolsocks_pool_enabled"), 1.0);
    assert_eq!(value("poolsocks_pool_up"), 1.0);
    assert_eq!(value("poolsocks_pool_hits_total"), 2.0);
    assert_eq!(value("poolsocks_pool_misses_total"), 1.0);
    assert_eq!(value("poolsocks_pool_connections_created_total"), 4.0);
    assert_eq!(value("poolsocks_pool_connections_reused_total"), 2.0);
    assert_eq!(value("poolsocks_pool_idle_connections"), 1.0);
    assert_eq!(value("poolsocks_pool_connections_in_use"), 0.0);
    assert!((value("poolsocks_pool_hit_ratio") - 2.0 / 3.0).abs() < 1e-9);
    assert_eq!(value("poolsocks_sessions_total"), 3.0);
    assert_eq!(value("poolsocks_sessions_active"), 0.0);
    assert_eq!(value("poolsocks_handshake_failures_total"), 0.0);
    let dir = |d: &str| metric_value(&parsed, "poolsocks_relayed_bytes_total", &[("direction", d)]);
    assert_eq!(dir("client_to_upstream"), 30.0);
    assert_eq!(dir("upstream_to_client"), 30.0);
    let label = echo.addr.to_string();
    let per_dest = |name: &str| metric_value(&parsed, name, &[("destination", &label)]);
    assert_eq!(per_dest("poolsocks_pool_destination_hits_total"), 2.0);
    assert_eq!(per_dest("poolsocks_pool_destination_misses_total"), 1.0);
    assert_eq!(per_dest("poolsocks_pool_destination_idle"), 1.0);
    assert_eq!(per_dest("poolsocks_pool_destination_created_total"), 4.0);
    assert!(per_dest("poolsocks_pool_destination_refill_target") >= 1.0, "refill target exported");
    assert_eq!(per_dest("poolsocks_pool_destination_trimmed_total"), 0.0);
    assert_eq!(value("poolsocks_pool_trimmed_total"), 0.0);
    assert_eq!(value("poolsocks_pool_abandoned_total"), 0.0);
    // Every checkout's wait for its manager is in the histogram: one per session, the first
    // sighting's (answered by the Directory) included.
    assert_eq!(value("poolsocks_pool_checkout_wait_seconds_count"), 3.0);
    let waits = scrape_histogram(&parsed, "poolsocks_pool_checkout_wait_seconds");
    assert_eq!(waits.last().map(|b| (b.less_than, b.count)), Some((f64::INFINITY, 3.0)));
    assert!(waits.windows(2).all(|w| w[0].count <= w[1].count), "cumulative: {waits:?}");
    assert!(text.contains("# TYPE poolsocks_pool_checkout_wait_seconds histogram"), "{text}");
    // The format's own rules, beyond what the parser checks.
    assert!(text.contains("# TYPE poolsocks_pool_hits_total counter"), "{text}");
    assert!(text.contains("# HELP poolsocks_sessions_active "), "{text}");

    // A failed handshake is counted.
    let mut bad = TcpStream::connect(rig.proxy.addr).await.expect("connect");
    bad.write_all(&[4, 1, 0, 80]).await.expect("send a SOCKS4 greeting");
    assert!(common::closed_without_data(&mut bad).await);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (parsed, _) = scrape(rig.stats).await;
        if metric_value(&parsed, "poolsocks_handshake_failures_total", &[]) == 1.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "handshake failure not counted");
        tokio::task::yield_now().await;
    }
    rig.stop().await;
}

#[tokio::test]
async fn metrics_with_the_pool_disabled() {
    let rig = Rig::start(false).await;
    let mut echo = EchoServer::start().await;
    session(rig.proxy.addr, echo.addr, b"abc").await;
    accepted(&mut echo, 1).await;
    stats_when_sessions_ended(rig.stats, 1).await;

    let (parsed, text) = scrape(rig.stats).await;
    assert_eq!(metric_value(&parsed, "poolsocks_pool_enabled", &[]), 0.0);
    assert_eq!(metric_value(&parsed, "poolsocks_pool_up", &[]), 0.0);
    assert_eq!(metric_value(&parsed, "poolsocks_sessions_total", &[]), 1.0);
    let dir = |d: &str| metric_value(&parsed, "poolsocks_relayed_bytes_total", &[("direction", d)]);
    assert_eq!(dir("client_to_upstream"), 3.0);
    assert!(!text.contains("destination="), "no per-destination series without a pool");
    rig.stop().await;
}

#[tokio::test]
async fn metrics_cap_destination_labels_to_the_busiest() {
    let mut options = RigOptions::new(true);
    options.stats.metrics_destination_cap = 2;
    let rig = Rig::start_with(options).await;
    let echoes = [EchoServer::start().await, EchoServer::start().await, EchoServer::start().await];
    // Destination i gets i + 1 sessions, so the two busiest are echoes[1] and echoes[2].
    for (i, echo) in echoes.iter().enumerate() {
        let mut dest = rig.watch(echo.addr).await;
        for _ in 0..=i {
            session(rig.proxy.addr, echo.addr, b"x").await;
            settle(&mut dest, 1).await;
        }
    }
    let (parsed, _) = scrape(rig.stats).await;
    let labelled: Vec<&str> = parsed
        .samples
        .iter()
        .filter(|s| s.metric == "poolsocks_pool_destination_misses_total")
        .filter_map(|s| s.labels.get("destination"))
        .collect();
    let mut expected = vec![echoes[1].addr.to_string(), echoes[2].addr.to_string()];
    expected.sort();
    let mut labelled: Vec<String> = labelled.into_iter().map(String::from).collect();
    labelled.sort();
    assert_eq!(labelled, expected);
    assert_eq!(metric_value(&parsed, "poolsocks_pool_destinations_unlabelled", &[]), 1.0);
    // The totals still include the unlabelled destination: 3 misses, 0 + 1 + 2 hits.
    assert_eq!(metric_value(&parsed, "poolsocks_pool_misses_total", &[]), 3.0);
    assert_eq!(metric_value(&parsed, "poolsocks_pool_hits_total", &[]), 3.0);
    assert_eq!(metric_value(&parsed, "poolsocks_pool_destinations", &[]), 3.0);
    rig.stop().await;
}

// ---------------------------------------------------------------------------------------------
// GET /api/telemetry/events

#[tokio::test]
async fn telemetry_events_show_real_warnings_newest_first_and_filter() {
    // One spare in the whole pool: a second destination's spare evicts the first's (warning).
    let mut options = RigOptions::new(true);
    options.config.server.pool.max_idle_per_dest = 1;
    options.config.server.pool.max_total_idle = 1;
    let rig = Rig::start_with(options).await;
    let first = EchoServer::start().await;
    let second = EchoServer::start().await;
    let mut first_dest = rig.watch(first.addr).await;
    let mut second_dest = rig.watch(second.addr).await;

    session(rig.proxy.addr, first.addr, b"a").await;
    settle(&mut first_dest, 1).await;
    evict_by_demand(rig.proxy.addr, second.addr, &mut second_dest, &mut first_dest).await;
    settle(&mut second_dest, 1).await;
    tokio::time::timeout(DEADLINE, first_dest.wait_for(|s| s.counters.evicted == 1 && s.idle == 0))
        .await
        .expect("eviction in time")
        .expect("watch open");

    let all = get_json(rig.stats, "/api/telemetry/events").await;
    assert_eq!(all["enabled"], true);
    let events = all["events"].as_array().expect("events");
    let eviction = events
        .iter()
        .find(|e| {
            e["category"] == "pool.limit" && e["message"].as_str().unwrap_or("").contains("evict")
        })
        .unwrap_or_else(|| panic!("no eviction event in {all:#}"));
    assert_eq!(eviction["severity"], "warning");
    assert_eq!(eviction["details"]["destination"], first.addr.to_string());
    let times: Vec<u64> = events.iter().map(|e| e["timestamp_ms"].as_u64().expect("ts")).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first: {times:?}");
    assert_eq!(all["count"], events.len());

    let warnings = get_json(rig.stats, "/api/telemetry/events?severity=warning").await;
    let warnings = warnings["events"].as_array().expect("events");
    assert!(!warnings.is_empty());
    assert!(warnings.iter().all(|e| e["severity"] == "warning"));

    let errors =
        get_json(rig.stats, "/api/telemetry/events?severity=error&category=pool.limit").await;
    assert_eq!(errors["count"], 0, "{errors:#}");

    let limited = get_json(rig.stats, "/api/telemetry/events?limit=1&minutes=5").await;
    assert_eq!(limited["count"], 1);
    assert_eq!(limited["events"][0], events[0], "limit keeps the newest");
    assert_eq!(limited["query"]["limit"], 1);
    assert_eq!(limited["query"]["minutes"], 5);

    let by_category = get_json(rig.stats, "/api/telemetry/events?category=pool.limit").await;
    assert!(by_category["events"]
        .as_array()
        .expect("events")
        .iter()
        .all(|e| e["category"] == "pool.limit"));
    assert!(by_category["count"].as_u64().expect("count") >= 1);

    let other = get_json(rig.stats, "/api/telemetry/events?category=no.such.category").await;
    assert_eq!(other["count"], 0);
    rig.stop().await;
}

#[tokio::test]
async fn telemetry_disabled_reports_so_and_records_nothing() {
    // The same eviction as above, with telemetry off: nothing is recorded, and the route says
    // why the feed is empty.
    let mut options = RigOptions::new(true);
    options.config.telemetry.enabled = false;
    options.config.server.pool.max_idle_per_dest = 1;
    options.config.server.pool.max_total_idle = 1;
    let rig = Rig::start_with(options).await;
    let (first, second) = (EchoServer::start().await, EchoServer::start().await);
    let mut first_dest = rig.watch(first.addr).await;
    let mut second_dest = rig.watch(second.addr).await;
    session(rig.proxy.addr, first.addr, b"a").await;
    settle(&mut first_dest, 1).await;
    evict_by_demand(rig.proxy.addr, second.addr, &mut second_dest, &mut first_dest).await;
    tokio::time::timeout(DEADLINE, first_dest.wait_for(|s| s.counters.evicted == 1))
        .await
        .expect("eviction in time")
        .expect("watch open");
    settle(&mut second_dest, 1).await;

    let body = get_json(rig.stats, "/api/telemetry/events").await;
    assert_eq!(body["enabled"], false);
    assert_eq!(body["count"], 0);
    assert_eq!(body["recorded"], 0);
    assert_eq!(get_json(rig.stats, "/api/pool/stats").await["evicted"], 1);
    rig.stop().await;
}

#[tokio::test]
async fn telemetry_bad_query_parameters_get_400_naming_the_parameter() {
    let rig = Rig::start(false).await;
    let long = "9".repeat(5000);
    let cases = [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("limit=", "limit"),
        ("minutes=-5", "minutes"),
        ("minutes=0", "minutes"),
        (long.as_str(), long.as_str()),
        ("severity=fatal", "severity"),
        ("category=%3Cscript%3E", "category"),
        ("limit=1&limit=2", "limit"),
        ("since=5", "since"),
    ];
    for (query, parameter) in cases {
        let response = get(rig.stats, &format!("/api/telemetry/events?{query}")).await;
        assert_eq!(response.status, 400, "?{query}");
        assert_eq!(response.header("content-type"), Some("application/json"));
        let body = response.json();
        let expected_parameter = if parameter.len() > 100 { None } else { Some(parameter) };
        if let Some(parameter) = expected_parameter {
            assert_eq!(body["parameter"], parameter, "?{query}: {body}");
            assert!(body["error"].as_str().expect("error").contains(parameter), "{body}");
        } else {
            // A huge unknown name is named, shortened, never echoed whole.
            assert!(body["parameter"].as_str().expect("parameter").len() < 100, "{body}");
        }
    }
    rig.stop().await;
}

// ---------------------------------------------------------------------------------------------
// GET /health, and the pool read with a timeout

#[tokio::test]
async fn health_is_ready_when_listening_and_the_pool_answers() {
    let rig = Rig::start(true).await;
    let response = get(rig.stats, "/health").await;
    assert_eq!(response.status, 200);
    let body = response.json();
    assert_eq!((body["live"].clone(), body["ready"].clone()), (true.into(), true.into()));
    assert_eq!(body["checks"]["pool"]["state"], "up");
    assert_eq!(body["checks"]["listener"]["state"], "listening");

    // The pool's actors stop: readiness follows, liveness does not.
    rig.pool().shutdown().await;
    let response = get(rig.stats, "/health").await;
    assert_eq!(response.status, 503);
    let body = response.json();
    assert_eq!((body["live"].clone(), body["ready"].clone()), (true.into(), false.into()));
    assert_eq!(body["checks"]["pool"]["state"], "unresponsive");
    let stats = get(rig.stats, "/api/pool/stats").await;
    assert_eq!(stats.status, 503);
    assert_eq!(stats.json()["available"], false);
    rig.endpoint.stop().await.expect("stats endpoint ran cleanly");
    rig.proxy.stop().await;
}

#[tokio::test]
async fn health_is_not_ready_before_the_listener_is() {
    let readiness = Readiness::new();
    let mut options = RigOptions::new(false);
    options.readiness = readiness.clone();
    let rig = Rig::start_with(options).await;
    let body = get(rig.stats, "/health").await;
    assert_eq!(body.status, 503);
    assert_eq!(body.json()["checks"]["listener"]["state"], "not listening");
    assert_eq!(body.json()["checks"]["pool"]["state"], "disabled");
    readiness.set_listening(true);
    assert_eq!(get(rig.stats, "/health").await.status, 200);
    rig.stop().await;
}

/// Stands in for a wedged Directory (which the pool's own API cannot produce: it answers
/// stats from published snapshots): a stats call that never completes.
struct NeverAnswers;

impl PoolStatsSource for NeverAnswers {
    fn stats(&self) -> BoxFuture<'_, Result<PoolStats, String>> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test]
async fn a_pool_that_never_answers_costs_a_request_the_timeout_and_no_more() {
    let mut options = RigOptions::new(true);
    options.source = Some(Arc::new(NeverAnswers));
    options.stats.pool_call_timeout = Duration::from_millis(200);
    let rig = Rig::start_with(options).await;

    let stats = get(rig.stats, "/api/pool/stats").await;
    assert_eq!(stats.status, 503);
    let body = stats.json();
    assert_eq!(body["available"], false);
    assert!(body["error"].as_str().expect("error").contains("did not answer"), "{body}");
    assert_eq!(body["pool_hits"], 0, "zeros keep the shape");

    let (parsed, _) = scrape(rig.stats).await;
    assert_eq!(metric_value(&parsed, "poolsocks_pool_up", &[]), 0.0);
    assert_eq!(get(rig.stats, "/health").await.status, 503);

    // The proxy itself is unaffected.
    let echo = EchoServer::start().await;
    let mut dest = rig.watch(echo.addr).await;
    session(rig.proxy.addr, echo.addr, b"still serving").await;
    settle(&mut dest, 1).await;
    rig.stop().await;
}

// ---------------------------------------------------------------------------------------------
// GET /, unknown routes, wrong methods

#[tokio::test]
async fn dashboard_is_one_self_contained_page() {
    let rig = Rig::start(false).await;
    let response = get(rig.stats, "/").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("text/html; charset=utf-8"));
    let csp = response.header("content-security-policy").expect("CSP");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    let html = response.text();
    assert!(html.contains("<svg id=\"chart\""));
    assert!(html.contains("api/pool/stats") && html.contains("api/telemetry/events"));
    // No external resource of any kind.
    for external in ["http://", "https://", "//cdn", "<link ", "src=\""] {
        let count = html.matches(external).count();
        let allowed = if external == "http://" { 1 } else { 0 }; // the SVG namespace URI
        assert_eq!(count, allowed, "{external:?} in the page");
    }
    rig.stop().await;
}

#[tokio::test]
async fn unknown_routes_get_404_json_and_wrong_methods_405_with_allow() {
    let rig = Rig::start(false).await;
    for path in ["/nope", "/api", "/api/pool/stats/extra", "/metrics.json", "/%00"] {
        let response = get(rig.stats, path).await;
        assert_eq!(response.status, 404, "{path}");
        assert_eq!(response.header("content-type"), Some("application/json"));
        assert_eq!(response.json()["path"], path);
    }
    for path in ["/", "/api/pool/stats", "/api/telemetry/events", "/metrics", "/health"] {
        for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
            let response = request(rig.stats, method, path, &[]).await;
            assert_eq!(response.status, 405, "{method} {path}");
            assert_eq!(response.header("allow"), Some("GET, HEAD"), "{method} {path}");
            assert!(response.json()["error"].as_str().expect("error").contains(method));
        }
        let head = request(rig.stats, "HEAD", path, &[]).await;
        assert_eq!(head.status, 200, "HEAD {path}");
        assert!(head.body.is_empty(), "HEAD {path} has no body");
    }
    rig.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The token

#[tokio::test]
async fn every_route_but_health_requires_the_token_when_one_is_set() {
    let mut options = RigOptions::new(true);
    options.config.sessions.stats_api_token = Some(Secret::new("s3cret-token"));
    let rig = Rig::start_with(options).await;
    let paths = ["/", "/api/pool/stats", "/api/telemetry/events", "/metrics", "/nope"];
    for (i, path) in paths.into_iter().enumerate() {
        // One source per path: five wrong tokens each, under the limit of ten per source.
        let source = Ipv4Addr::new(127, 0, 1, 1 + i as u8);
        for auth in [
            None,
            Some("Authorization: Bearer wrong"),
            Some("Authorization: Bearer s3cret-toke"),
            Some("Authorization: Bearer s3cret-token-and-more"),
            Some("Authorization: s3cret-token"),
            Some("Authorization: Basic dXNlcjp3cm9uZw=="), // user:wrong
        ] {
            let headers: Vec<&str> = auth.into_iter().collect();
            let response = request_from(source, rig.stats, "GET", path, &headers).await;
            assert_eq!(response.status, 401, "{path} with {auth:?}");
            let challenge = response.header("www-authenticate").expect("challenge");
            assert!(challenge.starts_with("Bearer"), "{challenge}");
            assert_eq!(response.header("content-type"), Some("application/json"));
        }
        let ok =
            request_from(source, rig.stats, "GET", path, &["Authorization: Bearer s3cret-token"])
                .await;
        let expected = if path == "/nope" { 404 } else { 200 };
        assert_eq!(ok.status, expected, "{path} with the token");
        // What a browser sends after the Basic prompt: any user, the token as password.
        let basic = request_from(
            source,
            rig.stats,
            "GET",
            path,
            &["Authorization: Basic b3BzOnMzY3JldC10b2tlbg=="],
        )
        .await;
        assert_eq!(basic.status, expected, "{path} with Basic");
    }
    // Liveness and readiness only, for balancers whose checks carry no token.
    assert_eq!(get(rig.stats, "/health").await.status, 200);
    // Only the page asks a browser to prompt.
    let page = get(rig.stats, "/").await;
    assert!(page.header("www-authenticate").expect("challenge").contains("Basic"));
    let api = get(rig.stats, "/metrics").await;
    assert!(!api.header("www-authenticate").expect("challenge").contains("Basic"));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_needs_no_token_and_a_source_guessing_it_gets_429_while_others_are_served() {
    let mut options = RigOptions::new(true);
    options.config.sessions.stats_api_token = Some(Secret::new("s3cret-token"));
    let rig = Rig::start_with(options).await;
    let guesser = Ipv4Addr::new(127, 0, 2, 1);
    let other = Ipv4Addr::new(127, 0, 2, 2);
    let right = "Authorization: Bearer s3cret-token";

    let health = get(rig.stats, "/health").await;
    assert_eq!(health.status, 200, "{}", health.text());
    assert_eq!(health.json()["ready"], true);
    for i in 0..10 {
        let wrong = format!("Authorization: Bearer guess-{i}");
        let response = request_from(guesser, rig.stats, "GET", "/metrics", &[&wrong]).await;
        assert_eq!(response.status, 401, "guess {i}");
    }
    // The right token no longer helps the guesser (it is not even compared) ...
    let limited = request_from(guesser, rig.stats, "GET", "/api/pool/stats", &[right]).await;
    assert_eq!(limited.status, 429, "{}", limited.text());
    assert_eq!(limited.header("retry-after"), Some("60"));
    // ... nor does a request without credentials, but /health stays open to it.
    assert_eq!(request_from(guesser, rig.stats, "GET", "/metrics", &[]).await.status, 429);
    assert_eq!(request_from(guesser, rig.stats, "GET", "/health", &[]).await.status, 200);
    // Another source with the token is served, and sees the failures counted.
    let stats = request_from(other, rig.stats, "GET", "/api/pool/stats", &[right]).await;
    assert_eq!(stats.status, 200, "{}", stats.text());
    let counted = &stats.json()["stats_api"];
    assert_eq!(counted["token_failures"], 10, "{counted}");
    assert_eq!(counted["token_rate_limited"], 2, "{counted}");
    let scrape = request_from(other, rig.stats, "GET", "/metrics", &[right]).await;
    let lines = scrape.text();
    let parsed = prometheus_parse::Scrape::parse(lines.lines().map(|l| Ok(l.to_string())))
        .expect("/metrics parses");
    assert_eq!(metric_value(&parsed, "poolsocks_stats_token_failures_total", &[]), 10.0);
    assert_eq!(metric_value(&parsed, "poolsocks_stats_token_rate_limited_total", &[]), 2.0);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_logs_wrong_tokens_naming_the_source() {
    let mut daemon = common::daemon::Daemon::start(
        "[server]\nbind_port = 0\n[sessions]\nstats_api_enabled = true\nstats_api_port = 0\n\
         stats_api_token = \"s3cret-token\"\n",
    );
    let stats = daemon.await_stats_addr();
    let guesser = Ipv4Addr::new(127, 0, 3, 7);
    for i in 0..3 {
        let wrong = format!("Authorization: Bearer guess-{i}");
        assert_eq!(request_from(guesser, stats, "GET", "/metrics", &[&wrong]).await.status, 401);
    }
    let line = daemon.await_log("stats endpoint: wrong token");
    assert!(line.contains("WARN") && line.contains("127.0.3.7"), "{line}");
    assert!(line.contains("token_failures_not_logged=0"), "{line}");
    assert!(!line.contains("guess-"), "the guess itself is not logged: {line}");
}

// ---------------------------------------------------------------------------------------------
// Clients that misbehave

#[tokio::test]
async fn slow_or_oversized_requests_are_cut_and_the_proxy_keeps_serving() {
    let mut options = RigOptions::new(true);
    options.stats.header_read_timeout = Duration::from_millis(300);
    let rig = Rig::start_with(options).await;
    let echo = EchoServer::start().await;

    // A client that never finishes its headers is closed after the header timeout, while
    // the proxy serves on.
    let mut slow = TcpStream::connect(rig.stats).await.expect("connect");
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").await.expect("partial head");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "a slow client was not cut");

    // A head over the size bound is refused, not buffered.
    let huge = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
    let mut big = TcpStream::connect(rig.stats).await.expect("connect");
    let _ = big.write_all(huge.as_bytes()).await; // the server may close before reading it all
    let mut answer = Vec::new();
    let _ =
        tokio::time::timeout(DEADLINE, big.read_to_end(&mut answer)).await.expect("cut in time");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 431"), "{text}");

    // A request with a body is refused.
    let with_body = send_raw(
        rig.stats,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert_eq!(with_body.status, 413);

    let mut dest = rig.watch(echo.addr).await;
    session(rig.proxy.addr, echo.addr, b"proxy unaffected").await;
    settle(&mut dest, 1).await;
    rig.stop().await;
}

#[tokio::test]
async fn at_the_cap_the_longest_waiting_connection_makes_room_and_the_proxy_keeps_serving() {
    let mut options = RigOptions::new(true);
    options.stats.max_connections = 3;
    // Any waiting connection may make room (the daemon spares those younger than 100 ms).
    options.stats.evictable_after = Duration::ZERO;
    let rig = Rig::start_with(options).await;
    let echo = EchoServer::start().await;
    let mut dest = rig.watch(echo.addr).await;

    // Fill every connection slot with clients that never finish a request (the header
    // timeout is the default 5 s, far longer than this part takes).
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(rig.stats).await.expect("connect");
        stream.write_all(b"G").await.expect("one byte");
        idle.push(stream);
    }
    // A health check still gets its answer: the oldest idle connection is closed for it.
    for _ in 0..5 {
        let response = request(rig.stats, "GET", "/health", &[]).await;
        assert_eq!(response.status, 200, "a health check at the cap is answered");
    }
    let mut oldest = idle.remove(0);
    let mut nothing = Vec::new();
    let read = tokio::time::timeout(DEADLINE, oldest.read_to_end(&mut nothing))
        .await
        .expect("the oldest idle connection is closed");
    assert!(read.is_err() || nothing.is_empty(), "closed without an answer");
    session(rig.proxy.addr, echo.addr, b"proxy unaffected").await;
    settle(&mut dest, 1).await;
    rig.stop().await;
}

#[tokio::test]
async fn shutdown_stops_the_endpoint_and_closes_its_port() {
    let rig = Rig::start(false).await;
    assert_eq!(get(rig.stats, "/health").await.status, 200);
    let addr = rig.stats;
    rig.stop().await;
    assert!(TcpStream::connect(addr).await.is_err(), "the port is closed after shutdown");
}

// ---------------------------------------------------------------------------------------------
// The endpoint as the daemon runs it: started by `Server::run` beside the SOCKS listener.

#[tokio::test]
async fn the_server_runs_the_endpoint_when_enabled_and_stops_it_with_itself() {
    let mut config = test_config();
    config.server.pool.enabled = true;
    config.sessions.stats_api_enabled = true;
    config.sessions.stats_api_port = 0;
    let server = common::build_server(config).await.expect("server builds");
    let stats = server.stats_addr().expect("stats endpoint bound");
    let pool = server.pool().expect("pool");
    let proxy = TestProxy::start_server(server).await;
    let echo = EchoServer::start().await;
    let mut dest = pool.watch_destination(&TargetAddr::Ip(echo.addr)).await.expect("watch");
    for _ in 0..2 {
        session(proxy.addr, echo.addr, b"wired").await;
        settle(&mut dest, 1).await;
    }

    let health = get(stats, "/health").await;
    assert_eq!(health.status, 200, "{}", health.text());
    let body = get_json(stats, "/api/pool/stats").await;
    assert_eq!((body["pool_hits"].clone(), body["pool_misses"].clone()), (1.into(), 1.into()));
    assert_eq!(body["server"]["sessions_total"], 2);
    let (parsed, _) = scrape(stats).await;
    assert_eq!(metric_value(&parsed, "poolsocks_pool_hits_total", &[]), 1.0);

    proxy.stop().await;
    assert!(TcpStream::connect(stats).await.is_err(), "the endpoint stops with the server");
}

#[tokio::test]
async fn a_server_without_the_endpoint_binds_nothing() {
    let server = common::build_server(test_config()).await.expect("server builds");
    assert_eq!(server.stats_addr(), None);
}
