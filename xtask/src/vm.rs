//! The kernel matrix: st8s on kernels other than this machine's, each booted under QEMU
//! (software emulation: KVM does not work on these machines) with Debian's own kernel package,
//! on x86_64 and on arm64 (QEMU's `virt` board with a Cortex-A72, the Raspberry Pi 4's core).
//!
//! Per kernel, an initramfs holds busybox, the st8s and xtask binaries, the fixtures test binary,
//! the tools the lab drives (ip, tc, nsenter, ethtool, curl, dig) with their libraries, and the
//! kernel modules the lab needs (veth, bridge, clsact, cls_bpf). On x86_64 the tools are this
//! machine's; on arm64 the binaries are cross-built and the tools come from Debian's arm64
//! packages (downloaded, unpacked under `target/vm/arm64-root`, never installed). Its /init
//! runs, one step after the other, and reports each as `ST8S-STEP <name> <exit status> <seconds>`:
//! - the BPF_PROG_TEST_RUN fixtures through the verifier-loaded programs;
//! - the lab (three nodes, pods, a client; local and forwarded, TCP and UDP) on every attach
//!   path: XDP native with the kernel's own TC path (`auto`: netlink filters before 6.6, TCX
//!   after), XDP off (TC forwards), and on kernels with TCX the netlink path as well;
//! - the lab with node1's address on a VLAN subinterface (eth0.20, its switch port a trunk):
//!   this machine's own kernel has no 802.1Q support, Debian's has it as a module.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{progress, setup::ARM64, target_dir, workspace_root};

/// The machine a kernel runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// The QEMU system emulator and its board: the x86_64 default PC, or arm64's `virt` board
    /// with a Cortex-A72 (the Raspberry Pi 4's core; `max` would also emulate SVE and pointer
    /// authentication, which only slows the emulation down).
    fn qemu(self) -> (&'static str, &'static [&'static str], &'static str) {
        match self {
            Arch::Amd64 => ("qemu-system-x86_64", &[], "qemu-system-x86"),
            Arch::Arm64 => (
                "qemu-system-aarch64",
                &["-M", "virt", "-cpu", "cortex-a72"],
                "qemu-system-arm",
            ),
        }
    }

    /// The serial console: the PC's UART, or the `virt` board's PL011.
    fn console(self) -> &'static str {
        match self {
            Arch::Amd64 => "ttyS0",
            Arch::Arm64 => "ttyAMA0",
        }
    }

    /// An objcopy that reads this architecture's ELF files (Debian's x86_64 binutils does not
    /// recognise aarch64 ones).
    fn objcopy(self) -> &'static str {
        match self {
            Arch::Amd64 => "objcopy",
            Arch::Arm64 => "aarch64-linux-gnu-objcopy",
        }
    }

    /// How long a guest may run all its steps (emulating another instruction set is slower).
    fn limit(self) -> Duration {
        match self {
            Arch::Amd64 => Duration::from_secs(900),
            Arch::Arm64 => Duration::from_secs(1800),
        }
    }
}

/// A kernel of the matrix: a name, the Debian package (a pattern for `apt-cache search
/// --names-only`; the newest match is taken), and its architecture.
pub struct Kernel {
    pub name: &'static str,
    pub package: &'static str,
    pub arch: Arch,
}

pub const KERNELS: [Kernel; 3] = [
    // Debian 12 (bookworm)'s own kernel.
    Kernel {
        name: "debian-6.1",
        package: r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$",
        arch: Arch::Amd64,
    },
    // Debian's 6.12 (bookworm-backports; Debian 13's kernel line).
    Kernel {
        name: "debian-6.12",
        package: r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$",
        arch: Arch::Amd64,
    },
    // Debian 12's kernel for arm64 boards and VMs (Raspberry Pi OS bookworm runs 6.1 and 6.6).
    Kernel {
        name: "debian-6.1-arm64",
        package: r"^linux-image-6\.1\.0-[0-9]+-cloud-arm64-unsigned$",
        arch: Arch::Arm64,
    },
];

/// Modules the lab needs that Debian builds as modules, in load order (dependencies first;
/// [`module_deps`] adds any the files name).
const MODULES: [&str; 5] = ["bridge", "veth", "sch_ingress", "cls_bpf", "8021q"];

/// Host tools the lab runs inside the VM (busybox provides the rest: sh, sysctl, mount, ...).
const TOOLS: [&str; 6] = [
    "/usr/sbin/ip",
    "/usr/sbin/tc",
    "/usr/bin/nsenter",
    "/usr/sbin/ethtool",
    "/usr/bin/curl",
    "/usr/bin/dig",
];

/// One step's outcome inside a VM.
#[derive(Debug)]
pub struct Step {
    pub name: String,
    pub status: i32,
    pub seconds: u64,
    /// How the lab's agents attached (`xdp native, tc netlink`), as the lab printed it.
    pub attach: String,
}

