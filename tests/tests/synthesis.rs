//! VM synthesis end to end, as an operator does it: `image-builder base`, `image-builder
//! overlay --script`, `vmm synthesize`. The synthesised VM's memory is byte-identical to the
//! customised VM's, its service answers from the warm state, VMs share the base's clean pages
//! and not each other's writes, and bad overlays are refused before any vCPU runs with the
//! base left untouched.

use cloudlet_tests::Shared;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cloudlet_tests::{
    arg, file_digest, image_builder, make_base, make_overlay, micro_guest, run_vmm, vmm_snapshot,
    Scratch, Vmm,
};
use format::base::{DISK, KERNEL, MANIFEST, MEMORY, STATE};
use micro_service::oracle::{get_reply, model_entry, query_reply, table_image, table_value};

const T: Duration = Duration::from_secs(60);

/// Sends `query I` for each of `indices` on `vm`'s console and checks each answer against
/// the oracle.
fn check_queries(vm: &mut Vmm, indices: &[u64]) {
    for &i in indices {
        vm.send(&format!("query {i}\n"));
        let l = vm.expect_line(T, |l| l.starts_with("ok query") || l.starts_with("err"));
        assert_eq!(l, query_reply(i));
    }
}

/// One base, one 16 MiB-model overlay (with the customised snapshot kept), shared by the
/// tests of this file.
struct Images {
    base: PathBuf,
    overlay: PathBuf,
    custom: PathBuf,
}

fn images() -> &'static Images {
    static IMAGES: Shared<Images> = Shared::new("synth");
    IMAGES.get(|dir| {
        let base = make_base(&dir.path("base"), "128", &[]);
        let overlay = dir.path("model.overlay");
        let custom = dir.path("custom");
        make_overlay(
            &base,
            "load:16,query:7",
            &overlay,
            &["--keep-snapshot", arg(&custom)],
        );
        Images {
            base,
            overlay,
            custom,
        }
    })
}

fn synth_args(base: &Path, overlay: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        "synthesize".to_string(),
        "--base".into(),
        base.display().to_string(),
        "--overlay".into(),
        overlay.display().to_string(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn digests(dir: &Path) -> Vec<u64> {
    [MANIFEST, KERNEL, STATE, MEMORY]
        .iter()
        .map(|n| file_digest(&dir.join(n)))
        .collect()
}

#[test]
fn base_is_small_and_verifiable() {
    let img = images();
    let on_disk: u64 = [MANIFEST, KERNEL, STATE, MEMORY]
        .iter()
        .map(|n| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(img.base.join(n)).unwrap().blocks() * 512
        })
        .sum();
    assert!(
        on_disk <= 8 << 20,
        "base is {on_disk} bytes on disk, budget 8 MiB"
    );
    let fin = image_builder(&["verify", arg(&img.base)]);
    assert!(fin.stdout[0].contains("is intact"));
}

#[test]
fn synthesised_memory_is_byte_identical_and_the_service_answers_from_warm_state() {
    // Lazy (the default: pages filled on first touch and in the background) and eager.
    identical_and_answers("synth-identical-lazy", &[]);
    identical_and_answers("synth-identical-eager", &["--eager"]);
}

fn identical_and_answers(name: &str, mode: &[&str]) {
    let img = images();
    let s = Scratch::new(name);
    let sock = s.path("vm.sock");
    // Paused: nothing has run since synthesis, so its memory must equal the customised VM's.
    let sock_arg = sock.display().to_string();
    let mut args = vec!["--paused", "--api-sock", &sock_arg];
    args.extend_from_slice(mode);
    let mut vm = Vmm::spawn(synth_args(&img.base, &img.overlay, &args));
    while !sock.exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let snap = s.path("snap");
    vmm_snapshot(&sock_arg, &snap, true, T);
    assert_eq!(
        file_digest(&snap.join(MEMORY)),
        file_digest(&img.custom.join(MEMORY)),
        "synthesised RAM equals the customised VM's RAM"
    );
    let ok = run_vmm(["resume", "--api-sock", &sock.display().to_string()], T);
    assert_eq!(ok.code(), 0);
    check_queries(&mut vm, &[0, 7, 123_456, 2_097_151]);
    let (stats, _) = vm.stats_and_poweroff(0, T);
    // load and query ran while the overlay was made; the 4 queries and stats here.
    assert!(stats.contains("requests=7"), "{stats}");
}

/// Lazy synthesis with the background fill held back: every page the guest needs comes
/// through the fault path (a whole chunk decompressed per fault), answers are right, and the
/// synthesised RAM is still byte-identical once the fill completes.
#[test]
fn lazy_synthesis_serves_first_touches_through_faults() {
    let img = images();
    let s = Scratch::new("synth-faults");
    let sock = s.path("vm.sock");
    let sock_arg = sock.display().to_string();
    let mut vm = Vmm::spawn(synth_args(
        &img.base,
        &img.overlay,
        &["-v", "--prefetch-delay-ms", "1500", "--api-sock", &sock_arg],
    ));
    // Entries spread over the 16 MiB table: each lies in a different chunk.
    check_queries(&mut vm, &[5, 700_000, 1_400_001, 2_097_151, 3]);
    // A snapshot waits for the fill; the model table must then be complete in its memory
    // image (the table lives at guest physical 16 MiB), even where no query touched it.
    let snap = s.path("snap");
    vmm_snapshot(&sock_arg, &snap, false, T);
    let image = std::fs::read(snap.join(MEMORY)).unwrap();
    for i in [1u64, 1_048_576, 2_000_000] {
        let at = (16 << 20) + 8 * i as usize;
        let v = u64::from_le_bytes(image[at..at + 8].try_into().unwrap());
        assert_eq!(v, model_entry(i), "entry {i} in the snapshot's memory");
    }
    vm.send("query 1048576\npoweroff 0\n");
    let l = vm.expect_line(T, |l| l.starts_with("ok query"));
    assert_eq!(l, query_reply(1_048_576));
    let done = vm.finish(T);
    assert_eq!(done.code(), 0, "{}", done.stderr);
    let faults: u64 = done
        .stderr
        .split("lazy fill: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no lazy fill report in: {}", done.stderr));
    // The first chunk (the guest's own pages and the table's start, where entries 3 and 5
    // are) is filled before the vCPUs run; the other three entries lie in three other chunks.
    assert!(
        faults >= 3,
        "expected the queries to fault: {}",
        done.stderr
    );
}

