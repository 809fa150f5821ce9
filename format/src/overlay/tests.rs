//! Round trips through the writer and the reader: apply, lazy page sources, damage, shared
//! checks, the disk δ.

use super::fixtures::{applied, images, scratch, write, PAGES};
use super::writer::page;
use super::*;
use crate::PAGE_SIZE;

#[test]
fn apply_reproduces_the_customised_memory_exactly() {
    let (base, new) = images();
    let (path, stats) = write("rt", &base, &new);
    assert_eq!(stats.pages, PAGES as u64);
    assert_eq!(stats.zero, 1);
    assert_eq!(stats.base_dedup, 1);
    // 189 data pages filled with 128 distinct odd bytes: 61 or more repeats.
    assert!(stats.self_dedup >= 61, "{stats:?}");
    assert_eq!(
        stats.same + stats.zero + stats.base_dedup + stats.self_dedup + stats.data,
        stats.pages
    );
    let ov = Overlay::open(&path).unwrap();
    assert_eq!(ov.index().state, b"STATE");
    ov.check_base(&[7; 32]).unwrap();
    assert!(matches!(
        ov.check_base(&[8; 32]),
        Err(OverlayError::WrongBase { .. })
    ));
    for threads in [1, 2, 3] {
        assert!(
            applied(&ov, &base, threads).unwrap() == new,
            "threads = {threads}"
        );
    }
}