/// What one kernel did.
pub struct Outcome {
    pub kernel: &'static str,
    pub release: String,
    pub steps: Vec<Step>,
    pub seconds: f64,
    pub log: PathBuf,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        !self.steps.is_empty() && self.steps.iter().all(|s| s.status == 0)
    }
}

/// The binaries a guest runs, built for its architecture.
struct Binaries {
    st8s: PathBuf,
    xtask: PathBuf,
    fixtures: PathBuf,
}

impl Binaries {
    /// This machine's debug builds (`cargo xtask build` made st8s and xtask), or arm64's,
    /// cross-built here.
    fn for_arch(arch: Arch) -> anyhow::Result<Self> {
        let dir = match arch {
            Arch::Amd64 => target_dir().join("debug"),
            Arch::Arm64 => {
                progress("arm64: cross-building st8s, xtask and the fixtures for the arm64 guest");
                crate::run(Command::new("cargo").current_dir(workspace_root()).args([
                    "build",
                    "-p",
                    "st8s-userspace",
                    "--bin",
                    "st8s",
                    "-p",
                    "xtask",
                    "--bin",
                    "xtask",
                    "--target",
                    ARM64,
                ]))
                .context("cross-building st8s and xtask for arm64")?;
                target_dir().join(ARM64).join("debug")
            }
        };
        let target = (arch == Arch::Arm64).then_some(ARM64);
        Ok(Self {
            st8s: dir.join("st8s"),
            xtask: dir.join("xtask"),
            fixtures: fixtures_binary(target)?,
        })
    }
}

impl Binaries {
    /// Where each goes in the initramfs.
    fn files(&self) -> Vec<(String, PathBuf)> {
        vec![
            ("t/debug/st8s".into(), self.st8s.clone()),
            ("t/debug/xtask".into(), self.xtask.clone()),
            ("t/fixtures".into(), self.fixtures.clone()),
        ]
    }
}

/// The kernel the per-packet instructions are counted on: Debian 13's, the newest of the matrix.
const COUNTING_KERNEL: &str = "debian-6.12";

/// Issue 18: the per-packet cases of `cargo xtask bench` counted in instructions. The guest
/// boots under QEMU with `-icount shift=0`: its virtual clock advances one nanosecond per
/// instruction executed (one vCPU, deterministic), so the time BPF_PROG_TEST_RUN reports per
/// packet is a count of instructions, which does not drift with the host machine as time does.
/// The guest runs this xtask binary (`per-packet-count`) on the kernel object `object`; returns
/// the kernel release and, per case, the instructions of both sides.
pub fn count_instructions(object: &Path, cases: usize) -> anyhow::Result<(String, Vec<(u64, u64)>)> {
    let k = KERNELS
        .iter()
        .find(|k| k.name == COUNTING_KERNEL)
        .context("the counting kernel is not in the matrix")?;
    let tree = fetch(k)?;
    let (vmlinuz, _modules, release) = kernel_files(&tree)?;
    let work = target_dir().join("vm/run/count");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let initrd = work.join("initrd.cpio");
    let me = std::env::current_exe().context("this xtask binary")?;
    let init = format!(
        "{INIT_PRELUDE}cd /t\n/t/debug/xtask per-packet-count --object /t/st8s.o\n\
         echo \"ST8S-STEP count $?\"\npoweroff -f\n"
    );
    build_initrd(
        &initrd,
        Arch::Amd64,
        &tree,
        &[],
        vec![("t/debug/xtask".into(), me)],
        &[("t/st8s.o".into(), object.to_path_buf())],
        &init,
    )?;
    let log = work.join("console.log");
    // One vCPU: -icount runs the guest on one thread anyway. Loading the programs and the runs
    // take a minute or two under emulation.
    run_guest(
        Arch::Amd64,
        &vmlinuz,
        &initrd,
        &log,
        &["-icount", "shift=0", "-m", "1024", "-smp", "1"],
        Duration::from_secs(600),
    )?;
    let _ = fs::remove_file(&initrd);
    let console = fs::read_to_string(&log).unwrap_or_default();
    let counts = parse_counts(&console, cases);
    counts.map(|c| (release, c)).with_context(|| {
        format!(
            "the guest counted no instructions; its console: {}",
            log.display()
        )
    })
}

/// The `ST8S-INSNS index a b` lines, one for each of `cases` cases in order; None unless every
/// case is there and the guest's step passed.
fn parse_counts(console: &str, cases: usize) -> Option<Vec<(u64, u64)>> {
    let mut counts = vec![None; cases];
    let mut passed = false;
    for l in console.lines().map(str::trim) {
        if l.ends_with("ST8S-STEP count 0") {
            passed = true;
        }
        // The first line may follow the firmware's terminal escapes on the same line.
        let Some(rest) = l.find("ST8S-INSNS ").map(|at| &l[at + "ST8S-INSNS ".len()..]) else {
            continue;
        };
        let v: Vec<u64> = rest.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        if let [i, a, b] = v[..]
            && let Some(slot) = counts.get_mut(i as usize)
        {
            *slot = Some((a, b));
        }
    }
    if !passed {
        return None;
    }
    counts.into_iter().collect()
}

