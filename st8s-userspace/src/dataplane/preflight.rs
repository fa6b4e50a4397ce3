//! What the kernel must offer before the agent touches any map or link: the program and map
//! types, the helpers the programs call, and a kernel from 5.10 on (bpf_link for XDP came in
//! 5.9, bpf_redirect_neigh in 5.10). A kernel that lacks one is named with what is missing and
//! what needs it, and the agent stops there, leaving whatever runs untouched.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
    util::KernelVersion,
};

/// One thing the dataplane needs, and what for.
#[derive(Clone, Copy, Debug)]
pub enum Feature {
    Program(ProgramType, &'static str),
    Map(MapType, &'static str),
    Helper(ProgramType, BpfHelper, &'static str),
}

impl Feature {
    fn name(&self) -> String {
        match self {
            Feature::Program(p, why) => format!("program type {p:?} ({why})"),
            Feature::Map(m, why) => format!("map type {m:?} ({why})"),
            Feature::Helper(p, h, why) => format!("helper {h:?} in {p:?} programs ({why})"),
        }
    }
}

/// The oldest kernel st8s runs on.
pub const MIN_KERNEL: (u32, u32) = (5, 10);

/// What the programs need; the socket hooks' part only when they are wanted.
pub fn required(sockets: bool) -> Vec<Feature> {
    use BpfHelper as H;
    let tc = ProgramType::SchedClassifier;
    let mut f = vec![
        Feature::Program(ProgramType::Xdp, "forwarding on the uplink"),
        Feature::Program(tc, "local delivery and replies"),
        Feature::Map(MapType::Hash, "ports, nodes, backends"),
        Feature::Map(MapType::LruHash, "flows and reply translations"),
        Feature::Map(MapType::Array, "configuration"),
        Feature::Map(MapType::PerCpuArray, "counters"),
        Feature::Helper(tc, H::BPF_FUNC_redirect_neigh, "delivery to pods, replies"),
        Feature::Helper(tc, H::BPF_FUNC_redirect, "forwarding from TC"),
        Feature::Helper(tc, H::BPF_FUNC_clone_redirect, "discovery copies"),
        Feature::Helper(tc, H::BPF_FUNC_l4_csum_replace, "address translation"),
        Feature::Helper(tc, H::BPF_FUNC_ktime_get_ns, "reply freshness"),
    ];
    if sockets {
        let sock = ProgramType::CgroupSockAddr;
        f.push(Feature::Program(sock, "clients on the node itself"));
        f.push(Feature::Helper(
            sock,
            H::BPF_FUNC_get_socket_cookie,
            "clients on the node itself",
        ));
    }
    f
}

/// Whether this kernel has `f` (asking the kernel, as libbpf's probes do). A probe the kernel
/// refuses for another reason (no CAP_BPF: EPERM) is an error, not a missing feature.
pub fn probe(f: &Feature) -> anyhow::Result<bool> {
    Ok(match *f {
        Feature::Program(p, _) => is_program_supported(p)?,
        Feature::Map(m, _) => is_map_supported(m)?,
        Feature::Helper(p, h, _) => is_helper_supported(p, h)?,
    })
}

/// Fails, naming everything missing, unless `kernel` is recent enough and has every feature.
pub fn check(
    kernel: KernelVersion,
    features: &[Feature],
    has: impl Fn(&Feature) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let mut missing: Vec<String> = Vec::new();
    if kernel < KernelVersion::new(MIN_KERNEL.0 as u8, MIN_KERNEL.1 as u8, 0) {
        missing.push(format!(
            "Linux {}.{} or later (bpf_link for XDP, bpf_redirect_neigh)",
            MIN_KERNEL.0, MIN_KERNEL.1
        ));
    }
    for f in features {
        let present = has(f).map_err(|e| {
            anyhow::anyhow!(
                "probing the kernel for {}: {e:#} (the agent needs CAP_BPF and CAP_NET_ADMIN)",
                f.name()
            )
        })?;
        if !present {
            missing.push(f.name());
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "this kernel ({kernel}) lacks what the st8s dataplane needs; nothing was loaded, pinned or attached:\n  {}",
        missing.join("\n  ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_feature_or_an_old_kernel_is_named() {
        let needs = required(true);
        let here = KernelVersion::new(6, 1, 0);
        assert!(check(here, &needs, |_| Ok(true)).is_ok());
        let err = check(here, &needs, |f| {
            Ok(!matches!(
                f,
                Feature::Helper(_, BpfHelper::BPF_FUNC_redirect_neigh, _)
            ))
        })
        .expect_err("no bpf_redirect_neigh");
        let text = err.to_string();
        assert!(
            text.contains("BPF_FUNC_redirect_neigh") && text.contains("delivery to pods"),
            "{text}"
        );
        assert!(text.contains("nothing was loaded"), "{text}");
        let old = check(KernelVersion::new(5, 4, 0), &needs, |_| Ok(true)).expect_err("5.4");
        assert!(old.to_string().contains("Linux 5.10 or later"), "{old}");
        let refused = check(here, &needs, |_| anyhow::bail!("Operation not permitted"))
            .expect_err("EPERM is not a missing feature");
        let text = refused.to_string();
        assert!(
            text.contains("Operation not permitted") && !text.contains("lacks"),
            "{text}"
        );
        assert!(
            !required(false)
                .iter()
                .any(|f| matches!(f, Feature::Program(ProgramType::CgroupSockAddr, _))),
            "no socket hooks, no cgroup programs needed"
        );
    }
}
