//! The capacity report's SVG plots: server memory against idle
//! connections (`memory.svg`) and unicast latency percentiles at half the
//! best rate (`latency.svg`), Switchboard next to the tokio baseline.
//!
//! Owns: drawing, from a finished [`TcpReport`]. Plain SVG text, no
//! plotting dependency.
//! Must not: compute figures; it draws what the report holds.

use std::fmt::Write as _;

use super::report::{Peers, RssPoint, TcpReport, UnicastStep};

/// A percentile of a unicast step, and its label.
type Percentile = (fn(&UnicastStep) -> u64, &'static str);

fn svg_frame(title: &str, w: f64, h: f64) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">{title}</text>\n",
        w / 2.0
    )
}

/// Server RSS against connections, for Switchboard and the tokio peer.
pub fn memory_svg(tcp: &TcpReport, peers: &Peers) -> String {
    let (w, h, l, b) = (640.0, 400.0, 70.0, 50.0);
    let mut series = vec![("Switchboard", "#1f77b4", &tcp.rss_curve)];
    if let Some(t) = &peers.tokio {
        series.push(("tokio baseline", "#d62728", &t.idle.rss_curve));
    }
    let pts = |v: &[RssPoint]| -> Vec<(f64, f64)> {
        v.iter().filter_map(|p| Some((p.connections as f64, p.rss_bytes? as f64 / 1e6))).collect()
    };
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| pts(s.2)).collect();
    let xmax = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let ymax = all.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let sx = |x: f64| l + x / xmax * (w - l - 20.0);
    let sy = |y: f64| h - b - y / ymax * (h - b - 40.0);
    let mut s = svg_frame("Server resident memory vs idle connections", w, h);
    let _ = writeln!(s, "<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>", h - b, w - 20.0, h - b);
    let _ = writeln!(s, "<line x1=\"{l}\" y1=\"40\" x2=\"{l}\" y2=\"{}\" stroke=\"black\"/>", h - b);
    for i in 0..=4 {
        let (xv, yv) = (xmax * i as f64 / 4.0, ymax * i as f64 / 4.0);
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{xv:.0}</text>", sx(xv), h - b + 18.0);
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{yv:.0}</text>", l - 6.0, sy(yv) + 4.0);
    }
    let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">connections</text>", w / 2.0, h - 10.0);
    let _ = writeln!(
        s,
        "<text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">RSS (MB)</text>",
        h / 2.0,
        h / 2.0
    );
    for (k, (name, color, v)) in series.iter().enumerate() {
        let p = pts(v);
        let path: Vec<String> = p.iter().map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y))).collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            path.join(" ")
        );
        for (x, y) in &p {
            let _ = writeln!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>", sx(*x), sy(*y));
        }
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{name}</text>", l + 10.0, 55.0 + 16.0 * k as f64);
    }
    s.push_str("</svg>\n");
    s
}

/// Unicast latency percentiles at half the best rate, per server (log scale).
pub fn latency_svg(tcp: &TcpReport, peers: &Peers) -> String {
    let (w, h, l, b) = (640.0, 400.0, 70.0, 50.0);
    let mut servers = vec![("Switchboard", "#1f77b4", &tcp.unicast.at_half_max)];
    if let Some(t) = &peers.tokio {
        servers.push(("tokio baseline", "#d62728", &t.unicast.at_half_max));
    }
    let keys: [Percentile; 4] =
        [(|s| s.p50_us, "p50"), (|s| s.p99_us, "p99"), (|s| s.p999_us, "p99.9"), (|s| s.max_us, "max")];
    let ymax = servers.iter().flat_map(|s| keys.iter().map(|k| k.0(s.2) as f64)).fold(10.0, f64::max);
    let (lmin, lmax) = (1.0f64, (ymax * 2.0).log10());
    let sy = |v: f64| h - b - (v.max(1.0).log10() - lmin.log10()) / (lmax - lmin.log10()) * (h - b - 40.0);
    let mut s = svg_frame("Unicast publish→receive latency at half the best rate (µs, log scale)", w, h);
    let _ = writeln!(s, "<line x1=\"{l}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>", h - b, w - 20.0, h - b);
    let mut decade = 1.0;
    while decade <= ymax * 2.0 {
        let _ =
            writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{decade:.0}</text>", l - 6.0, sy(decade) + 4.0);
        let _ =
            writeln!(s, "<line x1=\"{l}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#ddd\"/>", sy(decade), w - 20.0);
        decade *= 10.0;
    }
    let group = (w - l - 20.0) / keys.len() as f64;
    let bar = group / (servers.len() as f64 + 1.0);
    for (i, (get, label)) in keys.iter().enumerate() {
        let gx = l + group * i as f64;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
            gx + group / 2.0,
            h - b + 18.0
        );
        for (k, (_, color, step)) in servers.iter().enumerate() {
            let val = get(step) as f64;
            let x = gx + bar * (k as f64 + 0.5);
            let y = sy(val);
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"/>",
                bar * 0.9,
                h - b - y
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"10\">{val:.0}</text>",
                x + bar * 0.45,
                y - 3.0
            );
        }
    }
    for (k, (name, color, _)) in servers.iter().enumerate() {
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{name}</text>", l + 10.0, 55.0 + 16.0 * k as f64);
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::report::Report;

    const QUICK_JSON: &str = include_str!("testdata/quick-report.json");

    #[test]
    fn a_recorded_report_draws_the_same_plots() {
        let r: Report = serde_json::from_str(QUICK_JSON).unwrap();
        let tcp = r.tcp.as_ref().unwrap();
        assert_eq!(memory_svg(tcp, &r.peers), include_str!("testdata/quick-memory.svg"));
        assert_eq!(latency_svg(tcp, &r.peers), include_str!("testdata/quick-latency.svg"));
    }

    #[test]
    fn without_the_tokio_peer_only_switchboard_is_drawn() {
        let mut r: Report = serde_json::from_str(QUICK_JSON).unwrap();
        r.peers.tokio = None;
        let tcp = r.tcp.as_ref().unwrap();
        let m = memory_svg(tcp, &r.peers);
        assert_eq!(m.matches("<polyline").count(), 1, "{m}");
        assert_eq!(m.matches("<circle").count(), tcp.rss_curve.len(), "{m}");
        assert!(!m.contains("tokio"));
        let l = latency_svg(tcp, &r.peers);
        assert_eq!(l.matches("<rect x=").count(), 4, "p50, p99, p99.9, max: {l}");
    }
}