/// The BPF_PROG_TEST_RUN fixtures as a test binary (for another target when one is named).
pub fn fixtures_binary(target: Option<&str>) -> anyhow::Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root()).args([
        "test",
        "-p",
        "st8s-userspace",
        "--features",
        "privileged",
        "--test",
        "fixtures",
        "--no-run",
        "--message-format=json",
    ]);
    if let Some(t) = target {
        cmd.args(["--target", t]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("building the fixtures test binary")?;
    anyhow::ensure!(out.status.success(), "building the fixtures test binary failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"]["name"] == "fixtures")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .context("cargo named no fixtures executable")
}

/// Boots each selected kernel in turn and runs the steps. Fails when any step fails, after
/// reporting every kernel.
pub fn run(which: &str) -> anyhow::Result<Vec<Outcome>> {
    let kernels: Vec<&Kernel> = KERNELS
        .iter()
        .filter(|k| which == "all" || k.name == which)
        .collect();
    if kernels.is_empty() {
        let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
        bail!("no kernel {which:?}: {} or all", names.join(", "));
    }
    let mut outcomes = Vec::new();
    let mut built: Vec<(Arch, Binaries)> = Vec::new();
    for k in kernels {
        progress(&format!("kernel {}: fetching Debian's package", k.name));
        let tree = fetch(k)?;
        if !built.iter().any(|(a, _)| *a == k.arch) {
            built.push((k.arch, Binaries::for_arch(k.arch)?));
        }
        let bins = built
            .iter()
            .find_map(|(a, b)| (*a == k.arch).then_some(b))
            .context("binaries for the kernel's architecture")?;
        let outcome = boot(k, &tree, bins)?;
        let verdict = if outcome.passed() { "passed" } else { "FAILED" };
        progress(&format!(
            "kernel {} ({}): {verdict} in {:.0} s",
            k.name, outcome.release, outcome.seconds
        ));
        outcomes.push(outcome);
    }
    println!("{}", report(&outcomes));
    if let Some(bad) = outcomes.iter().find(|o| !o.passed()) {
        bail!(
            "kernel {} failed; its console log: {}",
            bad.kernel,
            bad.log.display()
        );
    }
    Ok(outcomes)
}

/// The per-kernel table.
pub fn report(outcomes: &[Outcome]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<17} {:<28} {:<26} {:<22} {:>7} {:>5}",
        "KERNEL", "RELEASE", "STEP", "ATTACHED", "RESULT", "SECS"
    );
    for out in outcomes {
        if out.steps.is_empty() {
            let _ = writeln!(
                o,
                "{:<17} {:<28} {:<26} {:<22} {:>7}",
                out.kernel, out.release, "(no step ran)", "-", "FAILED"
            );
        }
        for s in &out.steps {
            let result = if s.status == 0 { "ok" } else { "FAILED" };
            let attach = if s.attach.is_empty() {
                "-"
            } else {
                s.attach.as_str()
            };
            let _ = writeln!(
                o,
                "{:<17} {:<28} {:<26} {:<22} {:>7} {:>5}",
                out.kernel, out.release, s.name, attach, result, s.seconds
            );
        }
    }
    o
}

/// The newest package matching the kernel's pattern, downloaded and unpacked once under
/// `target/vm/` (later runs reuse it).
fn fetch(k: &Kernel) -> anyhow::Result<PathBuf> {
    let out = Command::new("apt-cache")
        .args(["search", "--names-only", k.package])
        .output()
        .context("apt-cache (Debian's apt)")?;
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    names.sort_by_key(|n| version_key(n));
    let Some(pkg) = names.pop() else {
        bail!(
            "no Debian package matches {} (for kernel {}): run `apt-get update`, or check the apt sources",
            k.package,
            k.name
        );
    };
    let dir = target_dir().join("vm").join(&pkg);
    if dir.join("boot").is_dir() {
        return Ok(dir);
    }
    let debs = target_dir().join("vm/debs");
    fs::create_dir_all(&debs)?;
    crate::run(
        // As root into target/: apt's `_apt` sandbox user may not write there (it only warns).
        Command::new("apt-get")
            .current_dir(&debs)
            .args(["-o", "APT::Sandbox::User=root", "download", &pkg]),
    )
    .with_context(|| format!("apt-get download {pkg}"))?;
    let deb = fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_")))
        })
        .with_context(|| format!("{pkg}: downloaded, but no .deb in {}", debs.display()))?;
    let tmp = dir.with_extension("partial");
    let _ = fs::remove_dir_all(&tmp);
    crate::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp)).context("dpkg-deb -x")?;
    fs::rename(&tmp, &dir)?;
    Ok(dir)
}

