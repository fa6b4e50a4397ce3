//! Paired-ratio statistics for `cargo xtask bench` (issue 18): a benchmark figure that compares
//! two paths is a set of per-round ratios, each taken from two measurements made side by side in
//! the same round, so that whatever slowed the machine during that round slowed both. The figure
//! is their geometric mean with a 95 % confidence interval (Student's t on the logarithms: ratios
//! multiply, and a ratio of 2 and one of 0.5 should cancel) and their range.

/// Per-round ratios of two paths, summarised.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// The geometric mean of the ratios.
    pub mean: f64,
    /// The 95 % confidence interval of `mean`.
    pub lo: f64,
    pub hi: f64,
    /// The smallest and the largest ratio.
    pub min: f64,
    pub max: f64,
    /// How many rounds.
    pub n: usize,
}

impl Spread {
    /// The summary of `ratios` (positive, finite ones; others are ignored). None with fewer than
    /// two: one round has no spread to show.
    pub fn of(ratios: &[f64]) -> Option<Spread> {
        let logs: Vec<f64> = ratios
            .iter()
            .copied()
            .filter(|r| r.is_finite() && *r > 0.0)
            .map(f64::ln)
            .collect();
        let n = logs.len();
        if n < 2 {
            return None;
        }
        let mean = logs.iter().sum::<f64>() / n as f64;
        let var = logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        let half = t975(n - 1) * (var / n as f64).sqrt();
        let (min, max) = logs.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), l| {
            (a.min(*l), b.max(*l))
        });
        Some(Spread {
            mean: mean.exp(),
            lo: (mean - half).exp(),
            hi: (mean + half).exp(),
            min: min.exp(),
            max: max.exp(),
            n,
        })
    }

    /// The interval's half-width as a share of the mean: 0.05 is "+-5 %".
    pub fn relative_half_width(&self) -> f64 {
        (self.hi - self.lo) / 2.0 / self.mean
    }

    /// `0.93-1.01x` (the confidence interval).
    pub fn interval(&self) -> String {
        format!("{:.2}-{:.2}x", self.lo, self.hi)
    }

    /// `0.90-1.04x` (the range of the rounds).
    pub fn range(&self) -> String {
        format!("{:.2}-{:.2}x", self.min, self.max)
    }
}

/// The 97.5th percentile of Student's t distribution with `df` degrees of freedom (two-sided
/// 95 %), from the standard table; the normal distribution's 1.96 beyond 30.
pub fn t975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => TABLE[df - 1],
        _ => 1.96,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_ratios_have_no_spread_and_reciprocals_cancel() {
        let s = Spread::of(&[1.1, 1.1, 1.1]).expect("spread");
        assert!((s.mean - 1.1).abs() < 1e-12 && (s.lo - 1.1).abs() < 1e-12 && (s.hi - 1.1).abs() < 1e-12);
        let s = Spread::of(&[2.0, 0.5]).expect("spread");
        assert!((s.mean - 1.0).abs() < 1e-12);
        assert_eq!((s.min, s.max, s.n), (0.5, 2.0, 2));
        assert!(Spread::of(&[1.0]).is_none());
        assert!(Spread::of(&[1.0, f64::NAN, 0.0]).is_none());
    }

    #[test]
    fn the_interval_is_students_t_on_the_logarithms() {
        // logs: -0.1, 0, 0.1: mean 0, sd 0.1, t(2) = 4.303: half-width 4.303 * 0.1 / sqrt(3).
        let r: Vec<f64> = [-0.1f64, 0.0, 0.1].iter().map(|l| l.exp()).collect();
        let s = Spread::of(&r).expect("spread");
        let half = 4.303 * 0.1 / 3f64.sqrt();
        assert!((s.mean - 1.0).abs() < 1e-12);
        assert!((s.lo - (-half).exp()).abs() < 1e-9, "{s:?}");
        assert!((s.hi - half.exp()).abs() < 1e-9, "{s:?}");
        assert!((s.relative_half_width() - half.sinh()).abs() < 1e-9);
        // More rounds of the same spread narrow the interval.
        let more: Vec<f64> = r.iter().cycle().take(30).copied().collect();
        assert!(Spread::of(&more).expect("spread").relative_half_width() < s.relative_half_width() / 4.0);
        assert_eq!(s.interval(), format!("{:.2}-{:.2}x", s.lo, s.hi));
    }

    #[test]
    fn t_quantiles_fall_towards_the_normal() {
        assert_eq!(t975(1), 12.706);
        assert_eq!(t975(4), 2.776);
        assert_eq!(t975(30), 2.042);
        assert_eq!(t975(200), 1.96);
        assert!((1..30).all(|d| t975(d) > t975(d + 1)));
    }
}
