//! `cargo xtask <task>`: see `cargo xtask --help`.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use xtask::{progress, run, setup, workspace_root};

mod lab_cmd;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "st8s developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks: nightly + rust-src, LLVM 22 and bpf-linker, and the
    /// Debian packages the lab and the tests use. Idempotent; fast when all is there.
    Setup,
    /// Build the kernel programs (st8s-ebpf) with nightly and bpf-linker.
    BuildEbpf,
    /// Build the kernel programs and the `st8s` binary (debug, or --release).
    Build {
        #[arg(long)]
        release: bool,
        /// Also build st8s for arm64, and lay both out for deploy/Containerfile:
        /// target/image/amd64/st8s and target/image/arm64/st8s.
        #[arg(long)]
        image: bool,
    },
    /// Clippy in two passes (host crates, then the kernel programs) and rustfmt, all as errors.
    Lint,
    /// Format everything with nightly rustfmt (import grouping needs nightly).
    Fmt,
    /// Set up, build, and run the network-namespace lab: three nodes, pods, a client, one agent
    /// per node; send real requests to every node and print who answered.
    Lab(lab_cmd::LabArgs),
    /// Benchmarks side by side (release build): st8s against direct routing, iptables DNAT and
    /// a haproxy hop; per-packet cost against a parse-only program; control-plane latency,
    /// sync time and memory. Writes docs/benchmarks.md.
    Bench {
        /// Rounds at least, per workload and path.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Rounds at most: a workload runs more than --rounds until the forwarded path's ratio to
        /// direct routing is known within +-5 % (95 % confidence), up to this many. Each round
        /// of the four workloads takes about four minutes.
        #[arg(long, default_value_t = 8)]
        max_rounds: usize,
        /// Only these data paths, comma-separated (direct, direct-2hop, iptables-fwd,
        /// iptables-local, haproxy, st8s-local, st8s-fwd and their -v6 / ip6tables twins);
        /// ratios need their baselines.
        #[arg(long, value_delimiter = ',')]
        paths: Vec<String>,
        /// Only these workloads, comma-separated: keep-alive, new-conn, dns, stream.
        #[arg(long, value_delimiter = ',')]
        workloads: Vec<String>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 4)]
        seconds: u64,
        /// Skip the data-path workloads and the per-packet cost.
        #[arg(long)]
        skip_dataplane: bool,
        /// Skip the data-path workloads but keep the per-packet cost.
        #[arg(long)]
        skip_workloads: bool,
        /// Skip the control-plane part.
        #[arg(long)]
        skip_control: bool,
        /// Skip the in-cluster clients (a pod through its node's address against the pod
        /// directly).
        #[arg(long)]
        skip_local_clients: bool,
        /// Skip the per-packet cost (BPF_PROG_TEST_RUN and the instruction count).
        #[arg(long)]
        skip_per_packet: bool,
        /// Where to write the report.
        #[arg(long, default_value = "docs/benchmarks.md")]
        out: PathBuf,
    },
    /// arm64: the core's unit tests for aarch64 under qemu-user, and the agent built for
    /// aarch64, run under emulation.
    Arm64,
    /// The kernel matrix: boot Debian's kernels (6.1 and 6.12 on x86_64, 6.1 on arm64) under
    /// QEMU and run, inside each, the BPF_PROG_TEST_RUN fixtures and the lab on every attach
    /// path. Reports per kernel.
    Kernels {
        /// `debian-6.1`, `debian-6.12`, `debian-6.1-arm64`, or `all`.
        #[arg(long, default_value = "all")]
        kernel: String,
    },
    /// Set up, build, and run every test: unit tests, BPF_PROG_TEST_RUN fixtures through the
    /// real programs, network-namespace integration tests (root needed), and the kernel matrix.
    Test {
        /// Skip `setup` (when you know the machine is ready).
        #[arg(long)]
        no_setup: bool,
        /// Skip the kernel matrix (the QEMU VMs).
        #[arg(long)]
        no_kernels: bool,
        /// Extra arguments for `cargo test` (after `--`), e.g. a test-name filter.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Fuzz the userspace parsers with cargo-fuzz (libFuzzer, nightly), installing cargo-fuzz
    /// if needed. The test suite runs a bounded version of the same targets.
    Fuzz {
        /// `cluster_yaml`, `annotations`, `mdns`, or `all`.
        #[arg(long, default_value = "all")]
        target: String,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// (bench internal) In the counting guest: print the per-packet cases' instruction counts.
    #[command(hide = true)]
    PerPacketCount {
        #[arg(long)]
        object: PathBuf,
    },
    /// (bench internal) Runs one side of one per-packet case in a loop, for a profiler to
    /// sample: `perf record -a -e cpu-clock -- cargo xtask per-packet-profile --case 4`.
    #[command(hide = true)]
    PerPacketProfile {
        /// The kernel object (default: the one `build-ebpf` made).
        #[arg(long)]
        object: Option<PathBuf>,
        /// The case's index, in the order of the bench's per-packet tables (0 lists them).
        #[arg(long)]
        case: usize,
        /// The reference side (b) instead of st8s's (a).
        #[arg(long)]
        reference: bool,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// (lab internal) Run a backend pod's HTTP/DNS server.
    #[command(hide = true)]
    LabBackend {
        #[arg(long)]
        name: String,
        #[arg(long)]
        http: Option<u16>,
        #[arg(long)]
        dns: Option<u16>,
        /// A UDP discovery port to answer on (repeat for several).
        #[arg(long)]
        discovery: Vec<u16>,
        /// The pod's address/prefix, which discovery servers bind to as real servers do.
        #[arg(long)]
        addr: Option<xtask::backend::PodAddr>,
    },
    /// (lab internal) Attach the XDP_PASS stub to a veth and pin the link.
    #[command(hide = true)]
    LabStub {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        pin: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.task {
        Task::Setup => setup::setup(),
        Task::BuildEbpf => setup::build_ebpf(),
        Task::Build { release, image } => {
            build(release)?;
            if image {
                image_binaries(release)?;
            }
            Ok(())
        }
        Task::Lint => lint(),
        Task::Fmt => fmt(false),
        Task::Lab(args) if args.down || args.no_setup => lab_cmd::run(args),
        Task::Lab(args) => {
            setup::setup()?;
            build(false)?;
            lab_cmd::run(args)
        }
        Task::Arm64 => {
            setup::setup()?;
            build(false)?;
            xtask::arm64::check()
        }
        Task::Kernels { kernel } => {
            setup::setup()?;
            build(false)?;
            xtask::vm::run(&kernel).map(|_| ())
        }
        Task::Test {
            no_setup,
            no_kernels,
            cargo_args,
        } => {
            if !no_setup {
                setup::setup()?;
            }
            build(false)?;
            lint()?;
            if !setup::is_root() {
                bail!("the BPF and network-namespace tests need root (CAP_BPF, CAP_NET_ADMIN): run as root");
            }
            // The planning core builds and passes its tests without aya, tokio or kube.
            progress("the planning core alone (no kernel, runtime or API client)");
            run(Command::new("cargo").current_dir(workspace_root()).args([
                "test",
                "-p",
                "st8s-userspace",
                "--no-default-features",
                "--lib",
            ]))
            .context("the core without the agent's dependencies")?;
            progress("running the test suite");
            let mut cmd = Command::new("cargo");
            cmd.current_dir(workspace_root())
                .args(["test", "--workspace", "--features", PRIVILEGED_TESTS]);
            // The tests that measure something (failover, churn, discovery, dns) print it.
            cmd.arg("--").arg("--show-output").args(&cargo_args);
            run(&mut cmd)?;
            if cargo_args.is_empty() {
                xtask::arm64::check()?;
            }
            if !no_kernels && cargo_args.is_empty() {
                progress(
                    "the kernel matrix: Debian's 6.1 and 6.12 (x86_64) and 6.1 (arm64) under QEMU, one after the other",
                );
                xtask::vm::run("all")?;
            }
            progress("all tests passed");
            Ok(())
        }
        Task::Fuzz { target, seconds } => {
            let tc = setup::nightly()?;
            if run(Command::new("cargo").args(["fuzz", "--version"])).is_err() {
                progress("installing cargo-fuzz (once)");
                run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
                    .context("cargo install cargo-fuzz")?;
            }
            setup::build_ebpf()?;
            let targets: Vec<&str> = match target.as_str() {
                "all" => vec!["cluster_yaml", "annotations", "mdns"],
                t @ ("cluster_yaml" | "annotations" | "mdns") => vec![t],
                other => bail!("no fuzz target {other:?}: cluster_yaml, annotations, mdns or all"),
            };
            for t in targets {
                progress(&format!("fuzzing {t} for {seconds} s"));
                run(Command::new("cargo")
                    .current_dir(workspace_root())
                    .arg(format!("+{tc}"))
                    .args(["fuzz", "run", t, "--fuzz-dir", "fuzz", "--"])
                    .arg(format!("-max_total_time={seconds}")))
                .with_context(|| {
                    format!("fuzzing {t} (a crash leaves its input under fuzz/artifacts/{t}/)")
                })?;
            }
            progress("no crash");
            Ok(())
        }
        Task::Bench {
            rounds,
            max_rounds,
            paths,
            workloads,
            seconds,
            skip_dataplane,
            skip_workloads,
            skip_control,
            skip_local_clients,
            skip_per_packet,
            out,
        } => {
            // Before the setup and the builds, which take minutes.
            if rounds < 2 || max_rounds < rounds {
                bail!(
                    "--rounds must be at least 2 (a spread needs two rounds) and --max-rounds at least --rounds"
                );
            }
            setup::setup()?;
            setup::build_ebpf()?;
            progress("building st8s (release)");
            run(Command::new("cargo").current_dir(workspace_root()).args([
                "build",
                "--release",
                "-p",
                "st8s-userspace",
            ]))?;
            if !setup::is_root() {
                bail!("benchmarks need root (network namespaces, BPF)");
            }
            let out = if out.is_absolute() {
                out
            } else {
                workspace_root().join(out)
            };
            xtask::bench::run(xtask::bench::BenchArgs {
                rounds,
                max_rounds,
                paths,
                workloads,
                seconds,
                skip_dataplane,
                skip_workloads,
                skip_control,
                skip_local_clients,
                skip_per_packet,
                out,
            })
        }
        Task::PerPacketCount { object } => xtask::bench::print_instruction_counts(&object),
        Task::PerPacketProfile {
            object,
            case,
            reference,
            seconds,
        } => xtask::bench::profile_case(
            &object.unwrap_or_else(xtask::setup::ebpf_object),
            case,
            reference,
            std::time::Duration::from_secs(seconds),
        ),
        Task::LabBackend {
            name,
            http,
            dns,
            discovery,
            addr,
        } => xtask::backend::serve(name, http, dns, &discovery, addr),
        Task::LabStub { iface, pin } => stub(&iface, &pin),
    }
}

/// The features that turn on the tests needing root; a plain `cargo test` leaves them out.
const PRIVILEGED_TESTS: &str = "st8s-userspace/privileged,xtask/privileged";

fn build(release: bool) -> anyhow::Result<()> {
    setup::build_ebpf()?;
    progress("building st8s and the lab tools");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args(["build", "-p", "st8s-userspace", "-p", "xtask"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd).context("building st8s")
}

/// st8s for both image architectures, where deploy/Containerfile takes them (by TARGETARCH).
fn image_binaries(release: bool) -> anyhow::Result<()> {
    let profile = if release { "release" } else { "debug" };
    progress(&format!("building st8s for {} too", setup::ARM64));
    let arm64 = xtask::arm64::build(release)?;
    let target = xtask::target_dir();
    for (arch, from) in [("amd64", target.join(profile).join("st8s")), ("arm64", arm64)] {
        let dir = target.join("image").join(arch);
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(&from, dir.join("st8s")).with_context(|| format!("copying {}", from.display()))?;
    }
    progress("target/image/amd64/st8s and target/image/arm64/st8s are ready for deploy/Containerfile");
    Ok(())
}

fn fmt(check: bool) -> anyhow::Result<()> {
    let tc = setup::nightly()?;
    let check_arg: &[&str] = if check { &["--", "--check"] } else { &[] };
    run(Command::new("cargo")
        .current_dir(workspace_root())
        .arg(format!("+{tc}"))
        .args(["fmt", "--all"])
        .args(check_arg))
    .context("rustfmt (workspace); run `cargo xtask fmt`")?;
    run(Command::new("cargo")
        .current_dir(workspace_root().join("st8s-ebpf"))
        .arg(format!("+{tc}"))
        .arg("fmt")
        .args(check_arg))
    .context("rustfmt (st8s-ebpf); run `cargo xtask fmt`")
}

fn lint() -> anyhow::Result<()> {
    progress("clippy: host crates");
    run(Command::new("cargo").current_dir(workspace_root()).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--features",
        PRIVILEGED_TESTS,
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy (host crates)")?;
    progress("clippy: kernel programs");
    let tc = setup::nightly()?;
    run(Command::new("cargo")
        .current_dir(workspace_root().join("st8s-ebpf"))
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .arg(format!("+{tc}"))
        .args([
            "clippy",
            "-Z",
            "build-std=core",
            "--target",
            "bpfel-unknown-none",
            "--release",
            "--",
            "-D",
            "warnings",
        ]))
    .context("clippy (kernel programs)")?;
    progress("rustfmt --check");
    fmt(true)
}

fn stub(iface: &str, pin: &std::path::Path) -> anyhow::Result<()> {
    use aya::programs::{Xdp, XdpMode, links::FdLink};
    // The programs the st8s library carries (also inside a test VM, where no build tree is).
    let obj = st8s::dataplane::ebpf_object()?;
    let mut ebpf = aya::Ebpf::load(obj).context("loading the kernel programs")?;
    let prog: &mut Xdp = ebpf
        .program_mut(st8s_common::program_names::XDP_PASS)
        .context("XDP_PASS program missing")?
        .try_into()?;
    prog.load()?;
    let id = prog
        .attach(iface, XdpMode::Driver)
        .with_context(|| format!("attaching to {iface}"))?;
    let link = prog.take_link(id)?;
    let link: FdLink = link.try_into().context("the XDP link is not a bpf_link")?;
    link.pin(pin)
        .with_context(|| format!("pinning {}", pin.display()))?;
    Ok(())
}