/// Sorts package names by the numbers in them (6.1.0-9 before 6.1.0-10).
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// A kernel file in an unpacked package: the kernel image and its modules' directory.
fn kernel_files(tree: &Path) -> anyhow::Result<(PathBuf, PathBuf, String)> {
    let vmlinuz = fs::read_dir(tree.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no vmlinuz in the package")?;
    let release = vmlinuz
        .file_name()
        .map(|n| n.to_string_lossy().trim_start_matches("vmlinuz-").to_owned())
        .unwrap_or_default();
    let modules = tree.join("lib/modules").join(&release);
    Ok((vmlinuz, modules, release))
}

fn boot(k: &Kernel, tree: &Path, bins: &Binaries) -> anyhow::Result<Outcome> {
    let (vmlinuz, modules, release) = kernel_files(tree)?;
    let work = target_dir().join("vm/run").join(k.name);
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let tcx = release_at_least(&release, 6, 6);
    let initrd = work.join("initrd.cpio");
    let mods = module_order(&modules)?;
    build_initrd(
        &initrd,
        k.arch,
        &modules,
        &mods,
        bins.files(),
        &[],
        &init_script(&mods, tcx, k.arch == Arch::Amd64),
    )?;
    let log = work.join("console.log");
    progress(&format!(
        "kernel {}: booting {release} under QEMU (software emulation)",
        k.name
    ));
    let started = Instant::now();
    run_guest(
        k.arch,
        &vmlinuz,
        &initrd,
        &log,
        &["-m", "2048", "-smp", "2"],
        k.arch.limit(),
    )?;
    let console = fs::read_to_string(&log).unwrap_or_default();
    let mut steps = parse_steps(&console);
    add_missing(&mut steps, &scheduled_steps(tcx, k.arch == Arch::Amd64));
    // A lab step passes only on the attach path it is there for.
    for s in &mut steps {
        if let Some(want) = expected_attach(&s.name, tcx)
            && s.status == 0
            && s.attach != want
        {
            s.status = 98;
            s.attach = format!("{} (wanted {want})", s.attach);
        }
    }
    let _ = fs::remove_file(&initrd);
    Ok(Outcome {
        kernel: k.name,
        release,
        steps,
        seconds: started.elapsed().as_secs_f64(),
        log,
    })
}

/// Boots `vmlinuz` with `initrd` under QEMU (software emulation, `extra` for memory, CPUs and
/// the like), its console into `log`, and waits until it powers off; a guest still running after
/// `limit` (hung) is killed.
fn run_guest(
    arch: Arch,
    vmlinuz: &Path,
    initrd: &Path,
    log: &Path,
    extra: &[&str],
    limit: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let (qemu, board, package) = arch.qemu();
    let mut child = Command::new(qemu)
        .args(board)
        .args(["-accel", "tcg"])
        .args(extra)
        .args(["-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console={} panic=-1 quiet", arch.console()))
        .stdin(Stdio::null())
        .stdout(fs::File::create(log)?)
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {qemu} (Debian package {package})"))?;
    while child.try_wait()?.is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// The attach paths a lab step must have run on (`None`: not a lab step).
fn expected_attach(step: &str, tcx: bool) -> Option<String> {
    let kernel_tc = if tcx { "tcx" } else { "netlink" };
    Some(match step {
        "lab-xdp-auto" => format!("xdp native tc {kernel_tc}"),
        "lab-xdp-off-tc-forwards" => format!("xdp off tc {kernel_tc}"),
        "lab-tc-netlink" => "xdp native tc netlink".to_owned(),
        // node1 on a VLAN subinterface: Linux's VLAN driver has no native XDP.
        "lab-vlan-uplink" => format!("xdp off tc {kernel_tc}"),
        _ => return None,
    })
}

/// The `ST8S-STEP name status seconds` markers, each with the attach line the lab printed
/// before it (`node1 attach  xdp native  tc netlink`).
fn parse_steps(console: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut attach = String::new();
    for l in console.lines().map(str::trim) {
        if let Some(rest) = l.strip_prefix("node1 attach") {
            attach = rest.split_whitespace().collect::<Vec<_>>().join(" ");
        }
        let Some(marker) = l.strip_prefix("ST8S-STEP ") else {
            continue;
        };
        let mut w = marker.split_whitespace();
        let (Some(name), Some(status), Some(seconds)) = (w.next(), w.next(), w.next()) else {
            continue;
        };
        steps.push(Step {
            name: name.to_owned(),
            status: status.parse().unwrap_or(-1),
            seconds: seconds.parse().unwrap_or(0),
            attach: std::mem::take(&mut attach),
        });
    }
    steps
}

fn release_at_least(release: &str, major: u64, minor: u64) -> bool {
    let v = version_key(release);
    (v.first().copied().unwrap_or(0), v.get(1).copied().unwrap_or(0)) >= (major, minor)
}

/// The steps /init runs: each prints its marker line. `vlan`: the VLAN uplink step too (run on
/// the x86_64 kernels, one per TC attach path; on arm64 it would test nothing of its own).
/// What every guest's /init does first: busybox's applets, the kernel's file systems, loopback.
const INIT_PRELUDE: &str = "#!/bin/busybox sh\n/bin/busybox --install -s\nexport PATH=/usr/sbin:/usr/bin:/sbin:/bin\n\
     mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n\
     mount -t tmpfs tmpfs /run\nmount -t tmpfs tmpfs /tmp\nmount -t bpf bpf /sys/fs/bpf\n\
     mount -t cgroup2 cgroup2 /sys/fs/cgroup\nip link set lo up\n";

fn init_script(mods: &[String], tcx: bool, vlan: bool) -> String {
    let mut s = String::from(INIT_PRELUDE);
    for m in mods {
        let _ = writeln!(s, "insmod /m/{m}.ko || echo \"insmod {m} failed\"");
    }
    s += "echo \"ST8S-KERNEL $(uname -r) $(uname -m)\"\ncd /t\nexport CARGO_TARGET_DIR=/t\n\
          step() { name=$1; shift; t0=$(date +%s); \"$@\"; rc=$?; echo \"ST8S-STEP $name $rc $(( $(date +%s) - t0 ))\"; }\n";
    for (name, command) in scheduled_steps(tcx, vlan) {
        let _ = writeln!(s, "step {name} {command}");
    }
    s += "poweroff -f\n";
    s
}

/// The steps a guest runs, in order: name and command.
fn scheduled_steps(tcx: bool, vlan: bool) -> Vec<(&'static str, &'static str)> {
    // The bounded fuzz (58,000 program runs, most of the fixtures' time under emulation) runs
    // on this machine's kernel in the suite; its invariants are the programs' logic, which the
    // deterministic fixtures pin down here on each kernel's verifier, JIT and helpers.
    let mut steps = vec![
        (
            "fixtures",
            "/t/fixtures --test-threads 1 --skip fuzzed_packets_keep_the_invariants",
        ),
        (
            "lab-xdp-auto",
            "/t/debug/xtask lab --no-setup --wait 180 --dual-stack",
        ),
    ];
    if vlan {
        // node1 on a VLAN subinterface steers in TC (the VLAN driver has no native XDP), its
        // forwarded flows included: that covers the XDP-off step's path on this kernel, at the
        // cost of one lab (each lab's agents verify every program, minutes under emulation).
        steps.push((
            "lab-vlan-uplink",
            "/t/debug/xtask lab --no-setup --wait 180 --vlan-node 1",
        ));
    } else {
        steps.push((
            "lab-xdp-off-tc-forwards",
            "/t/debug/xtask lab --no-setup --wait 180 --xdp off",
        ));
    }
    if tcx {
        steps.push((
            "lab-tc-netlink",
            "/t/debug/xtask lab --no-setup --wait 180 --agent-arg=--tc-attach=netlink",
        ));
    }
    steps
}

/// Every scheduled step that reported nothing (the guest hung and was killed, or crashed) is a
/// failed one: a kernel passes only when all of them ran and passed.
fn add_missing(steps: &mut Vec<Step>, scheduled: &[(&str, &str)]) {
    for (name, _) in scheduled {
        if !steps.iter().any(|s| s.name == *name) {
            steps.push(Step {
                name: (*name).to_owned(),
                status: 99,
                seconds: 0,
                attach: "did not run".to_owned(),
            });
        }
    }
}

/// The lab's modules and their dependencies, dependencies first (from each file's
/// `depends=` modinfo field; modules built into the kernel have no file and are skipped).
fn module_order(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for m in MODULES {
        add_module(dir, m, &mut order, &mut seen)?;
    }
    Ok(order)
}

fn add_module(
    dir: &Path,
    name: &str,
    order: &mut Vec<String>,
    seen: &mut BTreeSet<String>,
) -> anyhow::Result<()> {
    if !seen.insert(name.to_owned()) {
        return Ok(());
    }
    let Some(bytes) = module_bytes(dir, name)? else {
        return Ok(());
    };
    for dep in module_deps(&bytes) {
        add_module(dir, &dep, order, seen)?;
    }
    order.push(name.to_owned());
    Ok(())
}

/// A module's file, uncompressed (Debian compresses them with xz from 6.x on), if it exists.
fn module_bytes(dir: &Path, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let mut stack = vec![dir.join("kernel")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let file = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let stem = file.split(".ko").next().unwrap_or_default().replace('-', "_");
            if stem != name.replace('-', "_") || !file.contains(".ko") {
                continue;
            }
            return Ok(Some(match file.rsplit('.').next() {
                Some("ko") => fs::read(&p)?,
                Some("xz") => {
                    Command::new("xz")
                        .arg("-dc")
                        .arg(&p)
                        .output()
                        .context("xz -dc")?
                        .stdout
                }
                Some("zst") => {
                    Command::new("zstd")
                        .arg("-dc")
                        .arg(&p)
                        .output()
                        .context("zstd -dc")?
                        .stdout
                }
                _ => continue,
            }));
        }
    }
    Ok(None)
}

/// The `depends=` field of a module's modinfo.
fn module_deps(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Writes the initramfs (an uncompressed newc cpio archive, which the kernel unpacks itself).
fn build_initrd(
    path: &Path,
    arch: Arch,
    modules: &Path,
    mods: &[String],
    binaries: Vec<(String, PathBuf)>,
    data: &[(String, PathBuf)],
    init: &str,
) -> anyhow::Result<()> {
    let mut files: Vec<(String, Vec<u8>, u32)> = Vec::new();
    let root = match arch {
        Arch::Amd64 => PathBuf::from("/"),
        Arch::Arm64 => arm64_root()?,
    };
    let busybox = ["bin/busybox", "usr/bin/busybox"]
        .into_iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
        .context("busybox is missing (Debian package busybox-static)")?;
    files.push(("bin/busybox".into(), fs::read(busybox)?, 0o755));
    files.push(("init".into(), init.as_bytes().to_vec(), 0o755));
    let mut binaries = binaries;
    for (at, src) in data {
        let bytes = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        files.push((at.clone(), bytes, 0o644));
    }
    for t in TOOLS {
        binaries.push((t.trim_start_matches('/').into(), tool_in(&root, t)?));
    }
    for (at, src) in &binaries {
        files.push((at.clone(), stripped(arch, src)?, 0o755));
    }
    let srcs: Vec<PathBuf> = binaries.into_iter().map(|(_, src)| src).collect();
    let libs = match arch {
        Arch::Amd64 => host_libraries(&srcs)?,
        Arch::Arm64 => arm64_libraries(&root, &srcs)?,
    };
    for (at, src) in libs {
        let bytes = fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
        files.push((at, bytes, 0o755));
    }
    for m in mods {
        if let Some(bytes) = module_bytes(modules, m)? {
            files.push((format!("m/{m}.ko"), bytes, 0o644));
        }
    }
    let dirs = [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "m", "t", "t/debug",
        "etc", "var",
    ];
    let mut out = std::io::BufWriter::new(fs::File::create(path)?);
    let mut ino = 1u32;
    let mut made: BTreeSet<String> = BTreeSet::new();
    for d in dirs {
        cpio_entry(&mut out, ino, d, 0o040755, &[])?;
        made.insert(d.to_owned());
        ino += 1;
    }
    cpio_entry(&mut out, ino, "var/run", 0o120777, b"/run")?;
    ino += 1;
    for (name, bytes, mode) in &files {
        // Parent directories first (library paths such as lib/x86_64-linux-gnu).
        let mut parent = String::new();
        for part in name
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map(|(_, p)| p.to_vec())
            .unwrap_or_default()
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if made.insert(parent.clone()) {
                cpio_entry(&mut out, ino, &parent, 0o040755, &[])?;
                ino += 1;
            }
        }
        cpio_entry(&mut out, ino, name, 0o100000 | mode, bytes)?;
        ino += 1;
    }
    cpio_entry(&mut out, 0, "TRAILER!!!", 0, &[])?;
    out.flush()?;
    Ok(())
}

/// One newc entry: header, name (NUL-terminated, padded to 4), data (padded to 4).
fn cpio_entry(
    out: &mut impl std::io::Write,
    ino: u32,
    name: &str,
    mode: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        0,
        0,
        0,
        data.len(),
        0,
        0,
        0,
        0,
        name.len() + 1,
        0
    );
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    let pad = |n: usize| (4 - n % 4) % 4;
    out.write_all(&vec![0; pad(110 + name.len() + 1)])?;
    out.write_all(data)?;
    out.write_all(&vec![0; pad(data.len())])?;
    Ok(())
}

