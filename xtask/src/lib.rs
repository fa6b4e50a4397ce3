//! st8s developer tasks, as a library so that the integration tests share the lab.

pub mod apiserver;
pub mod arm64;
pub mod backend;
pub mod bench;
pub mod deploy;
pub mod knot;
pub mod lab;
pub mod setup;
pub mod stats;
pub mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The workspace root (the directory holding the top Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Where cargo puts host binaries.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The debug `st8s` binary the tests run (`cargo xtask test` builds it first).
pub fn st8s_debug_bin() -> PathBuf {
    let p = target_dir().join("debug/st8s");
    assert!(
        p.is_file(),
        "{} missing: run through `cargo xtask test`",
        p.display()
    );
    p
}

/// A progress line on stderr, so long steps never look hung.
pub fn progress(msg: &str) {
    eprintln!("==> {msg}");
}

/// Polls `found` every 20 ms until it returns something, for at most `timeout`; the error says
/// what did not happen. Tests wait with this instead of sleeping a fixed time.
pub fn poll_until<T>(
    timeout: std::time::Duration,
    what: &str,
    mut found: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(t) = found() {
            return Ok(t);
        }
        if std::time::Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Runs a command with inherited output; an error names it.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// The status code of `GET path` on `127.0.0.1:port`, or None when nothing answers (a probe as
/// the kubelet makes it).
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).map(|(code, _)| code)
}

/// `GET path` on `127.0.0.1:port`: the status code and the body, or None when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: st8s\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((code, body.to_owned()))
}

/// The Grafana dashboard shipped in `deploy/monitoring`.
pub fn dashboard_path() -> std::path::PathBuf {
    workspace_root().join("deploy/monitoring/st8s-dashboard.json")
}

/// Every PromQL query of a Grafana dashboard (each target's `expr`, and each templating query),
/// by panel title.
pub fn dashboard_queries(path: &std::path::Path) -> anyhow::Result<Vec<(String, String)>> {
    let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut out = Vec::new();
    for p in d["panels"].as_array().into_iter().flatten() {
        let title = p["title"].as_str().unwrap_or_default().to_owned();
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((title.clone(), e.to_owned()));
            }
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = v["query"]["query"].as_str() {
            out.push((format!("variable {}", v["name"]), q.to_owned()));
        }
    }
    Ok(out)
}

/// The `st8s_…` metric names a query uses.
pub fn metric_names(query: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let bytes = query.as_bytes();
    let mut i = 0;
    while let Some(at) = query[i..].find("st8s_") {
        let start = i + at;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = query[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(query.len(), |n| start + n);
        if boundary {
            out.insert(query[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// The series names an OpenMetrics exposition can carry, from its `# TYPE` lines (a family
/// with no series yet, such as an error counter that never counted, still has one): a
/// counter's `_total`, a histogram's `_bucket`, `_sum` and `_count`, a gauge's own name.
pub fn exposition_series(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for l in text.lines() {
        let mut f = l.split_whitespace();
        if (f.next(), f.next()) != (Some("#"), Some("TYPE")) {
            continue;
        }
        let (Some(name), Some(kind)) = (f.next(), f.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "histogram" => {
                for s in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{s}"));
                }
            }
            _ => {
                out.insert(name.to_owned());
            }
        }
    }
    out
}

/// Sets an `int` socket option (`setsockopt(2)`), for the options std has no call for.
pub(crate) fn set_int_option(
    s: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: a valid socket and an int option of its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A TCP port on loopback that nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_names_its_st8s_metrics_and_nothing_else() {
        let q = "histogram_quantile(0.99, sum by (le) (rate(st8s_sync_latency_seconds_bucket{x=\"st8s_no\"}[5m]))) / on (map) st8s_map_capacity + my_st8s_x";
        let names: Vec<String> = metric_names(q).into_iter().collect();
        // A label value in quotes is a word too; the checks against a scrape would fail on it,
        // which is the safe side.
        assert_eq!(
            names,
            ["st8s_map_capacity", "st8s_no", "st8s_sync_latency_seconds_bucket"]
        );
    }

    #[test]
    fn an_exposition_gives_the_series_its_families_can_carry() {
        let text = "# HELP st8s_errors Errors by kind.\n# TYPE st8s_errors counter\n\
                    # TYPE st8s_sync_latency_seconds histogram\nst8s_sync_latency_seconds_count 1\n\
                    # TYPE st8s_ready gauge\nst8s_ready 1\n# EOF\n";
        let s: Vec<String> = exposition_series(text).into_iter().collect();
        assert_eq!(
            s,
            [
                "st8s_errors_total",
                "st8s_ready",
                "st8s_sync_latency_seconds_bucket",
                "st8s_sync_latency_seconds_count",
                "st8s_sync_latency_seconds_sum"
            ]
        );
    }
}
