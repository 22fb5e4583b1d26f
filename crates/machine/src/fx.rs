//! A multiplicative (FxHash-style) hasher for the simulator's own keys: frame and page
//! numbers it chooses itself, so resistance to chosen keys buys nothing, while SipHash cost
//! more than the rest of a memory read or a TLB lookup together. Deterministic: iteration
//! order of a map built with it depends only on what was inserted.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// The hasher.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u32(&mut self, word: u32) {
        self.write_u64(u64::from(word));
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0xf135_7aea_2e62_a9c5);
    }

    fn finish(&self) -> u64 {
        // The product's high bits mix every key bit; the table indexes by the low ones.
        self.0.rotate_left(26)
    }
}

/// A `HashMap` hashed with [`FxHasher`].
pub(crate) type FxHashMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn neighbouring_page_numbers_spread_over_the_low_bits() {
        let build = BuildHasherDefault::<FxHasher>::default();
        let buckets: std::collections::BTreeSet<u64> =
            (0..256u64).map(|page| build.hash_one(page) & 255).collect();
        assert!(buckets.len() > 128, "{} buckets of 256", buckets.len());
    }

    #[test]
    fn the_hash_is_the_same_every_run() {
        let build = BuildHasherDefault::<FxHasher>::default();
        assert_eq!(
            build.hash_one((12u32, 0x1234u64)),
            build.hash_one((12u32, 0x1234u64))
        );
        assert_ne!(
            build.hash_one((12u32, 0x1234u64)),
            build.hash_one((21u32, 0x1234u64))
        );
    }
}