/// A binary without its debug sections (the debug builds are mostly DWARF).
fn stripped(arch: Arch, src: &Path) -> anyhow::Result<Vec<u8>> {
    let tmp = std::env::temp_dir().join(format!(
        "st8s-vm-{}-{}",
        std::process::id(),
        src.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    crate::run(
        Command::new(arch.objcopy())
            .arg("--strip-debug")
            .arg(src)
            .arg(&tmp),
    )
    .with_context(|| format!("{} --strip-debug {}", arch.objcopy(), src.display()))?;
    let bytes = fs::read(&tmp)?;
    let _ = fs::remove_file(&tmp);
    Ok(bytes)
}

/// Where a tool the lab runs lives in a root: its own path, or, in packages unpacked without
/// Debian's merged /usr, the same name in another bin directory (`ip` is packaged as /bin/ip).
fn tool_in(root: &Path, tool: &str) -> anyhow::Result<PathBuf> {
    let name = Path::new(tool).file_name().unwrap_or_default();
    std::iter::once(root.join(tool.trim_start_matches('/')))
        .chain(["bin", "sbin", "usr/bin", "usr/sbin"].map(|d| root.join(d).join(name)))
        .find(|p| p.is_file())
        .with_context(|| format!("{tool} is missing under {}", root.display()))
}

/// The shared libraries the binaries load, with the loader, as `ldd` resolves them here; each
/// at its own path in the guest.
fn host_libraries(bins: &[PathBuf]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut libs = BTreeSet::new();
    for bin in bins {
        let out = Command::new("ldd").arg(bin).output().context("ldd")?;
        libs.extend(
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter(|w| w.starts_with('/'))
                .map(str::to_owned),
        );
    }
    Ok(libs
        .into_iter()
        .map(|l| (l.trim_start_matches('/').to_owned(), PathBuf::from(l)))
        .collect())
}

/// The packages whose programs an arm64 guest runs (busybox and the lab's tools); their
/// dependencies come along.
const ARM64_PACKAGES: [&str; 6] = [
    "busybox-static",
    "iproute2",
    "util-linux",
    "ethtool",
    "curl",
    "bind9-dnsutils",
];

/// Debian's arm64 packages for busybox and the lab's tools, with everything they depend on,
/// downloaded and unpacked once under `target/vm/arm64-root` (a directory tree, not a system:
/// nothing is installed or run from it here).
fn arm64_root() -> anyhow::Result<PathBuf> {
    let root = target_dir().join("vm/arm64-root");
    if root.join(".complete").is_file() {
        return Ok(root);
    }
    progress("arm64: downloading Debian's arm64 busybox, iproute2, curl, dig and their libraries");
    let out = Command::new("apt-cache")
        .args([
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
        ])
        .args(ARM64_PACKAGES.map(|p| format!("{p}:arm64")))
        .output()
        .context("apt-cache (Debian's apt)")?;
    let pkgs = arm64_closure(&String::from_utf8_lossy(&out.stdout));
    if !out.status.success() || pkgs.is_empty() {
        bail!(
            "apt knows no arm64 packages: `dpkg --add-architecture arm64 && apt-get update` (cargo xtask setup does both)"
        );
    }
    let debs = target_dir().join("vm/debs-arm64");
    fs::create_dir_all(&debs)?;
    crate::run(
        Command::new("apt-get")
            .current_dir(&debs)
            .args(["-o", "APT::Sandbox::User=root", "-qq", "download"])
            .args(&pkgs),
    )
    .context("apt-get download (arm64 packages)")?;
    let tmp = root.with_extension("partial");
    let _ = fs::remove_dir_all(&tmp);
    for deb in fs::read_dir(&debs)?.flatten().map(|e| e.path()) {
        if deb.extension().is_some_and(|e| e == "deb") {
            crate::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))
                .with_context(|| format!("dpkg-deb -x {}", deb.display()))?;
        }
    }
    fs::write(tmp.join(".complete"), pkgs.join("\n"))?;
    let _ = fs::remove_dir_all(&root);
    fs::rename(&tmp, &root)?;
    Ok(root)
}