/// Shared_Clean and Private_Dirty (KiB) of the mapping of `file` in process `pid`.
fn mapping_of(pid: u32, file: &Path) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let name = file.canonicalize().unwrap().display().to_string();
    let (mut inside, mut shared, mut private) = (false, 0, 0);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            inside = line.ends_with(&name);
        } else if inside {
            let v = || {
                line.split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            };
            match first {
                "Shared_Clean:" => shared += v(),
                "Private_Dirty:" => private += v(),
                _ => {}
            }
        }
    }
    (shared, private)
}

#[test]
fn two_vms_share_the_base_and_not_each_others_writes() {
    let img = images();
    let before = digests(&img.base);
    let mut a = Vmm::spawn(synth_args(&img.base, &img.overlay, &[]));
    let mut b = Vmm::spawn(synth_args(&img.base, &img.overlay, &[]));
    // a rebuilds its model smaller (overwriting its first 1 MiB), b keeps the original.
    a.send("load 1\nquery 5\n");
    b.send("query 5\n");
    let qa = a.expect_line(T, |l| l.starts_with("ok query"));
    let qb = b.expect_line(T, |l| l.starts_with("ok query"));
    assert_eq!(qa, qb, "same data either way");
    a.send("query 200000\n");
    assert!(
        a.expect_line(T, |l| l.starts_with("err") || l.starts_with("ok query"))
            .starts_with("err"),
        "a's table is now 1 MiB"
    );
    b.send("query 200000\n");
    assert_eq!(
        b.expect_line(T, |l| l.starts_with("ok query")),
        query_reply(200_000),
        "b does not see a's writes"
    );
    // Both map the base memory file and share its clean pages through the page cache.
    let mem = img.base.join(MEMORY);
    let (sa, _) = mapping_of(a.pid(), &mem);
    let (sb, _) = mapping_of(b.pid(), &mem);
    assert!(
        sa > 0 && sb > 0,
        "base pages shared: a {sa} KiB, b {sb} KiB"
    );
    a.send("poweroff\n");
    b.send("poweroff\n");
    assert_eq!(a.finish(T).code(), 0);
    assert_eq!(b.finish(T).code(), 0);
    assert_eq!(digests(&img.base), before, "the base is never modified");
}

