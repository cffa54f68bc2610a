//! The cache page's pictures, drawn on the server as inline SVG: no script, no chart library,
//! no external service (the page's Content-Security-Policy allows none).
//!
//! - [`size_bar`]: the stored size against the limit, with a mark at the 85 % warning.
//! - [`charts`]: the last days' stored size (a line), bytes downloaded (bars) and requests
//!   (NAR and narinfo bars, stacked), from the server's own daily statistics
//!   ([`crate::stats`]).
//!
//! Colours are stylesheet classes (so the dark theme applies; inline styles are forbidden by
//! the CSP). Every picture has a text equivalent: a `<title>` and `<desc>` summing it up for
//! screen readers, a `<title>` per bar or point (a tooltip: the day and its value), and the
//! numbers in a table below. Every SVG element is written with a closing tag: inside HTML,
//! `<rect …>` without one would swallow the elements after it.

use maud::{html, Markup};

use super::{human_size, percent};
use crate::retention::WARN_FRACTION;
use crate::stats::{CacheStats, DayStats};

/// The stored size against the limit: a bar (green, amber past the warning, red over the
/// limit) with a mark at the warning threshold.
pub(super) fn size_bar(name: &str, size: i64, max: i64) -> Markup {
    let filled = (size as f64 * 100.0 / max as f64).clamp(0.0, 100.0);
    let state = if size > max {
        "over"
    } else if size as f64 >= max as f64 * WARN_FRACTION {
        "near"
    } else {
        "ok"
    };
    let label = format!(
        "storage used by {name}: {} of {} ({})",
        human_size(size),
        human_size(max),
        percent(size, max)
    );
    let warn = WARN_FRACTION * 100.0;
    html! {
        svg.sizebar viewBox="0 0 100 10" preserveAspectRatio="none" role="img" aria-label=(label)
            data-percent=(format!("{:.0}", size as f64 * 100.0 / max as f64)) {
            title { (label) }
            rect.track x="0" y="0" width="100" height="10" {}
            rect class=(format!("used {state}")) x="0" y="0" width=(f1(filled)) height="10" {}
            line.threshold x1=(f1(warn)) x2=(f1(warn)) y1="0" y2="10"
                vector-effect="non-scaling-stroke" {}
        }
    }
}

// ---- geometry ---------------------------------------------------------------------------------

const W: f64 = 360.0;
const H: f64 = 172.0;
const LEFT: f64 = 62.0;
const RIGHT: f64 = 14.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 24.0;
const PLOT_W: f64 = W - LEFT - RIGHT;
const PLOT_H: f64 = H - TOP - BOTTOM;

fn f1(v: f64) -> String {
    format!("{v:.1}")
}

/// Where day `i` of `n` is centred.
fn x_center(i: usize, n: usize) -> f64 {
    LEFT + (i as f64 + 0.5) * PLOT_W / n as f64
}

fn y_of(v: f64, top: f64) -> f64 {
    TOP + PLOT_H - (v / top).clamp(0.0, 1.0) * PLOT_H
}

/// What an axis counts.
#[derive(Clone, Copy)]
enum Unit {
    Bytes,
    Count,
}

/// A y axis from 0 to `top`, with its ticks and their labels.
struct Axis {
    top: f64,
    ticks: Vec<(f64, String)>,
}

/// 1, 2 or 5 times a power of ten: the smallest at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw * 0.999_999)
        .unwrap_or(10.0 * mag)
}

/// About four intervals from 0 past `max`; bytes in the binary unit that keeps the numbers
/// under 1024, counts in whole numbers.
fn axis(max: f64, unit: Unit) -> Axis {
    let (scale, suffix) = match unit {
        Unit::Count => (1.0, ""),
        Unit::Bytes => {
            let units = [" B", " KiB", " MiB", " GiB", " TiB", " PiB"];
            let mut i = 0;
            while max >= 1024f64.powi(i as i32 + 1) && i < units.len() - 1 {
                i += 1;
            }
            (1024f64.powi(i as i32), units[i])
        }
    };
    let m = (max / scale).max(0.0);
    let mut step = if m > 0.0 { nice_step(m / 4.0) } else { 1.0 };
    if matches!(unit, Unit::Count) || scale == 1.0 {
        step = step.max(1.0);
    }
    let n = (m / step).ceil().max(1.0) as usize;
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    let ticks = (0..=n)
        .map(|k| {
            let v = k as f64 * step;
            let label = match (k, unit) {
                (0, _) => "0".to_owned(),
                (_, Unit::Count) => count_label(v),
                (_, Unit::Bytes) => format!("{v:.decimals$}{suffix}"),
            };
            (v * scale, label)
        })
        .collect();
    Axis {
        top: n as f64 * step * scale,
        ticks,
    }
}

