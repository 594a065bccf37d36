//! A hash map keyed by guest addresses, for the tables a hit looks up (sites,
//! out-of-line slot ends). Std's SipHash guards against keys an attacker
//! picks to collide; here the keys are probe addresses the API already
//! accepted (each one a kernel instruction boundary), and SipHash cost a
//! tenth of an emulated hit in the hit path's profile.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Multiply-and-fold hash of one `u64`.
#[derive(Default, Clone, Copy)]
pub(crate) struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn write_u64(&mut self, x: u64) {
        // Fibonacci hashing; the fold brings the high bits (where the
        // multiplication mixes best) down to the bucket index.
        let h = (self.0 ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 32);
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A map from guest addresses.
pub(crate) type AddrMap<V> = HashMap<u64, V, BuildHasherDefault<AddrHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn neighbouring_addresses_spread_over_buckets() {
        let build = BuildHasherDefault::<AddrHasher>::default();
        // 4096 consecutive instruction addresses: the low 8 bits of their
        // hashes (a 256-bucket table's index) take most values.
        let base = 0xffff_ffff_8100_0000u64;
        let mut seen = [0u32; 256];
        for a in base..base + 4096 {
            seen[(build.hash_one(a) & 0xff) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 0 && n < 64), "{seen:?}");
        let mut m: AddrMap<u64> = AddrMap::default();
        for a in (base..base + 1000).step_by(5) {
            m.insert(a, a + 1);
        }
        assert_eq!(m.len(), 200);
        assert_eq!(m.get(&(base + 995)), Some(&(base + 996)));
        assert_eq!(m.get(&(base + 1)), None);
    }
}
