//! Map-layout changes between versions: adopt what fits, migrate flows across a capacity change,
//! rebuild what cannot be read, and say which. Needs root (bpffs, CAP_BPF) and bpftool.
#![cfg(feature = "privileged")]

use std::{path::PathBuf, process::Command};

use aya::maps::{Array, HashMap};
use st8s::dataplane::pins::{self, MapFate};
use st8s_common::{
    Config, FLOW_REMOTE, FlowKey, FlowKey6, FlowValue, LAYOUT_VERSION, PROTO_TCP, PROTO_UDP, addr6, map_names,
};

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
    // An "older" layout: a smaller flow table of layout 1 (16-byte values) holding two flows, and
    // a port table whose values are 8 bytes instead of 16.
    layout1_flows(&flows, 128, &[7, 8]);
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
            assert!(reason.contains("keys 16B -> 12B"), "{reason}");
            assert!(reason.contains("values 16B -> 32B"), "{reason}");
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
    assert_eq!(
        m.get(&layout2_key(7), 0).expect("migrated flow"),
        layout1_flow_value()
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

/// The flow every layout-1 table of these tests holds, as this release reads it: the fields up
/// to `created_ns` kept, the fields added since zeroed (the flow is checked by its next packet).
fn layout1_flow_value() -> FlowValue {
    FlowValue {
        backend_addr_be: u32::from_ne_bytes([10, 0, 0, 12]),
        backend_port_be: 8080u16.to_be(),
        kind: FLOW_REMOTE,
        backend_hint: 5,
        created_ns: 0x0102_0304_0506_0708,
        ..Default::default()
    }
}

/// The flow of client `c` (its address's first octet) in these tests' old tables, as this
/// release keys it.
fn layout2_key(c: u8) -> FlowKey {
    FlowKey {
        client_addr_be: u32::from_ne_bytes([c, 0, 0, 50]),
        client_port_be: 40000u16.to_be(),
        frontend_port_be: 443u16.to_be(),
        proto: PROTO_TCP,
        ..Default::default()
    }
}

/// `layout2_key`'s flow as layouts 1 and 2 keyed it: the client, this node's address
/// (192.168.1.11), the client's port, the frontend port, the protocol and two bytes of padding.
fn old_key(c: u8) -> Vec<u8> {
    let mut key = vec![c, 0, 0, 50, 192, 168, 1, 11];
    key.extend(40000u16.to_be_bytes());
    key.extend(443u16.to_be_bytes());
    key.extend([PROTO_TCP, 0, 0, 0]);
    key
}

/// Writes one entry into the pinned map at `path`.
fn bpftool_update(path: &std::path::Path, key: &[u8], value: &[u8]) {
    let mut args = vec![
        "map".to_owned(),
        "update".into(),
        "pinned".into(),
        path.display().to_string(),
        "key".into(),
    ];
    args.extend(hex(key));
    args.push("value".into());
    args.extend(hex(value));
    bpftool(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// Pins a flow table as layout 1 wrote it (16-byte keys with the frontend address, 16-byte
/// values) at `path`, holding one flow per client (`old_key`) with `layout1_flow_value`'s fields.
fn layout1_flows(path: &std::path::Path, entries: u32, clients: &[u8]) {
    pin_flow_table(path, "ST8S_FLOWS", 16, 16, entries);
    for client in clients {
        // Layout 1's FlowValue: backend_addr_be, backend_port_be, kind, backend_hint, created_ns.
        let mut value = vec![10, 0, 0, 12];
        value.extend(8080u16.to_be().to_ne_bytes());
        value.extend([FLOW_REMOTE, 5]);
        value.extend(0x0102_0304_0506_0708u64.to_ne_bytes());
        bpftool_update(path, &old_key(*client), &value);
    }
}

/// Pins an empty flow table of `entries` entries with `key`- and `value`-byte entries at `path`.
fn pin_flow_table(path: &std::path::Path, name: &str, key: usize, value: usize, entries: u32) {
    let (key, value, entries) = (key.to_string(), value.to_string(), entries.to_string());
    bpftool(&[
        "map",
        "create",
        path.to_str().expect("path"),
        "type",
        "lru_hash",
        "key",
        &key,
        "value",
        &value,
        "entries",
        &entries,
        "name",
        name,
    ]);
}

/// A pin directory holding this release's maps, its config saying an agent of `layout` wrote
/// them.
fn pinned_as_layout(tag: &str, layout: u16) -> PinDir {
    let dir = PinDir::new(tag);
    let mut loaded = pins::load_pinned(&dir.0, obj()).expect("load");
    let mut c: Array<_, Config> =
        Array::try_from(loaded.ebpf.map_mut(map_names::CONFIG).expect("map")).expect("type");
    c.set(
        0,
        Config {
            layout,
            ..Default::default()
        },
        0,
    )
    .expect("config");
    dir
}

/// An upgrade from layout 1 (issue 18 changed two maps' meaning compatibly): every map is taken
/// over as it is, and the flow table, whose values grew, is copied with its flows kept, so that
/// established connections keep their backends across the upgrade.
#[test]
fn maps_of_layout_1_are_adopted_and_its_flows_carried_over() {
    let dir = pinned_as_layout("layout1", 1);
    let flows = dir.0.join(map_names::FLOWS);
    std::fs::remove_file(&flows).expect("unpin the new flow table");
    layout1_flows(&flows, 65_536, &[7]);

    let loaded = pins::load_pinned(&dir.0, obj()).expect("reload");
    for (name, f) in &loaded.fates {
        match (*name, f) {
            (map_names::FLOWS, MapFate::Migrated { entries, reason }) => {
                assert_eq!(*entries, 1);
                assert_eq!(
                    reason,
                    "keys 16B -> 12B, without the node's own address, values 16B -> 32B, the new fields zeroed"
                );
            }
            (_, MapFate::Adopted) => {}
            other => panic!("{other:?}"),
        }
    }
    let m: HashMap<_, FlowKey, FlowValue> =
        HashMap::try_from(loaded.ebpf.map(map_names::FLOWS).expect("map")).expect("type");
    assert_eq!(
        m.get(&layout2_key(7), 0).expect("flow carried over"),
        layout1_flow_value()
    );
}

/// An upgrade from layout 2, whose flow keys carried the node's own address (16 and 40 bytes):
/// both flow tables are copied with their keys narrowed and their values whole, and every other
/// map is taken over as it is, so established connections of both families keep their backends.
#[test]
fn flows_of_layout_2_keep_their_backends_without_the_frontend_in_their_keys() {
    let dir = pinned_as_layout("layout2", 2);
    let value = FlowValue {
        backend_addr_be: u32::from_ne_bytes([10, 0, 0, 12]),
        kind: FLOW_REMOTE,
        backend_hint: 5,
        created_ns: 0x0102_0304_0506_0708,
        port_word: 0x0003_0041,
        node_mac: [2, 0, 0, 0, 0, 12],
        ..Default::default()
    };
    // SAFETY: FlowValue is plain integers and byte arrays, with no padding (assert_size!).
    let value_bytes: [u8; 32] = unsafe { std::mem::transmute(value) };
    let flows = dir.0.join(map_names::FLOWS);
    std::fs::remove_file(&flows).expect("unpin the new flow table");
    pin_flow_table(&flows, "ST8S_FLOWS", 16, 32, 65_536);
    bpftool_update(&flows, &old_key(7), &value_bytes);
    // Layout 2's FlowKey6: client (fd00::7), frontend (fd00::11), ports, protocol, padding.
    let client6 = addr6([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
    let mut key6: Vec<u8> = vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
    key6.extend([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11]);
    key6.extend(5353u16.to_be_bytes());
    key6.extend(53u16.to_be_bytes());
    key6.extend([PROTO_UDP, 0, 0, 0]);
    let flows6 = dir.0.join(map_names::FLOWS6);
    std::fs::remove_file(&flows6).expect("unpin the new flow table");
    pin_flow_table(&flows6, "ST8S_FLOWS6", 40, 32, 65_536);
    bpftool_update(&flows6, &key6, &value_bytes);

    let loaded = pins::load_pinned(&dir.0, obj()).expect("reload");
    for (name, f) in &loaded.fates {
        match (*name, f) {
            (map_names::FLOWS, MapFate::Migrated { entries, reason }) => {
                assert_eq!(
                    (*entries, reason.as_str()),
                    (1, "keys 16B -> 12B, without the node's own address")
                );
            }
            (map_names::FLOWS6, MapFate::Migrated { entries, reason }) => {
                assert_eq!(
                    (*entries, reason.as_str()),
                    (1, "keys 40B -> 24B, without the node's own address")
                );
            }
            (_, MapFate::Adopted) => {}
            other => panic!("{other:?}"),
        }
    }
    let m: HashMap<_, FlowKey, FlowValue> =
        HashMap::try_from(loaded.ebpf.map(map_names::FLOWS).expect("map")).expect("type");
    assert_eq!(m.get(&layout2_key(7), 0).expect("IPv4 flow carried over"), value);
    let m6: HashMap<_, FlowKey6, FlowValue> =
        HashMap::try_from(loaded.ebpf.map(map_names::FLOWS6).expect("map")).expect("type");
    let k6 = FlowKey6 {
        client_addr: client6,
        client_port_be: 5353u16.to_be(),
        frontend_port_be: 53u16.to_be(),
        proto: PROTO_UDP,
        ..Default::default()
    };
    assert_eq!(m6.get(&k6, 0).expect("IPv6 flow carried over"), value);
}

#[test]
fn another_layout_version_rebuilds_everything() {
    let dir = pinned_as_layout("version", LAYOUT_VERSION + 1);
    let loaded = pins::load_pinned(&dir.0, obj()).expect("reload");
    for (name, f) in &loaded.fates {
        match f {
            MapFate::Rebuilt { reason } => assert!(reason.contains("layout version"), "{name}: {reason}"),
            other => panic!("{name}: {other:?}"),
        }
    }
}
