//! knotd, the authoritative DNS server from Debian's `knot` package, as the tests run it where
//! CoreDNS stands in the deploy example: serving the zones `st8s dns` writes.

use std::path::{Path, PathBuf};

/// A knotd configuration: listen on `addr@port`, keep its state under `run`, serve `zones`
/// (origin, file), each loaded whole from its file.
pub fn conf(addr: &str, port: u16, run: &Path, zones: &[(String, PathBuf)]) -> String {
    let mut conf = format!(
        "server:\n  listen: {addr}@{port}\n  rundir: {d}\ndatabase:\n  storage: {d}/db\nlog:\n  - target: stderr\n    any: warning\nzone:\n",
        d = run.display()
    );
    for (origin, file) in zones {
        conf += &format!(
            "  - domain: {origin}\n    file: {}\n    zonefile-load: whole\n",
            file.display()
        );
    }
    conf
}

/// The zones of a `st8s dns --zone-dir` directory: every `<origin>.zone` file, sorted.
pub fn zone_dir(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut zones: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let origin = path.file_name()?.to_str()?.strip_suffix(".zone")?.to_owned();
            Some((origin, path))
        })
        .collect();
    zones.sort();
    zones
}

/// knotd serving a `st8s dns --zone-dir` directory the way CoreDNS's `auto` plugin with `reload
/// 1s` does (plugin/auto: it rescans the directory, loads new zones, drops removed ones and
/// reloads changed ones): the configuration is rewritten from the directory and `knotc reload`
/// run every second. Stopped, with its rescan, when dropped.
pub struct DirServer {
    child: std::process::Child,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    rescan: Option<std::thread::JoinHandle<()>>,
}

impl DirServer {
    /// Starts knotd in the network namespace `netns` on `addr@port`, its state under `run`.
    pub fn start(netns: &str, addr: &str, port: u16, run: &Path, zone_dir: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        std::fs::create_dir_all(run).with_context(|| format!("creating {}", run.display()))?;
        let conf_path = run.join("knot.conf");
        let write = {
            let (addr, run, zone_dir, conf_path) = (
                addr.to_owned(),
                run.to_owned(),
                zone_dir.to_owned(),
                conf_path.clone(),
            );
            move || std::fs::write(&conf_path, conf(&addr, port, &run, &self::zone_dir(&zone_dir)))
        };
        write().context("writing knot.conf")?;
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", netns, "knotd", "-c"])
            .arg(&conf_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting knotd (Debian package knot)")?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rescan = {
            let (stop, netns) = (stop.clone(), netns.to_owned());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    let _ = write();
                    let _ = std::process::Command::new("ip")
                        .args(["netns", "exec", &netns, "knotc", "-c"])
                        .arg(&conf_path)
                        .arg("reload")
                        .output();
                }
            })
        };
        Ok(Self {
            child,
            stop,
            rescan: Some(rescan),
        })
    }
}

impl Drop for DirServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.rescan.take() {
            let _ = t.join();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
