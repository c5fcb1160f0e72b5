//! The SVG plot: percentile distributions (HdrHistogram style: x is the percentile on a
//! log(1/(1-q)) axis, y the latency on a log axis) of SLO start delay and promotion lag, split
//! vs monolithic, plus the promotion scenario's lag when it ran; and x-y line charts with log
//! axes ([`draw_lines`]) for the scale scenario's cost against table size and lag against rate.

use crate::hist::Hist;
use anyhow::anyhow;
use plotters::prelude::*;
use std::path::Path;

/// Up to p99.99 on the x axis.
const NINES: f64 = 4.0;
/// Values are clamped to this floor so that zeros show on the log axis.
const FLOOR_MS: f64 = 0.01;

pub struct Series<'a> {
    pub label: String,
    pub hist: &'a Hist,
    pub color: RGBColor,
}

pub struct Panel<'a> {
    pub title: String,
    pub series: Vec<Series<'a>>,
}

pub const SPLIT: RGBColor = RGBColor(31, 119, 180);
pub const MONOLITHIC: RGBColor = RGBColor(214, 39, 40);
pub const PROMOTION: RGBColor = RGBColor(44, 160, 44);

fn percentile_label(x: f64) -> String {
    match x.round() as i64 {
        0 => "0%".into(),
        1 => "90%".into(),
        2 => "99%".into(),
        3 => "99.9%".into(),
        4 => "99.99%".into(),
        _ => String::new(),
    }
}

fn ms_label(v: f64) -> String {
    if v >= 1000.0 {
        format!("{}s", v / 1000.0)
    } else {
        format!("{v}ms")
    }
}

pub fn draw(path: &Path, panels: &[Panel<'_>]) -> anyhow::Result<()> {
    let width = 620 * panels.len().max(1) as u32;
    let root = SVGBackend::new(path, (width, 460)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        let curves: Vec<(&Series<'_>, Vec<(f64, f64)>)> = panel
            .series
            .iter()
            .map(|s| {
                let points = s
                    .hist
                    .percentile_curve(NINES)
                    .into_iter()
                    .map(|(x, y)| (x, y.max(FLOOR_MS)))
                    .collect();
                (s, points)
            })
            .collect();
        let top = curves
            .iter()
            .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
            .fold(1.0f64, f64::max);
        let y_max = 10f64.powf(top.log10().ceil()).max(1.0);
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 18))
            .margin(12)
            .margin_right(36)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..NINES, (FLOOR_MS..y_max).log_scale())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_labels(5)
            .x_label_formatter(&|x| percentile_label(*x))
            .y_label_formatter(&|y| ms_label(*y))
            .x_desc("percentile")
            .y_desc("latency")
            .draw()
            .map_err(|e| err(&e))?;
        for (series, points) in curves {
            if series.hist.is_empty() || points.is_empty() {
                continue;
            }
            let color = series.color;
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(format!("{} (n={})", series.label, series.hist.len()))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// One line of an x-y chart: its points, drawn as a line with a dot at each point.
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
}

/// An x-y chart with log axes (table sizes and costs both span decades).
pub struct LinePanel {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub lines: Vec<Line>,
}

/// Colors for the lines of one panel, in order.
pub const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// `color` halfway to white: the companion line of the same series.
pub fn lighter(color: RGBColor) -> RGBColor {
    let half = |c: u8| c + (255 - c) / 2;
    RGBColor(half(color.0), half(color.1), half(color.2))
}

/// The log-axis range that holds `values` (positive), widened by a factor of two each side so
/// that a single value still makes a range.
fn log_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| *v > 0.0 && v.is_finite())
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (FLOOR_MS, 1.0);
    }
    (lo / 2.0, hi * 2.0)
}

fn short_number(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{}k", v / 1e3)
    } else {
        format!("{v}")
    }
}

pub fn draw_lines(path: &Path, panels: &[LinePanel]) -> anyhow::Result<()> {
    let width = 620 * panels.len().max(1) as u32;
    let root = SVGBackend::new(path, (width, 460)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        let points = || panel.lines.iter().flat_map(|l| l.points.iter());
        let (x_lo, x_hi) = log_range(points().map(|(x, _)| *x));
        let (y_lo, y_hi) = log_range(points().map(|(_, y)| y.max(FLOOR_MS)));
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, ("sans-serif", 18))
            .margin(12)
            .margin_right(36)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((x_lo..x_hi).log_scale(), (y_lo..y_hi).log_scale())
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_label_formatter(&|x| short_number(*x))
            .y_label_formatter(&|y| ms_label((*y * 1000.0).round() / 1000.0))
            .x_desc(panel.x_desc.as_str())
            .y_desc(panel.y_desc.as_str())
            .draw()
            .map_err(|e| err(&e))?;
        for line in &panel.lines {
            if line.points.is_empty() {
                continue;
            }
            let color = line.color;
            let points: Vec<(f64, f64)> = line
                .points
                .iter()
                .map(|(x, y)| (*x, y.max(FLOOR_MS)))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(line.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 4, color.filled())),
                )
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
