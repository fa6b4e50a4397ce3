//! What outlives the agent: maps and links pinned under the pin directory.
//!
//! A starting agent adopts the pinned maps when their layout matches its programs, migrates the
//! flow state when only a capacity changed, and rebuilds a map whose layout it cannot read,
//! saying which for every map. Links are pinned too, so that the programs stay attached while no
//! agent runs (an upgrade, a crash); a new agent swaps its programs in with `bpf_link_update`, and
//! `st8s uninstall` is what detaches them.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapInfo},
    programs::links::{FdLink, PinnedLink},
};
use st8s_common::{
    ADOPTED_LAYOUTS, Config, FLOW_KEY_V2_SIZE, FLOW_KEY6_V2_SIZE, FLOW_VALUE_V1_SIZE, FlowKey, FlowKey6,
    FlowValue, LAYOUT_VERSION, RevNatKey, RevNatKey6, RevNatValue, RevNatValue6, map_names, program_names,
};
use tracing::{info, warn};

/// What happened to one map when the agent started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapFate {
    /// No pin: a new, empty map.
    Created,
    /// The pinned map fits: taken over with its contents.
    Adopted,
    /// Only the capacity changed: entries copied into a new map.
    Migrated { entries: usize, reason: String },
    /// The layout changed in a way that cannot be copied: a new, empty map.
    Rebuilt { reason: String },
}

