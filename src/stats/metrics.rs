//! `GET /metrics`: Prometheus text exposition (format 0.0.4) through `prometheus-client`.
//!
//! The figures live in the actors and in `ServerMetrics`, not in prometheus-client's types, so
//! each scrape fills a fresh registry from one consistent snapshot and encodes it. Per-destination
//! series are capped to the busiest destinations: destination names come from SOCKS clients, and
//! an unbounded label set would let any client grow every scrape without limit.

use std::sync::atomic::AtomicU64;

use hyper::{Response, StatusCode};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::pool_stats::ratio;
use super::pool_view::PoolView;
use super::response::{self, Body};
use super::router::Shared;
use crate::pool::{CheckoutWaitStats, DestStats, PoolStats};
use crate::server::metrics::{BindOutcome, DropReason, ServerMetricsSnapshot};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestinationLabel {
    destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabel {
    command: &'static str,
}

pub(super) async fn handle(shared: &Shared) -> Response<Body> {
    let view = shared.pool.read().await;
    let text = render(shared, &view);
    match text {
        Ok(text) => response::with_body(StatusCode::OK, prometheus_text::CONTENT_TYPE, text),
        // Only a `fmt::Write` into a String, which does not fail; answered properly regardless.
        Err(_) => response::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "could not encode metrics",
            serde_json::json!({}),
        ),
    }
}

fn render(shared: &Shared, view: &PoolView) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("poolsocks");
    let ctx = &shared.ctx;

    let server = ctx.server_metrics.snapshot();
    gauge(
        &mut registry,
        "sessions_active",
        "SOCKS sessions being served now",
        server.sessions_active,
    );
    counter(
        &mut registry,
        "sessions",
        "SOCKS sessions accepted since start",
        server.sessions_total,
    );
    let by_command = Family::<CommandLabel, Counter>::default();
    for (command, count) in [
        ("connect", server.sessions_by_command.connect),
        ("bind", server.sessions_by_command.bind),
        ("udp_associate", server.sessions_by_command.udp_associate),
    ] {
        by_command.get_or_create(&CommandLabel { command }).inc_by(count);
    }
    registry.register(
        "command_sessions",
        "SOCKS sessions started since start, by command",
        by_command,
    );
    let relayed = Family::<DirectionLabel, Counter>::default();
    for (direction, bytes) in [
        ("client_to_upstream", server.bytes_client_to_upstream),
        ("upstream_to_client", server.bytes_upstream_to_client),
    ] {
        relayed.get_or_create(&DirectionLabel { direction }).inc_by(bytes);
    }
    registry.register("relayed_bytes", "Bytes relayed between clients and upstreams", relayed);
    counter(
        &mut registry,
        "handshake_failures",
        "SOCKS handshakes that failed (bad greeting, auth, request or timeout)",
        server.handshake_failures,
    );
    counter(
        &mut registry,
        "rejected_over_limit",
        "Clients closed at once because max_connections were being served",
        server.rejected_over_limit,
    );
    let proxy_rejected = Family::<ReasonLabel, Counter>::default();
    for (reason, count) in [
        ("untrusted_source", server.proxy_untrusted),
        ("invalid_header", server.proxy_header_invalid),
    ] {
        proxy_rejected.get_or_create(&ReasonLabel { reason }).inc_by(count);
    }
    registry.register(
        "proxy_protocol_rejected",
        "Connections closed before SOCKS with the PROXY protocol on: source not trusted, or header missing, invalid or late",
        proxy_rejected,
    );
    let logins = Family::<OutcomeLabel, Counter>::default();
    for (outcome, count) in [
        ("accepted", server.auth.logins_accepted),
        ("rejected", server.auth.logins_rejected),
        ("rate_limited", server.auth.logins_rate_limited),
        ("shed", server.auth.logins_shed),
    ] {
        logins.get_or_create(&OutcomeLabel { outcome }).inc_by(count);
    }
    registry.register("logins", "RFC 1929 logins by outcome", logins);
    counter(
        &mut registry,
        "argon2_checks",
        "argon2 password checks run (real and decoy), at most 2 at once",
        server.auth.argon2_checks,
    );
    let tokens = shared.tokens.counts();
    counter(
        &mut registry,
        "stats_token_failures",
        "Stats requests with a wrong token (/health takes none)",
        tokens.token_failures,
    );
    counter(
        &mut registry,
        "stats_token_rate_limited",
        "Stats requests refused with 429: too many wrong tokens from their source address",
        tokens.token_rate_limited,
    );
    udp_and_bind(&mut registry, &server);
    let status = ctx.config.status();
    gauge(
        &mut registry,
        "config_last_reload_successful",
        "0 when the last reload was refused (the previous config is still in force), else 1",
        u64::from(status.last_reload_successful),
    );
    gauge(
        &mut registry,
        "config_last_reload_timestamp_seconds",
        "When the config in force was loaded (start or last applied reload), Unix seconds",
        status.loaded_at_ms / 1000,
    );
    counter(&mut registry, "config_reloads", "Reloads applied since start", status.reloads_applied);
    counter(
        &mut registry,
        "config_reloads_refused",
        "Reloads refused since start (invalid file, or a key that needs a restart)",
        status.reloads_refused,
    );
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct HashLabel {
        hash: String,
    }
    let info = Family::<HashLabel, Gauge>::default();
    info.get_or_create(&HashLabel { hash: status.config_hash.clone() }).set(1);
    registry.register(
        "config_info",
        "1, labelled with the BLAKE2s-256 hash of the effective config in force",
        info,
    );
    let (held, recorded) = ctx.telemetry.counts();
    gauge(&mut registry, "telemetry_events_held", "Telemetry events held now", held as u64);
    counter(&mut registry, "telemetry_events", "Telemetry events recorded since start", recorded);

    let pool = registry.sub_registry_with_prefix("pool");
    gauge(
        pool,
        "enabled",
        "1 when the connection pool is enabled",
        u64::from(shared.pool.enabled()),
    );
    let up = matches!(view, PoolView::Up(_));
    gauge(pool, "up", "1 when the pool's actors answered this scrape in time", u64::from(up));
    let live = ctx.config.current();
    let config = &live.server.pool;
    gauge(
        pool,
        "max_idle_per_dest",
        "Configured spares per destination",
        config.max_idle_per_dest as u64,
    );
    gauge(
        pool,
        "max_total_idle",
        "Configured spares across all destinations",
        config.max_total_idle as u64,
    );
    if let PoolView::Up(stats) = view {
        pool_totals(pool, stats);
        per_destination(pool, &stats.per_destination, ctx.options.metrics_destination_cap);
    }

    let mut text = String::new();
    prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}

