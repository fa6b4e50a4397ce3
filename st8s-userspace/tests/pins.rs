//! Map-layout changes between versions: adopt what fits, migrate flows across a capacity change,
//! rebuild what cannot be read, and say which. Needs root (bpffs, CAP_BPF) and bpftool.
#![cfg(feature = "privileged")]

use std::{path::PathBuf, process::Command};

use aya::maps::{Array, HashMap};
use st8s::dataplane::pins::{self, MapFate};
use st8s_common::{Config, FlowKey, FlowValue, LAYOUT_VERSION, map_names};

struct PinDir(PathBuf);

impl PinDir {
    fn new(tag: &str) -> Self {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "needs root: run through `cargo xtask test`"
        );
        let dir = PathBuf::from(format!("/sys/fs/bpf/st8s-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("bpffs mounted at /sys/fs/bpf");
        PinDir(dir)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bpftool(args: &[&str]) {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .expect("bpftool installed (cargo xtask setup)");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn hex(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("0x{b:02x}")).collect()
}

fn fate<'a>(fates: &'a [(&'static str, MapFate)], name: &str) -> &'a MapFate {
    &fates.iter().find(|(n, _)| *n == name).expect("map reported").1
}

fn obj() -> &'static [u8] {
    st8s::dataplane::ebpf_object().expect("kernel programs embedded")
}

#[test]
fn first_start_creates_and_a_restart_adopts_with_contents() {
    let dir = PinDir::new("adopt");
    let mut loaded = pins::load_pinned(&dir.0, obj()).expect("load");
    assert!(
        loaded.fates.iter().all(|(_, f)| *f == MapFate::Created),
        "{:?}",
        loaded.fates
    );
    {
        let mut flows: HashMap<_, FlowKey, FlowValue> =
            HashMap::try_from(loaded.ebpf.map_mut(map_names::FLOWS).expect("map")).expect("type");
        let k = FlowKey {
            client_addr_be: 1,
            ..Default::default()
        };
        flows
            .insert(
                k,
                FlowValue {
                    backend_addr_be: 9,
                    ..Default::default()
                },
                0,
            )
            .expect("insert");
    }
    drop(loaded);
    let loaded = pins::load_pinned(&dir.0, obj()).expect("reload");
    assert!(loaded.adopted_all(), "{:?}", loaded.fates);
    let flows: HashMap<_, FlowKey, FlowValue> =
        HashMap::try_from(loaded.ebpf.map(map_names::FLOWS).expect("map")).expect("type");
    let k = FlowKey {
        client_addr_be: 1,
        ..Default::default()
    };
    assert_eq!(flows.get(&k, 0).expect("flow kept").backend_addr_be, 9);
}

#[test]
fn a_capacity_change_migrates_flows_and_a_shape_change_rebuilds() {
    let dir = PinDir::new("migrate");
    let flows = dir.0.join(map_names::FLOWS);
    let ports = dir.0.join(map_names::PORTS);
    // An "older" layout: a smaller flow table holding two flows, and a port table whose values
    // are 8 bytes instead of 16.
    bpftool(&[
        "map",
        "create",
        flows.to_str().expect("path"),
        "type",
        "lru_hash",
        "key",
        "16",
        "value",
        "16",
        "entries",
        "128",
        "name",
        "ST8S_FLOWS",
    ]);
    for client in [7u8, 8] {
        let mut key = vec![client, 0, 0, 0];
        key.extend([0u8; 12]);
        let mut value = vec![10, 0, 0, 12];
        value.extend([0u8; 12]);
        let mut args = vec![
            "map".to_owned(),
            "update".into(),
            "pinned".into(),
            flows.display().to_string(),
            "key".into(),
        ];
        args.extend(hex(&key));
        args.push("value".into());
        args.extend(hex(&value));
        bpftool(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }
    bpftool(&[
        "map",
        "create",
        ports.to_str().expect("path"),
        "type",
        "hash",
        "key",
        "4",
        "value",
        "8",
        "entries",
        "64",
        "name",
        "ST8S_PORTS",
    ]);

    let loaded = pins::load_pinned(&dir.0, obj()).expect("load");
    match fate(&loaded.fates, map_names::FLOWS) {
        MapFate::Migrated { entries, reason } => {
            assert_eq!(*entries, 2);
            assert!(reason.contains("128 ->"), "{reason}");
        }
        other => panic!("flows: {other:?}"),
    }
    match fate(&loaded.fates, map_names::PORTS) {
        MapFate::Rebuilt { reason } => assert!(reason.contains("value 8B"), "{reason}"),
        other => panic!("ports: {other:?}"),
    }
    assert_eq!(fate(&loaded.fates, map_names::NODES), &MapFate::Created);
    let m: HashMap<_, FlowKey, FlowValue> =
        HashMap::try_from(loaded.ebpf.map(map_names::FLOWS).expect("map")).expect("type");
    let k = FlowKey {
        client_addr_be: u32::from_ne_bytes([7, 0, 0, 0]),
        ..Default::default()
    };
    assert_eq!(
        m.get(&k, 0).expect("migrated flow").backend_addr_be,
        u32::from_ne_bytes([10, 0, 0, 12])
    );
    // The new pin is the big table.
    let out = Command::new("bpftool")
        .args(["map", "show", "pinned", flows.to_str().expect("path")])
        .output()
        .expect("bpftool");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("max_entries 65536"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn another_layout_version_rebuilds_everything() {
    let dir = PinDir::new("version");
    let mut loaded = pins::load_pinned(&dir.0, obj()).expect("load");
    {
        let mut c: Array<_, Config> =
            Array::try_from(loaded.ebpf.map_mut(map_names::CONFIG).expect("map")).expect("type");
        c.set(
            0,
            Config {
                layout: LAYOUT_VERSION + 1,
                ..Default::default()
            },
            0,
        )
        .expect("config");
    }
    drop(loaded);
    let loaded = pins::load_pinned(&dir.0, obj()).expect("reload");
    for (name, f) in &loaded.fates {
        match f {
            MapFate::Rebuilt { reason } => assert!(reason.contains("layout version"), "{name}: {reason}"),
            other => panic!("{name}: {other:?}"),
        }
    }
}