impl fmt::Display for MapFate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapFate::Created => f.write_str("created"),
            MapFate::Adopted => f.write_str("adopted"),
            MapFate::Migrated { entries, reason } => write!(f, "migrated {entries} entries ({reason})"),
            MapFate::Rebuilt { reason } => write!(f, "rebuilt empty ({reason})"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shape {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

impl Shape {
    fn of(info: &MapInfo) -> anyhow::Result<Self> {
        Ok(Shape {
            map_type: info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        })
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "type {} key {}B value {}B max {}",
            self.map_type, self.key_size, self.value_size, self.max_entries
        )
    }
}

/// Maps whose contents cannot be rebuilt from the cluster: worth copying across a capacity change.
const MIGRATABLE: [&str; 4] = [
    map_names::FLOWS,
    map_names::REVNAT,
    map_names::FLOWS6,
    map_names::REVNAT6,
];

/// The maps, loaded onto the pins, with a report of what happened to each.
pub struct Loaded {
    pub ebpf: Ebpf,
    pub fates: Vec<(&'static str, MapFate)>,
}

impl Loaded {
    /// True when every map was taken over as it was: the agent restarts onto a running dataplane.
    pub fn adopted_all(&self) -> bool {
        self.fates.iter().all(|(_, f)| *f == MapFate::Adopted)
    }
}

/// Loads `obj` with its maps on the pins under `dir`, adopting, migrating or rebuilding each.
pub fn load_pinned(dir: &Path, obj: &[u8]) -> anyhow::Result<Loaded> {
    fs::create_dir_all(dir)
        .with_context(|| format!("creating {} (is bpffs mounted at /sys/fs/bpf?)", dir.display()))?;
    // What this build's maps look like: a throwaway load with no pins.
    let mut probe = loader().load(obj).context("loading the st8s programs")?;
    let version = pinned_layout_version(dir);

    let mut fates = Vec::new();
    let mut stash: Vec<(&'static str, MapData)> = Vec::new();
    for name in map_names::ALL {
        let path = dir.join(name);
        if !path.exists() {
            fates.push((name, MapFate::Created));
            continue;
        }
        let want =
            Shape::of(&map_data(probe.take_map(name).context("map missing from the object")?)?.info()?)?;
        let old = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let have = Shape::of(&old.info()?)?;
        let fate = match version {
            Some(v) if v != LAYOUT_VERSION && !ADOPTED_LAYOUTS.contains(&v) => MapFate::Rebuilt {
                reason: format!("written by layout version {v}, this agent uses {LAYOUT_VERSION}"),
            },
            _ if have == want => MapFate::Adopted,
            _ if MIGRATABLE.contains(&name) && copyable(name, have, want) => MapFate::Migrated {
                entries: 0,
                reason: change(have, want),
            },
            _ => MapFate::Rebuilt {
                reason: format!("pinned {have}, this agent needs {want}"),
            },
        };
        if fate != MapFate::Adopted {
            // The old map lives on through `old` (for a copy) until it is dropped.
            fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
            if matches!(fate, MapFate::Migrated { .. }) {
                stash.push((name, old));
            }
        }
        fates.push((name, fate));
    }
    drop(probe);

    let paths: Vec<(&'static str, PathBuf)> = map_names::ALL.iter().map(|n| (*n, dir.join(n))).collect();
    let mut loader = loader();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .load(obj)
        .context("loading the st8s programs onto the pinned maps")?;

    for (name, old) in stash {
        let copied = match name {
            map_names::FLOWS => copy_flows(old, &mut ebpf, name, FlowKey::from_v2)?,
            map_names::FLOWS6 => copy_flows(old, &mut ebpf, name, FlowKey6::from_v2)?,
            map_names::REVNAT => copy_entries::<RevNatKey, RevNatValue>(old, &mut ebpf, name)?,
            map_names::REVNAT6 => copy_entries::<RevNatKey6, RevNatValue6>(old, &mut ebpf, name)?,
            _ => 0,
        };
        if let Some((_, MapFate::Migrated { entries, .. })) = fates.iter_mut().find(|(n, _)| *n == name) {
            *entries = copied;
        }
    }
    for (name, fate) in &fates {
        match fate {
            MapFate::Adopted | MapFate::Created => info!(map = name, %fate, "map"),
            _ => warn!(map = name, %fate, "map layout changed"),
        }
    }
    Ok(Loaded { ebpf, fates })
}

/// A loader without the kernel's BTF: the programs touch no kernel structures (nothing to
/// relocate), and parsing /sys/kernel/btf/vmlinux would cost the agent several MiB.
fn loader() -> EbpfLoader<'static> {
    let mut l = EbpfLoader::new();
    l.btf(None);
    l
}

/// The kernel map behind one of the map kinds st8s uses.
fn map_data(map: Map) -> anyhow::Result<MapData> {
    match map {
        Map::Array(m) | Map::HashMap(m) | Map::LruHashMap(m) | Map::PerCpuArray(m) | Map::RingBuf(m) => Ok(m),
        other => anyhow::bail!("unexpected map kind {other:?}"),
    }
}

/// The layout version recorded in a pinned config, if there is one with a sync behind it.
fn pinned_layout_version(dir: &Path) -> Option<u16> {
    let data = MapData::from_pin(dir.join(map_names::CONFIG)).ok()?;
    let info = data.info().ok()?;
    if info.value_size() as usize != std::mem::size_of::<Config>() {
        return None;
    }
    let map: Array<MapData, Config> = Array::try_from(Map::from_map_data(data).ok()?).ok()?;
    let config = map.get(&0, 0).ok()?;
    (config.layout != 0).then_some(config.layout)
}

/// The size of a flow table's keys before they lost the frontend address (layouts 1 and 2).
fn old_flow_key_size(name: &str) -> Option<usize> {
    match name {
        map_names::FLOWS => Some(FLOW_KEY_V2_SIZE),
        map_names::FLOWS6 => Some(FLOW_KEY6_V2_SIZE),
        _ => None,
    }
}

/// Whether a pinned map's entries can be copied into the map this agent needs: the same type, a
/// capacity of any size, the same keys and values, or a flow table's keys of layouts 1 and 2
/// (narrowed) and values of layout 1 (widened).
fn copyable(name: &str, have: Shape, want: Shape) -> bool {
    let old_key = old_flow_key_size(name);
    let narrowed = old_key == Some(have.key_size as usize);
    let widened = old_key.is_some()
        && have.value_size as usize == FLOW_VALUE_V1_SIZE
        && want.value_size as usize == std::mem::size_of::<FlowValue>();
    have.map_type == want.map_type
        && (have.key_size == want.key_size || narrowed)
        && (have.value_size == want.value_size || widened)
}

/// What differs between the pinned map and the one this agent needs.
fn change(have: Shape, want: Shape) -> String {
    let mut parts = Vec::new();
    if have.max_entries != want.max_entries {
        parts.push(format!("capacity {} -> {}", have.max_entries, want.max_entries));
    }
    if have.key_size != want.key_size {
        parts.push(format!(
            "keys {}B -> {}B, without the node's own address",
            have.key_size, want.key_size
        ));
    }
    if have.value_size != want.value_size {
        parts.push(format!(
            "values {}B -> {}B, the new fields zeroed",
            have.value_size, want.value_size
        ));
    }
    parts.join(", ")
}

fn copy_entries<K: aya::Pod, V: aya::Pod>(
    old: MapData,
    ebpf: &mut Ebpf,
    name: &str,
) -> anyhow::Result<usize> {
    copy_converted(old, ebpf, name, |k: K, v: V| (k, v))
}

/// Copies a flow table of any layout `copyable` accepts: keys that still carry the frontend
/// address (`K::from_v2`) lose it, values of layout 1 are widened.
fn copy_flows<K: aya::Pod, const OLD_KEY: usize>(
    old: MapData,
    ebpf: &mut Ebpf,
    name: &str,
    from_v2: fn([u8; OLD_KEY]) -> K,
) -> anyhow::Result<usize> {
    let info = old.info()?;
    let old_key = info.key_size() as usize == OLD_KEY;
    let v1 = info.value_size() as usize == FLOW_VALUE_V1_SIZE;
    let widen = FlowValue::from_v1;
    match (old_key, v1) {
        (true, true) => copy_converted(old, ebpf, name, |k, v| (from_v2(k), widen(v))),
        (true, false) => copy_converted(old, ebpf, name, |k, v: FlowValue| (from_v2(k), v)),
        (false, true) => copy_converted(old, ebpf, name, |k: K, v| (k, widen(v))),
        (false, false) => copy_entries::<K, FlowValue>(old, ebpf, name),
    }
}

/// Copies every entry of `old` into the map `name`, each through `convert`.
fn copy_converted<OldK: aya::Pod, OldV: aya::Pod, K: aya::Pod, V: aya::Pod>(
    old: MapData,
    ebpf: &mut Ebpf,
    name: &str,
    convert: impl Fn(OldK, OldV) -> (K, V),
) -> anyhow::Result<usize> {
    let old: HashMap<MapData, OldK, OldV> = HashMap::try_from(Map::from_map_data(old)?)?;
    let mut new: HashMap<_, K, V> =
        HashMap::try_from(ebpf.map_mut(name).context("map missing from the object")?)?;
    let mut copied = 0;
    for entry in old.iter() {
        let Ok((k, v)) = entry else { continue };
        let (k, v) = convert(k, v);
        // A smaller new map keeps what fits; the LRU evicts the rest.
        if new.insert(k, v, 0).is_ok() {
            copied += 1;
        }
    }
    Ok(copied)
}

/// The pin path of a link.
pub fn link_path(dir: &Path, what: &str) -> PathBuf {
    dir.join(format!("link_{what}"))
}

/// Opens a pinned link, if there is one.
pub fn pinned_link(path: &Path) -> Option<FdLink> {
    if !path.exists() {
        return None;
    }
    match PinnedLink::from_pin(path) {
        Ok(l) => Some(l.into()),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "unreadable link pin: replacing it");
            let _ = fs::remove_file(path);
            None
        }
    }
}

/// Removes a link's pin: the link detaches once nothing else holds it.
pub fn unpin_link(path: &Path) {
    let _ = fs::remove_file(path);
}

/// The `what` of every link pinned under `dir` as `link_<prefix><what>`.
pub fn pinned_names(dir: &Path, prefix: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let pin = format!("link_{prefix}");
    entries
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix(&pin)
                .map(str::to_owned)
        })
        .collect()
}