fn udp_and_bind(registry: &mut Registry, server: &ServerMetricsSnapshot) {
    let udp = &server.udp;
    let registry_udp = registry.sub_registry_with_prefix("udp");
    gauge(
        registry_udp,
        "associations_active",
        "UDP associations open now",
        udp.associations_active,
    );
    counter(
        registry_udp,
        "associations",
        "UDP associations opened since start",
        udp.associations_total,
    );
    counter(
        registry_udp,
        "associations_refused",
        "UDP associations refused because the descriptors kept for them were in use",
        udp.associations_refused,
    );
    let datagrams = Family::<DirectionLabel, Counter>::default();
    let bytes = Family::<DirectionLabel, Counter>::default();
    for (direction, count, size) in [
        (
            "client_to_destination",
            udp.datagrams_client_to_destination,
            udp.bytes_client_to_destination,
        ),
        (
            "destination_to_client",
            udp.datagrams_destination_to_client,
            udp.bytes_destination_to_client,
        ),
    ] {
        datagrams.get_or_create(&DirectionLabel { direction }).inc_by(count);
        bytes.get_or_create(&DirectionLabel { direction }).inc_by(size);
    }
    registry_udp.register("datagrams", "UDP datagrams relayed", datagrams);
    registry_udp.register("bytes", "UDP payload bytes relayed (SOCKS headers not counted)", bytes);
    let dropped = Family::<ReasonLabel, Counter>::default();
    for reason in DropReason::ALL {
        dropped
            .get_or_create(&ReasonLabel { reason: reason.name() })
            .inc_by(udp.dropped.get(reason));
    }
    registry_udp.register("dropped", "UDP datagrams dropped, by reason", dropped);

    let bind = &server.bind;
    let registry_bind = registry.sub_registry_with_prefix("bind");
    gauge(registry_bind, "waits_active", "BINDs waiting for their peer now", bind.waits_active);
    counter(
        registry_bind,
        "refused_peers",
        "Connections to a BIND port refused: not from the host the BIND named",
        bind.refused_peers,
    );
    let outcomes = Family::<OutcomeLabel, Counter>::default();
    for outcome in BindOutcome::ALL {
        outcomes
            .get_or_create(&OutcomeLabel { outcome: outcome.name() })
            .inc_by(bind.outcomes.get(outcome));
    }
    registry_bind.register("outcomes", "BINDs ended waiting, by outcome", outcomes);
}

