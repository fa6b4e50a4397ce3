//! `cargo xtask setup` and `cargo xtask build-ebpf`: everything a fresh machine lacks, installed
//! idempotently; a machine that has it all is checked in about a second.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::{progress, run, workspace_root};

/// The dated nightly the machines can install (../shared/TOOLCHAIN.md); `nightly` is used when
/// it is already there.
const NIGHTLY_DATED: &str = "nightly-2026-05-20";

/// Debian packages the lab, the tests and the build use, with a command each provides.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("bpftool", "bpftool"),
    ("curl", "curl"),
    ("bind9-dnsutils", "dig"),
    ("util-linux", "nsenter"),
    ("iptables", "iptables-save"),
    ("nftables", "nft"),
    ("ethtool", "ethtool"),
    ("iputils-ping", "ping"),
    ("bind9-utils", "named-checkzone"),
    // kdig: sends DNS queries larger than 512 bytes over UDP (dig switches to TCP), for the
    // fragment tests.
    ("knot-dnsutils", "kdig"),
    ("knot", "knotd"),
    // The LAN resolver in front of st8s's zones and the public authority (dns tests).
    ("unbound", "unbound"),
    // A real Prometheus scrapes the agent's /metrics in the tests.
    ("prometheus", "prometheus"),
    // A real mDNS responder and a real SSDP server run in lab pods (discovery as real servers
    // expect it).
    ("avahi-daemon", "avahi-daemon"),
    ("minidlna", "minidlnad"),
    // Reads the pcap `st8s monitor --pcap` writes, as an operator would.
    ("tcpdump", "tcpdump"),
    // The kernel matrix: Debian's kernels booted under QEMU with a busybox initramfs.
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("busybox-static", "busybox"),
    // arm64: the cross linker (and C compiler, for ring) and user-mode emulation for the tests.
    ("gcc-aarch64-linux-gnu", "aarch64-linux-gnu-gcc"),
    ("qemu-user-static", "qemu-aarch64-static"),
    // The kernel matrix's arm64 guest (its tools come from Debian's arm64 packages, which
    // `ensure_arm64_packages` lets apt download).
    ("qemu-system-arm", "qemu-system-aarch64"),
];
/// Needed to build bpf-linker against the LLVM that matches the nightly.
const LLVM_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "libzstd-dev", "zlib1g-dev"];

/// Whether a command is installed. The sbin directories count too: a normal user's PATH often
/// leaves them out, yet bpftool, iptables and ethtool live there.
fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args([
            "-c",
            &format!("PATH=\"$PATH:/usr/sbin:/sbin\" command -v {cmd} >/dev/null 2>&1"),
        ])
        .status()
        .is_ok_and(|s| s.success())
}

fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"));
    home.join("bin").join(name)
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn apt_install(pkgs: &[&str]) -> anyhow::Result<()> {
    apt_install_from(pkgs, None)
}

/// `apt-get install`, from `release` (`-t`) when given.
fn apt_install_from(pkgs: &[&str], release: Option<&str>) -> anyhow::Result<()> {
    if pkgs.is_empty() {
        return Ok(());
    }
    if !have("apt-get") {
        bail!("missing packages {pkgs:?} and no apt-get to install them: install them by hand");
    }
    let from = release.map(|r| format!(" (from {r})")).unwrap_or_default();
    progress(&format!("installing Debian packages{from}: {}", pkgs.join(" ")));
    let sudo = if is_root() { vec![] } else { vec!["sudo"] };
    let mut update = sudo.clone();
    update.extend(["apt-get", "update", "-qq"]);
    run(Command::new(update[0]).args(&update[1..])).context("apt-get update")?;
    let mut install = sudo;
    install.extend([
        "env",
        "DEBIAN_FRONTEND=noninteractive",
        "apt-get",
        "install",
        "-y",
        "-qq",
    ]);
    if let Some(r) = release {
        install.extend(["-t", r]);
    }
    install.extend(pkgs);
    run(Command::new(install[0]).args(&install[1..]))
        .with_context(|| format!("apt-get install{from} {pkgs:?}"))
}

/// The packages that share `qemu-system-common` with the `qemu-utils` a machine may already have.
const QEMU_SYSTEM_PACKAGES: &[&str] = &["qemu-system-x86", "qemu-system-arm"];

