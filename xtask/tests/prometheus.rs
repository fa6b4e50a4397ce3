//! The agent's `/metrics` as a real Prometheus scrapes it: Debian's Prometheus server (installed
//! by `cargo xtask setup`) scrapes st8s's endpoint on loopback, parses what prometheus-client
//! wrote (OpenMetrics, which Prometheus asks for first in its Accept header), and the values the
//! agent recorded come back through Prometheus's own query API. No root needed.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use st8s::http::{ErrorKind, Metrics};

/// A directory and a Prometheus process, both gone on drop (also when an assertion fails).
struct Prom {
    dir: PathBuf,
    child: Child,
    addr: SocketAddr,
}

impl Drop for Prom {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prom {
    /// Prometheus scraping `target` every second.
    fn start(target: SocketAddr) -> Self {
        let dir = std::env::temp_dir().join(format!("st8s-prom-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("tmp dir");
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n\
                 scrape_configs:\n  - job_name: st8s\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("config");
        // A free loopback port for its own web API.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian package prometheus; run `cargo xtask setup`)");
        Prom { dir, child, addr }
    }

    /// The API's JSON answer to `path` with `query`, if it answered.
    fn api(&self, path: &str, query: Option<&str>) -> Option<serde_json::Value> {
        let mut curl = Command::new("curl");
        curl.args(["-s", "--max-time", "2", "-G"])
            .arg(format!("http://{}{path}", self.addr));
        if let Some(q) = query {
            curl.arg("--data-urlencode").arg(format!("query={q}"));
        }
        let out = curl.output().ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The value of an instant query's single sample, once Prometheus has one.
    fn value(&self, query: &str) -> Option<String> {
        let v = self.api("/api/v1/query", Some(query))?;
        v["data"]["result"][0]["value"][1].as_str().map(str::to_owned)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

#[test]
fn a_real_prometheus_scrapes_and_parses_the_agent_metrics() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let target = listener.local_addr().expect("addr");
    let metrics = Arc::new(Metrics::default());
    metrics.error(ErrorKind::MapWrite);
    metrics.error(ErrorKind::MapWrite);
    metrics.set_objects("pod", 7);
    metrics.observe_sync(Duration::from_millis(3));
    metrics.set_ready(true, None);
    rt.spawn(st8s::http::serve_on(listener, metrics.clone()));

    let prom = Prom::start(target);
    let want = [
        ("up{job=\"st8s\"}", "1"),
        ("st8s_ready", "1"),
        ("st8s_errors_total{kind=\"map_write\"}", "2"),
        ("st8s_objects{kind=\"pod\"}", "7"),
        ("st8s_sync_latency_seconds_count", "1"),
        ("st8s_sync_latency_seconds_bucket{le=\"0.005\"}", "1"),
        ("st8s_map_capacity{map=\"ST8S_FLOWS\"}", "65536"),
    ];
    let got = xtask::poll_until(Duration::from_secs(60), "Prometheus scraped st8s", || {
        let got: Vec<Option<String>> = want.iter().map(|(q, _)| prom.value(q)).collect();
        got.iter().all(Option::is_some).then_some(got)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", prom.log()));
    for ((query, value), got) in want.iter().zip(got) {
        assert_eq!(got.as_deref(), Some(*value), "{query}");
    }
    // Prometheus reports the scrape itself healthy: no parse error, no timeout.
    let targets = prom.api("/api/v1/targets", None).expect("targets");
    let t = &targets["data"]["activeTargets"][0];
    assert_eq!(t["health"], "up", "{t}");
    assert_eq!(t["lastError"], "", "{t}");

    // Issue 17: every query of the Grafana dashboard is PromQL that Prometheus accepts, with
    // Grafana's variables as a dashboard fills them in (the template query, label_values, is
    // Grafana's own and not PromQL).
    let dashboard = xtask::dashboard_queries(&xtask::dashboard_path()).expect("dashboard");
    for (panel, query) in dashboard.iter().filter(|(p, _)| !p.starts_with("variable")) {
        let q = query.replace("$__rate_interval", "1m").replace("$instance", ".*");
        let answer = prom.api("/api/v1/query", Some(&q)).expect("an answer");
        assert_eq!(answer["status"], "success", "panel {panel:?}: {q}\n{answer}");
    }
}
