//! `loadgen report`: turns the JSON records of one scenario into a markdown table (best of the
//! rounds, spread, ratios to Dante and to pool off) and SVG plots (rps bars, latency CDFs).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::stats::RunRecord;
use crate::timeline;

#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// Folder holding the scenario's JSON records (one per run).
    #[arg(long)]
    pub input: PathBuf,
    /// Folder for <scenario>.md and the SVG plots.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub scenario: String,
    /// One line under the title: what was measured and how.
    #[arg(long, default_value = "")]
    pub description: String,
    /// The path's round-trip time, to express latencies in RTTs.
    #[arg(long)]
    pub rtt_ms: Option<f64>,
    /// Label of the peer that ratios are taken against.
    #[arg(long, default_value = "dante")]
    pub baseline: String,
    /// Label of poolsocks with the pool off, the second ratio column.
    #[arg(long, default_value = "pool-off")]
    pub pool_off: String,
    /// Free text appended to the markdown (machine, notes, skipped peers).
    #[arg(long, default_value = "")]
    pub notes: String,
}

/// Fixed order for the known configurations; others follow alphabetically.
const ORDER: [&str; 10] = [
    "direct",
    "socksfloor",
    "minirelay",
    "poolsocks",
    "pool-off",
    "pool-default",
    "pool-tuned",
    "fixedpool",
    "dante",
    "microsocks",
];

fn order_key(label: &str) -> (usize, String) {
    let index = ORDER.iter().position(|l| *l == label).unwrap_or(ORDER.len());
    (index, label.to_string())
}

/// The middle value (the mean of the middle two for an even count); `None` for no values.
fn median_of(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    match values.len() {
        0 => None,
        n if n % 2 == 1 => Some(values[n / 2]),
        n => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// Round-by-round ratios of two configurations.
#[derive(Debug)]
struct PairedRatio {
    rounds: usize,
    median: f64,
    mean: f64,
    /// Half-width of the mean's 95% confidence interval, from 3 rounds on.
    ci95: Option<f64>,
}

impl std::fmt::Display for PairedRatio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "round by round {:.2}x", self.median)?;
        if let Some(ci95) = self.ci95 {
            write!(f, ", mean {:.3}x ±{ci95:.3} over {} rounds", self.mean, self.rounds)?;
        }
        Ok(())
    }
}

/// All rounds of one configuration (in one variant of the scenario).
struct Group<'a> {
    label: String,
    runs: Vec<&'a RunRecord>,
}

impl Group<'_> {
    /// The figure compared: rps, MiB/s, KiB per held session or syscalls per session (lower
    /// is better for the last two).
    fn metric(record: &RunRecord) -> f64 {
        match record.mode.as_str() {
            "bulk" => record.mib_per_sec,
            "hold" => record.kib_per_session,
            "syscalls" => syscalls_per_session(record),
            _ => record.rps,
        }
    }

    fn lower_is_better(&self) -> bool {
        self.runs.first().is_some_and(|r| r.mode == "hold" || r.mode == "syscalls")
    }

    fn best(&self) -> Option<&RunRecord> {
        let better = |a: &&&RunRecord, b: &&&RunRecord| {
            let (a, b) = (Self::metric(a), Self::metric(b));
            a.partial_cmp(&b).unwrap_or(std::cmp::Ordering::Equal)
        };
        if self.runs.first().is_some_and(|r| r.offered_rate.is_some()) {
            // At an offered rate every round carries the same load: the best round is the one
            // that added the least latency.
            let p99 = |r: &&&RunRecord| r.session_latency.as_ref().map_or(u64::MAX, |l| l.p99_us);
            self.runs.iter().min_by_key(p99).copied()
        } else if self.lower_is_better() {
            // A run that held (or traced) nothing has no meaningful per-session figure.
            self.runs.iter().filter(|r| r.held > 0 || r.traced_sessions > 0).min_by(better).copied()
        } else {
            self.runs.iter().max_by(better).copied()
        }
    }

    /// The median round's figure (the mean of the middle two for an even count): one lucky or
    /// unlucky round on a shared VM moves it less than it moves the best.
    fn median(&self) -> f64 {
        let values: Vec<f64> = self.runs.iter().map(|r| Self::metric(r)).collect();
        median_of(values).unwrap_or(0.0)
    }

    /// `ours / theirs` round by round (rounds run one configuration after another, so a round's
    /// ratio cancels what the host did to both): their median, mean and spread.
    fn paired_ratio(&self, theirs: &Group) -> Option<PairedRatio> {
        let ratios: Vec<f64> = self
            .runs
            .iter()
            .filter_map(|ours| {
                let other = theirs.runs.iter().find(|t| t.round == ours.round)?;
                let (a, b) = (Self::metric(ours), Self::metric(other));
                (b > 0.0).then_some(a / b)
            })
            .collect();
        let n = ratios.len();
        let median = median_of(ratios.clone())?;
        let mean = ratios.iter().sum::<f64>() / n as f64;
        // Normal approximation: with a handful of rounds it is a rough guide, not a test.
        let ci95 = (n >= 3).then(|| {
            let variance = ratios.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            1.96 * (variance / n as f64).sqrt()
        });
        Some(PairedRatio { rounds: n, median, mean, ci95 })
    }

    fn spread(&self) -> (f64, f64) {
        let values: Vec<f64> = self.runs.iter().map(|r| Self::metric(r)).collect();
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (min, max)
    }
}