/// The release QEMU's system emulators must come from, when not the machine's own: a machine
/// that ships `qemu-utils` from backports (these machines have 10.0.2 from bookworm-backports,
/// ../.library/env/machines/rust.md) cannot take bookworm's 7.2 emulators, whose
/// `qemu-system-common` that `qemu-utils` declares it Breaks; apt then refuses the whole install.
/// The emulators come from the same backports suite, added to apt's sources if it is not there.
fn qemu_release() -> anyhow::Result<Option<String>> {
    let version = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "qemu-utils"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !version.contains("~bpo") {
        return Ok(None);
    }
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let Some(codename) = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_string())
    else {
        bail!(
            "qemu-utils {version} is from backports, but /etc/os-release names no release to take QEMU from"
        );
    };
    let suite = format!("{codename}-backports");
    if !apt_sources_name(&suite) {
        progress(&format!(
            "adding {suite} to apt's sources ({ST8S_BACKPORTS}): the installed qemu-utils {version} comes from it"
        ));
        let entry = format!(
            "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: {suite}\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        );
        write_root_file(ST8S_BACKPORTS, &entry)?;
    }
    Ok(Some(suite))
}

/// The apt source st8s adds for QEMU's backports (removed with the rest by deleting the file).
const ST8S_BACKPORTS: &str = "/etc/apt/sources.list.d/st8s-backports.sources";

/// Whether any of apt's sources names `suite`.
fn apt_sources_name(suite: &str) -> bool {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(
            dir.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources")),
        );
    }
    files.iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|t| {
            t.lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .any(|l| l.split_whitespace().any(|w| w == suite))
        })
    })
}

/// Writes a file only root may write (through sudo when not root).
fn write_root_file(path: &str, contents: &str) -> anyhow::Result<()> {
    if is_root() {
        return std::fs::write(path, contents).with_context(|| format!("writing {path}"));
    }
    let mut child = Command::new("sudo")
        .args(["tee", path])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("sudo tee")?;
    use std::io::Write as _;
    child
        .stdin
        .take()
        .context("sudo tee's stdin")?
        .write_all(contents.as_bytes())
        .with_context(|| format!("writing {path}"))?;
    if !child.wait().context("sudo tee")?.success() {
        bail!("could not write {path} with sudo");
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The nightly toolchain to build the kernel programs with, installed if needed.
pub fn nightly() -> anyhow::Result<String> {
    for tc in ["nightly", NIGHTLY_DATED] {
        let ok = Command::new("rustc")
            .arg(format!("+{tc}"))
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok(tc.to_owned());
        }
    }
    progress(&format!(
        "installing Rust {NIGHTLY_DATED} (for the kernel programs)"
    ));
    run(Command::new("rustup").args([
        "toolchain",
        "install",
        NIGHTLY_DATED,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
        "--no-self-update",
    ]))
    .context("installing the nightly toolchain")?;
    Ok(NIGHTLY_DATED.to_owned())
}

fn ensure_rust_src(tc: &str) -> anyhow::Result<()> {
    let sysroot = Command::new("rustc")
        .arg(format!("+{tc}"))
        .args(["--print", "sysroot"])
        .output()?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    progress(&format!("adding rust-src to {tc}"));
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", tc]))
}

/// The Rust target of arm64 boards (Raspberry Pi and the like), for the stable toolchain.
pub const ARM64: &str = "aarch64-unknown-linux-gnu";

fn ensure_arm64_target() -> anyhow::Result<()> {
    let sysroot = Command::new("rustc").args(["--print", "sysroot"]).output()?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if sysroot.join("lib/rustlib").join(ARM64).is_dir() {
        return Ok(());
    }
    progress(&format!("adding the Rust target {ARM64}"));
    run(Command::new("rustup").args(["target", "add", ARM64]))
}

/// Lets apt download Debian's arm64 packages (the kernel matrix's arm64 guest runs their busybox,
/// ip, curl and dig; nothing arm64 is installed on this machine).
fn ensure_arm64_packages() -> anyhow::Result<()> {
    let foreign = Command::new("dpkg")
        .arg("--print-foreign-architectures")
        .output()
        .context("dpkg")?;
    if String::from_utf8_lossy(&foreign.stdout)
        .split_whitespace()
        .any(|a| a == "arm64")
    {
        return Ok(());
    }
    progress("adding arm64 to dpkg's architectures, for the arm64 guest's packages");
    let sudo: &[&str] = if is_root() { &[] } else { &["sudo"] };
    let cmd = |args: &[&str]| {
        let all: Vec<&str> = sudo.iter().chain(args).copied().collect();
        let mut c = Command::new(all[0]);
        c.args(&all[1..]);
        c
    };
    run(&mut cmd(&["dpkg", "--add-architecture", "arm64"])).context("dpkg --add-architecture arm64")?;
    run(&mut cmd(&["apt-get", "update", "-qq"])).context("apt-get update (with arm64)")
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    if have("bpf-linker") || cargo_bin("bpf-linker").is_file() {
        return Ok(());
    }
    let missing: Vec<&str> = LLVM_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    apt_install(&missing)?;
    progress("building bpf-linker against LLVM 22 (about 3 minutes, once)");
    run(Command::new("cargo")
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            "llvm-22",
            "--locked",
        ]))
    .context("cargo install bpf-linker")
}