/// `vmm synthesize` must fail with `needle` in its message, print nothing from the guest, and
/// leave the base unchanged.
fn refused(base: &Path, overlay: &Path, needle: &str) {
    let before = digests(base);
    let fin = run_vmm(synth_args(base, overlay, &["--no-stdin"]), T);
    assert_eq!(fin.code(), 1, "{fin:?}");
    assert!(
        fin.stderr.contains(needle),
        "expected {needle:?} in {}",
        fin.stderr
    );
    assert!(fin.stdout.is_empty(), "no guest ran: {:?}", fin.stdout);
    assert!(!fin.stderr.contains("panicked"));
    assert_eq!(digests(base), before);
}

#[test]
fn bad_overlays_are_refused_before_any_vcpu_runs() {
    let img = images();
    let s = Scratch::new("synth-bad");
    let good = std::fs::read(&img.overlay).unwrap();
    let write = |name: &str, bytes: &[u8]| s.write(name, bytes);
    refused(
        &img.base,
        &write("cut", &good[..good.len() / 2]),
        "not a usable overlay",
    );
    // A flipped bit in a chunk (just after the header) and in the index (at the end).
    let mut chunk = good.clone();
    chunk[200] ^= 1;
    refused(&img.base, &write("chunk", &chunk), "checksum mismatch");
    let mut index = good.clone();
    let n = index.len();
    index[n - 20] ^= 0x40;
    refused(
        &img.base,
        &write("index", &index),
        "index checksum mismatch",
    );
    let mut version = good.clone();
    version[8] = 7;
    refused(&img.base, &write("version", &version), "format version 7");
    refused(&img.base, &write("empty", b""), "truncated");

    // An overlay for another base: a base with another command line has another id.
    let other = make_base(
        &s.path("other-base"),
        "128",
        &["--cmdline", "console=ttyS0 other"],
    );
    refused(&other, &img.overlay, "applies to base");
}

/// A base with a root disk and a NIC; an overlay whose customisation wrote the disk. The
/// write travels as the overlay's disk δ (not just in the guest's RAM cache): a snapshot of
/// the synthesised VM holds it in its own δ, and the base's disk is never written.
#[test]
fn disk_delta_travels_in_the_overlay_and_the_base_disk_is_never_written() {
    let s = Scratch::new("synth-disk");
    let table = s.write("table.img", &table_image(5000, 1 << 20));
    let base = make_base(&s.path("base"), "64", &["--disk", arg(&table), "--net"]);
    let base_disk = base.join(DISK);
    let before = file_digest(&base_disk);
    assert_eq!(
        before,
        file_digest(&table),
        "the base keeps the disk as given"
    );
    let overlay = s.path("app.overlay");
    let fin = make_overlay(&base, "put:7:42,put:4000:9", &overlay, &[]);
    assert!(
        fin.stdout[0].contains("disk δ: 2 blocks"),
        "entries 7 and 4000 lie in two disk blocks: {fin:?}"
    );
    let sock = s.path("vm.sock");
    let sock_arg = sock.display().to_string();
    let mut vm = Vmm::spawn(synth_args(&base, &overlay, &["--api-sock", &sock_arg]));
    for (i, want) in [
        (7u64, 42u64),
        (4000, 9),
        (8, table_value(8)),
        (4999, table_value(4999)),
    ] {
        vm.send(&format!("get {i}\n"));
        let l = vm.expect_line(T, |l| l.starts_with("ok get") || l.starts_with("err"));
        assert_eq!(l, get_reply(i, want));
    }
    let snap = s.path("snap");
    vmm_snapshot(&sock_arg, &snap, false, T);
    vm.send("poweroff 0\n");
    assert_eq!(vm.finish(T).code(), 0);
    let state = vmm::snapshot::read_state(&snap).unwrap();
    let blocks = vmm::snapshot::read_disk_delta(&snap, &state).unwrap();
    let entry = |b: &[u8], i: u64| {
        let at = (512 + 8 * i as usize) % 4096;
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    };
    let block_of = |i: u64| (512 + 8 * i) / 4096;
    let find = |i: u64| {
        blocks
            .iter()
            .find(|(n, _)| *n == block_of(i))
            .unwrap_or_else(|| {
                panic!(
                    "no δ block for entry {i}: {:?}",
                    blocks.iter().map(|b| b.0).collect::<Vec<_>>()
                )
            })
    };
    assert_eq!(entry(&find(7).1, 7), 42);
    assert_eq!(entry(&find(4000).1, 4000), 9);
    assert_eq!(
        file_digest(&base_disk),
        before,
        "the base disk is never written"
    );
}

