//! Final guest memory of two runs, compared page by page in 8-byte words.

use std::collections::BTreeSet;

/// Bytes of a guest page.
const PAGE: usize = 4096;
/// Bytes of a compared word.
const WORD: usize = 8;

/// How two runs' final guest memory differs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryDiff {
    /// 8-byte words that differ (left-out words not counted).
    pub words: u64,
    /// The guest-physical address of the first differing word.
    pub first: Option<u64>,
}

/// Compares guest frames `0..frames` of two memories, read a page at a time by `a` and `b`
/// (each filling the buffer with the page at a guest-physical address). Words whose
/// guest-physical address is in `left_out` are not compared (they belong to a backend, not
/// the guest).
pub fn compare(
    frames: u64,
    mut a: impl FnMut(u64, &mut [u8]) -> Result<(), String>,
    mut b: impl FnMut(u64, &mut [u8]) -> Result<(), String>,
    left_out: &BTreeSet<u64>,
) -> Result<MemoryDiff, String> {
    let mut pa = vec![0u8; PAGE];
    let mut pb = vec![0u8; PAGE];
    let mut diff = MemoryDiff::default();
    for frame in 0..frames {
        let gpa = frame * PAGE as u64;
        a(gpa, &mut pa)?;
        b(gpa, &mut pb)?;
        if pa == pb {
            continue;
        }
        for (i, (wa, wb)) in pa.chunks_exact(WORD).zip(pb.chunks_exact(WORD)).enumerate() {
            let at = gpa + (i * WORD) as u64;
            if wa != wb && !left_out.contains(&at) {
                diff.words += 1;
                diff.first.get_or_insert(at);
            }
        }
    }
    Ok(diff)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A memory of `frames` pages of zeros but the bytes given.
    fn memory(frames: u64, bytes: &[(u64, u8)]) -> Vec<u8> {
        let mut m = vec![0u8; frames as usize * PAGE];
        for &(at, v) in bytes {
            m[at as usize] = v;
        }
        m
    }

    fn reader(m: &[u8]) -> impl FnMut(u64, &mut [u8]) -> Result<(), String> + '_ {
        |gpa, buf| {
            let from = gpa as usize;
            buf.copy_from_slice(&m[from..from + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn equal_memories_have_no_differences() {
        let m = memory(3, &[(5, 1), (8000, 2)]);
        let d = compare(3, reader(&m), reader(&m), &BTreeSet::new()).unwrap();
        assert_eq!(d, MemoryDiff::default());
    }

    #[test]
    fn differing_words_are_counted_once_each_and_the_first_is_named() {
        let a = memory(3, &[]);
        // Two bytes in one word of page 1, one byte in each of two words of page 2.
        let b = memory(
            3,
            &[(4096 + 17, 1), (4096 + 18, 1), (8192, 1), (8192 + 4095, 1)],
        );
        let d = compare(3, reader(&a), reader(&b), &BTreeSet::new()).unwrap();
        assert_eq!(d.words, 3);
        assert_eq!(d.first, Some(4096 + 16));
    }

    #[test]
    fn left_out_words_are_not_counted() {
        let a = memory(2, &[]);
        let b = memory(2, &[(4096 + 3, 9), (4096 + 8, 9)]);
        let left_out = BTreeSet::from([4096]);
        let d = compare(2, reader(&a), reader(&b), &left_out).unwrap();
        assert_eq!(d.words, 1);
        assert_eq!(d.first, Some(4096 + 8));
    }

    #[test]
    fn only_the_frames_asked_for_are_read() {
        let a = memory(2, &[]);
        let b = memory(2, &[(4096, 1)]);
        let d = compare(1, reader(&a), reader(&b), &BTreeSet::new()).unwrap();
        assert_eq!(d.words, 0);
    }

    #[test]
    fn a_read_error_is_returned() {
        let a = memory(1, &[]);
        let failing = |_: u64, _: &mut [u8]| Err("gone".to_string());
        assert_eq!(
            compare(1, reader(&a), failing, &BTreeSet::new()),
            Err("gone".to_string())
        );
    }
}