pub fn report(args: ReportArgs) -> Result<(), String> {
    let records = load(&args.input)?;
    if records.is_empty() {
        return Err(format!("no JSON records in {}", args.input.display()));
    }
    std::fs::create_dir_all(&args.out).map_err(|e| e.to_string())?;
    // Variants of one scenario (e.g. 1, 2 and 5 requests per session) get a table each.
    // UDP runs differ by payload size instead; held sessions (or associations) come last.
    let mut variants: BTreeMap<(bool, u32, usize), Vec<&RunRecord>> = BTreeMap::new();
    for record in &records {
        let key = (record.mode == "hold", record.requests_per_session, record.payload_bytes);
        variants.entry(key).or_default().push(record);
    }
    let mut md = String::new();
    let _ = writeln!(md, "# {}\n", args.scenario);
    if !args.description.is_empty() {
        let _ = writeln!(md, "{}\n", args.description);
    }
    let _ = writeln!(
        md,
        "Each configuration ran {} time(s), rounds interleaved (each round in its own \
         shuffled order); \"best\" is the best round, latencies are from that round, \
         spread is min–max over rounds, median is the middle round's figure. Ratios compare \
         best figures from this one run (and, where marked, the medians, and \"round by round\": \
         the median of the ratios taken within each round, where both ran minutes apart at most).{}\n",
        records.iter().map(|r| r.round).max().unwrap_or(1),
        if records.iter().any(|r| r.offered_rate.is_some()) {
            " At an offered rate (`loadgen run --rate`) every round carries the same load, so \
             the best round is the one with the lowest p99."
        } else {
            ""
        }
    );
    for ((_, requests_per_session, payload_bytes), group_records) in &variants {
        let groups = group(group_records);
        let mode =
            groups.first().and_then(|g| g.runs.first()).map(|r| r.mode.clone()).unwrap_or_default();
        let (suffix, heading) = match (variants.len() > 1, mode.as_str()) {
            (false, _) => (String::new(), None),
            (true, "udp") => {
                (format!("-{payload_bytes}b"), Some(format!("{payload_bytes}-byte payloads")))
            }
            (true, "hold") => ("-idle".to_string(), Some("Idle associations".to_string())),
            (true, _) => (
                format!("-n{requests_per_session}"),
                Some(format!("{requests_per_session} request(s) per session")),
            ),
        };
        if let Some(heading) = heading {
            let _ = writeln!(md, "## {heading}\n");
        }
        let stem = format!("{}{suffix}", args.scenario);
        match mode.as_str() {
            "bulk" => bulk_table(&mut md, &groups, &args),
            "hold" => hold_table(&mut md, &groups, &args),
            "syscalls" => syscalls_table(&mut md, &groups),
            "step" => {
                step_table(&mut md, &groups, &args);
                let timeline = args.out.join(format!("{stem}-timeline.svg"));
                timeline_plot(&timeline, &groups, &args.scenario)?;
                let _ =
                    writeln!(md, "\n![idle spares and hit rate over time]({stem}-timeline.svg)");
            }
            "udp" => udp_table(&mut md, &groups, &args),
            _ => run_table(&mut md, &groups, &args),
        }
        let bars = args.out.join(format!("{stem}-bars.svg"));
        bar_plot(&bars, &groups, &args.scenario, &mode)?;
        let _ = writeln!(md, "\n![bars]({stem}-bars.svg)\n");
        if mode == "run" || mode == "step" || mode == "udp" {
            let cdf = args.out.join(format!("{stem}-cdf.svg"));
            cdf_plot(&cdf, &groups, &args.scenario)?;
            let _ = writeln!(md, "![latency CDF]({stem}-cdf.svg)\n");
        }
    }
    if !args.notes.is_empty() {
        let _ = writeln!(md, "{}\n", args.notes);
    }
    let path = args.out.join(format!("{}.md", args.scenario));
    std::fs::write(&path, md).map_err(|e| format!("write {}: {e}", path.display()))?;
    eprintln!("report: wrote {}", path.display());
    Ok(())
}

fn load(dir: &Path) -> Result<Vec<RunRecord>, String> {
    let mut records = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("read {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        match serde_json::from_str::<RunRecord>(&text) {
            Ok(record) => records.push(record),
            Err(e) => eprintln!("report: skipping {}: {e}", path.display()),
        }
    }
    Ok(records)
}

fn group<'a>(records: &[&'a RunRecord]) -> Vec<Group<'a>> {
    let mut by_label: BTreeMap<(usize, String), Vec<&'a RunRecord>> = BTreeMap::new();
    for record in records {
        by_label.entry(order_key(&record.label)).or_default().push(record);
    }
    by_label.into_iter().map(|((_, label), runs)| Group { label, runs }).collect()
}