/// A base with a virtio console (`image-builder base --console`): the overlay's script is
/// typed on that console, and a VM synthesised from it answers there, from memory filled
/// ahead and on first touch.
#[test]
fn a_console_base_synthesises_and_answers_on_its_virtio_console() {
    let s = Scratch::new("synth-console");
    let base = make_base(&s.path("base"), "64", &["--console"]);
    let overlay = s.path("model.overlay");
    make_overlay(&base, "load:8", &overlay, &[]);
    // Typed before the VM exists: delivered into the console's receive buffers at start.
    let mut vm = Vmm::spawn(synth_args(&base, &overlay, &[]));
    check_queries(&mut vm, &[5, 0, 1_048_575]);
    powers_off_on_the_virtio_console(vm);
}

/// `vmm run --console` boots the micro guest with its console on virtio: banner, a request
/// and power-off all go through it.
#[test]
fn run_with_a_console_talks_over_virtio() {
    let kernel = micro_guest();
    let mut vm = Vmm::spawn([
        "run".to_string(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--mem".into(),
        "64".into(),
        "--console".into(),
    ]);
    vm.expect_line(T, |l| l.starts_with("micro-guest "));
    vm.send("primes 1000\n");
    let l = vm.expect_line(T, |l| l.starts_with("ok primes"));
    assert!(l.starts_with("ok primes N=1000 count=168"), "{l}");
    powers_off_on_the_virtio_console(vm);
}

/// `stats` and `poweroff 0` on `vm`'s console: the guest says its console is virtio and
/// answers the power-off there.
fn powers_off_on_the_virtio_console(mut vm: Vmm) {
    let (stats, fin) = vm.stats_and_poweroff(0, T);
    assert!(stats.ends_with(" console=virtio"), "{stats}");
    assert!(
        fin.stdout.iter().any(|l| l == "ok poweroff code=0"),
        "{fin:?}"
    );
}

/// A copy of the shared overlay in `s` (its RAM image files then stay in `s` too).
fn overlay_copy(s: &Scratch, name: &str) -> PathBuf {
    let p = s.path(name);
    std::fs::copy(&images().overlay, &p).unwrap();
    p
}

/// `vmm ram-image` for `overlay`; returns its stdout.
fn ram_image(overlay: &Path) -> String {
    let fin = run_vmm(
        [
            "ram-image",
            "--base",
            arg(&images().base),
            "--overlay",
            arg(overlay),
        ],
        T,
    );
    assert_eq!(fin.code(), 0, "{fin:?}");
    fin.stdout.join("\n")
}

/// Whether a `synthesize -v` of `overlay` mapped its shared RAM image, and the guest answers.
fn synthesised_shared(overlay: &Path) -> bool {
    let mut vm = Vmm::spawn(synth_args(&images().base, overlay, &["-v"]));
    check_queries(&mut vm, &[5, 2_097_151]);
    vm.send("poweroff\n");
    let fin = vm.finish(T);
    assert_eq!(fin.code(), 0, "{}", fin.stderr);
    assert!(fin.stderr.contains("synthesised in"), "{}", fin.stderr);
    fin.stderr.contains("map shared RAM image")
}

/// `vmm ram-image` writes the service's RAM image once; every synthesis of that base and
/// overlay then maps it: the synthesised RAM is byte-identical to the customised VM's, the
/// instances share the image's pages (the δ included) and not each other's writes, and the
/// image is never written.
#[test]
fn instances_of_a_service_share_its_ram_image() {
    let img = images();
    let s = Scratch::new("synth-ram-image");
    let overlay = overlay_copy(&s, "model.overlay");
    let out = ram_image(&overlay);
    assert!(out.contains("MiB of data, written in"), "{out}");
    let image = format::ram_image::image_path(&overlay);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 128 << 20);
    assert!(ram_image(&overlay).contains("is up to date"));
    let image_digest = file_digest(&image);

    // Paused: its memory is the customised VM's, page for page.
    let sock = s.path("vm.sock");
    let sock_arg = sock.display().to_string();
    let mut vm = Vmm::spawn(synth_args(
        &img.base,
        &overlay,
        &["-v", "--paused", "--api-sock", &sock_arg],
    ));
    while !sock.exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let snap = s.path("snap");
    vmm_snapshot(&sock_arg, &snap, false, T);
    assert_eq!(
        file_digest(&snap.join(MEMORY)),
        file_digest(&img.custom.join(MEMORY)),
        "synthesised RAM equals the customised VM's RAM"
    );
    vm.send("poweroff\n");
    let fin = vm.finish(T);
    assert!(
        fin.stderr.contains("map shared RAM image"),
        "{}",
        fin.stderr
    );

    let mut a = Vmm::spawn(synth_args(&img.base, &overlay, &[]));
    let mut b = Vmm::spawn(synth_args(&img.base, &overlay, &[]));
    check_queries(&mut a, &[5, 1_048_576, 2_097_151]);
    check_queries(&mut b, &[5, 1_048_576, 2_097_151]);
    a.send("load 1\nquery 200000\n");
    assert!(a
        .expect_line(T, |l| l.starts_with("err") || l.starts_with("ok query"))
        .starts_with("err"));
    check_queries(&mut b, &[200_000]);
    // The 16 MiB model the queries read is δ: both read it from the image's page cache.
    let (sa, _) = mapping_of(a.pid(), &image);
    let (sb, _) = mapping_of(b.pid(), &image);
    assert!(
        sa > 8 << 10 && sb > 8 << 10,
        "δ pages shared: a {sa} KiB, b {sb} KiB"
    );
    a.send("poweroff\n");
    b.send("poweroff\n");
    assert_eq!(a.finish(T).code(), 0);
    assert_eq!(b.finish(T).code(), 0);
    assert_eq!(
        file_digest(&image),
        image_digest,
        "the image is never written"
    );
}

