//! Retention policy: which backups a schedule may delete (like restic's `forget --keep-*`).

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::{Deserialize, Serialize};

/// How many backups to keep. Buckets (hours, days, ISO weeks) are in UTC.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// The newest `last` backups.
    pub last: u32,
    /// The newest backup of each of the last `hourly` hours that have one.
    pub hourly: u32,
    /// The newest backup of each of the last `daily` days that have one.
    pub daily: u32,
    /// The newest backup of each of the last `weekly` ISO weeks that have one.
    pub weekly: u32,
}

/// Marks the newest backup of each of the first `n` distinct buckets (walking newest first).
fn keep_buckets<K: PartialEq>(
    order: &[usize],
    backups: &[(String, DateTime<Utc>)],
    n: u32,
    key: impl Fn(&DateTime<Utc>) -> K,
    keep: &mut [bool],
) {
    let mut kept = 0;
    let mut last: Option<K> = None;
    for &i in order {
        if kept >= n {
            break;
        }
        let k = key(&backups[i].1);
        if last.as_ref() != Some(&k) {
            keep[i] = true;
            kept += 1;
            last = Some(k);
        }
    }
}

/// Ids of the backups `policy` does not keep, in the order given. A backup kept by any rule is
/// kept; the newest backup is always kept (it is what the next incremental builds on).
pub fn expired(backups: &[(String, DateTime<Utc>)], policy: &Retention) -> Vec<String> {
    let mut order: Vec<usize> = (0..backups.len()).collect();
    // Newest first; ties broken by id so the result does not depend on the input order.
    order.sort_by(|&a, &b| {
        backups[b]
            .1
            .cmp(&backups[a].1)
            .then_with(|| backups[b].0.cmp(&backups[a].0))
    });
    let mut keep = vec![false; backups.len()];
    for &i in order.iter().take(policy.last.max(1) as usize) {
        keep[i] = true;
    }
    keep_buckets(
        &order,
        backups,
        policy.hourly,
        |t| (t.date_naive(), t.hour()),
        &mut keep,
    );
    keep_buckets(&order, backups, policy.daily, |t| t.date_naive(), &mut keep);
    keep_buckets(&order, backups, policy.weekly, |t| t.iso_week(), &mut keep);
    backups
        .iter()
        .zip(keep)
        .filter(|(_, k)| !k)
        .map(|((id, _), _)| id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    fn kept(backups: &[(String, DateTime<Utc>)], p: &Retention) -> Vec<String> {
        let gone = expired(backups, p);
        backups
            .iter()
            .map(|(id, _)| id.clone())
            .filter(|id| !gone.contains(id))
            .collect()
    }

    /// One backup every `step` from `start`, named by index.
    fn series(start: DateTime<Utc>, step: Duration, n: usize) -> Vec<(String, DateTime<Utc>)> {
        (0..n)
            .map(|i| (format!("b{i:03}"), start + step * i as i32))
            .collect()
    }

    #[test]
    fn newest_always_kept() {
        let b = series(at(2024, 1, 1, 0, 0), Duration::minutes(20), 10);
        let none = Retention::default();
        assert_eq!(kept(&b, &none), ["b009"]);
        assert_eq!(expired(&b, &none).len(), 9);
        // Input order does not matter.
        let mut rev = b.clone();
        rev.reverse();
        assert_eq!(kept(&rev, &none), ["b009"]);
        assert!(expired(&[], &none).is_empty());
    }

    #[test]
    fn last_n() {
        let b = series(at(2024, 1, 1, 0, 0), Duration::minutes(20), 10);
        let p = Retention {
            last: 3,
            ..Default::default()
        };
        assert_eq!(kept(&b, &p), ["b007", "b008", "b009"]);
    }

    #[test]
    fn hourly_buckets() {
        // 00:00, 00:20, 00:40, 01:00, ... 03:00: three per hour.
        let b = series(at(2024, 1, 1, 0, 0), Duration::minutes(20), 10);
        let p = Retention {
            hourly: 3,
            ..Default::default()
        };
        // Hours 03 (b009 alone), 02 (newest b008), 01 (newest b005).
        assert_eq!(kept(&b, &p), ["b005", "b008", "b009"]);
        // Hours without backups do not count: a gap of a day still keeps 3 hours.
        let mut gap = b.clone();
        gap.push(("late".into(), at(2024, 1, 2, 12, 0)));
        assert_eq!(kept(&gap, &p), ["b008", "b009", "late"]);
    }

    #[test]
    fn daily_and_weekly_buckets() {
        // Every 6 hours for 20 days starting Monday 2024-01-01 (ISO week 1).
        let b = series(at(2024, 1, 1, 3, 0), Duration::hours(6), 80);
        let daily = Retention {
            daily: 2,
            ..Default::default()
        };
        // Newest: 2024-01-20 21:00 (b079); the day before ends with b075.
        assert_eq!(b[79].1, at(2024, 1, 20, 21, 0));
        assert_eq!(kept(&b, &daily), ["b075", "b079"]);
        let weekly = Retention {
            weekly: 3,
            ..Default::default()
        };
        // ISO weeks: Jan 15-21 (b079), Jan 8-14 (last: Jan 14 21:00 = b055), Jan 1-7 (b027).
        assert_eq!(b[55].1, at(2024, 1, 14, 21, 0));
        assert_eq!(b[27].1, at(2024, 1, 7, 21, 0));
        assert_eq!(kept(&b, &weekly), ["b027", "b055", "b079"]);
        // Rules add up; overlapping keeps count once.
        let mixed = Retention {
            last: 2,
            hourly: 0,
            daily: 2,
            weekly: 3,
        };
        assert_eq!(kept(&b, &mixed), ["b027", "b055", "b075", "b078", "b079"]);
        // Asking for more buckets than exist keeps one per bucket, no more.
        let many = Retention {
            weekly: 50,
            ..Default::default()
        };
        assert_eq!(kept(&b, &many).len(), 3);
    }
}
