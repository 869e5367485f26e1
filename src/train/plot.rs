//! Pictures as PNG: an episode as a labelled grid of images, and (for runs)
//! training curves. Text is drawn by plotters with an embedded font
//! (DejaVu Sans Mono), so no system font library is needed.

use std::io::Cursor;
use std::path::Path;
use std::sync::Once;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::data::episode::Episode;
use crate::data::store::write_atomic;

pub const FONT: &str = "sans-serif";

pub(crate) fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSansMono.ttf");
        if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_err() {
            eprintln!("metagrad: the embedded font could not be loaded; plots will have no text");
        }
    });
}

/// Encode an RGB buffer as PNG and write it atomically.
pub(crate) fn save_png(path: &Path, rgb: Vec<u8>, (width, height): (u32, u32)) -> Result<()> {
    let image = image::RgbImage::from_raw(width, height, rgb).ok_or_else(|| anyhow!("image buffer of the wrong size"))?;
    let mut png = Cursor::new(Vec::new());
    image.write_to(&mut png, image::ImageFormat::Png).context("cannot encode the PNG")?;
    write_atomic(path, png.get_ref())
}

/// A PNG of one episode: one column per class (label and class name on
/// top), the support images in the first rows and the query images below.
pub fn episode_grid(episode: &Episode, class_names: &[String], path: &Path) -> Result<()> {
    register_font();
    let [_, channels, h, w] = episode.support.shape;
    let scale = (64 / h.max(w)).max(1);
    let (cell_w, cell_h) = (w * scale + 6, h * scale + 6);
    let way = episode.way;
    let rows_of = |part: &crate::data::episode::LabelledImages| part.labels.len().div_ceil(way);
    let (shot, queries) = (rows_of(&episode.support), rows_of(&episode.query));
    let (left, top, gap) = (80usize, 44usize, 18usize);
    let width = left + way * cell_w.max(90) + 8;
    let col_w = cell_w.max(90);
    let height = top + (shot + queries) * cell_h + gap + 8;
    let mut rgb = vec![255u8; width * height * 3];
    let mut blit = |image: &[f32], x0: usize, y0: usize| {
        for y in 0..h * scale {
            for x in 0..w * scale {
                let p = (y / scale) * w + x / scale;
                let px = ((y0 + y) * width + x0 + x) * 3;
                for c in 0..3 {
                    let v = if channels == 1 { 1.0 - image[p] } else { image[c * h * w + p] };
                    rgb[px + c] = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
                }
            }
        }
    };
    let mut next_row = vec![0usize; way];
    let mut place = |part: &crate::data::episode::LabelledImages, first_y: usize| {
        next_row.iter_mut().for_each(|r| *r = 0);
        let n = h * w * channels;
        for (i, &label) in part.labels.iter().enumerate() {
            let x = left + label * col_w + (col_w - cell_w) / 2 + 3;
            let y = first_y + next_row[label] * cell_h + 3;
            next_row[label] += 1;
            blit(&part.images[i * n..(i + 1) * n], x, y);
        }
    };
    place(&episode.support, top);
    let query_top = top + shot * cell_h + gap;
    place(&episode.query, query_top);
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width as u32, height as u32)).into_drawing_area();
        let text = |s: &str, x: usize, y: usize, size: u32| Text::new(s.to_string(), (x as i32, y as i32), (FONT, size).into_font().color(&BLACK));
        let draw = |t| root.draw(&t).map_err(|e| anyhow!("cannot draw the preview: {e}"));
        draw(text("support", 6, top + cell_h / 2 - 7, 14))?;
        draw(text("query", 6, query_top + cell_h / 2 - 7, 14))?;
        for label in 0..way {
            let x = left + label * col_w + 2;
            draw(text(&format!("label {label}"), x, 4, 14))?;
            let name = class_names.get(label).map_or("", String::as_str);
            let short: String = if name.chars().count() > 13 { format!("…{}", name.chars().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect::<String>()) } else { name.to_string() };
            draw(text(&short, x, 22, 11))?;
        }
        root.draw(&PathElement::new(vec![(0, (query_top - gap / 2) as i32), (width as i32, (query_top - gap / 2) as i32)], ShapeStyle::from(&BLACK.mix(0.3))))
            .map_err(|e| anyhow!("cannot draw the preview: {e}"))?;
        root.present().map_err(|e| anyhow!("cannot draw the preview: {e}"))?;
    }
    save_png(path, rgb, (width as u32, height as u32))
}

/// Mean of each window of `width` consecutive points (x of the window's last point).
fn smooth(points: &[(f64, f64)], width: usize) -> Vec<(f64, f64)> {
    if width <= 1 {
        return points.to_vec();
    }
    points.chunks(width).map(|c| (c[c.len() - 1].0, c.iter().map(|p| p.1).sum::<f64>() / c.len() as f64)).collect()
}

/// One curve of a panel: legend, points, colour.
type Curve<'a> = (&'a str, Vec<(f64, f64)>, RGBColor);