/// An image that does not match the overlay file as it is now (rewritten), or whose id is
/// damaged, or which is cut short, is never mapped: synthesis applies the overlay as usual.
/// A damaged overlay writes no image.
#[test]
fn a_stale_or_damaged_ram_image_is_never_used() {
    let s = Scratch::new("synth-ram-stale");
    let overlay = overlay_copy(&s, "model.overlay");
    ram_image(&overlay);
    assert!(synthesised_shared(&overlay));

    // The same bytes in a new file: another identity.
    let bytes = std::fs::read(&overlay).unwrap();
    let tmp = s.write("rewritten", &bytes);
    std::fs::rename(&tmp, &overlay).unwrap();
    assert!(
        !synthesised_shared(&overlay),
        "a rewritten overlay voids its image"
    );
    assert!(ram_image(&overlay).contains("written in"));
    assert!(synthesised_shared(&overlay));

    let id = format::ram_image::id_path(&overlay);
    let good = std::fs::read(&id).unwrap();
    let mut bad = good.clone();
    bad[40] ^= 1;
    std::fs::write(&id, &bad).unwrap();
    assert!(!synthesised_shared(&overlay), "a damaged id is ignored");
    std::fs::write(&id, &good).unwrap();

    let image = format::ram_image::image_path(&overlay);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    assert!(!synthesised_shared(&overlay), "a short image is ignored");

    let mut chunk = bytes.clone();
    chunk[200] ^= 1;
    let damaged = s.write("damaged.overlay", &chunk);
    let fin = run_vmm(
        [
            "ram-image",
            "--base",
            arg(&images().base),
            "--overlay",
            arg(&damaged),
        ],
        T,
    );
    assert_eq!(fin.code(), 1, "{fin:?}");
    assert!(
        fin.stderr.contains("failed to write the RAM image")
            && fin.stderr.contains("checksum mismatch"),
        "{}",
        fin.stderr
    );
    assert!(!format::ram_image::image_path(&damaged).exists());
    assert!(!format::ram_image::id_path(&damaged).exists());
}
