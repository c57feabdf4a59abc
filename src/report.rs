//! The run report: `<run>/report/report.md` and SVG plots, built from each
//! step's manifest and `metrics.jsonl` (never written into a checkpoint).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use baton_core::checkpoint::{Checkpoint, Manifest};
use baton_core::files::{Mode, OutputDir, OutputKind};

/// One plotted series: name and `(x, y)` points.
type Series = (String, Vec<(f64, f64)>);

/// The metrics.jsonl lines of a stage as JSON objects.
fn read_metrics(dir: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Points `(x_key, y_key)` of every line that has both.
fn points(lines: &[serde_json::Value], x_key: &str, y_key: &str) -> Vec<(f64, f64)> {
    lines
        .iter()
        .filter_map(|v| Some((v[x_key].as_f64()?, v[y_key].as_f64()?)))
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect()
}

/// How a chart's y axis is scaled.
#[derive(Clone, Copy, PartialEq)]
enum YAxis {
    /// To the data's range (losses: the interesting part is near the bottom).
    Range,
    /// From zero (rates and shares: small wobbles should not look like swings).
    FromZero,
}

/// Draws series on one chart into `path` (SVG). Returns false when there is nothing to draw.
fn plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_axis: YAxis,
    series: &[Series],
) -> Result<bool, String> {
    let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    if all.is_empty() {
        return Ok(false);
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in &all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y_axis == YAxis::FromZero && y0 >= 0.0 {
        y0 = 0.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let root = SVGBackend::new(path, (640, 360)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .x_label_formatter(&|x| axis_label(*x))
        .y_label_formatter(&|y| axis_label(*y))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| err(&e))?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(true)
}

/// The plots of a stage: `(file name, title, x label, y axis, series)`.
fn stage_plots(
    lines: &[serde_json::Value],
) -> Vec<(&'static str, &'static str, &'static str, YAxis, Vec<Series>)> {
    let s = |name: &str, x: &str, y: &str| (name.to_string(), points(lines, x, y));
    vec![
        (
            "loss.svg",
            "loss (nats/token)",
            "tokens seen",
            YAxis::Range,
            vec![
                s("train", "tokens_seen", "train/loss"),
                s("validation", "tokens_seen", "val/loss"),
            ],
        ),
        (
            "bpb.svg",
            "validation bits per byte",
            "tokens seen",
            YAxis::Range,
            vec![s("val/bpb", "tokens_seen", "val/bpb")],
        ),
        (
            "lr.svg",
            "learning rate",
            "step",
            YAxis::FromZero,
            vec![s("lr", "step", "lr")],
        ),
        (
            "throughput.svg",
            "training tokens/s",
            "step",
            YAxis::FromZero,
            vec![s("tok/s", "step", "tok_per_s")],
        ),
        (
            "tasks.svg",
            "held-out task accuracy and stop rate",
            "step",
            YAxis::FromZero,
            vec![
                s("task_accuracy", "step", "task_accuracy"),
                s("stop_rate", "step", "stop_rate"),
            ],
        ),
        (
            "rewards.svg",
            "reward margins and accuracies (training steps)",
            "step",
            YAxis::Range,
            vec![
                s("rewards/margins", "step", "rewards/margins"),
                s("rewards/accuracies", "step", "rewards/accuracies"),
            ],
        ),
        (
            "kl.svg",
            "KL to the reference (per reply)",
            "step",
            YAxis::Range,
            vec![s("kl_to_reference", "step", "kl_to_reference")],
        ),
    ]
}

fn format_metric(v: f64) -> String {
    if v.abs() >= 1000.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.4}")
    }
}

