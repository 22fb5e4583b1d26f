//! `shadow2 report`: draws what `shadow2 bench` measured as SVG plots and a Markdown summary.
//!
//! Reads `BenchResults` (default `target/shadow2/bench.json`) and writes into the output
//! directory (default `target/shadow2/report`): `traps_per_op.svg`,
//! `traps_per_demand_fault.svg`, `pool_occupancy.svg` and `report.md`, printing each path.
//! The SVGs are drawn with plotters' SVG backend alone: text stays `<text>` elements for the
//! viewer to lay out, so no font is needed here.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::result::{BENCH_VERSION, BenchResults, KvmBench, RunResult, fmt_f64, fmt_secs};

/// Options of `report`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The bench results to draw (written by `shadow2 bench`).
    #[arg(long, default_value = "target/shadow2/bench.json")]
    input: PathBuf,
    /// The directory to write the plots and report.md into (created if missing).
    #[arg(long, default_value = "target/shadow2/report")]
    out: PathBuf,
}

/// The files written, in the order printed.
const TRAPS_PER_OP: &str = "traps_per_op.svg";
const TRAPS_PER_DF: &str = "traps_per_demand_fault.svg";
const POOL: &str = "pool_occupancy.svg";
const MARKDOWN: &str = "report.md";
const KVM_WALL_RATIO: &str = "kvm_wall_ratio.svg";
const KVM_EXITS_PER_OP: &str = "kvm_exits_per_op.svg";

/// At most this many runs get their own colour and legend entry in the pool plot; the
/// others are drawn in grey under one entry.
const POOL_LEGEND_MAX: usize = 12;
/// At most this many points per pool series are drawn.
const POOL_POINTS_MAX: usize = 1000;