/// `ours / theirs` of the best figures, or a dash when either is missing.
fn ratio(groups: &[Group], group: &Group, against: &str) -> String {
    let Some(other) = groups.iter().find(|g| g.label == against) else {
        return "—".into();
    };
    let (Some(a), Some(b)) = (group.best(), other.best()) else {
        return "—".into();
    };
    let (a, b) = (Group::metric(a), Group::metric(b));
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "—".into()
    }
}

fn errors_text(group: &Group) -> String {
    let mut total: BTreeMap<&str, u64> = BTreeMap::new();
    for run in &group.runs {
        for (kind, count) in &run.errors {
            *total.entry(kind).or_insert(0) += count;
        }
    }
    if total.is_empty() {
        "0".into()
    } else {
        total.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
    }
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// A latency in RTTs, when the path's RTT is known.
fn in_rtt(us: u64, rtt_ms: Option<f64>) -> String {
    match rtt_ms {
        Some(rtt) if rtt > 0.0 => format!("{:.2}", us as f64 / 1000.0 / rtt),
        _ => "—".into(),
    }
}

fn percent(rate: Option<f64>) -> String {
    rate.map_or_else(|| "—".into(), |r| format!("{:.1}%", r * 100.0))
}

/// The cold ramp: hits in the first second of the proxy's life, as "rate of checkouts".
fn ramp_text(record: &RunRecord) -> String {
    match timeline::ramp_and_rest(record) {
        Some((ramp, _)) if ramp.checkouts > 0.0 => {
            format!("{} of {:.0}", percent(ramp.rate()), ramp.checkouts)
        }
        _ => "—".into(),
    }
}

fn rest_text(record: &RunRecord) -> String {
    percent(timeline::ramp_and_rest(record).and_then(|(_, rest)| rest.rate()))
}

fn mean_idle_text(record: &RunRecord) -> String {
    timeline::mean_idle(record).map_or_else(|| "—".into(), |m| format!("{m:.1}"))
}

fn run_table(md: &mut String, groups: &[Group], args: &ReportArgs) {
    let rtt_col = if args.rtt_ms.is_some() {
        " p50 (RTT) | p99 (RTT) | request p99 (RTT) |"
    } else {
        " request p99 ms |"
    };
    let _ = writeln!(
        md,
        "| config | rounds | best rps | spread rps | median rps | vs {} | vs {} | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |{rtt_col} proxy CPU µs / session | upstream conns / session | max idle sampled | mean idle held | budget high water | idle after load | cold ramp: hits in 1st s | hit rate after 1st s | errors |",
        args.baseline, args.pool_off
    );
    let _ = writeln!(
        md,
        "|---|---|---|---|---|---|---|---|---|---|---|---|{}---|---|---|---|---|---|---|---|---|",
        if args.rtt_ms.is_some() { "---|---|---|" } else { "---|" }
    );
    for group in groups {
        let Some(best) = group.best() else { continue };
        let (min, max) = group.spread();
        let lat = best.session_latency.clone().unwrap_or_default();
        let rtt = if args.rtt_ms.is_some() {
            format!(
                " {} | {} | {} |",
                in_rtt(lat.p50_us, args.rtt_ms),
                in_rtt(lat.p99_us, args.rtt_ms),
                in_rtt(request_p99_us(best), args.rtt_ms)
            )
        } else {
            format!(" {} |", ms(request_p99_us(best)))
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0}–{:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} |{rtt} {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            group.label,
            group.runs.len(),
            best.rps,
            min,
            max,
            group.median(),
            ratio(groups, group, &args.baseline),
            ratio(groups, group, &args.pool_off),
            ms(lat.p50_us),
            ms(lat.p90_us),
            ms(lat.p99_us),
            ms(lat.p999_us),
            ms(lat.max_us),
            cpu_text(group),
            conns_per_session(best),
            max_idle_sampled(group),
            mean_idle_text(best),
            budget_high_water(group),
            idle_after(best),
            ramp_text(best),
            rest_text(best),
            errors_text(group),
        );
    }
    let _ = writeln!(
        md,
        "\nHits are counted by the proxy (`pool_hits` / (`pool_hits` + `pool_misses` + \
         `first_sightings`), from its stats sampled every {} ms): the cold ramp is the proxy's \
         first second under load (warm-up included), the hit rate after it runs to the end of \
         the load; \"mean idle held\" is the mean of its idle spares (`total_idle`) over the \
         samples after the first second. minirelay has no pool; fixedpool reports the same \
         fields.",
        groups
            .iter()
            .flat_map(|g| g.runs.iter())
            .map(|r| r.sample_interval_ms)
            .max()
            .unwrap_or(1000)
            .max(1)
    );
    let _ = writeln!(
        md,
        "\n\"proxy CPU µs / session\" is the proxy process's user and system time over the \
         measured window (all threads, /proc/PID/stat) divided by the sessions in it, median \
         over rounds; the stats endpoint's one request a second is included. Dante forks a \
         process per client batch, so it has none."
    );
    let _ = writeln!(
        md,
        "\n\"request p99\" leaves out the connect and the SOCKS handshake: from an HTTP request \
         written to its response read, the part a proxy relays. Direct's figure is the path's \
         own (a request on a connection just opened); on a distant path it is the floor under \
         any pool's."
    );
    goal_lines(md, groups, args);
}

/// The proxy's CPU per session: the median over rounds (a cost, steadier than any one round).
fn cpu_text(group: &Group) -> String {
    median_cpu(group).map_or_else(|| "—".into(), |us| format!("{us:.1}"))
}

fn median_cpu(group: &Group) -> Option<f64> {
    median_of(group.runs.iter().filter_map(|r| r.cpu_us_per_session()).collect())
}

fn request_p99_us(record: &RunRecord) -> u64 {
    record.request_latency.as_ref().map_or(0, |l| l.p99_us)
}

fn conns_per_session(record: &RunRecord) -> String {
    record
        .upstream
        .map(|u| format!("{:.2}", u.connections as f64 / record.sessions.max(1) as f64))
        .unwrap_or_else(|| "—".into())
}

/// Issue 18's comparisons, where both sides ran: best rounds of this one run.
fn goal_lines(md: &mut String, groups: &[Group], args: &ReportArgs) {
    let find = |label: &str| groups.iter().find(|g| g.label == label).and_then(|g| g.best());
    let group_of = |label: &str| groups.iter().find(|g| g.label == label);
    // Best rounds' rps ratio, then the medians', then the median of round-by-round ratios
    // (the steadiest of the three on a shared host: both sides of a ratio ran minutes apart).
    let rps_ratio = |ours: &str, ours_best: &RunRecord, theirs: &str, theirs_best: &RunRecord| {
        let mut text = format!("{:.2}x", ours_best.rps / theirs_best.rps.max(f64::MIN_POSITIVE));
        let (Some(ours), Some(theirs)) = (group_of(ours), group_of(theirs)) else { return text };
        let mut extra = Vec::new();
        if theirs.median() > 0.0 {
            extra.push(format!("medians {:.2}x", ours.median() / theirs.median()));
        }
        if let Some(paired) = ours.paired_ratio(theirs) {
            extra.push(paired.to_string());
        }
        if !extra.is_empty() {
            let _ = write!(text, " ({})", extra.join(", "));
        }
        text
    };
    let p99 = |r: &RunRecord| r.session_latency.as_ref().map_or(0, |l| l.p99_us) as f64;
    // Medians over rounds of the proxy's CPU per session, when both were read.
    let cpu_ratio = |ours: &str, theirs: &str| match (
        group_of(ours).and_then(median_cpu),
        group_of(theirs).and_then(median_cpu),
    ) {
        (Some(a), Some(b)) if b > 0.0 => {
            format!(", CPU / session {:.2}x ({a:.1} vs {b:.1} µs)", a / b)
        }
        _ => String::new(),
    };
    let mut lines = Vec::new();
    if let (Some(off), Some(relay)) = (find("pool-off"), find("minirelay")) {
        lines.push(format!(
            "pool-off / minirelay: rps {}, p99 {:.2}x{}",
            rps_ratio("pool-off", off, "minirelay", relay),
            p99(off) / p99(relay).max(1.0),
            cpu_ratio("pool-off", "minirelay")
        ));
    }
    if let (Some(off), Some(direct)) = (find("pool-off"), find("direct")) {
        let request = |r: &RunRecord| request_p99_us(r) as f64;
        lines.push(format!(
            "pool-off p99 / direct p99: {:.2}x (request p99, the relayed part: {:.2}x)",
            p99(off) / p99(direct).max(1.0),
            request(off) / request(direct).max(1.0)
        ));
    }
    if let (Some(floor), Some(direct)) = (find("socksfloor"), find("direct")) {
        lines.push(format!(
            "socksfloor p99 / direct p99: {:.2}x (no SOCKS5 proxy measures below the floor)",
            p99(floor) / p99(direct).max(1.0)
        ));
    }
    for on in ["pool-default", "pool-tuned"] {
        if let (Some(on_record), Some(off)) = (find(on), find("pool-off")) {
            lines.push(format!(
                "{on} / pool-off: rps {}, upstream conns / session {}{}",
                rps_ratio(on, on_record, "pool-off", off),
                conns_per_session(on_record),
                cpu_ratio(on, "pool-off")
            ));
        }
    }
    if let (Some(tuned), Some(fixed)) = (find("pool-tuned"), find("fixedpool")) {
        let rtts = if args.rtt_ms.is_some() {
            let rtt = |us: u64| in_rtt(us, args.rtt_ms);
            let mut text = format!(
                " ({} vs {} RTT; request p99 {} vs {} RTT",
                rtt(p99(tuned) as u64),
                rtt(p99(fixed) as u64),
                rtt(request_p99_us(tuned)),
                rtt(request_p99_us(fixed))
            );
            if let Some(direct) = find("direct") {
                let _ = write!(text, ", the path's own: {} RTT", rtt(request_p99_us(direct)));
            }
            text.push(')');
            text
        } else {
            String::new()
        };
        lines.push(format!(
            "pool-tuned / fixedpool: rps {}, p99 {:.2}x{rtts}, mean idle held {} vs {}, hit rate after 1st s {} vs {}",
            rps_ratio("pool-tuned", tuned, "fixedpool", fixed),
            p99(tuned) / p99(fixed).max(1.0),
            mean_idle_text(tuned),
            mean_idle_text(fixed),
            rest_text(tuned),
            rest_text(fixed),
        ));
    }
    if !lines.is_empty() {
        let _ = writeln!(md, "\nIssue 18 comparisons (best rounds): {}.", lines.join("; "));
    }
}

/// The largest idle figure seen in the proxy's stats samples: any top-level number whose key
/// mentions "idle" (the stats format belongs to the daemon, so this stays loose on purpose).
fn max_idle_sampled(group: &Group) -> String {
    let mut max: Option<f64> = None;
    for run in &group.runs {
        for sample in &run.stats_samples {
            if let Some(object) = sample.as_object() {
                for (key, value) in object {
                    if key.contains("idle") && !key.contains("timeout") {
                        if let Some(v) = value.as_f64() {
                            max = Some(max.map_or(v, |m: f64| m.max(v)));
                        }
                    }
                }
            }
        }
    }
    max.map_or_else(|| "—".into(), |m| format!("{m:.0}"))
}

/// The most budget slots ever held at once (reserved + lent + pooled + evicting), as the
/// GlobalBudget itself records it: exact, unlike a sum of per-destination views read one after
/// another, which a sampler can catch half-updated.
fn budget_high_water(group: &Group) -> String {
    let high = group
        .runs
        .iter()
        .flat_map(|run| run.stats_samples.iter().chain(run.stats_after.iter()))
        .filter_map(|s| s.get("budget")?.get("high_water")?.as_f64())
        .fold(None, |max: Option<f64>, v| Some(max.map_or(v, |m| m.max(v))));
    high.map_or_else(|| "—".into(), |m| format!("{m:.0}"))
}

/// `total_idle` in the last sample taken after the load stopped, with how long after.
fn idle_after(record: &RunRecord) -> String {
    record
        .stats_after
        .last()
        .and_then(|s| s.get("total_idle"))
        .and_then(|v| v.as_f64())
        .map_or_else(|| "—".into(), |idle| format!("{idle:.0} (+{:.0} s)", record.linger_secs))
}

fn udp_table(md: &mut String, groups: &[Group], args: &ReportArgs) {
    let _ = writeln!(
        md,
        "| config | rounds | best round trips/s | spread | vs {} | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | lost | errors |",
        args.baseline
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for group in groups {
        let Some(best) = group.best() else { continue };
        let (min, max) = group.spread();
        let lat = best.session_latency.clone().unwrap_or_default();
        let lost: u64 = group.runs.iter().filter_map(|r| r.errors.get("lost")).sum();
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0}–{:.0} | {} | {} | {} | {} | {} | {} | {lost} | {} |",
            group.label,
            group.runs.len(),
            best.rps,
            min,
            max,
            ratio(groups, group, &args.baseline),
            ms(lat.p50_us),
            ms(lat.p90_us),
            ms(lat.p99_us),
            ms(lat.p999_us),
            ms(lat.max_us),
            errors_text(group),
        );
    }
}