/// Installs what the build, the lab and the tests need. Fast when everything is there.
pub fn setup() -> anyhow::Result<()> {
    let tc = nightly()?;
    ensure_rust_src(&tc)?;
    ensure_arm64_target()?;
    ensure_bpf_linker()?;
    let (qemu, missing): (Vec<&str>, Vec<&str>) = PACKAGES
        .iter()
        .filter(|(_, cmd)| !have(cmd))
        .map(|(p, _)| *p)
        .partition(|p| QEMU_SYSTEM_PACKAGES.contains(p));
    apt_install(&missing)?;
    if !qemu.is_empty() {
        apt_install_from(&qemu, qemu_release()?.as_deref())?;
    }
    ensure_arm64_packages()?;
    for (pkg, cmd) in PACKAGES {
        if !have(cmd) {
            bail!("`{cmd}` (Debian package {pkg}) is still missing after installing it");
        }
    }
    ensure_bpffs()?;
    ensure_kubernetes_validate()?;
    progress("setup: toolchain, bpf-linker, packages and the manifest validator present");
    Ok(())
}

/// kubernetes-validate (PyPI), pinned, in a virtualenv of its own under `target/`.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// The manifest validator the deploy tests run.
pub fn kubernetes_validate() -> PathBuf {
    crate::target_dir().join("pyenv/bin/kubernetes-validate")
}

fn ensure_kubernetes_validate() -> anyhow::Result<()> {
    if kubernetes_validate().is_file() {
        return Ok(());
    }
    if !have("python3") {
        apt_install(&["python3"])?;
    }
    let venv = crate::target_dir().join("pyenv");
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success());
    if !made {
        // Debian splits venv out of python3.
        apt_install(&["python3-venv"])?;
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
            .context("creating a Python virtualenv")?;
    }
    progress(&format!(
        "installing {KUBERNETES_VALIDATE} (PyPI) into {}",
        venv.display()
    ));
    run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", KUBERNETES_VALIDATE]))
        .context("pip install kubernetes-validate (needs PyPI)")?;
    if !kubernetes_validate().is_file() {
        bail!(
            "{} is still missing after installing it",
            kubernetes_validate().display()
        );
    }
    Ok(())
}

/// Pinned maps live on bpffs; mount it at /sys/fs/bpf when it is not there yet.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.split_whitespace().nth(2) == Some("bpf")
    }) {
        return Ok(());
    }
    if !is_root() {
        bail!("bpffs is not mounted at /sys/fs/bpf and mounting it needs root: mount -t bpf bpf /sys/fs/bpf");
    }
    progress("mounting bpffs at /sys/fs/bpf");
    std::fs::create_dir_all("/sys/fs/bpf").context("creating /sys/fs/bpf")?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"])).context("mounting bpffs")
}

/// Where `build-ebpf` leaves the object; the agent's build script embeds it from there.
pub fn ebpf_object() -> PathBuf {
    workspace_root().join("st8s-ebpf/target/bpfel-unknown-none/release/st8s")
}

pub fn build_ebpf() -> anyhow::Result<()> {
    let tc = nightly()?;
    ensure_rust_src(&tc)?;
    if !(have("bpf-linker") || cargo_bin("bpf-linker").is_file()) {
        bail!("bpf-linker is missing: run `cargo xtask setup`");
    }
    progress("building the kernel programs (st8s-ebpf)");
    let dir = workspace_root().join("st8s-ebpf");
    let path = std::env::var("PATH").unwrap_or_default();
    let bin = cargo_bin("");
    run(Command::new("cargo")
        .current_dir(&dir)
        .env("PATH", format!("{}:{path}", bin.display()))
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        .arg(format!("+{tc}"))
        .args([
            "build",
            "--release",
            "-Z",
            "build-std=core",
            "--target",
            "bpfel-unknown-none",
        ]))
    .context("building st8s-ebpf")?;
    progress(&format!("kernel programs at {}", ebpf_object().display()));
    Ok(())
}
