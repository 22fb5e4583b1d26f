//! A small deterministic generator: the same seed gives the same run on every machine.
//!
//! The same choices can also be read from a byte string ([`Rng::from_bytes`]): a fuzzer's
//! input then steers the checker, one byte per small choice, and the run ends when the
//! bytes do ([`Rng::exhausted`]).

/// Where the choices come from.
#[derive(Clone, Debug)]
enum Source {
    /// xorshift64*, seeded through splitmix64 so that nearby seeds give unrelated streams.
    Xorshift(u64),
    /// A byte string read from the front; zeros once it is used up.
    Bytes { data: Vec<u8>, pos: usize },
}

/// The checker's source of choices.
#[derive(Clone, Debug)]
pub struct Rng(Source);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng(Source::Xorshift((z ^ (z >> 31)) | 1))
    }

    /// Choices read from `data`: a choice among at most 256 takes one byte, a wider one
    /// as many as it needs (little-endian), [`Rng::next_u64`] eight.
    pub fn from_bytes(data: &[u8]) -> Rng {
        Rng(Source::Bytes {
            data: data.to_vec(),
            pos: 0,
        })
    }

    /// Whether a byte-string source has no bytes left (never, for a seeded generator).
    pub fn exhausted(&self) -> bool {
        match &self.0 {
            Source::Xorshift(_) => false,
            Source::Bytes { data, pos } => *pos >= data.len(),
        }
    }

    /// The next `n` bytes (at most 8) as a little-endian number.
    fn take(&mut self, n: usize) -> u64 {
        match &mut self.0 {
            Source::Xorshift(_) => self.next_u64(),
            Source::Bytes { data, pos } => {
                let mut word = [0u8; 8];
                let end = pos.saturating_add(n.min(8)).min(data.len());
                let got = data.get(*pos..end).unwrap_or(&[]);
                if let Some(dst) = word.get_mut(..got.len()) {
                    dst.copy_from_slice(got);
                }
                *pos = end.max(*pos);
                u64::from_le_bytes(word)
            }
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        match &mut self.0 {
            Source::Xorshift(s) => {
                *s ^= *s >> 12;
                *s ^= *s << 25;
                *s ^= *s >> 27;
                s.wrapping_mul(0x2545_f491_4f6c_dd1d)
            }
            Source::Bytes { .. } => self.take(8),
        }
    }

    /// A number in `0..n` (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let bytes = (64 - (n - 1).leading_zeros()).div_ceil(8).max(1) as usize;
        self.take(bytes) % n
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn byte_choices_take_one_byte_each_and_then_run_out() {
        let mut r = Rng::from_bytes(&[7, 0x34, 0x12, 250]);
        assert_eq!(r.below(10), 7);
        assert_eq!(r.below(0x1_0000), 0x1234);
        assert!(!r.exhausted());
        assert!(!r.chance(50), "250 % 100 = 50 is not below 50");
        assert!(r.exhausted());
        assert_eq!(r.next_u64(), 0);
    }

    #[test]
    fn seeded_generator_never_runs_out() {
        let mut r = Rng::new(3);
        let first = r.next_u64();
        assert_ne!(first, r.next_u64());
        assert!(!r.exhausted());
    }
}