fn pool_totals(registry: &mut Registry, stats: &PoolStats) {
    gauge(registry, "idle_connections", "Spares held now", stats.total_idle as u64);
    gauge(registry, "destinations", "Destinations with a PoolManager", stats.destinations as u64);
    gauge(
        registry,
        "cheap_destinations",
        "Destinations dialed as cheaply as a message: no manager, no spare",
        stats.cheap_destinations as u64,
    );
    gauge(
        registry,
        "connections_in_use",
        "Pooled or leased connections in use by sessions",
        stats.connections_in_use,
    );
    gauge(registry, "pending_creates", "Background dials in flight", stats.pending_creates);
    let hit_ratio = Gauge::<f64, AtomicU64>::default();
    hit_ratio.set(ratio(stats.pool_hits, stats.pool_hits + stats.pool_misses));
    registry.register(
        "hit_ratio",
        "Checkouts answered by a spare, of all checkouts since start",
        hit_ratio,
    );
    registry.register_with_unit(
        "checkout_wait",
        "Time a checkout waited for its PoolManager's answer: what the pool adds to a session's path",
        Unit::Seconds,
        WaitHistogram(stats.checkout_wait.clone()),
    );
    let budget = &stats.budget;
    gauge(
        registry,
        "budget_slots_in_use",
        "GlobalBudget slots reserved, lent, pooled or evicting",
        budget.in_use() as u64,
    );
    gauge(
        registry,
        "budget_high_water",
        "Most GlobalBudget slots ever in use at once",
        budget.high_water as u64,
    );
    for (name, help, value) in [
        (
            "connections_created",
            "Upstream connections opened (spares and misses)",
            stats.total_created,
        ),
        ("connections_reused", "Spares handed to a client", stats.total_reused),
        ("hits", "Checkouts answered by a spare", stats.pool_hits),
        ("misses", "Checkouts that had to dial", stats.pool_misses),
        (
            "dropped_full",
            "Untouched connections not pooled because a cap was full",
            stats.dropped_full,
        ),
        ("expired", "Spares closed for exceeding idle_timeout", stats.expired),
        ("evicted", "Spares evicted by the global budget", stats.evicted),
        ("connect_failures", "Failed dials", stats.connect_failures),
        ("validation_drops", "Spares found broken at checkout", stats.validation_drops),
        ("peer_closed", "Idle spares closed by their peer", stats.peer_closed),
        (
            "returned_untouched",
            "Connections handed back unused and pooled again",
            stats.returned_untouched,
        ),
        ("refill_denied", "Background dials refused by the global budget", stats.refill_denied),
        (
            "budget_denied_colder",
            "Slots refused: the requester was not clearly busier than the spare it would evict",
            stats.budget.denied_colder,
        ),
        (
            "first_sightings",
            "Checkouts of a destination seen for the first time: dialed directly, no spare",
            stats.first_sightings,
        ),
        (
            "bypassed",
            "Checkouts of destinations kept without spares (cheap dial, excluded), no message",
            stats.bypassed,
        ),
        (
            "destinations_forgotten",
            "Destinations forgotten to stay within max_destinations",
            stats.destinations_forgotten,
        ),
        (
            "stale_checkouts",
            "Spares found unusable at hand-out; their clients got another connection",
            stats.stale_checkouts,
        ),
        (
            "retired_early",
            "Spares closed before their server's learned idle limit",
            stats.retired_early,
        ),
        ("trimmed", "Surplus spares closed after demand fell", stats.trimmed),
        (
            "closed_by_rules",
            "Spares closed because a reloaded config no longer allows their peer",
            stats.closed_by_rules,
        ),
        ("manager_restarts", "PoolManagers restarted after a failure", stats.manager_restarts),
        (
            "destinations_pruned",
            "Cold destinations whose PoolManager was stopped",
            stats.destinations_pruned,
        ),
        (
            "fallback_dials",
            "Checkouts answered by a direct dial because the pool was slow or down",
            stats.fallback_dials,
        ),
        (
            "abandoned",
            "Checkouts whose caller had timed out before the PoolManager got to them",
            stats.abandoned,
        ),
    ] {
        counter(registry, name, help, value);
    }
}

