//! Reading a `steward run` process's `/metrics`: one scrape, a histogram's buckets from it, the
//! difference of two scrapes, and quantiles estimated from buckets the way Prometheus'
//! `histogram_quantile` does. The demo's live view and the benchmark's fleet scenario read
//! promotion lag and start delay this way.

use std::time::Duration;

/// Cumulative bucket counts by upper bound (ascending, `+Inf` last).
pub type Buckets = Vec<(f64, f64)>;

/// GET `/metrics` from `addr` (HTTP/1.0: the server closes the connection after the body);
/// `None` when it cannot be read within `timeout` or does not answer 200.
pub async fn scrape(addr: &str, timeout: Duration) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let response = String::from_utf8(response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_owned())
    };
    tokio::time::timeout(timeout, fetch).await.ok().flatten()
}

/// The buckets of histogram `name` (without `_bucket`) in a Prometheus exposition, summed per
/// bound over the series whose labels (the text between the braces) `keep` accepts; `None`
/// when there is no such series (a histogram appears with its first observation).
pub fn buckets(exposition: &str, name: &str, keep: impl Fn(&str) -> bool) -> Option<Buckets> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: Buckets = Vec::new();
    for line in exposition.lines() {
        let Some((labels, value)) = line
            .strip_prefix(prefix.as_str())
            .and_then(|r| r.split_once('}'))
        else {
            continue;
        };
        if !keep(labels) {
            continue;
        }
        let Some(le) = labels
            .split(',')
            .find_map(|pair| pair.trim().strip_prefix("le=\""))
            .map(|v| v.trim_end_matches('"'))
        else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            match le.parse::<f64>() {
                Ok(le) => le,
                Err(_) => continue,
            }
        };
        let Ok(count) = value.trim().parse::<f64>() else {
            continue;
        };
        match buckets.iter_mut().find(|(bound, _)| *bound == le) {
            Some((_, total)) => *total += count,
            None => buckets.push((le, count)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    (!buckets.is_empty()).then_some(buckets)
}

/// The `_sum` of histogram `name`, summed over the series whose labels `keep` accepts (an
/// unlabelled series has empty labels); `None` when there is none.
pub fn sum(exposition: &str, name: &str, keep: impl Fn(&str) -> bool) -> Option<f64> {
    let prefix = format!("{name}_sum");
    let mut total = None;
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix(prefix.as_str()) else {
            continue;
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(labelled) => match labelled.split_once('}') {
                Some(split) => split,
                None => continue,
            },
            // Another metric whose name starts with this one's `_sum`.
            None if !rest.starts_with(' ') => continue,
            None => ("", rest),
        };
        if !keep(labels) {
            continue;
        }
        if let Ok(value) = value.trim().parse::<f64>() {
            *total.get_or_insert(0.0) += value;
        }
    }
    total
}

/// `later - earlier` per bound (a bound missing from `earlier` counts from 0); `None` when a
/// count went down (another process, or a restart).
pub fn delta(later: &Buckets, earlier: &Buckets) -> Option<Buckets> {
    later
        .iter()
        .map(|(le, count)| {
            let before = earlier
                .iter()
                .find(|(bound, _)| bound == le)
                .map_or(0.0, |(_, c)| *c);
            (count >= &before).then_some((*le, count - before))
        })
        .collect()
}

/// How many observations the buckets hold (the `+Inf` bucket's count).
pub fn count(buckets: &Buckets) -> f64 {
    buckets.last().map_or(0.0, |(_, c)| *c)
}

