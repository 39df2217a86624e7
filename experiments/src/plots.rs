//! SVG charts for the report (plotters, SVG backend: text stays `<text>`, no fonts needed).
//! Each function draws one kind of chart from plain numbers; the report decides what to plot.

use std::collections::BTreeMap;
use std::path::Path;

use dynrobust_core::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::store::write_atomic;

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Where a chart goes and what it says.
pub(crate) struct Chart<'a> {
    pub path: &'a Path,
    pub title: &'a str,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
}

/// One named line: (x, y) points, drawn in x order.
pub(crate) struct Line {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One labelled point of a scatter.
pub(crate) struct Point {
    pub label: String,
    pub x: f64,
    pub y: f64,
}

const SIZE: (u32, u32) = (900, 560);
const FONT: &str = "sans-serif";

/// Renders into a string, then writes the file atomically.
fn render(path: &Path, size: (u32, u32), draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> DrawResult) -> Result<()> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        let drawn = root.fill(&WHITE).map_err(Into::into).and_then(|_| draw(&root)).and_then(|_| Ok(root.present()?));
        drawn.map_err(|e| Error::io(path, std::io::Error::other(format!("drawing the chart failed: {e}"))))?;
    }
    write_atomic(path, svg.as_bytes())
}

fn color(i: usize) -> RGBAColor {
    Palette99::pick(i).to_rgba()
}

/// (lo, hi) of `values` padded by 5 % (and never empty).
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad, hi + pad)
}

/// Lines with markers and a legend.
pub(crate) fn lines(chart: &Chart, series: &[Line]) -> Result<()> {
    let (x0, x1) = bounds(series.iter().flat_map(|l| l.points.iter().map(|p| p.0)));
    let (y0, y1) = bounds(series.iter().flat_map(|l| l.points.iter().map(|p| p.1)));
    render(chart.path, SIZE, |root| {
        let mut c = ChartBuilder::on(root)
            .caption(chart.title, (FONT, 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        c.configure_mesh().label_style((FONT, 14)).axis_desc_style((FONT, 16)).x_desc(chart.x_desc).y_desc(chart.y_desc).draw()?;
        for (i, line) in series.iter().enumerate() {
            let col = color(i);
            let mut pts = line.points.clone();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            c.draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))?
                .label(line.name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2)));
            c.draw_series(pts.iter().map(|p| Circle::new(*p, 4, col.filled())))?;
        }
        c.configure_series_labels().label_font((FONT, 14)).background_style(WHITE.mix(0.85)).border_style(BLACK).draw()?;
        Ok(())
    })
}

/// Grouped bars: for each x position, one bar per named series (points are (index, value)).
pub(crate) fn grouped_bars(chart: &Chart, x_names: &[String], series: &[Line]) -> Result<()> {
    let n = x_names.len().max(1);
    let w = 0.8 / series.len().max(1) as f64;
    let top = series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0.0f64, f64::max).max(1e-3) * 1.35; // headroom for the legend
    render(chart.path, SIZE, |root| {
        let mut c = ChartBuilder::on(root)
            .caption(chart.title, (FONT, 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5..n as f64 - 0.5, 0.0..top)?;
        // Key points fall on the integers (one per group); label those with the group's name.
        let fmt = |x: &f64| match x_names.get(x.round().max(0.0) as usize) {
            Some(name) if (x - x.round()).abs() < 1e-6 => name.clone(),
            _ => String::new(),
        };
        c.configure_mesh().label_style((FONT, 14)).axis_desc_style((FONT, 16)).disable_x_mesh().x_labels(n).x_label_formatter(&fmt).x_desc(chart.x_desc).y_desc(chart.y_desc).draw()?;
        for (j, s) in series.iter().enumerate() {
            let col = color(j);
            let bar = |&(x, y): &(f64, f64)| {
                let left = x - 0.4 + j as f64 * w;
                Rectangle::new([(left, y), (left + w, 0.0)], col.filled())
            };
            c.draw_series(s.points.iter().map(bar))?
                .label(s.name.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], col.filled()));
        }
        c.configure_series_labels().label_font((FONT, 14)).position(SeriesLabelPosition::UpperRight).background_style(WHITE.mix(0.85)).border_style(BLACK).draw()?;
        Ok(())
    })
}

