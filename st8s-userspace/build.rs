//! Embeds the kernel programs built by `cargo xtask build-ebpf`, when they exist.
//!
//! Without them the crate still builds (so the pure core's tests need no BPF toolchain); the agent
//! then says how to build them instead of loading anything.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    println!("cargo::rustc-check-cfg=cfg(st8s_ebpf)");
    println!("cargo::rerun-if-env-changed=ST8S_EBPF_OBJ");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let obj = env::var_os("ST8S_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../st8s-ebpf/target/bpfel-unknown-none/release/st8s"));
    println!("cargo::rerun-if-changed={}", obj.display());
    let out = PathBuf::from(env::var("OUT_DIR")?).join("st8s.bpf.o");
    if obj.is_file() {
        fs::copy(&obj, &out)?;
        println!("cargo::rustc-cfg=st8s_ebpf");
    } else {
        fs::write(&out, b"")?;
    }
    Ok(())
}
