//! The standard `process_*` metrics, read from `/proc/self` at scrape time.
//!
//! Written by hand: prometheus-client has no process collector, the `prometheus` crate's
//! belongs to another metrics library (its own registry and types), and `procfs` is a large
//! dependency for the six numbers needed here. The names, types and help follow
//! client_golang's process collector, so dashboards built for it work.
//!
//! Linux only: elsewhere (or if `/proc` is not mounted) the metrics are simply absent. A
//! file that cannot be read or parsed drops only the metrics read from it.

use std::fs;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// Clock ticks per second in `/proc/<pid>/stat`: `USER_HZ`, which the kernel fixes at 100
/// for userspace on every architecture Rust targets (reading `sysconf(_SC_CLK_TCK)` would
/// need libc and `unsafe`).
const TICKS_PER_SECOND: f64 = 100.0;

/// Collects `process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// `process_virtual_memory_bytes`, `process_open_fds`, `process_max_fds` and
/// `process_start_time_seconds` on each scrape.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessCollector;

/// What one scrape read; `None` for what could not be read.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct ProcessStats {
    pub(crate) cpu_seconds: Option<f64>,
    pub(crate) resident_bytes: Option<u64>,
    pub(crate) virtual_bytes: Option<u64>,
    pub(crate) open_fds: Option<u64>,
    pub(crate) max_fds: Option<u64>,
    pub(crate) start_time_seconds: Option<f64>,
}

impl ProcessStats {
    pub(crate) fn read() -> ProcessStats {
        let stat = fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| parse_stat(&s));
        let boot_time = fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| parse_boot_time(&s));
        ProcessStats {
            cpu_seconds: stat.map(|s| (s.utime + s.stime) as f64 / TICKS_PER_SECOND),
            resident_bytes: fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| parse_vm_rss(&s)),
            virtual_bytes: stat.map(|s| s.vsize),
            open_fds: fs::read_dir("/proc/self/fd")
                .ok()
                .map(|dir| dir.count() as u64),
            max_fds: fs::read_to_string("/proc/self/limits")
                .ok()
                .and_then(|s| parse_max_fds(&s)),
            start_time_seconds: stat
                .zip(boot_time)
                .map(|(s, boot)| boot as f64 + s.start_ticks as f64 / TICKS_PER_SECOND),
        }
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = ProcessStats::read();
        if let Some(v) = stats.cpu_seconds {
            let m = ConstCounter::new(v);
            let help = "Total user and system CPU time spent in seconds.";
            m.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                help,
                None,
                m.metric_type(),
            )?)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                stats.resident_bytes.map(|v| v as f64),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                stats.virtual_bytes.map(|v| v as f64),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                stats.open_fds.map(|v| v as f64),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                stats.max_fds.map(|v| v as f64),
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                stats.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let m = ConstGauge::new(v);
                m.encode(encoder.encode_descriptor(name, help, None, m.metric_type())?)?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Stat {
    pub(crate) utime: u64,
    pub(crate) stime: u64,
    pub(crate) start_ticks: u64,
    pub(crate) vsize: u64,
}

/// `/proc/self/stat`: the command name (field 2) is in parentheses and may itself hold
/// spaces and parentheses, so fields are counted from the last `)`.
pub(crate) fn parse_stat(s: &str) -> Option<Stat> {
    let rest = &s[s.rfind(')')? + 1..];
    // `rest` starts at field 3 (state); field n is at index n - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        start_ticks: field(22)?,
        vsize: field(23)?,
    })
}

/// `btime` in `/proc/stat`: boot time, seconds since the epoch.
pub(crate) fn parse_boot_time(s: &str) -> Option<u64> {
    s.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// `VmRSS:  1234 kB` in `/proc/self/status`, in bytes.
pub(crate) fn parse_vm_rss(s: &str) -> Option<u64> {
    let line = s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let mut parts = line.split_whitespace();
    let kib: u64 = parts.next()?.parse().ok()?;
    (parts.next() == Some("kB")).then_some(kib * 1024)
}

/// The soft limit of `Max open files` in `/proc/self/limits`.
pub(crate) fn parse_max_fds(s: &str) -> Option<u64> {
    let line = s.lines().find_map(|l| l.strip_prefix("Max open files"))?;
    line.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "4242 (my (odd) proc) S 1 4242 4242 0 -1 4194560 1200 0 0 0 \
                    250 75 0 0 20 0 9 0 123456 987654321 2048 18446744073709551615";
        assert_eq!(
            parse_stat(stat),
            Some(Stat {
                utime: 250,
                stime: 75,
                start_ticks: 123456,
                vsize: 987654321
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000)
        );
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t   2048 kB\nThreads: 3\n"),
            Some(2048 * 1024)
        );
        assert_eq!(
            parse_max_fds(
                "Limit                     Soft Limit           Hard Limit           Units\n\
                 Max open files            1024                 1048576              files\n"
            ),
            Some(1024)
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_process() {
        let s = ProcessStats::read();
        assert!(s.resident_bytes.unwrap() > 1024 * 1024);
        assert!(s.virtual_bytes.unwrap() >= s.resident_bytes.unwrap());
        assert!(s.open_fds.unwrap() >= 3);
        assert!(s.max_fds.unwrap() >= s.open_fds.unwrap());
        assert!(s.cpu_seconds.unwrap() >= 0.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = s.start_time_seconds.unwrap();
        assert!(
            start <= now + 1.0 && start > now - 86_400.0,
            "{start} vs {now}"
        );
    }
}