/// The `q` quantile of cumulative buckets, interpolated linearly within the bucket it falls
/// in, as `histogram_quantile` does: the lowest bucket starts at 0, and a quantile in the
/// `+Inf` bucket is the highest finite bound.
pub fn quantile(q: f64, buckets: &Buckets) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut previous = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(previous.0);
            }
            if count == previous.1 {
                return Some(le);
            }
            return Some(
                previous.0 + (le - previous.0) * (rank - previous.1) / (count - previous.1),
            );
        }
        previous = (le, count);
    }
    Some(previous.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "\
# TYPE steward_promotion_lag_seconds histogram
steward_promotion_lag_seconds_bucket{le=\"0.001\"} 10
steward_promotion_lag_seconds_bucket{le=\"0.002\"} 50
steward_promotion_lag_seconds_bucket{le=\"0.005\"} 90
steward_promotion_lag_seconds_bucket{le=\"0.01\"} 100
steward_promotion_lag_seconds_bucket{le=\"+Inf\"} 100
steward_promotion_lag_seconds_sum 0.2
steward_promotion_lag_seconds_count 100
steward_maintenance_branch_start_delay_seconds_bucket{branch=\"a\",class=\"slo\",le=\"0.001\"} 7
steward_maintenance_branch_start_delay_seconds_bucket{branch=\"a\",class=\"slo\",le=\"+Inf\"} 8
steward_maintenance_branch_start_delay_seconds_bucket{branch=\"b\",class=\"slo\",le=\"0.001\"} 1
steward_maintenance_branch_start_delay_seconds_bucket{branch=\"b\",class=\"slo\",le=\"+Inf\"} 2
steward_maintenance_branch_start_delay_seconds_bucket{branch=\"c\",class=\"hygiene\",le=\"0.001\"} 0
steward_maintenance_branch_start_delay_seconds_bucket{branch=\"c\",class=\"hygiene\",le=\"+Inf\"} 5
";

    #[test]
    fn buckets_are_read_and_summed_over_the_series_kept() {
        let lag = buckets(SCRAPE, "steward_promotion_lag_seconds", |_| true).unwrap();
        assert_eq!(
            lag,
            vec![
                (0.001, 10.0),
                (0.002, 50.0),
                (0.005, 90.0),
                (0.01, 100.0),
                (f64::INFINITY, 100.0)
            ]
        );
        let slo = buckets(
            SCRAPE,
            "steward_maintenance_branch_start_delay_seconds",
            |labels| labels.contains("class=\"slo\""),
        )
        .unwrap();
        assert_eq!(slo, vec![(0.001, 8.0), (f64::INFINITY, 10.0)]);
        assert_eq!(count(&slo), 10.0);
        assert_eq!(
            sum(SCRAPE, "steward_promotion_lag_seconds", |_| true),
            Some(0.2)
        );
        let durations = "\
steward_d_seconds_sum{class=\"slo\"} 1.5
steward_d_seconds_sum{class=\"hygiene\"} 9
steward_d_seconds_sum{class=\"slo\",branch=\"x\"} 0.5
steward_d_seconds_summary 3
";
        assert_eq!(
            sum(durations, "steward_d_seconds", |l| l
                .contains("class=\"slo\"")),
            Some(2.0)
        );
        assert_eq!(sum(durations, "steward_e_seconds", |_| true), None);
        assert_eq!(
            buckets("steward_leader 1\n", "steward_leader", |_| true),
            None
        );
    }

    #[test]
    fn quantiles_interpolate_within_buckets_like_histogram_quantile() {
        let lag = buckets(SCRAPE, "steward_promotion_lag_seconds", |_| true).unwrap();
        // rank 50 is the top of the 1-2 ms bucket; rank 99 is 90% into the 5-10 ms bucket.
        let p50 = quantile(0.5, &lag).unwrap();
        assert!((p50 - 0.002).abs() < 1e-12, "{p50}");
        let p99 = quantile(0.99, &lag).unwrap();
        assert!((p99 - 0.0095).abs() < 1e-12, "{p99}");
        // In the lowest bucket, from 0.
        let p05 = quantile(0.05, &lag).unwrap();
        assert!((p05 - 0.0005).abs() < 1e-12, "{p05}");
        // Beyond the highest finite bound: that bound.
        let over = vec![(0.001, 1.0), (f64::INFINITY, 10.0)];
        assert_eq!(quantile(0.99, &over), Some(0.001));
        assert_eq!(
            quantile(0.5, &vec![(0.001, 0.0), (f64::INFINITY, 0.0)]),
            None
        );
    }

    #[test]
    fn a_delta_counts_what_happened_between_two_scrapes() {
        let earlier = vec![(0.001, 5.0), (0.01, 5.0), (f64::INFINITY, 5.0)];
        let later = vec![(0.001, 5.0), (0.01, 9.0), (f64::INFINITY, 9.0)];
        assert_eq!(
            delta(&later, &earlier),
            Some(vec![(0.001, 0.0), (0.01, 4.0), (f64::INFINITY, 4.0)])
        );
        // Before its first observation the histogram is not exported: everything is new.
        assert_eq!(delta(&later, &Vec::new()), Some(later.clone()));
        // Counts going down: another process, or a restart.
        assert_eq!(delta(&earlier, &later), None);
    }
}
