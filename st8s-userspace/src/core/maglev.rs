//! Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4).
//!
//! Every agent builds the same table from the same backend names and seed, so a flow maps to the
//! same backend whichever node computes it; when a backend joins or leaves, only about 1/N of the
//! table's entries change.

use st8s_common::MAGLEV_SIZE;

/// FNV-1a over the name, then a finalizer; `salt` gives the two independent hashes Maglev needs.
fn hash(name: &str, seed: u32, salt: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ (u64::from(seed) << 32) ^ salt;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Builds the lookup table: entry `i` holds the index (into `backends`) that owns slot `i`.
/// An empty backend list gives an all-zero table, which the programs never read (count is 0).
pub fn table(backends: &[&str], seed: u32) -> Vec<u8> {
    let m = MAGLEV_SIZE as u64;
    let mut out = vec![0u8; MAGLEV_SIZE];
    if backends.is_empty() {
        return out;
    }
    // Which slots are taken (every index 0..=255 is a real backend, so none can mark "free").
    let mut taken = vec![false; MAGLEV_SIZE];
    let perms: Vec<(u64, u64)> = backends
        .iter()
        .map(|b| (hash(b, seed, 0) % m, hash(b, seed, 0x5bd1_e995) % (m - 1) + 1))
        .collect();
    let mut next = vec![0u64; backends.len()];
    let mut filled = 0;
    'fill: loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m;
            while taken[c as usize] {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            taken[c as usize] = true;
            out[c as usize] = i as u8;
            next[i] += 1;
            filled += 1;
            if filled == MAGLEV_SIZE {
                break 'fill;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(t: &[u8], i: u8) -> f64 {
        t.iter().filter(|&&b| b == i).count() as f64 / t.len() as f64
    }

    #[test]
    fn spreads_evenly() {
        let t = table(&["node1", "node2", "node3"], 42);
        for i in 0..3 {
            let s = share(&t, i);
            assert!((0.30..0.37).contains(&s), "backend {i} owns {s}");
        }
    }

    #[test]
    fn same_input_same_table_on_every_node() {
        assert_eq!(table(&["a", "b"], 7), table(&["a", "b"], 7));
        assert_ne!(table(&["a", "b"], 7), table(&["a", "b"], 8));
    }

    #[test]
    fn removing_a_backend_moves_few_other_flows() {
        let before = table(&["node1", "node2", "node3", "node4"], 1);
        let after = table(&["node1", "node2", "node4"], 1);
        let names_before = ["node1", "node2", "node3", "node4"];
        let names_after = ["node1", "node2", "node4"];
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| {
                let b = names_before[**b as usize];
                b != "node3" && b != names_after[**a as usize]
            })
            .count();
        // Entries of surviving backends that changed owner: Maglev keeps this small.
        let frac = moved as f64 / MAGLEV_SIZE as f64;
        assert!(frac < 0.05, "{frac} of the table moved between survivors");
    }

    #[test]
    fn the_largest_port_gives_each_of_256_backends_its_share() {
        let names: Vec<String> = (0..256).map(|i| format!("node{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let t = table(&refs, 5);
        let mut counts = [0usize; 256];
        for &b in &t {
            counts[b as usize] += 1;
        }
        let (min, max) = (
            counts.iter().min().copied().unwrap_or(0),
            counts.iter().max().copied().unwrap_or(0),
        );
        // Filled one slot per backend per turn: shares differ by one slot at most, and index 255
        // is a backend like the others.
        assert!(min >= MAGLEV_SIZE / 256 && max - min <= 1, "{min}..{max}");
    }

    #[test]
    fn every_entry_is_a_valid_backend() {
        let t = table(&["x"; 16], 3);
        assert!(t.iter().all(|&b| b < 16));
    }
}