/// Training curves as PNG: loss and accuracy against step (train smoothed
/// over windows, validation as measured), ufo's q and the scheduled meta
/// learning rate when the run has them.
pub fn training_curves(metrics: &[crate::train::Metrics], title: &str, path: &Path) -> Result<()> {
    register_font();
    let series = |split: &str, f: fn(&crate::train::Metrics) -> Option<f64>| -> Vec<(f64, f64)> {
        metrics.iter().filter(|m| m.split == split).filter_map(|m| f(m).map(|v| (m.step as f64, v))).collect()
    };
    let train_loss = series("train", |m| Some(m.loss));
    if train_loss.is_empty() {
        anyhow::bail!("the metrics log has no training steps yet; nothing to plot");
    }
    let width = (train_loss.len() / 200).max(1);
    let panels: Vec<(&str, Vec<Curve>)> = {
        let mut p = vec![
            ("query loss", vec![("train", smooth(&train_loss, width), BLUE), ("val", series("val", |m| Some(m.loss)), RED)]),
            (
                "query accuracy",
                vec![("train", smooth(&series("train", |m| Some(m.accuracy)), width), BLUE), ("val", series("val", |m| Some(m.accuracy)), RED)],
            ),
        ];
        let q = series("train", |m| m.q);
        if !q.is_empty() {
            p.push(("ufo q (mean per meta-batch)", vec![("q", smooth(&q, width), GREEN)]));
        }
        let ratio = series("train", |m| Some(m.ufo_d2? / m.ufo_v2?));
        if !ratio.is_empty() {
            p.push(("ufo adaptive q: D²/V² (q = 1 while it is at least 1)", vec![("D²/V²", smooth(&ratio, width), GREEN)]));
        }
        let meta_lr = series("train", |m| m.meta_lr);
        if !meta_lr.is_empty() {
            p.push(("meta learning rate (train.meta_lr_schedule)", vec![("meta_lr", meta_lr, GREEN)]));
        }
        p
    };
    let (w, h) = (900u32, 330 * panels.len() as u32 + 40);
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw the plot: {e}");
        let root = root.titled(title, (FONT, 20)).map_err(|e| err(&e))?;
        let max_step = metrics.iter().map(|m| m.step).max().unwrap_or(1).max(1) as f64;
        for (area, (name, lines)) in root.split_evenly((panels.len(), 1)).iter().zip(&panels) {
            let values: Vec<f64> = lines.iter().flat_map(|(_, pts, _)| pts.iter().map(|p| p.1)).filter(|v| v.is_finite()).collect();
            let (lo, hi) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
            let pad = ((hi - lo) * 0.05).max(1e-6);
            let mut chart = ChartBuilder::on(area)
                .caption(*name, (FONT, 16))
                .margin(8)
                .x_label_area_size(30)
                .y_label_area_size(60)
                .build_cartesian_2d(0f64..max_step, (lo - pad)..(hi + pad))
                .map_err(|e| err(&e))?;
            chart
                .configure_mesh()
                .x_desc("meta-iteration")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .label_style((FONT, 12))
                .draw()
                .map_err(|e| err(&e))?;
            for (label, pts, colour) in lines {
                if pts.is_empty() {
                    continue;
                }
                let colour = *colour;
                if *label == "val" {
                    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled()))).map_err(|e| err(&e))?;
                }
                chart
                    .draw_series(LineSeries::new(pts.iter().copied(), colour.stroke_width(2)))
                    .map_err(|e| err(&e))?
                    .label(*label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font((FONT, 12))
                .draw()
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    save_png(path, rgb, (w, h))
}

/// One named series of an `xy_plot`.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn as markers instead of a line.
    pub markers: bool,
}

/// Several series of (x, y) on one pair of axes, as PNG, each in its own
/// colour with a legend.
pub fn xy_plot(series: &[Series], title: &str, (x_desc, y_desc): (&str, &str), path: &Path) -> Result<()> {
    register_font();
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.iter().copied()).filter(|p| p.0.is_finite() && p.1.is_finite()).collect();
    anyhow::ensure!(!all.is_empty(), "nothing to plot");
    let bounds = |f: fn(&(f64, f64)) -> f64| all.iter().map(f).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let ((x0, x1), (y0, y1)) = (bounds(|p| p.0), bounds(|p| p.1));
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let (w, h) = (900u32, 560u32);
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let err = |e: &dyn std::fmt::Display| anyhow!("cannot draw the plot: {e}");
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 18))
            .margin(10)
            .x_label_area_size(34)
            .y_label_area_size(50)
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
            .map_err(|e| err(&e))?;
        chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).label_style((FONT, 12)).draw().map_err(|e| err(&e))?;
        for (i, s) in series.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            let drawn = if s.markers {
                chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, colour.filled()))).map_err(|e| err(&e))?
            } else {
                chart.draw_series(LineSeries::new(s.points.iter().copied(), colour.stroke_width(2))).map_err(|e| err(&e))?
            };
            drawn.label(s.label.as_str()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2)));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).label_font((FONT, 12)).draw().map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    save_png(path, rgb, (w, h))
}
