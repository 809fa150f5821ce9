//! `image-builder import` end to end: a table disk an operator holds as a compressed qcow2
//! (made with `qemu-img`) is imported with the CLI, then a service VM (the micro guest under
//! our vmm) reads it as its virtio disk and answers from it as the oracle says; a refused
//! image leaves nothing behind and says why.

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use cloudlet_tests::{micro_guest, run_image_builder, Scratch, Vmm};
use micro_service::client::Client;
use micro_service::oracle;

const ENTRIES: u64 = 3000;

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_imported_qcow2_disk_serves_a_vm() {
    let s = Scratch::new("import-e2e");
    let raw = s.write("table.raw", &oracle::table_image(ENTRIES, 1 << 20));
    let qcow2 = s.path("table.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        qcow2.to_str().unwrap(),
    ]);
    let disk = s.path("service.disk");
    let fin = run_image_builder(
        [
            "import".as_ref(),
            qcow2.as_os_str(),
            "--out".as_ref(),
            disk.as_os_str(),
        ],
        Duration::from_secs(60),
    );
    assert!(fin.status.success(), "{}", fin.stderr);
    assert!(
        fin.stdout.iter().any(|l| l.contains("read back equal")),
        "{:?}",
        fin.stdout
    );
    assert_eq!(std::fs::read(&disk).unwrap(), std::fs::read(&raw).unwrap());

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut vm = Vmm::spawn([
        "run".as_ref(),
        "--kernel".as_ref(),
        micro_guest().as_os_str(),
        "--mem".as_ref(),
        "64".as_ref(),
        "--disk".as_ref(),
        disk.as_os_str(),
        "--forward".as_ref(),
        format!("127.0.0.1:{port}=10.0.2.15:80").as_ref(),
    ]);
    vm.expect_line(Duration::from_secs(20), |l| l.starts_with("micro-guest "));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut c =
        Client::connect_when_up(addr, Duration::from_secs(20), Duration::from_secs(2)).unwrap();
    c.expect(
        "disk",
        &format!("ok disk sectors=2048 ro=0 magic=CLDTABLE entries={ENTRIES}"),
    )
    .unwrap();
    for i in [0, 1, 777, ENTRIES - 1] {
        c.expect(
            &format!("get {i}"),
            &oracle::get_reply(i, oracle::table_value(i)),
        )
        .unwrap();
    }
}

#[test]
fn a_refused_import_says_why_and_installs_nothing() {
    let s = Scratch::new("import-refused");
    let base = s.path("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1M"]);
    let child = s.path("child.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        child.to_str().unwrap(),
    ]);
    let out = s.path("service.disk");
    let fin = run_image_builder(
        [
            "import".as_ref(),
            child.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ],
        Duration::from_secs(60),
    );
    assert_eq!(fin.status.code(), Some(1));
    assert!(
        fin.stderr.contains("has a backing file") && fin.stderr.contains("qemu-img convert"),
        "the message says what is wrong and what to do: {}",
        fin.stderr
    );
    assert!(!out.exists());
    let mut left: Vec<String> = std::fs::read_dir(s.path(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["base.qcow2", "child.qcow2"]);
}