/// An overlay read from memory is the one read from its file: same index, same RAM applied,
/// every chunk checked, no verification record.
#[test]
fn overlays_open_from_bytes_as_from_files() {
    let (base, new) = images();
    let (path, _) = write("bytes", &base, &new);
    let from_file = Overlay::open(&path).unwrap();
    let ov = Overlay::from_bytes("mem", std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(ov.index(), from_file.index());
    assert_eq!(ov.base_id(), &[7; 32]);
    ov.verify_chunks(2).unwrap();
    assert!(applied(&ov, &base, 2).unwrap() == new);
    ov.record_verified();
    assert!(!ov.verified_before());
    let mut bad = std::fs::read(&path).unwrap();
    bad[ov.index().chunks[0].offset as usize] ^= 1;
    let ov = Overlay::from_bytes("mem", bad).unwrap();
    assert!(matches!(
        ov.verify_chunks(1),
        Err(OverlayError::Chunk {
            source: ChunkError::Checksum,
            ..
        })
    ));
}

/// Filling each rewritten page once, from its final source, in reverse order (as a lazy
/// applier might), gives the same memory as `apply`.
#[test]
fn page_sources_reproduce_the_customised_memory_in_any_order() {
    use crate::sources::{PageSources, Source};
    let (base, new) = images();
    let (path, stats) = write("lazy", &base, &new);
    let ov = Overlay::open(&path).unwrap();
    ov.verify_chunks(2).unwrap();
    let src = PageSources::new(ov.index());
    assert_eq!(src.len() as u64, stats.pages - stats.same);
    let mut mem = base.clone();
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    for i in 0..ov.index().chunks.len() {
        let mut b = Vec::new();
        ov.read_chunk(i, &mut b).unwrap();
        chunks.push(b);
    }
    for r in src.runs().iter().rev() {
        for p in (r.first..r.first + r.count).rev() {
            let bytes = match src.get(p).unwrap() {
                Source::Zero => vec![0u8; PAGE_SIZE],
                Source::Base(b) => page(&base, b).to_vec(),
                Source::Chunk { chunk, index } => {
                    page(&chunks[chunk as usize], u64::from(index)).to_vec()
                }
            };
            mem[p as usize * PAGE_SIZE..(p as usize + 1) * PAGE_SIZE].copy_from_slice(&bytes);
        }
    }
    assert!(mem == new);
    let listed: usize = (0..src.chunks())
        .map(|c| src.chunk_pages(c).len())
        .sum::<usize>()
        + src.other_pages().len();
    assert_eq!(listed, src.len());
}

#[test]
fn damaged_overlays_are_refused_before_or_while_applying() {
    let (base, new) = images();
    let (path, _) = write("bad", &base, &new);
    let good = std::fs::read(&path).unwrap();
    let apply = |ov: Overlay| applied(&ov, &base, 2).map(|_| ());
    // The file and the same bytes in memory are judged alike.
    let try_bytes = |b: &[u8]| -> Result<(), OverlayError> {
        std::fs::write(&path, b).unwrap();
        let from_file = Overlay::open(&path).and_then(apply);
        let in_memory = Overlay::from_bytes("mem", b.to_vec()).and_then(apply);
        assert_eq!(
            from_file.is_ok(),
            in_memory.is_ok(),
            "{from_file:?} {in_memory:?}"
        );
        from_file
    };
    // Truncations.
    for cut in [
        0,
        10,
        HEADER_LEN - 1,
        HEADER_LEN,
        good.len() / 2,
        good.len() - 1,
    ] {
        assert!(try_bytes(&good[..cut]).is_err(), "cut at {cut}");
    }
    // A flipped bit anywhere (sampled), header, chunks and index alike.
    for at in (0..good.len())
        .step_by(97)
        .chain([8, 12, 44, 70, good.len() - 3])
    {
        let mut b = good.clone();
        b[at] ^= 0x04;
        assert!(try_bytes(&b).is_err(), "flip at {at}");
    }
    let mut v3 = good.clone();
    v3[8] = 3;
    let e = try_bytes(&v3).unwrap_err();
    assert!(
        matches!(
            &e,
            OverlayError::Invalid(_, Malformed::Header(HeaderError::Version(3)))
        ),
        "{e:?}"
    );
    try_bytes(&good).unwrap();
}

/// A shared pass checks each chunk once across workers, stops at a damaged chunk, and a
/// finished pass checks nothing however many workers join.
#[test]
fn shared_chunk_checks() {
    let (base, new) = images();
    let (path, _) = write("shared-checks", &base, &new);
    let mut bytes = std::fs::read(&path).unwrap();
    let ov = Overlay::open(&path).unwrap();
    let at = ov.index().chunks[1].offset as usize + 2;
    drop(ov);
    bytes[at] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let ov = Overlay::open(&path).unwrap();
    let checks = ChunkChecks::new();
    checks.work(&ov);
    checks.work(&ov);
    assert!(checks.result().is_err(), "chunk 1 is damaged");
    let done = ChunkChecks::finished();
    for _ in 0..3 {
        done.work(&ov);
    }
    assert!(done.result().is_ok(), "a finished pass checks nothing");
}

/// The disk δ rides in the overlay and comes back block for block; damage to a disk chunk
/// is caught by the up-front check.
#[test]
fn disk_delta_round_trips_and_is_checked() {
    let (base, new) = images();
    let out = scratch("disk").join("app.overlay");
    let blocks: Vec<(u64, Vec<u8>)> = [9u64, 2, 3, 700]
        .iter()
        .map(|&b| (b, vec![b as u8 ^ 0x5a; PAGE_SIZE]))
        .collect();
    let disk = DiskDelta {
        disk_bytes: 1024 * PAGE_SIZE as u64,
        blocks: &blocks,
    };
    let opts = BuildOptions {
        level: 1,
        chunk_pages: 2,
        threads: 2,
    };
    let stats = build(&base, &new, &[7; 32], vec![], Some(disk), &out, opts).unwrap();
    assert_eq!(stats.disk_blocks, 4);
    let ov = Overlay::open(&out).unwrap();
    assert_eq!(ov.index().disk_bytes, 1024 * PAGE_SIZE as u64);
    // Blocks 2 and 3 share a chunk; 9 and 700 are too far from their neighbours.
    assert_eq!(ov.index().disk_chunks.len(), 3);
    ov.verify_chunks(2).unwrap();
    let mut want = blocks.clone();
    want.sort_by_key(|(b, _)| *b);
    assert_eq!(ov.disk_blocks().unwrap(), want);
    // Flip a byte inside the last disk chunk.
    let last = ov.index().disk_chunks.last().unwrap().clone();
    drop(ov);
    let mut bytes = std::fs::read(&out).unwrap();
    bytes[last.offset as usize + 1] ^= 1;
    std::fs::write(&out, &bytes).unwrap();
    let ov = Overlay::open(&out).unwrap();
    assert!(matches!(
        ov.verify_chunks(1),
        Err(OverlayError::Chunk {
            source: ChunkError::Checksum,
            ..
        })
    ));
    // A block beyond the disk is refused at build time.
    let bad = vec![(5000u64, vec![0u8; PAGE_SIZE])];
    let disk = DiskDelta {
        disk_bytes: 1024 * PAGE_SIZE as u64,
        blocks: &bad,
    };
    assert!(build(&base, &new, &[7; 32], vec![], Some(disk), &out, opts).is_err());
}
