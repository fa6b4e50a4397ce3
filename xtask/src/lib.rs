//! st8s developer tasks, as a library so that the integration tests share the lab.

pub mod apiserver;
pub mod arm64;
pub mod backend;
pub mod bench;
pub mod deploy;
pub mod knot;
pub mod lab;
pub mod setup;
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

/// A TCP port on loopback that nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}
