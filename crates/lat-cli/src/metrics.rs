//! The metrics log (JSON lines, one record per logged step or evaluation) and the loss plot
//! (an SVG of training and validation bits per character), re-drawn as training goes.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use linear_attention_transformer::checkpoint::write_atomic;
use linear_attention_transformer::{Error, Result};

/// Appends records to `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens the log at `path`. A fresh run starts it empty; a resumed run keeps the records
    /// up to `resume_step` (later ones belong to work that is being redone).
    pub fn open(path: &Path, resume_step: Option<u64>) -> Result<Self> {
        let kept: Vec<String> = match resume_step {
            Some(step) => read_lines(path)?.into_iter().filter(|l| record_step(l).is_some_and(|s| s <= step)).collect(),
            None => vec![],
        };
        let mut text = kept.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        write_atomic(path, text.as_bytes())?;
        let file = OpenOptions::new().append(true).open(path).map_err(|e| Error::io(path, e))?;
        Ok(Self { path: path.to_path_buf(), file })
    }

    /// Appends one record (one line).
    pub fn write(&mut self, record: &Value) -> Result<()> {
        writeln!(self.file, "{record}").and_then(|_| self.file.flush()).map_err(|e| Error::io(&self.path, e))
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn record_step(line: &str) -> Option<u64> {
    serde_json::from_str::<Value>(line).ok()?.get("step")?.as_u64()
}

fn read_lines(path: &Path) -> Result<Vec<String>> {
    match File::open(path) {
        Ok(f) => BufReader::new(f).lines().collect::<std::io::Result<Vec<_>>>().map_err(|e| Error::io(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Every record of a metrics log.
pub fn read_records(path: &Path) -> Result<Vec<Value>> {
    Ok(read_lines(path)?.iter().filter_map(|l| serde_json::from_str(l).ok()).collect())
}

/// A "nice" tick spacing for a range.
fn tick_step(span: f64, target: usize) -> f64 {
    let raw = span / target as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    mag * if norm < 1.5 {
        1.0
    } else if norm < 3.5 {
        2.0
    } else if norm < 7.5 {
        5.0
    } else {
        10.0
    }
}

/// Draws training (thin) and validation (thick, with points) bits per character against the
/// step into an SVG file, written atomically.
pub fn plot(records: &[Value], path: &Path, title: &str) -> Result<()> {
    let series = |kind: &str| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter(|r| r.get("kind").and_then(Value::as_str) == Some(kind))
            .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get("bpc")?.as_f64()?)))
            .filter(|(_, y)| y.is_finite())
            .collect()
    };
    let (train, valid) = (series("train"), series("validation"));
    let (w, h) = (760.0, 440.0);
    let (left, right, top, bottom) = (64.0, 24.0, 40.0, 52.0);
    let all: Vec<(f64, f64)> = train.iter().chain(&valid).copied().collect();
    let x_max = all.iter().map(|p| p.0).fold(1.0f64, f64::max);
    // The first steps sit far above the rest; scale to what follows them.
    let mut ys: Vec<f64> = all.iter().map(|p| p.1).collect();
    ys.sort_by(|a, b| a.total_cmp(b));
    let y_min = ys.first().copied().unwrap_or(0.0);
    let y_hi = ys.get(ys.len().saturating_sub(1) * 95 / 100).copied().unwrap_or(8.0);
    let y_top = valid.iter().map(|p| p.1).fold(y_hi, f64::max).max(y_min + 0.1);
    let y_step = tick_step(y_top - y_min, 6);
    let (y0, y1) = ((y_min / y_step).floor() * y_step, (y_top / y_step).ceil() * y_step);
    let px = |x: f64| left + (x / x_max) * (w - left - right);
    let py = |y: f64| top + (1.0 - ((y.clamp(y0, y1) - y0) / (y1 - y0))) * (h - top - bottom);

    let mut s = String::new();
    let _ = writeln!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#);
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#, w / 2.0, escape(title));
    let mut y = y0;
    while y <= y1 + 1e-9 {
        let yy = py(y);
        let _ = writeln!(s, r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{y:.2}</text>"##, w - right, left - 6.0, yy + 4.0);
        y += y_step;
    }
    let x_step = tick_step(x_max, 8);
    let mut x = 0.0;
    while x <= x_max + 1e-9 {
        let xx = px(x);
        let _ = writeln!(s, r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{top}" y2="{}" stroke="#eee"/><text x="{xx:.1}" y="{}" text-anchor="middle">{x}</text>"##, h - bottom, h - bottom + 16.0);
        x += x_step;
    }
    let _ = writeln!(s, r#"<rect x="{left}" y="{top}" width="{}" height="{}" fill="none" stroke="black"/>"#, w - left - right, h - top - bottom);
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">step</text>"#, (left + w - right) / 2.0, h - 12.0);
    let _ = writeln!(s, r#"<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">bits per character</text>"#, (top + h - bottom) / 2.0);
    let line = |pts: &[(f64, f64)], color: &str, width: f64| -> String {
        let p: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        format!(r#"<polyline fill="none" stroke="{color}" stroke-width="{width}" points="{}"/>"#, p.join(" "))
    };
    let _ = writeln!(s, "{}", line(&train, "#7aa6d8", 1.2));
    let _ = writeln!(s, "{}", line(&valid, "#d1495b", 2.2));
    for &(x, y) in &valid {
        let _ = writeln!(s, r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#d1495b"/>"##, px(x), py(y));
    }
    let (lx, ly) = (w - right - 170.0, top + 18.0);
    let _ = writeln!(s, r##"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="#7aa6d8" stroke-width="2"/><text x="{}" y="{}">training</text>"##, lx + 24.0, lx + 30.0, ly + 4.0);
    let last = valid.last().map(|v| format!(" ({:.3})", v.1)).unwrap_or_default();
    let _ = writeln!(
        s,
        r##"<line x1="{lx}" x2="{}" y1="{}" y2="{}" stroke="#d1495b" stroke-width="2"/><text x="{}" y="{}">validation{last}</text>"##,
        lx + 24.0,
        ly + 18.0,
        ly + 18.0,
        lx + 30.0,
        ly + 22.0
    );
    s.push_str("</svg>\n");
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    write_atomic(path, s.as_bytes())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn log_keeps_records_up_to_the_resumed_step_and_plot_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&path, None).unwrap();
        for step in 1..=6u64 {
            log.write(&json!({"step": step, "kind": "train", "loss": 3.0 / step as f64, "bpc": 4.0 / step as f64})).unwrap();
        }
        log.write(&json!({"step": 6, "kind": "validation", "bpc": 1.0})).unwrap();
        drop(log);
        assert_eq!(read_records(&path).unwrap().len(), 7);
        let log = MetricsLog::open(&path, Some(4)).unwrap();
        drop(log);
        let records = read_records(&path).unwrap();
        assert_eq!(records.len(), 4);
        let svg = dir.path().join("loss.svg");
        plot(&records, &svg, "test <run>").unwrap();
        let text = fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg") && text.contains("polyline") && text.contains("test &lt;run&gt;"));
    }
}
