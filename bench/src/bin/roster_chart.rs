//! roster-chart: draws one SVG from a folder of roster-bench JSON results (what
//! scripts/bench.sh writes): latency percentiles per scenario, and the server's memory per
//! connection against the number of connections.
//!
//! A folder holding a `million` result (scripts/million.sh) gets that run's chart instead: the
//! ramp (clients joined over time) and the memory per connection, by where it is held.
//!
//! `roster-chart DIR` writes DIR/chart.svg.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::FontStyle;
use serde_json::Value;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// (label, p50, p90, p99) in milliseconds.
type Latency = (String, f64, f64, f64);

fn load(dir: &Path) -> Result<Vec<(String, Value)>, String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
            let v: Value =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push((name, v));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The latency each scenario is about.
fn latency(name: &str, v: &Value) -> Option<Latency> {
    let key = match v["scenario"].as_str()? {
        "connect" => "join_us",
        "join-storm" => "complete_view_us",
        "fanout" => "delivery_us",
        "churn" => "join_seen_us",
        "reconnect-storm" => "rejoin_us",
        _ => return None,
    };
    let h = &v[key];
    let ms = |q: &str| h[q].as_f64().map(|us| us / 1000.0);
    Some((name.to_owned(), ms("p50")?, ms("p90")?, ms("p99")?))
}

/// Bars are centred on whole numbers; only those ticks get a bar's name.
fn bar_label(labels: &[String], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() < 1e-6 && i >= 0.0 {
        labels.get(i as usize).cloned().unwrap_or_default()
    } else {
        String::new()
    }
}

fn draw(dir: &Path) -> Result<PathBuf, String> {
    let font: &'static [u8] = Box::leak(
        std::fs::read(FONT)
            .map_err(|e| format!("{FONT}: {e} (install fonts-dejavu-core)"))?
            .into_boxed_slice(),
    );
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| "bad font file")?;
    let results = load(dir)?;
    if let Some((_, v)) = results.iter().find(|(_, v)| v["scenario"] == "million") {
        return draw_million(dir, v);
    }
    let lat: Vec<Latency> = results.iter().filter_map(|(n, v)| latency(n, v)).collect();
    let mut mem: Vec<(f64, f64, String)> = results
        .iter()
        .filter(|(_, v)| v["scenario"] == "connect")
        .filter_map(|(_, v)| {
            Some((
                v["joined"].as_f64()?,
                v["server_bytes_per_connection"].as_f64()?,
                v["presence"].as_str().unwrap_or("?").to_owned(),
            ))
        })
        .collect();
    mem.sort_by(|a, b| a.0.total_cmp(&b.0));
    let out = dir.join("chart.svg");
    let target = out.clone();
    let root = SVGBackend::new(&target, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(700);

    // Latency percentiles per scenario, log scale.
    let top = lat.iter().map(|l| l.3).fold(1.0, f64::max) * 2.0;
    let mut chart = ChartBuilder::on(&left)
        .caption(
            "latency per scenario (ms, log): p50 / p90 / p99",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(120)
        .y_label_area_size(60)
        .build_cartesian_2d(
            -0.5f64..(lat.len().max(1) as f64 - 0.5),
            (0.01f64..top).log_scale(),
        )
        .map_err(|e| e.to_string())?;
    let labels: Vec<String> = lat.iter().map(|l| l.0.clone()).collect();
    chart
        .configure_mesh()
        .x_labels(lat.len().max(1))
        .x_label_formatter(&|x| bar_label(&labels, *x))
        .x_label_style(
            ("sans-serif", 12)
                .into_font()
                .transform(FontTransform::Rotate90),
        )
        .y_desc("ms")
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, (_, p50, p90, p99)) in lat.iter().enumerate() {
        let x = i as f64;
        for (k, (v, color)) in [(*p50, BLUE), (*p90, GREEN), (*p99, RED)]
            .into_iter()
            .enumerate()
        {
            let x0 = x - 0.33 + k as f64 * 0.23;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0, 0.01), (x0 + 0.2, v.max(0.01))],
                    color.filled(),
                )))
                .map_err(|e| e.to_string())?;
        }
    }

    // Server memory per connection against connections.
    let max_conns = mem.iter().map(|m| m.0).fold(1.0, f64::max) * 1.1;
    let max_bytes = mem.iter().map(|m| m.1).fold(1.0, f64::max) * 1.3;
    let mut chart = ChartBuilder::on(&right)
        .caption(
            "server user-space bytes per idle joined connection",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_conns, 0f64..max_bytes)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("connections")
        .y_desc("bytes")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(|e| e.to_string())?;
    for (mode, color) in [("none", BLUE), ("full", RED), ("count", GREEN)] {
        let points: Vec<(f64, f64)> = mem
            .iter()
            .filter(|m| m.2 == mode)
            .map(|m| (m.0, m.1))
            .collect();
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(format!("presence {mode}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 4, color.filled())),
            )
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(out)
}

/// A million run: clients joined against seconds, and bytes per connection by holder.
fn draw_million(dir: &Path, v: &Value) -> Result<PathBuf, String> {
    let per_s: Vec<f64> = v["ramp"]["joined_per_s"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let mut total = 0.0;
    let ramp: Vec<(f64, f64)> = per_s
        .iter()
        .enumerate()
        .map(|(s, k)| {
            total += k;
            ((s + 1) as f64, total)
        })
        .collect();
    let hold = &v["hold"];
    let bytes = |k: &str| hold[k].as_f64().unwrap_or(0.0);
    let n = v["ramp"]["joined"].as_f64().unwrap_or(1.0).max(1.0);
    let bars = [
        ("servers", bytes("server_bytes_per_connection"), RED),
        ("load generator", bytes("client_bytes_per_connection"), BLUE),
        (
            "kernel (both ends)",
            bytes("kernel_bytes_per_connection"),
            GREEN,
        ),
        ("nats-server", bytes("nats_bytes") / n, MAGENTA),
    ];
    let out = dir.join("chart.svg");
    let target = out.clone();
    let root = SVGBackend::new(&target, (1200, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (left, right) = root.split_horizontally(650);
    let secs = ramp.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&left)
        .caption(
            format!(
                "ramp: {} clients over {} nodes joined",
                total,
                v["nodes"].as_u64().unwrap_or(0)
            ),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..secs, 0f64..(total.max(1.0) * 1.05))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("clients joined and watching")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(ramp, RED.stroke_width(2)))
        .map_err(|e| e.to_string())?;
    let top = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.2;
    let labels: Vec<String> = bars.iter().map(|b| b.0.to_owned()).collect();
    let mut chart = ChartBuilder::on(&right)
        .caption("bytes per connection, held idle", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(bars.len() as f64 - 0.5), 0f64..top)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_labels(bars.len())
        .x_label_formatter(&|x| bar_label(&labels, *x))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, (_, b, color)) in bars.iter().enumerate() {
        let x = i as f64;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x - 0.3, 0.0), (x + 0.3, *b)],
                color.filled(),
            )))
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())?;
    Ok(out)
}

fn main() {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: roster-chart RESULTS_DIR");
        std::process::exit(2);
    };
    match draw(Path::new(&dir)) {
        Ok(path) => println!("chart: {}", path.display()),
        Err(e) => {
            eprintln!("roster-chart: {e}");
            std::process::exit(1);
        }
    }
}
