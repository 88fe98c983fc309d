//! `loadgen report`: turns the JSON records of one scenario into a markdown table (best of the
//! rounds, spread, ratios to Dante and to pool off) and SVG plots (rps bars, latency CDFs).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::stats::RunRecord;

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
const ORDER: [&str; 7] =
    ["direct", "poolsocks", "pool-off", "pool-default", "pool-tuned", "dante", "microsocks"];

fn order_key(label: &str) -> (usize, String) {
    let index = ORDER.iter().position(|l| *l == label).unwrap_or(ORDER.len());
    (index, label.to_string())
}

/// All rounds of one configuration (in one variant of the scenario).
struct Group<'a> {
    label: String,
    runs: Vec<&'a RunRecord>,
}

impl Group<'_> {
    /// The figure compared: rps, MiB/s, or KiB per held session (lower is better).
    fn metric(record: &RunRecord) -> f64 {
        match record.mode.as_str() {
            "bulk" => record.mib_per_sec,
            "hold" => record.kib_per_session,
            _ => record.rps,
        }
    }

    fn lower_is_better(&self) -> bool {
        self.runs.first().is_some_and(|r| r.mode == "hold")
    }

    fn best(&self) -> Option<&RunRecord> {
        let better = |a: &&&RunRecord, b: &&&RunRecord| {
            let (a, b) = (Self::metric(a), Self::metric(b));
            a.partial_cmp(&b).unwrap_or(std::cmp::Ordering::Equal)
        };
        if self.lower_is_better() {
            // A run that held nothing has no meaningful per-session figure.
            self.runs.iter().filter(|r| r.held > 0).min_by(better).copied()
        } else {
            self.runs.iter().max_by(better).copied()
        }
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
        "Each configuration ran {} time(s), rounds interleaved; \"best\" is the best round, \
         latencies are from that round, spread is min–max over rounds. Ratios compare best \
         figures from this one run.\n",
        records.iter().map(|r| r.round).max().unwrap_or(1)
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
        match mode.as_str() {
            "bulk" => bulk_table(&mut md, &groups, &args),
            "hold" => hold_table(&mut md, &groups, &args),
            "udp" => udp_table(&mut md, &groups, &args),
            _ => run_table(&mut md, &groups, &args),
        }
        let stem = format!("{}{suffix}", args.scenario);
        let bars = args.out.join(format!("{stem}-bars.svg"));
        bar_plot(&bars, &groups, &args.scenario, &mode)?;
        let _ = writeln!(md, "\n![bars]({stem}-bars.svg)\n");
        if mode == "run" || mode == "udp" {
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

fn run_table(md: &mut String, groups: &[Group], args: &ReportArgs) {
    let rtt_col = if args.rtt_ms.is_some() { " p50 (RTT) |" } else { "" };
    let _ = writeln!(
        md,
        "| config | rounds | best rps | spread rps | vs {} | vs {} | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |{rtt_col} upstream conns / session | max idle sampled | budget high water | idle after load | hit rate | errors |",
        args.baseline, args.pool_off
    );
    let _ = writeln!(
        md,
        "|---|---|---|---|---|---|---|---|---|---|---|{}---|---|---|---|---|---|",
        if args.rtt_ms.is_some() { "---|" } else { "" }
    );
    for group in groups {
        let Some(best) = group.best() else { continue };
        let (min, max) = group.spread();
        let lat = best.session_latency.clone().unwrap_or_default();
        let rtt = match args.rtt_ms {
            Some(rtt) if rtt > 0.0 => format!(" {:.2} |", lat.p50_us as f64 / 1000.0 / rtt),
            Some(_) => " — |".into(),
            None => String::new(),
        };
        let reuse = best
            .upstream
            .map(|u| format!("{:.2}", u.connections as f64 / best.sessions.max(1) as f64))
            .unwrap_or_else(|| "—".into());
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0}–{:.0} | {} | {} | {} | {} | {} | {} | {} |{rtt} {reuse} | {} | {} | {} | {} | {} |",
            group.label,
            group.runs.len(),
            best.rps,
            min,
            max,
            ratio(groups, group, &args.baseline),
            ratio(groups, group, &args.pool_off),
            ms(lat.p50_us),
            ms(lat.p90_us),
            ms(lat.p99_us),
            ms(lat.p999_us),
            ms(lat.max_us),
            max_idle_sampled(group),
            budget_high_water(group),
            idle_after(best),
            hit_rate(best),
            errors_text(group),
        );
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

/// The pool's own hit rate in the last sample under load (the daemon's `hit_rate` field).
fn hit_rate(record: &RunRecord) -> String {
    record
        .stats_samples
        .last()
        .and_then(|s| s.get("hit_rate"))
        .and_then(|v| v.as_f64())
        .map_or_else(|| "—".into(), |rate| format!("{:.0}%", rate * 100.0))
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