/// Writes the report; prints the paths written, one per line.
pub fn run(args: &Args) -> Result<ExitCode, String> {
    let bench = load(&args.input)?;
    fs::create_dir_all(&args.out)
        .map_err(|e| format!("cannot create {}: {}", args.out.display(), io_msg(&e)))?;
    let mut files: Vec<(&str, String)> = Vec::new();
    if !bench.runs.is_empty() {
        files.extend(sim_files(&bench)?);
    }
    if !bench.kvm.is_empty() {
        files.extend(kvm_files(&bench.kvm)?);
    }
    files.push((MARKDOWN, markdown(&args.input, &bench)));
    for (name, text) in files {
        let path = args.out.join(name);
        fs::write(&path, text)
            .map_err(|e| format!("cannot write {}: {}", path.display(), io_msg(&e)))?;
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The simulator's plots.
fn sim_files(bench: &BenchResults) -> Result<[(&'static str, String); 3], String> {
    Ok([
        (
            TRAPS_PER_OP,
            bar_chart(
                &group(&bench.runs, |r| r.traps_per_op),
                "Traps per guest operation",
                "traps per guest operation",
                "guest pair",
            )?,
        ),
        (
            TRAPS_PER_DF,
            bar_chart(
                &group(&bench.runs, |r| r.traps_per_demand_fault),
                "Traps per demand fault",
                "traps per demand fault",
                "guest pair",
            )?,
        ),
        (POOL, pool_chart(&bench.runs)?),
    ])
}

/// The KVM bench's plots: engine/native wall time, and exits per guest operation of both,
/// by workload.
fn kvm_files(rows: &[KvmBench]) -> Result<[(&'static str, String); 2], String> {
    let categories: Vec<String> = rows
        .iter()
        .map(|r| format!("{} ({})", r.workload, r.size))
        .collect();
    let ratio = Grouped {
        categories: categories.clone(),
        series: vec![format!("{} {}", rows[0].guest, rows[0].pair)],
        values: vec![rows.iter().map(|r| Some(r.wall_ratio)).collect()],
    };
    let exits = Grouped {
        categories,
        series: vec!["engine (shadows)".into(), "native".into()],
        values: vec![
            rows.iter().map(|r| Some(r.engine_exits_per_op)).collect(),
            rows.iter().map(|r| Some(r.native_exits_per_op)).collect(),
        ],
    };
    Ok([
        (
            KVM_WALL_RATIO,
            bar_chart(
                &ratio,
                "Wall time under KVM: engine's shadows / native",
                "engine wall time / native wall time",
                "guest pair",
            )?,
        ),
        (
            KVM_EXITS_PER_OP,
            bar_chart(
                &exits,
                "VM exits per guest operation under KVM",
                "VM exits per guest operation",
                "paging",
            )?,
        ),
    ])
}

/// Reads and checks the bench results; every error is one line.
fn load(path: &Path) -> Result<BenchResults, String> {
    let hint = "(run shadow2 bench first)";
    let text = fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {} {hint}", path.display(), io_msg(&e)))?;
    let bench: BenchResults = serde_json::from_str(&text)
        .map_err(|e| format!("cannot parse {}: {e} {hint}", path.display()))?;
    if bench.version > BENCH_VERSION {
        return Err(format!(
            "{} is bench results version {}; this shadow2 reads up to version {BENCH_VERSION}",
            path.display(),
            bench.version
        ));
    }
    if bench.runs.is_empty() && bench.kvm.is_empty() {
        return Err(format!("{} holds no runs {hint}", path.display()));
    }
    Ok(bench)
}

/// An I/O error's message without the "(os error N)" suffix.
fn io_msg(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

/// A metric by category (workload) and series (guest and pair), for a grouped bar chart.
#[derive(Debug)]
struct Grouped {
    categories: Vec<String>,
    series: Vec<String>,
    /// `values[series][category]`: the mean over the runs of that cell, if any.
    values: Vec<Vec<Option<f64>>>,
}

/// Groups the runs: a category per workload (per workload and size where a workload ran
/// at several sizes), a series per guest and pair (and backend, where several were run);
/// runs that fall in the same cell (other seeds) are averaged.
fn group(runs: &[RunResult], metric: impl Fn(&RunResult) -> f64) -> Grouped {
    let sized = |w: &str| {
        let mut sizes = runs.iter().filter(|r| r.workload == w).map(|r| r.size);
        let first = sizes.next();
        sizes.any(|s| Some(s) != first)
    };
    let backends = runs.iter().any(|r| r.backend != runs[0].backend);
    let category = |r: &RunResult| {
        if sized(&r.workload) {
            format!("{} ({})", r.workload, r.size)
        } else {
            r.workload.clone()
        }
    };
    let series = |r: &RunResult| {
        if backends {
            format!("{} {} {}", r.guest, r.pair, r.backend)
        } else {
            format!("{} {}", r.guest, r.pair)
        }
    };
    let mut g = Grouped {
        categories: Vec::new(),
        series: Vec::new(),
        values: Vec::new(),
    };
    let mut sums: Vec<Vec<(f64, u32)>> = Vec::new();
    for r in runs {
        let (c, s) = (category(r), series(r));
        let ci = index_or_push(&mut g.categories, c);
        let si = index_or_push(&mut g.series, s);
        sums.resize_with(g.series.len(), Vec::new);
        for row in &mut sums {
            row.resize(g.categories.len(), (0.0, 0));
        }
        let v = metric(r);
        let cell = &mut sums[si][ci];
        cell.0 += if v.is_finite() { v } else { 0.0 };
        cell.1 += 1;
    }
    g.values = sums
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|(sum, n)| (n > 0).then(|| sum / f64::from(n)))
                .collect()
        })
        .collect();
    g
}

fn index_or_push(v: &mut Vec<String>, s: String) -> usize {
    match v.iter().position(|x| *x == s) {
        Some(i) => i,
        None => {
            v.push(s);
            v.len() - 1
        }
    }
}

/// A series' colour.
fn colour(i: usize) -> RGBAColor {
    Palette99::pick(i).to_rgba()
}

/// Draws a legend (a swatch and a label per entry) in `area`, from the top.
fn legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    entries: &[(String, RGBAColor)],
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| format!("cannot draw the legend: {e}");
    let top = 40;
    area.draw(&Text::new(title, (8, top), ("sans-serif", 15).into_font()))
        .map_err(err)?;
    for (i, (label, c)) in entries.iter().enumerate() {
        let y = top + 24 + 20 * i as i32;
        area.draw(&Rectangle::new([(8, y), (22, y + 12)], c.filled()))
            .map_err(err)?;
        area.draw(&Text::new(
            label.as_str(),
            (28, y),
            ("sans-serif", 13).into_font(),
        ))
        .map_err(err)?;
    }
    Ok(())
}

/// The width of a legend for these labels (the SVG viewer lays out the text; this is an
/// estimate of 7 pixels a character).
fn legend_width<'a>(labels: impl Iterator<Item = &'a str>) -> u32 {
    let chars = labels.map(|l| l.chars().count()).max().unwrap_or(0);
    (40 + 7 * chars as u32).clamp(140, 420)
}