fn bulk_table(md: &mut String, groups: &[Group], args: &ReportArgs) {
    let _ = writeln!(
        md,
        "| config | rounds | best MiB/s | spread MiB/s | vs {} | vs {} | MiB per download | errors |",
        args.baseline, args.pool_off
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
    for group in groups {
        let Some(best) = group.best() else { continue };
        let (min, max) = group.spread();
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0}–{:.0} | {} | {} | {} | {} |",
            group.label,
            group.runs.len(),
            best.mib_per_sec,
            min,
            max,
            ratio(groups, group, &args.baseline),
            ratio(groups, group, &args.pool_off),
            best.bytes >> 20,
            errors_text(group)
        );
    }
}

fn hold_table(md: &mut String, groups: &[Group], args: &ReportArgs) {
    let _ = writeln!(
        md,
        "| config | rounds | held / attempted (worst round) | answering after idle | best KiB per session | spread | vs {} | proxy PSS before → held (KiB) | errors |",
        args.baseline
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    for group in groups {
        let worst = group.runs.iter().min_by_key(|r| r.held);
        let (min, max) = group.spread();
        let (held, alive) = worst.map_or(("—".into(), "—".into()), |w| {
            (format!("{} / {}", w.held, w.attempted), format!("{}", w.still_alive))
        });
        let (best_kib, rss) = match group.best() {
            Some(b) if b.rss_held_kib > 0 => (
                format!("{:.1}", b.kib_per_session),
                format!("{} → {}", b.rss_before_kib, b.rss_held_kib),
            ),
            _ => ("—".into(), "—".into()),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {held} | {alive} | {best_kib} | {:.1}–{:.1} | {} | {rss} | {} |",
            group.label,
            group.runs.len(),
            min,
            max,
            ratio(groups, group, &args.baseline),
            errors_text(group)
        );
    }
}

fn syscalls_per_session(record: &RunRecord) -> f64 {
    let total: u64 = record.syscalls.values().map(|c| c.calls).sum();
    total as f64 / record.traced_sessions.max(1) as f64
}

fn syscalls_table(md: &mut String, groups: &[Group]) {
    let _ = writeln!(
        md,
        "| config | rounds | sessions traced | syscalls per session | spread | vs minirelay | failed syscalls per session | upstream conns / session | most frequent (per session) | errors |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    for group in groups {
        let Some(best) = group.best() else { continue };
        let (min, max) = group.spread();
        let per = |n: u64| n as f64 / best.traced_sessions.max(1) as f64;
        let failed: u64 = best.syscalls.values().map(|c| c.errors).sum();
        let mut top: Vec<(&String, u64)> =
            best.syscalls.iter().map(|(k, c)| (k, c.calls)).collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let top: Vec<String> =
            top.iter().take(6).map(|(name, n)| format!("{name} {:.1}", per(*n))).collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} | {:.1}–{:.1} | {} | {:.1} | {} | {} | {} |",
            group.label,
            group.runs.len(),
            best.traced_sessions,
            syscalls_per_session(best),
            min,
            max,
            ratio(groups, group, "minirelay"),
            per(failed),
            conns_per_session(best),
            top.join(", "),
            errors_text(group),
        );
    }
    // Every syscall that some configuration makes at least once in 20 sessions, side by side.
    let bests: Vec<(&str, &RunRecord)> =
        groups.iter().filter_map(|g| g.best().map(|b| (g.label.as_str(), b))).collect();
    let mut names: BTreeMap<&str, f64> = BTreeMap::new();
    for (_, record) in &bests {
        for (name, count) in &record.syscalls {
            let per = count.calls as f64 / record.traced_sessions.max(1) as f64;
            let entry = names.entry(name.as_str()).or_insert(0.0);
            *entry = entry.max(per);
        }
    }
    let mut names: Vec<(&str, f64)> = names.into_iter().filter(|(_, m)| *m >= 0.05).collect();
    names.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    if names.is_empty() {
        return;
    }
    let _ = writeln!(md, "\nCalls per session, by syscall (best round of each):\n");
    let header: Vec<&str> = bests.iter().map(|(label, _)| *label).collect();
    let _ = writeln!(md, "| syscall | {} |", header.join(" | "));
    let _ = writeln!(md, "|---|{}", "---|".repeat(header.len()));
    for (name, _) in names {
        let cells: Vec<String> = bests
            .iter()
            .map(|(_, r)| {
                let calls = r.syscalls.get(name).map_or(0, |c| c.calls);
                format!("{:.2}", calls as f64 / r.traced_sessions.max(1) as f64)
            })
            .collect();
        let _ = writeln!(md, "| {name} | {} |", cells.join(" | "));
    }
}