fn per_destination(registry: &mut Registry, dests: &[DestStats], cap: usize) {
    // The busiest destinations keep their series; ties broken by name so the choice is stable.
    let mut ranked: Vec<&DestStats> = dests.iter().collect();
    ranked.sort_by(|a, b| {
        activity(b).cmp(&activity(a)).then_with(|| a.destination.cmp(&b.destination))
    });
    let (shown, hidden) = ranked.split_at(cap.min(ranked.len()));
    gauge(
        registry,
        "destinations_unlabelled",
        "Destinations over the label cap: counted in the totals only",
        hidden.len() as u64,
    );

    let dest = registry.sub_registry_with_prefix("destination");
    let gauges: [DestSeries; 6] = [
        ("idle", "Spares held for the destination", |d| d.idle as u64),
        ("in_use", "Leases outstanding for the destination", |d| d.in_use),
        ("pending_creates", "Background dials in flight for the destination", |d| {
            d.pending_creates
        }),
        (
            "refill_target",
            "Spares the destination aims for (checkouts/s x dial time + headroom)",
            |d| d.refill.refill_target as u64,
        ),
        (
            "spare_target",
            "Spares the destination gets after the policy (0 where a spare cannot pay)",
            |d| d.policy.target as u64,
        ),
        ("speaks_first", "1 when the destination's server sends bytes before the client", |d| {
            u64::from(d.policy.speaks_first)
        }),
    ];
    for (name, help, value) in gauges {
        let family = Family::<DestinationLabel, Gauge>::default();
        for d in shown {
            family.get_or_create(&label(d)).set(clamp_i64(value(d)));
        }
        dest.register(name, help, family);
    }
    // In seconds as Prometheus wants them, fractions kept: a limit under a second is no 0.
    let idle_limit = Family::<DestinationLabel, Gauge<f64, AtomicU64>>::default();
    for d in shown {
        let seconds = d.policy.server_idle_limit_ms.map_or(0.0, |ms| ms as f64 / 1000.0);
        idle_limit.get_or_create(&label(d)).set(seconds);
    }
    dest.register(
        "server_idle_limit_seconds",
        "Idle time after which the server was seen to drop spares (0: none seen)",
        idle_limit,
    );
    let counters: [DestSeries; 11] = [
        ("created", "Connections opened to the destination", |d| d.counters.created),
        ("reused", "Spares handed out for the destination", |d| d.counters.reused),
        ("hits", "Checkouts answered by a spare", |d| d.counters.hits),
        ("misses", "Checkouts that had to dial", |d| d.counters.misses),
        ("dropped_full", "Connections not pooled because a cap was full", |d| {
            d.counters.dropped_full
        }),
        ("expired", "Spares closed for age", |d| d.counters.expired),
        ("evicted", "Spares evicted by the global budget", |d| d.counters.evicted),
        ("trimmed", "Surplus spares closed after demand fell", |d| d.counters.trimmed),
        ("retired_early", "Spares closed before the server's learned idle limit", |d| {
            d.counters.retired_early
        }),
        ("validation_drops", "Spares found closed at checkout", |d| d.counters.validation_drops),
        ("peer_closed", "Idle spares closed by the server", |d| d.counters.peer_closed),
    ];
    for (name, help, value) in counters {
        let family = Family::<DestinationLabel, Counter>::default();
        for d in shown {
            family.get_or_create(&label(d)).inc_by(value(d));
        }
        dest.register(name, help, family);
    }
    // Why each destination has the spare target it has: one series per destination, valued 1,
    // labelled with the reason (demand, excluded, server_idle_limit, cheap_dial, rarely_used).
    let reasons = Family::<ReasonOfDestination, Gauge>::default();
    for d in shown {
        let reason = serde_json::to_value(d.policy.reason)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        reasons
            .get_or_create(&ReasonOfDestination { destination: d.destination.clone(), reason })
            .set(1);
    }
    dest.register("spare_target_reason", "Why the destination has its spare target", reasons);
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonOfDestination {
    destination: String,
    reason: String,
}

/// A per-destination series: name, help, and how to read its value.
type DestSeries = (&'static str, &'static str, fn(&DestStats) -> u64);

fn activity(d: &DestStats) -> u64 {
    d.counters.hits + d.counters.misses + d.in_use + d.idle as u64
}

fn label(d: &DestStats) -> DestinationLabel {
    DestinationLabel { destination: d.destination.clone() }
}

/// The pool's own fixed buckets, encoded as a Prometheus histogram (prometheus-client's
/// `Histogram` only observes; this one is a snapshot of counts kept by the pool).
#[derive(Debug)]
struct WaitHistogram(CheckoutWaitStats);

impl EncodeMetric for WaitHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let stats = &self.0;
        // The encoder accumulates per-bucket counts itself and wants `+Inf` last.
        let mut buckets = Vec::with_capacity(stats.buckets.len() + 1);
        let mut below = 0;
        for &(bound_us, within) in &stats.buckets {
            buckets.push((bound_us as f64 / 1e6, within.saturating_sub(below)));
            below = within;
        }
        buckets.push((f64::INFINITY, stats.count.saturating_sub(below)));
        let sum = stats.sum_us as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, stats.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

fn clamp_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let metric = Gauge::<i64>::default();
    metric.set(clamp_i64(value));
    registry.register(name, help, metric);
}

/// prometheus-client appends `_total` to counter names.
fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let metric = Counter::<u64>::default();
    metric.inc_by(value);
    registry.register(name, help, metric);
}