/// The arm64 packages in `apt-cache depends --recurse` output: its unindented lines, less
/// virtual packages (`<debconf-2.0>`) and the architecture-independent ones (no `:arm64`,
/// which hold no libraries).
fn arm64_closure(depends: &str) -> Vec<String> {
    let set: BTreeSet<&str> = depends
        .lines()
        .filter(|l| !l.starts_with([' ', '<']))
        .map(str::trim)
        .filter(|l| l.ends_with(":arm64"))
        .collect();
    set.into_iter().map(str::to_owned).collect()
}

/// The libraries arm64 binaries load, found as the guest's loader would find them (its
/// multiarch directories) in the unpacked packages, followed through each library's own
/// `DT_NEEDED` entries; with the loader at the path the binaries name (`PT_INTERP`).
fn arm64_libraries(root: &Path, bins: &[PathBuf]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    const DIRS: [&str; 2] = ["lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu"];
    let mut found: std::collections::BTreeMap<String, PathBuf> = Default::default();
    let mut queue: Vec<PathBuf> = bins.to_vec();
    while let Some(file) = queue.pop() {
        for name in needed(&file)? {
            if found.contains_key(&name) {
                continue;
            }
            let lib = DIRS
                .iter()
                .map(|d| root.join(d).join(&name))
                .find(|p| p.is_file())
                .with_context(|| {
                    format!(
                        "{name}, which {} loads, is in none of the arm64 packages",
                        file.display()
                    )
                })?;
            queue.push(lib.clone());
            found.insert(name, lib);
        }
    }
    let loader = root.join("lib/aarch64-linux-gnu/ld-linux-aarch64.so.1");
    anyhow::ensure!(loader.is_file(), "no arm64 loader in {}", root.display());
    let mut libs: Vec<(String, PathBuf)> = found
        .into_iter()
        .map(|(name, p)| (format!("lib/aarch64-linux-gnu/{name}"), p))
        .collect();
    libs.push(("lib/ld-linux-aarch64.so.1".into(), loader));
    Ok(libs)
}

