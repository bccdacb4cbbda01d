//! The overview's chart, drawn on the server as inline SVG (no script, no
//! library): notifications and deliveries per minute, and delivery latency
//! (p50, p99 per minute) over the last hour. Pure: data in, markup out.

use std::fmt::Write as _;

use crate::store::ui::Activity;

/// Minutes shown.
pub const MINUTES: usize = 60;
const WIDTH: f64 = 600.0;
const PANEL: f64 = 100.0;
const LEFT: f64 = 48.0;
const TOP: f64 = 22.0;
const GAP: f64 = 40.0;

/// The figures behind the chart, also shown as text beside it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    pub notifications: u64,
    pub delivered: u64,
    /// Over the whole hour, in milliseconds; `None` without deliveries.
    pub p50_ms: Option<i64>,
    pub p99_ms: Option<i64>,
    /// Latencies the percentiles were computed from.
    pub sampled: usize,
}

/// The `q` quantile (0..=1) of sorted values, nearest rank.
pub fn quantile(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Per minute of the hour ending at `now_ms`, oldest first: (notifications,
/// delivered, p50, p99).
type Minute = (u64, u64, Option<i64>, Option<i64>);

fn minutes(activity: &Activity, now_ms: i64) -> Vec<Minute> {
    let last = now_ms.div_euclid(60_000);
    let first = last - (MINUTES as i64 - 1);
    let slot = |minute_ms: i64| {
        let m = minute_ms.div_euclid(60_000);
        (first..=last).contains(&m).then(|| (m - first) as usize)
    };
    let mut out = vec![(0, 0, None, None); MINUTES];
    for &(at, n) in &activity.notifications {
        if let Some(i) = slot(at) {
            out[i].0 += n;
        }
    }
    for &(at, n) in &activity.delivered {
        if let Some(i) = slot(at) {
            out[i].1 += n;
        }
    }
    let mut per_minute = vec![Vec::new(); MINUTES];
    for &(at, latency) in &activity.latencies {
        if let Some(i) = slot(at) {
            per_minute[i].push(latency.max(0));
        }
    }
    for (i, mut values) in per_minute.into_iter().enumerate() {
        values.sort_unstable();
        out[i].2 = quantile(&values, 0.5);
        out[i].3 = quantile(&values, 0.99);
    }
    out
}

/// The hour's totals and percentiles.
pub fn summary(activity: &Activity, now_ms: i64) -> Summary {
    let per_minute = minutes(activity, now_ms);
    let since = now_ms - MINUTES as i64 * 60_000;
    let mut all: Vec<i64> = activity.latencies.iter().filter(|(at, _)| *at > since).map(|&(_, l)| l.max(0)).collect();
    all.sort_unstable();
    Summary {
        notifications: per_minute.iter().map(|m| m.0).sum(),
        delivered: per_minute.iter().map(|m| m.1).sum(),
        p50_ms: quantile(&all, 0.5),
        p99_ms: quantile(&all, 0.99),
        sampled: all.len(),
    }
}

/// A round axis maximum at or above `max` (1, 2, 5 times a power of ten).
fn nice(max: f64) -> f64 {
    if max <= 1.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|&v| v >= max).unwrap_or(10.0 * magnitude)
}

/// Milliseconds as the axis shows them.
pub fn short_ms(ms: f64) -> String {
    if ms >= 60_000.0 {
        format!("{:.0} min", ms / 60_000.0)
    } else if ms >= 1000.0 {
        format!("{:.0} s", ms / 1000.0)
    } else {
        format!("{ms:.0} ms")
    }
}

/// A polyline over the minutes, skipping minutes without a value; with
/// `dots`, each value also gets a dot (a lone minute is then still seen).
fn line(out: &mut String, values: &[Option<f64>], top: f64, max: f64, class: &str, dots: bool) {
    let step = (WIDTH - LEFT - 8.0) / (MINUTES as f64 - 1.0);
    let mut points = String::new();
    for (i, v) in values.iter().enumerate() {
        if let Some(v) = v {
            let x = LEFT + i as f64 * step;
            let y = top + PANEL - (v / max).min(1.0) * PANEL;
            let _ = write!(points, "{x:.1},{y:.1} ");
            if dots {
                let _ = write!(out, r#"<circle class="{class}" cx="{x:.1}" cy="{y:.1}" r="2.5"/>"#);
            }
        }
    }
    if !points.is_empty() {
        let _ = write!(out, r#"<polyline class="{class}" points="{}"/>"#, points.trim_end());
    }
}

fn panel(out: &mut String, top: f64, title: &str, max_label: &str) {
    let bottom = top + PANEL;
    let _ = write!(
        out,
        r#"<text class="t" x="{LEFT}" y="{}">{title}</text><line class="axis" x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{bottom}"/><line class="axis" x1="{LEFT}" y1="{bottom}" x2="{}" y2="{bottom}"/><text class="l" x="{}" y="{}" text-anchor="end">{max_label}</text><text class="l" x="{}" y="{}" text-anchor="end">0</text>"#,
        top - 6.0,
        WIDTH - 8.0,
        LEFT - 4.0,
        top + 8.0,
        LEFT - 4.0,
        bottom
    );
}

/// The chart as an `<svg>` element. Everything in it is numbers and fixed
/// words, so nothing needs escaping.
pub fn svg(activity: &Activity, now_ms: i64) -> String {
    let per_minute = minutes(activity, now_ms);
    let counts_max = nice(per_minute.iter().map(|m| m.0.max(m.1)).max().unwrap_or(0) as f64);
    let latency_max = nice(per_minute.iter().filter_map(|m| m.3).max().unwrap_or(0) as f64);
    let height = TOP + PANEL * 2.0 + GAP + 22.0;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" aria-labelledby="chart-title"><title id="chart-title">Notifications and deliveries per minute, and delivery latency p50 and p99, over the last hour</title>"#
    );
    panel(&mut out, TOP, "per minute: notifications, deliveries", &format!("{counts_max}"));
    let as_f = |f: fn(&Minute) -> Option<f64>| per_minute.iter().map(f).collect::<Vec<_>>();
    line(&mut out, &as_f(|m| Some(m.0 as f64)), TOP, counts_max, "s1", false);
    line(&mut out, &as_f(|m| Some(m.1 as f64)), TOP, counts_max, "s2", false);
    let second = TOP + PANEL + GAP;
    panel(&mut out, second, "delivery latency: p50, p99", &short_ms(latency_max));
    line(&mut out, &as_f(|m| m.2.map(|v| v as f64)), second, latency_max, "s3", true);
    line(&mut out, &as_f(|m| m.3.map(|v| v as f64)), second, latency_max, "s4", true);
    let axis = second + PANEL + 16.0;
    let _ = write!(
        out,
        r#"<text class="l" x="{LEFT}" y="{axis}">60 min ago</text><text class="l" x="{}" y="{axis}" text-anchor="end">now</text></svg>"#,
        WIDTH - 8.0
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_nearest_rank() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), Some(50));
        assert_eq!(quantile(&v, 0.99), Some(99));
        assert_eq!(quantile(&[7], 0.99), Some(7));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn minutes_outside_the_hour_are_left_out() {
        let now = 1_800_000_000_000;
        let activity = Activity {
            notifications: vec![(now - 30_000, 4), (now - 2 * 3_600_000, 100)],
            delivered: vec![(now - 30_000, 3)],
            latencies: vec![(now - 1000, 10), (now - 2000, 30), (now - 3000, 20), (now - 2 * 3_600_000, 9999)],
        };
        let s = summary(&activity, now);
        assert_eq!((s.notifications, s.delivered, s.p50_ms, s.p99_ms, s.sampled), (4, 3, Some(20), Some(30), 3));
        let svg = svg(&activity, now);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert_eq!(nice(0.0), 1.0);
        assert_eq!(nice(7.0), 10.0);
        assert_eq!(nice(120.0), 200.0);
    }
}