/// Text for a time after a step: ms and RTTs.
fn after_step(ms_after: Option<f64>, rtt_ms: Option<f64>) -> String {
    match (ms_after, rtt_ms) {
        (Some(t), Some(rtt)) if rtt > 0.0 => format!("{t:.0} ms = {:.1} RTT", t / rtt),
        (Some(t), _) => format!("{t:.0} ms"),
        (None, _) => "not reached".into(),
    }
}

/// Client-side hit inference on the delay line: a session that dials costs at least 2 RTT
/// (connect, then the request), one through a spare ~1 RTT; below this many RTTs it was a hit.
const FAST_SESSION_RTTS: f64 = 1.75;

/// Client-side bins of session start times, in RTTs: two, so a bin holds a round of sessions
/// (a hit's and a miss's) and the step's figure is good to 2 RTT (50 ms bins were 5 RTT at 10 ms).
const CLIENT_BIN_RTTS: f64 = 2.0;

fn step_table(md: &mut String, groups: &[Group], args: &ReportArgs) {
    let Some(first) = groups.iter().find_map(|g| g.best()) else { return };
    let Some((up, down)) = timeline::step_times(first) else {
        let _ = writeln!(md, "(no step up in --phases)");
        return;
    };
    let phases: Vec<String> =
        first.phases.iter().map(|p| format!("{} clients for {} s", p.clients, p.secs)).collect();
    let _ = writeln!(
        md,
        "Phases: {}; the step up is at {:.1} s, the fall at {:.1} s.\n",
        phases.join(", "),
        up / 1000.0,
        down / 1000.0
    );
    let _ = writeln!(
        md,
        "| config | rounds | best rps | p50 (RTT) | p99 (RTT) | cold ramp: hits in 1st s | hit rate after 1st s | hit rate while stepped up | step up to >= 95% hits (proxy counters) | step up to >= 95% sessions < 1.75 RTT (client) | peak idle | idle after the fall | mean idle held | errors |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for group in groups {
        let Some(best) = group.best() else { continue };
        let lat = best.session_latency.clone().unwrap_or_default();
        let points = timeline::points(best);
        let high = points
            .iter()
            .rev()
            .find(|p| p.t_ms <= up)
            .zip(points.iter().find(|p| p.t_ms >= down).or(points.last()))
            .map(|(a, b)| timeline::Window::between(a, b));
        let proxy = if points.is_empty() {
            "—".into()
        } else {
            after_step(timeline::time_to_rate_proxy(best, up, down, 0.95), args.rtt_ms)
        };
        let client = match args.rtt_ms {
            Some(rtt) if !best.session_log.is_empty() => after_step(
                timeline::time_to_rate_client(
                    best,
                    up,
                    down,
                    FAST_SESSION_RTTS * 1000.0 * rtt,
                    CLIENT_BIN_RTTS * rtt,
                    0.95,
                ),
                args.rtt_ms,
            ),
            _ => "—".into(),
        };
        let peak = points
            .iter()
            .filter(|p| p.t_ms >= up && p.t_ms <= down + 2000.0)
            .map(|p| p.idle)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let after = points
            .iter()
            .find(|p| p.t_ms >= down + 30_000.0)
            .or_else(|| points.last().filter(|p| p.t_ms > down));
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {proxy} | {client} | {} | {} | {} | {} |",
            group.label,
            group.runs.len(),
            best.rps,
            in_rtt(lat.p50_us, args.rtt_ms),
            in_rtt(lat.p99_us, args.rtt_ms),
            ramp_text(best),
            rest_text(best),
            percent(high.and_then(|w| w.rate())),
            peak.map_or_else(|| "—".into(), |p| format!("{p:.0}")),
            after.map_or_else(
                || "—".into(),
                |p| format!("{:.0} (+{:.0} s)", p.idle, (p.t_ms - down) / 1000.0)
            ),
            mean_idle_text(best),
            errors_text(group),
        );
    }
    let interval =
        groups.iter().flat_map(|g| g.runs.iter()).map(|r| r.sample_interval_ms).max().unwrap_or(0);
    let _ = writeln!(
        md,
        "\n\"Step up to >= 95% hits\": from the step to the start of the first window from which \
         hits are >= 95% both in that window and over the rest of the stepped-up phase. Proxy \
         counters: windows between successive stats samples ({interval} ms apart; poolsocks \
         serves its pool counters from a cache up to 250 ms old, so its figure is good to about \
         250 ms, and a repeated sample is dropped). Client side: bins of {CLIENT_BIN_RTTS} RTT of session start \
         times, a session through a spare takes ~1 RTT and one that dials at least 2 RTT, so a \
         session under 1.75 RTT counts as a hit (a dial cannot be that fast; a hit slowed by a \
         busy CPU may be slower, so this errs late; works for any proxy, and is finer). \"Idle after the \
         fall\": the first sample 30 s after the fall, or the last one if the run ends sooner."
    );
}

