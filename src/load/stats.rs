//! Latency percentiles and what `/proc` says about a process (CPU time, RSS).
//!
//! Latencies are kept as exact microsecond samples (bounded by [`MAX_SAMPLES`]) and sorted once at
//! the end: exact percentiles, no histogram dependency, and a run's memory is bounded.

use std::time::Duration;

use serde_json::json;

/// Most latency samples one run keeps (80 MB); beyond it samples are counted but not kept.
pub const MAX_SAMPLES: usize = 20_000_000;

/// Latency samples in microseconds.
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    samples: Vec<u32>,
    /// Samples seen but not kept (over the cap).
    dropped: u64,
}

impl Latencies {
    /// Records one latency, if there is room for it.
    pub fn record(&mut self, latency: Duration, cap: usize) {
        if self.samples.len() < cap {
            self.samples
                .push(latency.as_micros().min(u128::from(u32::MAX)) as u32);
        } else {
            self.dropped += 1;
        }
    }

    /// Merges another set of samples into this one.
    pub fn merge(&mut self, other: Latencies) {
        self.samples.extend(other.samples);
        self.dropped += other.dropped;
    }

    /// Sorts and summarises.
    pub fn summary(mut self) -> Summary {
        self.samples.sort_unstable();
        let at = |q: f64| -> f64 {
            if self.samples.is_empty() {
                return 0.0;
            }
            let i = ((self.samples.len() as f64 * q).ceil() as usize).clamp(1, self.samples.len());
            f64::from(self.samples[i - 1]) / 1000.0
        };
        Summary {
            count: self.samples.len() as u64 + self.dropped,
            p50_ms: at(0.50),
            p90_ms: at(0.90),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: self.samples.last().map_or(0.0, |&m| f64::from(m) / 1000.0),
        }
    }
}

/// Percentiles of a latency distribution, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Summary {
    pub fn json(&self) -> serde_json::Value {
        json!({
            "count": self.count,
            "p50_ms": round3(self.p50_ms),
            "p90_ms": round3(self.p90_ms),
            "p99_ms": round3(self.p99_ms),
            "p999_ms": round3(self.p999_ms),
            "max_ms": round3(self.max_ms),
        })
    }

    pub fn line(&self) -> String {
        format!(
            "p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  ({} samples)",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms, self.count
        )
    }
}

/// Rounds to three decimals for the JSON line.
pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// One reading of a process's resource use.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    /// User + system CPU time, all threads (including exited ones).
    pub cpu: Duration,
    /// Kernel share of `cpu`.
    pub system: Duration,
    /// Resident set size in KiB.
    pub rss_kib: u64,
}

/// Reads `/proc/PID/stat` (CPU) and `/proc/PID/status` (`VmRSS`). `pid` `None` means this process.
pub fn sample(pid: Option<u32>) -> Result<ProcSample, super::Error> {
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}"),
        None => "/proc/self".to_owned(),
    };
    let stat = std::fs::read_to_string(format!("{dir}/stat"))
        .map_err(|e| format!("{dir}/stat: {e} (is the server running?)"))?;
    // Fields after the parenthesised command name, which may itself contain spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| format!("{dir}/stat: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    let ticks = |i: usize| -> u64 { fields.get(i - 3).and_then(|v| v.parse().ok()).unwrap_or(0) };
    let per_second = clock_ticks_per_second();
    let to_duration = |t: u64| Duration::from_secs_f64(t as f64 / per_second as f64);
    let status = std::fs::read_to_string(format!("{dir}/status"))
        .map_err(|e| format!("{dir}/status: {e}"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(ProcSample {
        cpu: to_duration(ticks(14) + ticks(15)),
        system: to_duration(ticks(15)),
        rss_kib,
    })
}

/// The summed use of every process in `pids` (a cluster's nodes, and Redis if given); `None`
/// when no PID was given.
pub fn sample_servers(pids: &[u32]) -> Result<Option<ProcSample>, super::Error> {
    let each = pids
        .iter()
        .map(|&pid| sample(Some(pid)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(total(&each))
}

/// The sum of several readings (CPU, kernel CPU and RSS); `None` for none.
pub fn total(samples: &[ProcSample]) -> Option<ProcSample> {
    samples.iter().copied().reduce(|sum, one| ProcSample {
        cpu: sum.cpu + one.cpu,
        system: sum.system + one.system,
        rss_kib: sum.rss_kib + one.rss_kib,
    })
}

/// `sysconf(_SC_CLK_TCK)`, read from the auxiliary vector (`AT_CLKTCK`) so no libc binding is
/// needed; 100 if it cannot be read.
fn clock_ticks_per_second() -> u64 {
    const AT_CLKTCK: u64 = 17;
    let Ok(auxv) = std::fs::read("/proc/self/auxv") else {
        return 100;
    };
    auxv.chunks_exact(16)
        .map(|pair| {
            let word = |b: &[u8]| u64::from_ne_bytes(b.try_into().expect("8 bytes"));
            (word(&pair[..8]), word(&pair[8..]))
        })
        .find(|&(key, _)| key == AT_CLKTCK)
        .map_or(100, |(_, value)| value.max(1))
}

/// The server's CPU and memory over a measured window.
#[derive(Debug, Clone, Copy)]
pub struct ServerUse {
    pub cpu: Duration,
    pub system: Duration,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
}

impl ServerUse {
    pub fn between(before: ProcSample, after: ProcSample) -> ServerUse {
        ServerUse {
            cpu: after.cpu.saturating_sub(before.cpu),
            system: after.system.saturating_sub(before.system),
            rss_before_kib: before.rss_kib,
            rss_after_kib: after.rss_kib,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_exact_ranks() {
        let mut l = Latencies::default();
        for us in 1..=1000u64 {
            l.record(Duration::from_micros(us), MAX_SAMPLES);
        }
        let s = l.summary();
        assert_eq!(s.count, 1000);
        assert_eq!(s.p50_ms, 0.5);
        assert_eq!(s.p99_ms, 0.99);
        assert_eq!(s.p999_ms, 0.999);
        assert_eq!(s.max_ms, 1.0);
    }

    #[test]
    fn several_servers_add_up_and_none_is_none() {
        let me = std::process::id();
        assert!(sample_servers(&[]).unwrap().is_none());
        let one = sample(Some(me)).unwrap();
        let two = sample_servers(&[me, me]).unwrap().unwrap();
        assert!(two.cpu >= one.cpu * 2);
        assert!(two.rss_kib >= one.rss_kib);
    }

    #[test]
    fn reads_this_process() {
        let s = sample(None).expect("/proc/self");
        assert!(s.rss_kib > 0);
        assert!(clock_ticks_per_second() >= 1);
    }
}