/// A labelled scatter of clean and attacked points, with the Pareto front of the clean ones.
pub(crate) fn pareto(chart: &Chart, clean: &[Point], attacked: &[Point]) -> Result<()> {
    let all = || clean.iter().chain(attacked);
    let (x0, x1) = bounds(all().map(|p| p.x));
    let (y0, y1) = bounds(all().map(|p| p.y));
    let front = pareto_front(clean);
    render(chart.path, SIZE, |root| {
        let mut c = ChartBuilder::on(root)
            .caption(chart.title, (FONT, 22))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1 + (x1 - x0) * 0.15, y0..y1)?;
        c.configure_mesh().label_style((FONT, 14)).axis_desc_style((FONT, 16)).x_desc(chart.x_desc).y_desc(chart.y_desc).draw()?;
        let (cc, ac) = (color(0), color(1));
        c.draw_series(LineSeries::new(front, cc.stroke_width(1)))?
            .label("Pareto front (clean)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], cc));
        c.draw_series(clean.iter().map(|p| Circle::new((p.x, p.y), 5, cc.filled())))?
            .label("clean")
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, cc.filled()));
        c.draw_series(attacked.iter().map(|p| TriangleMarker::new((p.x, p.y), 6, ac.filled())))?
            .label("attacked (white-box, largest ε)")
            .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, ac.filled()));
        let text = |p: &Point| Text::new(p.label.clone(), (p.x, p.y), (FONT, 12).into_font());
        c.draw_series(all().map(text))?;
        c.configure_series_labels().label_font((FONT, 14)).position(SeriesLabelPosition::LowerRight).background_style(WHITE.mix(0.85)).border_style(BLACK).draw()?;
        Ok(())
    })
}

/// Clean points no other point beats on both cost (lower) and accuracy (higher), by cost.
fn pareto_front(points: &[Point]) -> Vec<(f64, f64)> {
    let mut sorted: Vec<(f64, f64)> = points.iter().map(|p| (p.x, p.y)).collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
    let mut front: Vec<(f64, f64)> = Vec::new();
    for p in sorted {
        if front.last().is_none_or(|l| p.1 > l.1) {
            front.push(p);
        }
    }
    front
}

/// A heat map: rows × columns of values, each cell annotated with its value.
pub(crate) fn heatmap(chart: &Chart, rows: &[String], cols: &[String], values: &BTreeMap<(usize, usize), f64>) -> Result<()> {
    let (lo, hi) = values.values().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(*v), b.max(*v)));
    let level = move |v: f64| if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
    // From a pale blue (lowest) to a dark blue (highest); a missing value stays white.
    let shade = move |v: f64| {
        let t = level(v);
        RGBColor((225.0 - 190.0 * t) as u8, (236.0 - 136.0 * t) as u8, (250.0 - 80.0 * t) as u8)
    };
    let (nr, nc) = (rows.len().max(1), cols.len().max(1));
    let plot_width = 140 * nc as i32;
    render(chart.path, (340 + plot_width as u32, 160 + 70 * nr as u32), |root| {
        let mut c = ChartBuilder::on(root)
            .caption(chart.title, (FONT, 18))
            .margin(12)
            .margin_right(200) // room for the legend, right of the matrix
            .x_label_area_size(45)
            .y_label_area_size(90)
            // Integer ranges are inclusive in plotters: 0..n-1 gives n segments.
            .build_cartesian_2d((0..nc.max(2) - 1).into_segmented(), (0..nr.max(2) - 1).into_segmented())?;
        let label = |names: &[String], v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => names.get(*i).cloned().unwrap_or_default(),
            SegmentValue::Last => String::new(),
        };
        let (xf, yf) = (|v: &SegmentValue<usize>| label(cols, v), |v: &SegmentValue<usize>| label(rows, v));
        c.configure_mesh().label_style((FONT, 14)).axis_desc_style((FONT, 16)).disable_mesh().x_labels(nc).y_labels(nr).x_label_formatter(&xf).y_label_formatter(&yf).x_desc(chart.x_desc).y_desc(chart.y_desc).draw()?;
        let rect = |(&(r, col), &v): (&(usize, usize), &f64)| {
            let corners = [(SegmentValue::Exact(col), SegmentValue::Exact(r)), (SegmentValue::Exact(col + 1), SegmentValue::Exact(r + 1))];
            Rectangle::new(corners, shade(v).filled())
        };
        c.draw_series(values.iter().map(rect))?;
        let text = |(&(r, col), &v): (&(usize, usize), &f64)| {
            let ink = if level(v) > 0.55 { WHITE } else { BLACK };
            Text::new(format!("{v:.2}"), (SegmentValue::CenterOf(col), SegmentValue::CenterOf(r)), (FONT, 14).into_font().color(&ink))
        };
        c.draw_series(values.iter().map(text))?;
        for (name, v) in [(format!("lightest = {lo:.2}"), lo), (format!("darkest = {hi:.2}"), hi)] {
            let col = shade(v);
            c.draw_series(std::iter::empty::<Circle<(SegmentValue<usize>, SegmentValue<usize>), i32>>())?
                .label(name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], col.filled()));
        }
        c.configure_series_labels().label_font((FONT, 14)).position(SeriesLabelPosition::Coordinate(plot_width + 45, 0)).background_style(TRANSPARENT).border_style(TRANSPARENT).draw()?;
        Ok(())
    })
}