fn timeline_plot(path: &Path, groups: &[Group], title: &str) -> Result<(), String> {
    // (label, idle over time, hit rate over time) of each configuration's best round.
    let mut curves = Vec::new();
    for group in groups {
        let Some(best) = group.best() else { continue };
        let points = timeline::points(best);
        if points.is_empty() {
            continue;
        }
        let idle: Vec<(f64, f64)> = points.iter().map(|p| (p.t_ms / 1000.0, p.idle)).collect();
        // Windows of at least 250 ms (poolsocks' cache), each plotted at its middle.
        let mut rate = Vec::new();
        let mut start = points[0];
        for p in &points[1..] {
            if p.t_ms - start.t_ms >= 250.0 {
                if let Some(r) = timeline::Window::between(&start, p).rate() {
                    rate.push(((start.t_ms + p.t_ms) / 2000.0, r * 100.0));
                }
                start = *p;
            }
        }
        curves.push((group.label.clone(), idle, rate));
    }
    if curves.is_empty() {
        return Ok(());
    }
    let t_max =
        curves.iter().flat_map(|(_, idle, _)| idle.iter().map(|(t, _)| *t)).fold(1.0, f64::max);
    let idle_max =
        curves.iter().flat_map(|(_, idle, _)| idle.iter().map(|(_, v)| *v)).fold(1.0, f64::max);
    let steps: Vec<f64> = groups
        .iter()
        .find_map(|g| g.best())
        .and_then(timeline::step_times)
        .map(|(up, down)| vec![up / 1000.0, down / 1000.0])
        .unwrap_or_default();
    let root = SVGBackend::new(path, (900, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (top, bottom) = root.split_vertically(320);
    let panels: [(&DrawingArea<SVGBackend, plotters::coord::Shift>, &str, f64, bool); 2] = [
        (&top, "idle spares (total_idle)", idle_max * 1.1, true),
        (&bottom, "hit rate per window (%)", 100.0, false),
    ];
    for (area, what, y_max, is_idle) in panels {
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{title}: {what}"), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..t_max * 1.02, 0.0..y_max)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the start")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(plot_error)?;
        for t in &steps {
            chart
                .draw_series(LineSeries::new(
                    [(*t, 0.0), (*t, y_max)],
                    BLACK.mix(0.6).stroke_width(2),
                ))
                .map_err(plot_error)?;
        }
        for (i, (label, idle, rate)) in curves.iter().enumerate() {
            let series = if is_idle { idle } else { rate };
            chart
                .draw_series(LineSeries::new(
                    series.iter().copied(),
                    Palette99::pick(i).stroke_width(2),
                ))
                .map_err(plot_error)?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], Palette99::pick(i).stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(if is_idle {
                SeriesLabelPosition::UpperRight
            } else {
                SeriesLabelPosition::LowerRight
            })
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error(e: impl std::fmt::Display) -> String {
    format!("plot: {e}")
}

fn bar_plot(path: &Path, groups: &[Group], title: &str, mode: &str) -> Result<(), String> {
    let values: Vec<(String, f64)> = groups
        .iter()
        .filter_map(|g| g.best().map(|b| (g.label.clone(), Group::metric(b))))
        .collect();
    if values.is_empty() {
        return Ok(());
    }
    let unit = match mode {
        "bulk" => "MiB/s (best round)",
        "hold" => "KiB per held session (best round)",
        "syscalls" => "syscalls per session (best round)",
        "udp" => "datagram round trips per second (best round)",
        _ => "requests per second (best round)",
    };
    let top = values.iter().map(|(_, v)| *v).fold(0.0, f64::max).max(1.0) * 1.15;
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title}: {unit}"), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        // A segmented range 0..n has n + 1 slots; n - 1 leaves exactly one per bar.
        .build_cartesian_2d((0..values.len().saturating_sub(1).max(1)).into_segmented(), 0.0..top)
        .map_err(plot_error)?;
    let names: Vec<String> = values.iter().map(|(n, _)| n.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(values.len())
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .y_desc(unit)
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, (_, v))| {
            let color = Palette99::pick(i).filled();
            let mut bar = Rectangle::new(
                [(SegmentValue::Exact(i), 0.0), (SegmentValue::Exact(i + 1), *v)],
                color,
            );
            bar.set_margin(0, 0, 12, 12);
            bar
        }))
        .map_err(plot_error)?;
    chart
        .draw_series(values.iter().enumerate().map(|(i, (_, v))| {
            Text::new(
                format!("{v:.0}"),
                (SegmentValue::CenterOf(i), *v * 1.02 + top * 0.02),
                ("sans-serif", 14),
            )
        }))
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn cdf_plot(path: &Path, groups: &[Group], title: &str) -> Result<(), String> {
    let curves: Vec<(String, Vec<(f64, f64)>)> = groups
        .iter()
        .filter_map(|g| {
            let lat = g.best()?.session_latency.clone()?;
            let points =
                // Plotted against log10(ms): plotters' log axis labels only powers of ten, and
                // a latency CDF often spans less than one decade.
                lat.cdf.iter().map(|(us, q)| ((*us as f64 / 1000.0).max(0.001).log10(), *q)).collect();
            Some((g.label.clone(), points))
        })
        .collect();
    if curves.is_empty() {
        return Ok(());
    }
    let all = curves.iter().flat_map(|(_, p)| p.iter().map(|(x, _)| *x));
    let (lo, hi) =
        all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title}: latency CDF (best round)"), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(lo - 0.05..hi + 0.05, 0.0..1.0)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_labels(12)
        .x_label_formatter(&|x| {
            let ms = 10f64.powf(*x);
            if ms >= 10.0 {
                format!("{ms:.0}")
            } else {
                format!("{ms:.2}")
            }
        })
        .x_desc("latency (ms, log scale)")
        .y_desc("fraction of samples")
        .draw()
        .map_err(plot_error)?;
    for (i, (label, points)) in curves.iter().enumerate() {
        let color = Palette99::pick(i).stroke_width(2);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color))
            .map_err(plot_error)?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], Palette99::pick(i).stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(label: &str, round: u32, rps: f64) -> RunRecord {
        RunRecord { mode: "run".into(), label: label.into(), round, rps, ..Default::default() }
    }

    #[test]
    fn paired_ratio_is_the_median_of_round_by_round_ratios() {
        // Round 2 ran while the host was slow for both: the best rounds alone would compare
        // 100 with 120 (0.83x) though each round puts ours at 0.9-1.1x theirs.
        let ours = [record("on", 1, 90.0), record("on", 2, 30.0), record("on", 3, 100.0)];
        let theirs = [record("off", 1, 100.0), record("off", 2, 27.0), record("off", 3, 120.0)];
        let ours = Group { label: "on".into(), runs: ours.iter().collect() };
        let theirs = Group { label: "off".into(), runs: theirs.iter().collect() };
        let paired = ours.paired_ratio(&theirs).expect("three shared rounds");
        let median = paired.median;
        assert!((median - 0.9).abs() < 1e-9, "median of 0.90, 1.11, 0.83 is 0.90, got {median}");
        let mean = (0.9 + 30.0 / 27.0 + 100.0 / 120.0) / 3.0;
        assert!((paired.mean - mean).abs() < 1e-9, "{paired:?}");
        assert!(paired.ci95.is_some_and(|ci| ci > 0.0), "{paired:?}");
        assert_eq!(paired.rounds, 3);
    }

    #[test]
    fn paired_ratio_needs_a_shared_round() {
        let ours = [record("on", 1, 90.0)];
        let theirs = [record("off", 2, 100.0)];
        let ours = Group { label: "on".into(), runs: ours.iter().collect() };
        let theirs = Group { label: "off".into(), runs: theirs.iter().collect() };
        assert!(ours.paired_ratio(&theirs).is_none());
    }
}