/// A count, short: 950, 1.5k, 12k, 3.4M.
fn count_label(v: f64) -> String {
    let short = |x: f64, s: &str| {
        let t = if x < 10.0 {
            format!("{x:.1}")
        } else {
            format!("{x:.0}")
        };
        format!("{}{s}", t.strip_suffix(".0").unwrap_or(&t))
    };
    if v >= 1e6 {
        short(v / 1e6, "M")
    } else if v >= 1e3 {
        short(v / 1e3, "k")
    } else {
        format!("{v:.0}")
    }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `5 Dec` from `2025-12-05`.
fn short_date(date: &str) -> String {
    let mut parts = date.split('-').skip(1);
    let month = parts.next().and_then(|m| m.parse::<usize>().ok());
    let day = parts.next().and_then(|d| d.parse::<u32>().ok());
    match (month, day) {
        (Some(m @ 1..=12), Some(d)) => format!("{d} {}", MONTHS[m - 1]),
        _ => date.to_owned(),
    }
}

/// Grid lines, y labels, the baseline and a date label every 7 days back from today.
fn frame(axis: &Axis, days: &[DayStats]) -> Markup {
    let n = days.len();
    html! {
        g.grid aria-hidden="true" {
            @for (v, _) in &axis.ticks {
                @let y = f1(y_of(*v, axis.top));
                line x1=(f1(LEFT)) x2=(f1(W - RIGHT)) y1=(y) y2=(y) {}
            }
        }
        g.axis aria-hidden="true" {
            @for (v, label) in &axis.ticks {
                text x=(f1(LEFT - 6.0)) y=(f1(y_of(*v, axis.top) + 4.0)) text-anchor="end" { (label) }
            }
            line.baseline x1=(f1(LEFT)) x2=(f1(W - RIGHT)) y1=(f1(TOP + PLOT_H)) y2=(f1(TOP + PLOT_H)) {}
            @for (i, d) in days.iter().enumerate() {
                @if (n - 1 - i).is_multiple_of(7) {
                    @let x = f1(x_center(i, n));
                    line.tick x1=(x) x2=(x) y1=(f1(TOP + PLOT_H)) y2=(f1(TOP + PLOT_H + 4.0)) {}
                    text x=(x) y=(f1(H - 6.0)) text-anchor="middle" { (short_date(&d.date)) }
                }
            }
        }
    }
}

/// A centred note on an empty chart.
fn empty_note(text: &str) -> Markup {
    html! {
        text.empty x=(f1(LEFT + PLOT_W / 2.0)) y=(f1(TOP + PLOT_H / 2.0)) text-anchor="middle" { (text) }
    }
}

/// One chart: a figure with its caption, the SVG with its accessible name and summary.
fn figure(id: &str, title: &str, caption: Markup, desc: &str, body: Markup) -> Markup {
    html! {
        figure.chart id=(id) {
            figcaption { strong { (title) } " " (caption) }
            svg viewBox=(format!("0 0 {W} {H}")) role="img"
                aria-labelledby=(format!("{id}-title {id}-desc")) {
                title id=(format!("{id}-title")) { (title) }
                desc id=(format!("{id}-desc")) { (desc) }
                (body)
            }
        }
    }
}

fn plural(n: i64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The stored size per day: a line through the days with a recorded size, and the limit as a
/// dashed line when it is near enough to be drawn to scale.
fn size_chart(s: &CacheStats) -> Markup {
    let days = &s.days;
    let n = days.len();
    let known: Vec<(usize, i64)> = days
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.size.map(|v| (i, v)))
        .collect();
    let peak = known.iter().map(|(_, v)| *v).max().unwrap_or(0);
    let now = known.last().map_or(0, |(_, v)| *v);
    // A limit far above the data would flatten it: drawn only within 1.5 × the peak.
    let limit = s
        .max_size
        .filter(|m| *m > 0 && (*m as f64) <= (peak as f64 * 1.5).max(1.0));
    let a = axis(peak.max(limit.unwrap_or(0)) as f64, Unit::Bytes);
    let low = known.iter().map(|(_, v)| *v).min().unwrap_or(0);
    let desc = if known.is_empty() {
        format!("No size recorded in the last {n} days.")
    } else {
        format!(
            "Stored size over the last {n} days: {} today, lowest {}, highest {}{}.",
            human_size(now),
            human_size(low),
            human_size(peak),
            s.max_size
                .map(|m| format!(", limit {}", human_size(m)))
                .unwrap_or_default()
        )
    };
    let points: Vec<(f64, f64)> = known
        .iter()
        .map(|(i, v)| (x_center(*i, n), y_of(*v as f64, a.top)))
        .collect();
    let line: Vec<String> = points
        .iter()
        .map(|(x, y)| format!("{},{}", f1(*x), f1(*y)))
        .collect();
    let area = match (points.first(), points.last()) {
        (Some(first), Some(last)) if points.len() > 1 => Some(format!(
            "M{},{} L{} L{},{} Z",
            f1(first.0),
            f1(TOP + PLOT_H),
            line.join(" L"),
            f1(last.0),
            f1(TOP + PLOT_H)
        )),
        _ => None,
    };
    let caption = html! {
        span.muted {
            (human_size(now)) " now"
            @if let Some(m) = s.max_size { " · limit " (human_size(m)) }
        }
    };
    let body = html! {
        (frame(&a, days))
        @if let Some(m) = limit {
            @let y = f1(y_of(m as f64, a.top));
            g.limit {
                line x1=(f1(LEFT)) x2=(f1(W - RIGHT)) y1=(y) y2=(y) {}
                text x=(f1(LEFT + 4.0)) y=(f1(y_of(m as f64, a.top) - 4.0)) { "limit" }
            }
        }
        @if known.is_empty() {
            (empty_note("No size recorded yet"))
        }
        g.series.size {
            @if let Some(d) = &area { path.area d=(d) {} }
            @if line.len() > 1 { polyline.line points=(line.join(" ")) {} }
            @for ((i, v), (x, y)) in known.iter().zip(&points) {
                circle.point cx=(f1(*x)) cy=(f1(*y)) r="2.5" data-date=(days[*i].date) data-value=(v) {
                    title { (days[*i].date) ": " (human_size(*v)) " stored" }
                }
            }
        }
    };
    figure("chart-size", "Stored size", caption, &desc, body)
}

/// Bytes downloaded per day.
fn bytes_chart(s: &CacheStats) -> Markup {
    let days = &s.days;
    let n = days.len();
    let total: i64 = days.iter().map(|d| d.bytes).sum();
    let today = days.last().map_or(0, |d| d.bytes);
    let peak = days.iter().map(|d| d.bytes).max().unwrap_or(0);
    let a = axis(peak as f64, Unit::Bytes);
    let slot = PLOT_W / n as f64;
    let width = (slot * 0.7).max(1.0);
    let desc = format!(
        "Bytes downloaded per day over the last {n} days (NARs and narinfos): {} in total, \
         {} today, at most {} in a day.",
        human_size(total),
        human_size(today),
        human_size(peak)
    );
    let caption = html! { span.muted { (human_size(total)) " in " (n) " days" } };
    let body = html! {
        (frame(&a, days))
        @if total == 0 { (empty_note("No downloads recorded yet")) }
        g.series.bytes {
            @for (i, d) in days.iter().enumerate() {
                @if d.bytes > 0 {
                    @let y = y_of(d.bytes as f64, a.top);
                    rect.bar x=(f1(x_center(i, n) - width / 2.0)) y=(f1(y)) width=(f1(width))
                        height=(f1(TOP + PLOT_H - y)) data-date=(d.date) data-value=(d.bytes) {
                        title { (d.date) ": " (human_size(d.bytes)) " downloaded" }
                    }
                }
            }
        }
    };
    figure("chart-bytes", "Downloaded per day", caption, &desc, body)
}

/// Requests per day: NAR requests below, narinfo requests stacked on them.
fn requests_chart(s: &CacheStats) -> Markup {
    let days = &s.days;
    let n = days.len();
    let nars: i64 = days.iter().map(|d| d.nar_requests).sum();
    let narinfos: i64 = days.iter().map(|d| d.narinfo_requests).sum();
    let today = days.last().map_or(0, |d| d.requests);
    let peak = days.iter().map(|d| d.requests).max().unwrap_or(0);
    let a = axis(peak as f64, Unit::Count);
    let slot = PLOT_W / n as f64;
    let width = (slot * 0.7).max(1.0);
    let desc = format!(
        "Requests per day over the last {n} days: {} in total ({}, {}), {} today.",
        nars + narinfos,
        plural(nars, "NAR", "NARs"),
        plural(narinfos, "narinfo", "narinfos"),
        today
    );
    let caption = html! {
        span.muted { (nars + narinfos) " in " (n) " days" }
        " "
        span.legend aria-hidden="true" {
            span.key.nar {} "NAR " span.key.narinfo {} "narinfo"
        }
    };
    let body = html! {
        (frame(&a, days))
        @if nars + narinfos == 0 { (empty_note("No downloads recorded yet")) }
        g.series.requests {
            @for (i, d) in days.iter().enumerate() {
                @let x = f1(x_center(i, n) - width / 2.0);
                @let y_nar = y_of(d.nar_requests as f64, a.top);
                @let y_all = y_of(d.requests as f64, a.top);
                @if d.nar_requests > 0 {
                    rect.bar.nar x=(x) y=(f1(y_nar)) width=(f1(width)) height=(f1(TOP + PLOT_H - y_nar))
                        data-date=(d.date) data-value=(d.nar_requests) {
                        title { (d.date) ": " (plural(d.nar_requests, "NAR request", "NAR requests")) }
                    }
                }
                @if d.narinfo_requests > 0 {
                    rect.bar.narinfo x=(x) y=(f1(y_all)) width=(f1(width)) height=(f1(y_nar - y_all))
                        data-date=(d.date) data-value=(d.narinfo_requests) {
                        title { (d.date) ": " (plural(d.narinfo_requests, "narinfo request", "narinfo requests")) }
                    }
                }
            }
        }
    };
    figure("chart-requests", "Requests per day", caption, &desc, body)
}

/// The charts of a cache page and the table of their numbers.
pub(super) fn charts(s: &CacheStats) -> Markup {
    html! {
        div.charts {
            (size_chart(s))
            (bytes_chart(s))
            (requests_chart(s))
        }
        details.numbers {
            summary { "The numbers, day by day" }
            table.rows #stats-table {
                thead { tr { th { "Day (UTC)" } th.num { "Stored" } th.num { "Downloaded" } th.num { "NAR requests" } th.num { "Narinfo requests" } } }
                tbody {
                    @for d in s.days.iter().rev() {
                        tr {
                            td data-label="Day (UTC)" { (d.date) }
                            td.num data-label="Stored" { @match d.size { Some(v) => { (human_size(v)) }, None => { span.muted { "—" } } } }
                            td.num data-label="Downloaded" { (human_size(d.bytes)) }
                            td.num data-label="NAR requests" { (d.nar_requests) }
                            td.num data-label="Narinfo requests" { (d.narinfo_requests) }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test fails
mod tests {
    use super::*;

    fn labels(a: &Axis) -> Vec<&str> {
        a.ticks.iter().map(|(_, l)| l.as_str()).collect()
    }

    #[test]
    fn axes_have_round_steps_in_readable_units() {
        let a = axis(1.2 * 1024.0 * 1024.0, Unit::Bytes);
        assert_eq!(labels(&a), ["0", "0.5 MiB", "1.0 MiB", "1.5 MiB"]);
        assert_eq!(a.top, 1.5 * 1024.0 * 1024.0);
        let a = axis(717.0, Unit::Bytes);
        assert_eq!(labels(&a), ["0", "200 B", "400 B", "600 B", "800 B"]);
        let a = axis(3.0, Unit::Count);
        assert_eq!(labels(&a), ["0", "1", "2", "3"]);
        let a = axis(0.0, Unit::Count);
        assert_eq!(labels(&a), ["0", "1"]);
        let a = axis(12_345.0, Unit::Count);
        assert_eq!(labels(&a), ["0", "5k", "10k", "15k"]);
        assert_eq!(count_label(1500.0), "1.5k");
        assert_eq!(count_label(2_000_000.0), "2M");
    }

    #[test]
    fn dates_are_short() {
        assert_eq!(short_date("2025-12-05"), "5 Dec");
        assert_eq!(short_date("2025-01-31"), "31 Jan");
    }

    #[test]
    fn svg_elements_are_closed() {
        let s = size_bar("c", 90, 100).into_string();
        assert!(s.contains("</rect>") && !s.contains("/>"), "{s}");
        assert!(s.contains(r#"data-percent="90""#), "{s}");
        assert!(s.contains(r#"class="used near""#), "{s}");
        assert!(size_bar("c", 101, 100)
            .into_string()
            .contains(r#"class="used over""#));
    }
}