/// `st8s uninstall`: detaches every pinned link and every st8s netlink TC filter (those of
/// `--tc-attach netlink`, on any interface of this network namespace), and removes every pin
/// under `dir`.
///
/// Removing a pin drops the last reference to a link (the agent keeps none open), which detaches
/// its program; links and filters go first, so traffic is back with the kernel before the maps
/// disappear.
pub fn uninstall(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    for iface in super::net::interfaces() {
        for name in [
            program_names::UPLINK_TC,
            program_names::POD_TC,
            program_names::POD_PORT_TC,
        ] {
            if aya::programs::tc::qdisc_detach_program(&iface, aya::programs::TcAttachType::Ingress, name)
                .is_ok()
            {
                removed.push(format!("tc filter {name} on {iface}"));
            }
        }
    }
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    let is_link = |p: &PathBuf| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("link_"))
    };
    paths.sort_by_key(|p| !is_link(p));
    // Removing a link's pin drops its last reference, but the kernel frees (detaches) the link
    // from a work queue, moments later: with several links the first request after `uninstall`
    // could still be steered. The programs they hold are read first, and `uninstall` returns
    // once the kernel has let them go (a program outlives its attachment).
    let prog_ids: Vec<u32> = paths
        .iter()
        .filter(|p| is_link(p))
        .filter_map(|p| FdLink::from(PinnedLink::from_pin(p).ok()?).info().ok())
        .map(|i| i.program_id())
        .collect();
    for path in paths {
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        removed.push(path.display().to_string());
    }
    fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    let deadline = std::time::Instant::now() + LINK_RELEASE;
    loop {
        let live = aya::programs::loaded_programs()
            .flatten()
            .filter(|p| prog_ids.contains(&p.id()))
            .count();
        if live == 0 {
            break;
        }
        if std::time::Instant::now() > deadline {
            warn!(programs = live, "the kernel has not released every program yet");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(removed)
}

/// How long `uninstall` waits for the kernel to release the programs of the links it unpinned.
const LINK_RELEASE: std::time::Duration = std::time::Duration::from_secs(5);
