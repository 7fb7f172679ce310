//! `--plot`: latency over time per level as a small self-contained SVG —
//! p99 as a solid line, p50 dashed, one colour per level.

use crate::Report;
use std::fmt::Write;

const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

pub fn svg(reports: &[Report]) -> String {
    let (width, height, margin) = (900.0, 420.0, 60.0);
    let seconds = reports
        .iter()
        .map(|r| r.timeline.len())
        .max()
        .unwrap_or(1)
        .max(2) as f64;
    let top = reports
        .iter()
        .flat_map(|r| r.timeline.iter().map(|s| s.p99_ms))
        .fold(1.0_f64, f64::max)
        * 1.1;
    let x = |second: f64| margin + second / (seconds - 1.0) * (width - 2.0 * margin);
    let y = |ms: f64| height - margin - ms / top * (height - 2.0 * margin);
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="{margin}" y="24" font-size="15">geolog latency over time (p99 solid, p50 dashed)</text>"#
    );
    // Axes with a few ticks.
    let _ = write!(
        out,
        r#"<line x1="{margin}" y1="{0}" x2="{1}" y2="{0}" stroke="black"/><line x1="{margin}" y1="{margin}" x2="{margin}" y2="{0}" stroke="black"/>"#,
        height - margin,
        width - margin
    );
    for i in 0..=4 {
        let ms = top * f64::from(i) / 4.0;
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end">{ms:.1} ms</text>"#,
            margin - 6.0,
            y(ms) + 4.0
        );
        let second = (seconds - 1.0) * f64::from(i) / 4.0;
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{second:.0} s</text>"#,
            x(second),
            height - margin + 18.0
        );
    }
    for (i, report) in reports.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        for (dash, pick) in [("", 99), (r#" stroke-dasharray="5,4""#, 50)] {
            let points: Vec<String> = report
                .timeline
                .iter()
                .filter(|s| s.requests > 0)
                .map(|s| {
                    let ms = if pick == 99 { s.p99_ms } else { s.p50_ms };
                    format!("{:.1},{:.1}", x(s.second as f64), y(ms))
                })
                .collect();
            let _ = write!(
                out,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5"{dash} points="{}"/>"#,
                points.join(" ")
            );
        }
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" fill="{colour}">{}</text>"#,
            width - margin - 120.0,
            margin + 16.0 * i as f64,
            report.consistency
        );
    }
    out.push_str("</svg>\n");
    out
}