/// Axis numbers: 1.25M, 1.2k, 300k, 40, 0.25 — as many decimals as the tick
/// needs (up to three), so neighbouring ticks never print the same label.
fn axis_label(x: f64) -> String {
    let short = |v: f64, unit: &str| {
        let s = format!("{v:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        format!("{s}{unit}")
    };
    let a = x.abs();
    if a >= 1e6 {
        short(x / 1e6, "M")
    } else if a >= 1e3 {
        short(x / 1e3, "k")
    } else {
        short(x, "")
    }
}

/// The report directory: `report.md` and `.svg` plots, nothing else.
pub const REPORT_OUTPUT: OutputKind = OutputKind {
    noun: "run report (a directory of report.md and .svg plots)",
    is_ours: is_report_dir,
    resumable: false,
};

fn is_report_dir(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    let names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names
        .iter()
        .all(|n| n == "report.md" || n.ends_with(".svg") || n.starts_with('.'))
        && fs::read_to_string(dir.join("report.md")).is_ok_and(|t| t.starts_with("# Baton run"))
}

/// Writes `<run>/report/`: `report.md` (lineage, a metrics table, held-out
/// accuracy per family, each step's plots, sample generations) and the plots,
/// replacing an earlier report (and nothing else). `steps` are the run's
/// checkpoints by step name, in order.
pub fn write_run_report(
    run: &Path,
    steps: &[(String, Checkpoint)],
    samples: &[(String, String)],
) -> Result<PathBuf, String> {
    let out = OutputDir::open(
        &run.join("report"),
        REPORT_OUTPUT,
        Mode::Fresh { force: true },
        &[],
    )
    .map_err(|e| e.to_string())?;
    let mut plots: Vec<(String, Vec<String>)> = Vec::new();
    for (name, ckpt) in steps {
        let lines = read_metrics(&ckpt.dir);
        let mut files = Vec::new();
        for (file, title, x_label, y_axis, series) in stage_plots(&lines) {
            let series: Vec<Series> = series.into_iter().filter(|(_, p)| !p.is_empty()).collect();
            let file = format!("{name}-{file}");
            if plot(&out.work.join(&file), title, x_label, y_axis, &series)? {
                files.push(file);
            }
        }
        plots.push((name.clone(), files));
    }
    let compared = compare_sources(&out.work, steps)?;
    if !compared.is_empty() {
        plots.push(("validation per source, all steps".into(), compared));
    }
    let md = run_markdown(steps, &plots, samples);
    fs::write(out.work.join("report.md"), md)
        .map_err(|e| format!("{}: {e}", out.work.display()))?;
    out.commit().map_err(|e| e.to_string())
}

/// One plot per data source that some step validated on by name
/// (`val/bpb/<source>`), with every such step's curve: e.g. the earlier
/// domain's bits per byte while continuing with and without replay. A step
/// that continued another step's weights (`--from`) is drawn from where that
/// one ended, so the x axis counts optimizer steps along the lineage.
fn compare_sources(dir: &Path, steps: &[(String, Checkpoint)]) -> Result<Vec<String>, String> {
    let mut offsets: Vec<f64> = Vec::new();
    for (_, ckpt) in steps {
        let offset = ckpt
            .manifest
            .parents
            .iter()
            .filter(|p| p.role == "parent")
            .find_map(|p| {
                let i = steps
                    .iter()
                    .position(|(_, c)| c.manifest_sha256 == p.manifest_sha256)?;
                Some(offsets.get(i)? + steps[i].1.manifest.step as f64)
            })
            .unwrap_or(0.0);
        offsets.push(offset);
    }
    let metrics: Vec<(String, Vec<serde_json::Value>)> = steps
        .iter()
        .map(|(name, ckpt)| (name.clone(), read_metrics(&ckpt.dir)))
        .collect();
    let mut sources = std::collections::BTreeSet::new();
    for (_, lines) in &metrics {
        for line in lines {
            if let Some(map) = line.as_object() {
                sources.extend(
                    map.keys()
                        .filter_map(|k| k.strip_prefix("val/bpb/"))
                        .map(str::to_string),
                );
            }
        }
    }
    let mut files = Vec::new();
    for source in sources {
        let key = format!("val/bpb/{source}");
        let series: Vec<Series> = metrics
            .iter()
            .zip(&offsets)
            .map(|((name, lines), offset)| {
                let curve = points(lines, "step", &key);
                let shifted = curve.into_iter().map(|(x, y)| (x + offset, y)).collect();
                (name.clone(), shifted)
            })
            .filter(|(_, p): &Series| !p.is_empty())
            .collect();
        let file = format!("compare-bpb-{source}.svg");
        let title = format!("validation bits per byte on {source}");
        if plot(
            &dir.join(&file),
            &title,
            "step along the lineage",
            YAxis::Range,
            &series,
        )? {
            files.push(file);
        }
    }
    Ok(files)
}

/// The text of `report.md`.
fn run_markdown(
    steps: &[(String, Checkpoint)],
    plots: &[(String, Vec<String>)],
    samples: &[(String, String)],
) -> String {
    let stages: Vec<(&str, &Manifest, &str)> = steps
        .iter()
        .map(|(n, c)| (n.as_str(), &c.manifest, c.manifest_sha256.as_str()))
        .collect();
    let mut md = String::from("# Baton run\n\n## Lineage\n\n");
    for (name, m, sha) in &stages {
        let parents: Vec<String> = m
            .parents
            .iter()
            .map(|p| {
                let sha = &p.manifest_sha256[..12.min(p.manifest_sha256.len())];
                format!("{} {} (`{sha}`…)", p.role, p.stage)
            })
            .collect();
        let parents = if parents.is_empty() {
            "—".to_string()
        } else {
            parents.join(", ")
        };
        let _ = writeln!(
            md,
            "- **{name}** `{}`… ← {parents}",
            &sha[..12.min(sha.len())]
        );
    }
    // The harder held-out set's accuracy, when an align step measured one.
    let harder = stages
        .iter()
        .any(|(_, m, _)| m.metrics.contains_key("harder/task_accuracy"));
    md.push_str(if harder {
        "\n## Metrics\n\n| stage | val_bpb | task_accuracy | harder task_accuracy | stop_rate | kl_to_reference | tokens/s | wall s |\n|---|---|---|---|---|---|---|---|\n"
    } else {
        "\n## Metrics\n\n| stage | val_bpb | task_accuracy | stop_rate | kl_to_reference | tokens/s | wall s |\n|---|---|---|---|---|---|---|\n"
    });
    for (name, m, _) in &stages {
        let get = |k: &str| {
            m.metrics
                .get(k)
                .map_or("—".to_string(), |v| format_metric(*v))
        };
        let accuracy = if harder {
            format!("{} | {}", get("task_accuracy"), get("harder/task_accuracy"))
        } else {
            get("task_accuracy")
        };
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} | {} |",
            get("val_bpb"),
            accuracy,
            get("stop_rate"),
            get("kl_to_reference"),
            get("tokens_per_second"),
            m.metrics
                .get("wall_seconds")
                .map_or("—".to_string(), |v| format!("{v:.1}"))
        );
    }
    let mut per_family: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (_, m, _) in &stages {
        for (k, v) in &m.metrics {
            if let Some(f) = k.strip_prefix("task_accuracy/") {
                per_family
                    .entry(f.to_string())
                    .or_default()
                    .push(format!("{v:.2}"));
            }
        }
    }
    if !per_family.is_empty() {
        md.push_str(
            "\n### Held-out accuracy per family (steps in order)\n\n| family | accuracy |\n|---|---|\n",
        );
        for (f, v) in per_family {
            let _ = writeln!(md, "| {f} | {} |", v.join(" → "));
        }
    }
    md.push_str("\n## Plots\n\n");
    for (name, files) in plots {
        if !files.is_empty() {
            let _ = writeln!(md, "### {name}\n");
        }
        for file in files {
            let _ = writeln!(md, "![{file}]({file})");
        }
        md.push('\n');
    }
    if !samples.is_empty() {
        md.push_str(
            "## Sample generations (final checkpoint, greedy)\n\n| prompt | reply |\n|---|---|\n",
        );
        for (prompt, reply) in samples {
            let clean = |s: &str| s.replace('|', "\\|").replace('\n', " ");
            let _ = writeln!(md, "| {} | {} |", clean(prompt), clean(reply));
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::axis_label;

    #[test]
    fn axis_labels_are_short_and_tell_neighbouring_ticks_apart() {
        let ticks = [600.0, 800.0, 1000.0, 1200.0, 1400.0, 1600.0, 1800.0];
        let labels: Vec<String> = ticks.iter().map(|&t| axis_label(t)).collect();
        assert_eq!(labels, ["600", "800", "1k", "1.2k", "1.4k", "1.6k", "1.8k"]);
        assert_eq!(axis_label(6250.0), "6.25k");
        assert_eq!(axis_label(1_250_000.0), "1.25M");
        assert_eq!(axis_label(0.25), "0.25");
        assert_eq!(axis_label(-3.0), "-3");
    }
}