/// A number on an axis: 1234567 as "1.23M", 250000 as "250k", 0.25 as "0.25".
fn axis_num(v: f64) -> String {
    let a = v.abs();
    let (scaled, suffix) = if a >= 1e9 {
        (v / 1e9, "G")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e5 {
        (v / 1e3, "k")
    } else if a >= 10.0 || a == 0.0 {
        return format!("{v:.0}");
    } else {
        (v, "")
    };
    let s = fmt_f64(scaled);
    // Trailing zeros only clutter an axis.
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    format!("{s}{suffix}")
}

/// A grouped bar chart of `g`: categories along x ("workload"), one bar per series.
fn bar_chart(g: &Grouped, title: &str, y_desc: &str, legend_title: &str) -> Result<String, String> {
    let err = |e: DrawingAreaErrorKind<std::io::Error>| format!("cannot draw {title}: {e}");
    let ncat = g.categories.len().max(1);
    let nser = g.series.len().max(1);
    let legend_w = legend_width(g.series.iter().map(String::as_str));
    // Room for the bars and for the workload's name under them.
    let name_w = g
        .categories
        .iter()
        .map(|c| 7 * c.chars().count() + 12)
        .max()
        .unwrap_or(0);
    let plot_w = u32::try_from(ncat * (nser * 18 + 36).max(name_w) + 140)
        .unwrap_or(u32::MAX)
        .clamp(640, 4000);
    let height = u32::try_from(nser * 20 + 120)
        .unwrap_or(u32::MAX)
        .clamp(480, 2400);
    let max = g
        .values
        .iter()
        .flatten()
        .flatten()
        .copied()
        .fold(0.0_f64, f64::max);
    let ymax = if max > 0.0 { max * 1.15 } else { 1.0 };
    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (plot_w + legend_w, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (left, right) = root.split_horizontally(plot_w);
        let mut chart = ChartBuilder::on(&left)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(Slots(ncat), 0.0..ymax)
            .map_err(err)?;
        let categories = &g.categories;
        let cat_label = |x: &f64| {
            let i = x.floor();
            if i >= 0.0 {
                categories.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("workload")
            .y_desc(y_desc)
            .x_label_formatter(&cat_label)
            .y_label_formatter(&|y: &f64| axis_num(*y))
            .axis_desc_style(("sans-serif", 16))
            .draw()
            .map_err(err)?;
        let bar_w = 0.8 / nser as f64;
        let bars = g.values.iter().enumerate().flat_map(|(si, row)| {
            row.iter().enumerate().filter_map(move |(ci, v)| {
                v.map(|v| {
                    let x0 = ci as f64 + 0.1 + bar_w * si as f64;
                    Rectangle::new([(x0, 0.0), (x0 + bar_w, v)], colour(si).filled())
                })
            })
        });
        chart.draw_series(bars).map_err(err)?;
        // The values over the bars, while there is room for them.
        if ncat * nser <= 24 {
            let style = &("sans-serif", 11)
                .into_font()
                .into_text_style(&left)
                .pos(Pos::new(HPos::Center, VPos::Bottom));
            let labels = g.values.iter().enumerate().flat_map(|(si, row)| {
                row.iter().enumerate().filter_map(move |(ci, v)| {
                    v.map(|v| {
                        let x = ci as f64 + 0.1 + bar_w * (si as f64 + 0.5);
                        Text::new(axis_num(v), (x, v + ymax * 0.01), style.clone())
                    })
                })
            });
            chart.draw_series(labels).map_err(err)?;
        }
        let entries: Vec<(String, RGBAColor)> = g
            .series
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), colour(i)))
            .collect();
        legend(&right, legend_title, &entries)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// An x axis of `n` category slots, slot `i` being `[i, i + 1)`, with its key points (ticks
/// and labels) at the slots' centres.
#[derive(Clone, Copy, Debug)]
struct Slots(usize);

impl Ranged for Slots {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let n = self.0.max(1) as f64;
        limit.0 + (v / n * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        // Labels only: no light grid lines between them.
        if hint.weight().allow_light_points() {
            return Vec::new();
        }
        (0..self.0).map(|i| i as f64 + 0.5).collect()
    }

    fn range(&self) -> std::ops::Range<f64> {
        0.0..self.0.max(1) as f64
    }
}

/// Keeps at most `max` points of a series, evenly spread, always the last.
fn thin(points: &[(u64, u64)], max: usize) -> Vec<(f64, f64)> {
    let step = points.len().div_ceil(max.max(1)).max(1);
    let mut out: Vec<(f64, f64)> = points
        .iter()
        .step_by(step)
        .map(|&(x, y)| (x as f64, y as f64))
        .collect();
    if let Some(&(x, y)) = points.last()
        && !(points.len() - 1).is_multiple_of(step)
    {
        out.push((x as f64, y as f64));
    }
    out
}

/// A line chart of pool pages in use against guest operations, a line per run that
/// recorded its pool series; the runs with the highest peaks get colours and legend
/// entries, the rest (past [`POOL_LEGEND_MAX`]) are grey under one entry.
fn pool_chart(runs: &[RunResult]) -> Result<String, String> {
    let title = "Shadow pool occupancy";
    let err = |e: DrawingAreaErrorKind<std::io::Error>| format!("cannot draw {title}: {e}");
    let mut with: Vec<&RunResult> = runs.iter().filter(|r| !r.pool_series.is_empty()).collect();
    let peak = |r: &RunResult| r.pool_series.iter().map(|p| p.1).max().unwrap_or(0);
    // Highest peak first (stable: ties keep bench order).
    with.sort_by_key(|r| std::cmp::Reverse(peak(r)));
    let (named, rest) = with.split_at(with.len().min(POOL_LEGEND_MAX));
    let short = |r: &RunResult| format!("{} {} {}", r.guest, r.workload, r.pair);
    // Runs that the short label does not tell apart get the long one.
    let label = |r: &RunResult| {
        let s = short(r);
        if with.iter().filter(|o| short(o) == s).count() > 1 {
            format!("{} seed {}", r.name(), r.seed)
        } else {
            s
        }
    };
    let mut entries: Vec<(String, RGBAColor)> = named
        .iter()
        .enumerate()
        .map(|(i, r)| (label(r), colour(i)))
        .collect();
    let grey = RGBColor(170, 170, 170).to_rgba();
    if !rest.is_empty() {
        entries.push((format!("{} more runs", rest.len()), grey));
    }
    let xmax = with
        .iter()
        .flat_map(|r| r.pool_series.iter().map(|p| p.0))
        .max()
        .unwrap_or(0);
    let ymax = with.iter().map(|r| peak(r)).max().unwrap_or(0);
    let xmax = if xmax > 0 { xmax as f64 } else { 1.0 };
    let ymax = if ymax > 0 { ymax as f64 * 1.1 } else { 1.0 };
    let legend_w = legend_width(entries.iter().map(|e| e.0.as_str()));
    let (plot_w, height) = (900, 540);
    let mut svg = String::new();
    {
        let root =
            SVGBackend::with_string(&mut svg, (plot_w + legend_w, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (left, right) = root.split_horizontally(plot_w);
        let mut chart = ChartBuilder::on(&left)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(0.0..xmax, 0.0..ymax)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("guest operations")
            .y_desc("pool pages in use")
            .x_label_formatter(&|x: &f64| axis_num(*x))
            .y_label_formatter(&|y: &f64| axis_num(*y))
            .axis_desc_style(("sans-serif", 16))
            .draw()
            .map_err(err)?;
        // Grey first, so that the coloured lines are drawn over them.
        let lines = rest
            .iter()
            .map(|r| (*r, grey, 1))
            .chain(named.iter().enumerate().map(|(i, r)| (*r, colour(i), 2)));
        for (r, c, w) in lines {
            let points = thin(&r.pool_series, POOL_POINTS_MAX);
            chart
                .draw_series(std::iter::once(PathElement::new(points, c.stroke_width(w))))
                .map_err(err)?;
        }
        if with.is_empty() {
            left.draw(&Text::new(
                "no run recorded a pool series",
                (
                    i32::try_from(plot_w / 2).unwrap_or(0),
                    i32::try_from(height / 2).unwrap_or(0),
                ),
                ("sans-serif", 16)
                    .into_font()
                    .into_text_style(&left)
                    .pos(Pos::new(HPos::Center, VPos::Center)),
            ))
            .map_err(err)?;
        }
        legend(&right, "guest workload pair", &entries)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// Escapes a Markdown table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// The Markdown summary: a table of the runs, the extremes, the mismatches, the plots;
/// then the KVM bench, if there is one.
fn markdown(input: &Path, bench: &BenchResults) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# shadow2 bench report\n");
    if !bench.runs.is_empty() {
        sim_markdown(&mut md, input, bench);
    }
    if !bench.goals.is_empty() {
        goals_markdown(&mut md, &bench.goals);
    }
    if !bench.kvm.is_empty() {
        kvm_markdown(&mut md, input, &bench.kvm);
    }
    md
}

/// Issue 12's goal rows.
fn goals_markdown(md: &mut String, goals: &[crate::goals::Goal]) {
    let _ = writeln!(
        md,
        "## Trap and memory goals\n\nEach row is the worst of the runs it covers.\n"
    );
    let _ = writeln!(md, "| what | measured | goal (at most) | met | worst run |");
    let _ = writeln!(md, "|---|---:|---:|---|---|");
    for g in goals {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} |",
            cell(&g.what),
            g.measured.map_or("-".into(), fmt_f64),
            fmt_f64(g.at_most),
            match (g.measured, g.met) {
                (None, _) => "not measured",
                (_, true) => "yes",
                (_, false) => "no",
            },
            cell(&g.worst_run)
        );
    }
    md.push('\n');
}

/// The KVM bench: a table per workload and its plots.
fn kvm_markdown(md: &mut String, input: &Path, rows: &[KvmBench]) {
    let _ = writeln!(
        md,
        "## Under KVM: the engine's shadows against native paging\n\n{} workloads from `{}`, each run on the engine's shadows and natively in the same bench.\n",
        rows.len(),
        input.display()
    );
    let _ = writeln!(
        md,
        "| guest | workload | pair | size | guest ops | engine wall | native wall | engine/native | engine exits/op | native exits/op |"
    );
    let _ = writeln!(md, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(&r.guest),
            cell(&r.workload),
            cell(&r.pair),
            r.size,
            r.guest_ops,
            fmt_secs(r.engine_wall_s),
            fmt_secs(r.native_wall_s),
            fmt_f64(r.wall_ratio),
            fmt_f64(r.engine_exits_per_op),
            fmt_f64(r.native_exits_per_op)
        );
    }
    md.push('\n');
    for (file, what) in [
        (KVM_WALL_RATIO, "Wall time, engine / native"),
        (KVM_EXITS_PER_OP, "VM exits per guest operation"),
    ] {
        let _ = writeln!(md, "![{what}]({file})\n");
    }
}

/// The simulator's runs.
fn sim_markdown(md: &mut String, input: &Path, bench: &BenchResults) {
    let runs = &bench.runs;
    let _ = writeln!(
        *md,
        "{} runs from `{}` (bench results version {}).\n",
        runs.len(),
        input.display(),
        bench.version
    );
    let _ = writeln!(
        *md,
        "| guest | workload | pair | guest ops | traps/op | traps/demand fault | µs/trap | mismatches |"
    );
    let _ = writeln!(*md, "|---|---|---|---:|---:|---:|---:|---:|");
    for r in runs {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(&r.guest),
            cell(&r.workload),
            cell(&r.pair),
            r.guest_ops,
            fmt_f64(r.traps_per_op),
            fmt_f64(r.traps_per_demand_fault),
            fmt_f64(r.engine_us_per_trap),
            r.oracle_mismatches
        );
    }
    md.push('\n');
    let by_rate = |a: &&RunResult, b: &&RunResult| a.traps_per_op.total_cmp(&b.traps_per_op);
    // max_by keeps the last of equals and min_by the first: both fine for a summary.
    if let (Some(hi), Some(lo)) = (runs.iter().max_by(by_rate), runs.iter().min_by(by_rate)) {
        let _ = writeln!(
            md,
            "- Highest traps per guest operation: {} ({}).",
            cell(&hi.name()),
            fmt_f64(hi.traps_per_op)
        );
        let _ = writeln!(
            md,
            "- Lowest traps per guest operation: {} ({}).",
            cell(&lo.name()),
            fmt_f64(lo.traps_per_op)
        );
    }
    let mismatches: u64 = runs.iter().map(|r| r.oracle_mismatches).sum();
    let violations: u64 = runs.iter().map(|r| r.audit_violations).sum();
    let with_mismatches = runs.iter().filter(|r| r.oracle_mismatches > 0).count();
    let _ = writeln!(
        *md,
        "- Oracle mismatches: {mismatches} in total ({with_mismatches} of {} runs); audit violations: {violations}.",
        runs.len()
    );
    let _ = writeln!(*md, "\n## Plots\n");
    for (file, what) in [
        (TRAPS_PER_OP, "Traps per guest operation"),
        (TRAPS_PER_DF, "Traps per demand fault"),
        (POOL, "Shadow pool occupancy"),
    ] {
        let _ = writeln!(*md, "- [{what}]({file})");
    }
    md.push('\n');
    for (file, what) in [
        (TRAPS_PER_OP, "Traps per guest operation"),
        (TRAPS_PER_DF, "Traps per demand fault"),
        (POOL, "Shadow pool occupancy"),
    ] {
        let _ = writeln!(*md, "![{what}]({file})\n");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn run(guest: &str, workload: &str, pair: &str, size: u64, rate: f64) -> RunResult {
        RunResult {
            guest: guest.into(),
            workload: workload.into(),
            pair: pair.into(),
            backend: "sim".into(),
            size,
            traps_per_op: rate,
            ..RunResult::default()
        }
    }

    #[test]
    fn grouping_by_workload_and_guest_pair_averages_duplicates() {
        let runs = [
            run("linux", "fork", "4on4", 8, 1.0),
            run("linux", "fork", "4on4", 8, 3.0),
            run("bsd", "fork", "3on4", 8, 5.0),
            run("bsd", "mmap", "3on4", 8, 7.0),
        ];
        let g = group(&runs, |r| r.traps_per_op);
        assert_eq!(g.categories, ["fork", "mmap"]);
        assert_eq!(g.series, ["linux 4on4", "bsd 3on4"]);
        assert_eq!(
            g.values,
            [vec![Some(2.0), None], vec![Some(5.0), Some(7.0)]]
        );
    }

    #[test]
    fn several_sizes_split_the_workload() {
        let runs = [
            run("linux", "fork", "4on4", 8, 1.0),
            run("linux", "fork", "4on4", 16, 3.0),
        ];
        let g = group(&runs, |r| r.traps_per_op);
        assert_eq!(g.categories, ["fork (8)", "fork (16)"]);
    }

    #[test]
    fn thinning_keeps_the_last_point() {
        let pts: Vec<(u64, u64)> = (0..10).map(|i| (i, i)).collect();
        let t = thin(&pts, 4);
        assert_eq!(t.first(), Some(&(0.0, 0.0)));
        assert_eq!(t.last(), Some(&(9.0, 9.0)));
        assert!(t.len() <= 5);
        assert_eq!(thin(&pts, 100).len(), 10);
    }

    #[test]
    fn axis_numbers_are_short() {
        assert_eq!(axis_num(0.0), "0");
        assert_eq!(axis_num(0.25), "0.25");
        assert_eq!(axis_num(1.5), "1.5");
        assert_eq!(axis_num(9000.0), "9000");
        assert_eq!(axis_num(250_000.0), "250k");
        assert_eq!(axis_num(1_234_567.0), "1.235M");
    }

    fn kvm_row(workload: &str, ratio: f64, engine: f64, native: f64) -> KvmBench {
        KvmBench {
            guest: "linux64".into(),
            workload: workload.into(),
            pair: "4on4".into(),
            size: 2,
            wall_ratio: ratio,
            engine_exits_per_op: engine,
            native_exits_per_op: native,
            ..KvmBench::default()
        }
    }

    #[test]
    fn a_kvm_bench_is_drawn_by_workload_with_both_exit_rates() {
        let rows = [
            kvm_row("forkwait", 2.5, 1.25, 1.0),
            kvm_row("demand", 0.75, 1.5, 1.0),
        ];
        let [(ratio_file, ratio_svg), (exits_file, exits_svg)] = kvm_files(&rows).unwrap();
        assert_eq!((ratio_file, exits_file), (KVM_WALL_RATIO, KVM_EXITS_PER_OP));
        for label in ["forkwait (2)", "demand (2)", "2.5", "0.75"] {
            assert!(ratio_svg.contains(label), "{label} missing");
        }
        for label in ["engine (shadows)", "native", "1.25", "1.5"] {
            assert!(exits_svg.contains(label), "{label} missing");
        }
    }

    #[test]
    fn the_markdown_has_a_kvm_section_only_when_there_is_a_kvm_bench() {
        let sim_only = BenchResults::new(vec![run("linux64", "forkwait", "4on4", 8, 1.0)]);
        let md = markdown(Path::new("b.json"), &sim_only);
        assert!(
            md.contains("traps_per_op.svg") && !md.contains("Under KVM"),
            "{md}"
        );
        let kvm_only = BenchResults {
            kvm: vec![kvm_row("forkwait", 2.5, 1.25, 1.0)],
            ..BenchResults::new(Vec::new())
        };
        let md = markdown(Path::new("b.json"), &kvm_only);
        assert!(md.contains("Under KVM") && md.contains("| 2.500 |"), "{md}");
        assert!(!md.contains("traps_per_op.svg"), "{md}");
    }

    #[test]
    fn io_messages_lose_the_os_error_number() {
        let e = std::io::Error::from_raw_os_error(2);
        assert!(!io_msg(&e).contains("os error"));
    }
}
