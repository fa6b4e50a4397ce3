//! One licence story (see LICENSE): the host crates are `MIT OR Apache-2.0`, the kernel programs
//! `MIT OR GPL-2.0-only` and declare "Dual MIT/GPL" to the kernel, and each licence named has
//! its text at the top of the repository.

use std::path::Path;

fn read(rel: &str) -> String {
    let path = xtask::workspace_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The `license` of a manifest: its own value, or the workspace's when it inherits it.
fn licence_of(manifest: &str) -> String {
    let own = read(manifest)
        .lines()
        .find_map(|l| {
            let l = l.trim();
            if l == "license.workspace = true" {
                Some(None)
            } else {
                l.strip_prefix("license = ")
                    .map(|v| Some(v.trim_matches('"').to_owned()))
            }
        })
        .unwrap_or_else(|| panic!("{manifest} declares no licence"));
    own.unwrap_or_else(|| licence_of("Cargo.toml"))
}

#[test]
fn host_crates_are_mit_or_apache() {
    for manifest in [
        "Cargo.toml",
        "st8s-common/Cargo.toml",
        "st8s-userspace/Cargo.toml",
        "xtask/Cargo.toml",
        "fuzz/Cargo.toml",
    ] {
        assert_eq!(licence_of(manifest), "MIT OR Apache-2.0", "{manifest}");
    }
}

#[test]
fn kernel_programs_are_gpl_compatible_and_say_so_consistently() {
    assert_eq!(licence_of("st8s-ebpf/Cargo.toml"), "MIT OR GPL-2.0-only");
    // The string the verifier checks before it allows GPL-only helpers; it must name both
    // licences the crate offers.
    let program = read("st8s-ebpf/src/main.rs");
    assert!(
        program.contains("*b\"Dual MIT/GPL\\0\""),
        "the programs' license section is not \"Dual MIT/GPL\""
    );
}

#[test]
fn every_licence_named_has_its_text() {
    let root = xtask::workspace_root();
    for (file, marker) in [
        ("LICENSE-MIT", "Permission is hereby granted, free of charge"),
        ("LICENSE-APACHE", "Apache License"),
        ("LICENSE-GPL-2.0", "GNU GENERAL PUBLIC LICENSE"),
        ("LICENSE", "MIT OR Apache-2.0"),
    ] {
        let text = read(file);
        assert!(text.contains(marker), "{file} does not hold its licence text");
        assert!(Path::new(&root.join(file)).is_file());
    }
}
