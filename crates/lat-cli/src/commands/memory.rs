//! Refusing what cannot fit: every command that allocates much computes its memory plan first
//! (`linear_attention_transformer::plan`) and stops with one line when the plan exceeds what the
//! system has (or `--max-memory`), unless `--force`.

use linear_attention_transformer::plan::{self, Plan};

use super::{usage, Result};

/// The memory options every large command takes.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct MemoryArgs {
    /// Refuse to start when the memory plan exceeds this (e.g. 8GiB, 500MB; default: the memory
    /// the system has available, or the cgroup's limit).
    #[arg(long, value_name = "SIZE")]
    pub max_memory: Option<String>,
    /// Start even when the memory plan says it will not fit.
    #[arg(long)]
    pub force: bool,
}

impl MemoryArgs {
    /// The limit to plan against: `--max-memory`, else what the system has.
    pub fn limit(&self) -> Result<Option<u64>> {
        match &self.max_memory {
            Some(s) => Ok(Some(parse_size(s)?)),
            None => Ok(plan::available()),
        }
    }

    /// Refuses `plan` unless it fits or `--force` was given; `advice` says what to change.
    pub fn check(&self, plan: &Plan, advice: impl FnOnce(u64) -> String) -> Result<()> {
        let Some(limit) = self.limit()? else { return Ok(()) };
        if self.force || plan.total <= limit {
            return Ok(());
        }
        plan::check(plan, Some(limit), &advice(limit)).map_err(|e| match (e, &self.max_memory) {
            (linear_attention_transformer::Error::Input(m), None) => usage(m.replace(" under --max-memory", "")),
            (e, _) => e,
        })
    }
}

/// Reads "8GiB", "8G", "500MB", "1.5GiB", "4096" (bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| usage(format!("cannot read the size \"{s}\": use e.g. 8GiB, 500MB, 4096")))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1048576.0,
        "g" | "gb" => 1e9,
        "gib" => 1073741824.0,
        "t" | "tb" => 1e12,
        "tib" => 1099511627776.0,
        _ => return Err(usage(format!("cannot read the size \"{s}\": the unit must be B, KB, KiB, MB, MiB, GB, GiB, TB or TiB"))),
    };
    Ok((n * scale) as u64)
}

/// The largest value of `1..=upto` for which `fits` holds (it must hold for smaller values
/// whenever it holds for a larger one), or None.
pub fn largest(upto: usize, fits: impl Fn(usize) -> bool) -> Option<usize> {
    if upto == 0 || !fits(1) {
        return None;
    }
    let (mut lo, mut hi) = (1, upto);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fits(mid) {
            lo = mid
        } else {
            hi = mid - 1
        }
    }
    Some(lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_searches() {
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("1.5 kib").unwrap(), 1536);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").is_err() && parse_size("3 parsecs").is_err());
        assert_eq!(largest(100, |b| b * 3 <= 100), Some(33));
        assert_eq!(largest(100, |_| false), None);
    }
}
