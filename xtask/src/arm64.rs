//! arm64 (Raspberry Pi and other boards): the agent cross-built for aarch64-unknown-linux-gnu
//! with Debian's gcc-aarch64-linux-gnu, and run under qemu-user (`qemu-aarch64-static`, the
//! runner in `.cargo/config.toml`). The kernel programs are the same object on every
//! architecture (BPF bytecode, little-endian), embedded as on x86_64.

use std::process::Command;

use anyhow::Context as _;

use crate::{progress, run, setup::ARM64, target_dir, workspace_root};

/// A cluster with one backend, for a plan computed on arm64.
const CLUSTER: &str = "apiVersion: v1\nkind: List\nitems:\n\
- {apiVersion: v1, kind: Node, metadata: {name: pi1}, status: {addresses: [{type: InternalIP, address: 192.168.1.21}], conditions: [{type: Ready, status: \"True\"}]}}\n\
- {apiVersion: v1, kind: Node, metadata: {name: pi2}, status: {addresses: [{type: InternalIP, address: 192.168.1.22}], conditions: [{type: Ready, status: \"True\"}]}}\n\
- {apiVersion: v1, kind: Pod, metadata: {name: traefik, namespace: ingress}, spec: {nodeName: pi1, containers: [{name: t, ports: [{containerPort: 8443, hostPort: 443}]}]}, status: {podIP: 10.42.0.5, conditions: [{type: Ready, status: \"True\"}]}}\n";

/// Cross-builds st8s for arm64 (debug, or release); where the binary is.
pub fn build(release: bool) -> anyhow::Result<std::path::PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root()).args([
        "build",
        "-p",
        "st8s-userspace",
        "--bin",
        "st8s",
        "--target",
        ARM64,
    ]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd).context("building st8s for arm64")?;
    let profile = if release { "release" } else { "debug" };
    Ok(target_dir().join(ARM64).join(profile).join("st8s"))
}

/// The core's unit tests for aarch64 under emulation, then the agent binary built for it, checked
/// to be an AArch64 executable that carries its kernel programs, and run: `st8s plan` on a small
/// cluster, whose answer is compared with the same plan on this machine.
pub fn check() -> anyhow::Result<()> {
    progress(&format!(
        "arm64: the planning core's unit tests for {ARM64}, under qemu-user"
    ));
    run(Command::new("cargo").current_dir(workspace_root()).args([
        "test",
        "-p",
        "st8s-common",
        "-p",
        "st8s-userspace",
        "--no-default-features",
        "--lib",
        "--target",
        ARM64,
    ]))
    .context("the core's tests on arm64")?;
    progress(&format!("arm64: the st8s binary for {ARM64}"));
    let bin = build(false)?;
    let elf = std::fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    // e_machine (offset 18, little-endian): 183 is EM_AARCH64.
    anyhow::ensure!(
        elf.get(18..20) == Some(&183u16.to_le_bytes()[..]),
        "{} is not an AArch64 executable",
        bin.display()
    );
    let programs = std::fs::read(crate::setup::ebpf_object()).context("the kernel programs")?;
    anyhow::ensure!(
        !programs.is_empty()
            && elf
                .windows(programs.len().min(64))
                .any(|w| w == &programs[..programs.len().min(64)]),
        "the arm64 binary does not carry the kernel programs"
    );
    let file = std::env::temp_dir().join(format!("st8s-arm64-{}.yaml", std::process::id()));
    std::fs::write(&file, CLUSTER)?;
    let plan = |bin: &std::path::Path, runner: &[&str]| -> anyhow::Result<String> {
        let mut cmd = match runner.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let out = cmd
            .args(["plan", "--node", "pi2", "--output", "json", "--from-file"])
            .arg(&file)
            .output()
            .context("running st8s plan")?;
        anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let on_arm = plan(&bin, &["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu"]);
    let here = plan(&target_dir().join("debug/st8s"), &[]);
    let _ = std::fs::remove_file(&file);
    let (on_arm, here) = (on_arm?, here?);
    anyhow::ensure!(
        on_arm == here && on_arm.contains("192.168.1.21"),
        "st8s plan on arm64 differs from x86_64:\n{on_arm}\n---\n{here}"
    );
    progress("arm64: the binary runs under emulation and plans exactly as on x86_64");
    Ok(())
}