/// An ELF file's `DT_NEEDED` entries, as binutils' readelf prints them.
fn needed(file: &Path) -> anyhow::Result<Vec<String>> {
    let out = Command::new("aarch64-linux-gnu-readelf")
        .arg("-d")
        .arg(file)
        .output()
        .context("aarch64-linux-gnu-readelf (Debian package binutils-aarch64-linux-gnu)")?;
    anyhow::ensure!(
        out.status.success(),
        "readelf -d {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(parse_needed(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_needed(readelf: &str) -> Vec<String> {
    readelf
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| {
            let start = l.find('[')? + 1;
            let end = l[start..].find(']')? + start;
            Some(l[start..end].to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically_and_modinfo_names_dependencies() {
        let mut names = [
            "linux-image-6.1.0-10-cloud-amd64-unsigned".to_owned(),
            "linux-image-6.1.0-9-cloud-amd64-unsigned".to_owned(),
        ];
        names.sort_by_key(|n| version_key(n));
        assert!(names[1].contains("-10-"));
        assert!(release_at_least("6.12.117+deb12-cloud-amd64", 6, 6));
        assert!(!release_at_least("6.1.0-56-cloud-amd64", 6, 6));
        let ko = b"\x7fELF...license=GPL\0depends=stp,llc\0intree=Y\0";
        assert_eq!(module_deps(ko), ["stp", "llc"]);
        assert!(module_deps(b"depends=\0").is_empty());
    }

    #[test]
    fn a_step_the_guest_never_reported_fails_the_kernel() {
        let console = "ST8S-KERNEL 6.12.0\nST8S-STEP fixtures 0 53\nnode1 attach  xdp native  tc tcx\nST8S-STEP lab-xdp-auto 0 38\n";
        let mut steps = parse_steps(console);
        let scheduled = scheduled_steps(true, true);
        assert_eq!(
            scheduled.len(),
            4,
            "fixtures, dual-stack lab, VLAN lab, netlink lab"
        );
        add_missing(&mut steps, &scheduled);
        let names: Vec<(&str, i32)> = steps.iter().map(|s| (s.name.as_str(), s.status)).collect();
        assert_eq!(
            names,
            [
                ("fixtures", 0),
                ("lab-xdp-auto", 0),
                ("lab-vlan-uplink", 99),
                ("lab-tc-netlink", 99)
            ]
        );
        // Without a VLAN step (arm64), the XDP-off lab runs instead.
        assert!(
            scheduled_steps(false, false)
                .iter()
                .any(|(n, _)| *n == "lab-xdp-off-tc-forwards")
        );
    }

    #[test]
    fn steps_carry_the_attach_paths_the_lab_printed() {
        let console = "ST8S-KERNEL 6.1.0\nST8S-STEP fixtures 0 53\nnode1 attach  xdp native  tc netlink\r\nnode2 attach  xdp native  tc netlink\nST8S-STEP lab-xdp-auto 0 38\nST8S-STEP lab-x 1 2\n";
        let steps = parse_steps(console);
        assert_eq!(steps.len(), 3);
        assert_eq!((steps[0].attach.as_str(), steps[0].status), ("", 0));
        assert_eq!(steps[1].attach, "xdp native tc netlink");
        assert_eq!((steps[2].attach.as_str(), steps[2].status), ("", 1));
    }

    #[test]
    fn arm64_packages_and_libraries_are_read_from_apt_and_readelf() {
        let depends = "curl:arm64\n  Depends: libcurl4:arm64\n  PreDepends: <debconf-2.0>\nlibcurl4:arm64\n<debconf-2.0>\ndebconf\ncurl:arm64\n";
        assert_eq!(arm64_closure(depends), ["curl:arm64", "libcurl4:arm64"]);
        let readelf = "Dynamic section at offset 0x5f2c8 contains 30 entries:\n  Tag        Type                         Name/Value\n 0x0000000000000001 (NEEDED)             Shared library: [libcurl.so.4]\n 0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]\n 0x000000000000000c (INIT)               0x2f50\n";
        assert_eq!(parse_needed(readelf), ["libcurl.so.4", "libc.so.6"]);
    }

    #[test]
    fn instruction_counts_are_read_whole_or_not_at_all() {
        let console =
            "Booting from ROM..\x1b[2JST8S-INSNS 0 721 278\r\nST8S-INSNS 1 472 278\nST8S-STEP count 0\n";
        assert_eq!(parse_counts(console, 2), Some(vec![(721, 278), (472, 278)]));
        // A case missing, or a guest whose step failed: nothing.
        assert_eq!(parse_counts(console, 3), None);
        assert_eq!(parse_counts(&console.replace("count 0", "count 1"), 2), None);
    }

    #[test]
    fn cpio_entries_are_newc_and_four_byte_aligned() {
        let mut out = Vec::new();
        cpio_entry(&mut out, 1, "init", 0o100755, b"#!/bin/sh\n").expect("write");
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        assert_eq!(&out[110..115], b"init\0");
    }
}
