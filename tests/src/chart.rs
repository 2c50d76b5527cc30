//! What the benchmarks print and draw: latency percentiles, and horizontal bar charts on a log
//! scale as SVG (a dozen elements: simpler than a plotting crate's font setup).

use std::time::Duration;

/// Latencies of one way of doing something.
pub struct Series {
    /// One per try.
    pub samples: Vec<Duration>,
}

impl Series {
    /// The `p` quantile (0.5: the median), nearest-rank.
    pub fn pct(&self, p: f64) -> Duration {
        let mut s = self.samples.clone();
        s.sort();
        let i = ((s.len() as f64 * p).ceil() as usize).clamp(1, s.len()) - 1;
        s[i]
    }
}

/// Milliseconds, as a float.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A peer's bar.
pub const GREY: &str = "#9e9e9e";
/// modelcache's bar.
pub const BLUE: &str = "#1f77b4";
/// The costly way's bar.
pub const RED: &str = "#d62728";

/// One bar: its label, colour and value in milliseconds.
pub struct Bar {
    label: String,
    color: &'static str,
    ms: f64,
}

impl Bar {
    /// A bar of `ms` milliseconds.
    pub fn new(label: String, color: &'static str, ms: f64) -> Self {
        Bar { label, color, ms }
    }
}

/// A horizontal bar chart titled `title`, from 0.01 ms to 100 s on a log scale.
pub fn bars_svg(title: &str, rows: &[Bar]) -> String {
    let (left, width, bar, gap) = (330.0, 420.0, 18.0, 8.0);
    let (lo, hi) = (0.01f64.log10(), 100_000f64.log10());
    let x = |v: f64| left + (v.max(0.01).log10() - lo) / (hi - lo) * width;
    let height = 50.0 + rows.len() as f64 * (bar + gap) + 30.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"14\" font-weight=\"bold\">{title}</text>\n",
        w = left + width + 90.0
    );
    let axis_y = height - 30.0;
    for decade in -2..=5 {
        let v = 10f64.powi(decade);
        let gx = x(v);
        svg += &format!(
            "<line x1=\"{gx:.1}\" y1=\"40\" x2=\"{gx:.1}\" y2=\"{axis_y}\" stroke=\"#ddd\"/>\n<text x=\"{gx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            axis_y + 16.0,
            if decade < 0 {
                format!("{v}")
            } else {
                format!("{}", v as u64)
            }
        );
    }
    for (i, b) in rows.iter().enumerate() {
        let y = 45.0 + i as f64 * (bar + gap);
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n<rect x=\"{left}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{bar}\" fill=\"{}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\">{:.2}</text>\n",
            left - 6.0,
            y + 13.0,
            b.label,
            (x(b.ms) - left).max(1.0),
            b.color,
            x(b.ms) + 4.0,
            y + 13.0,
            b.ms,
        );
    }
    svg += "</svg>\n";
    svg
}
