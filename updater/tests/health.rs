//! `cloudlet-update check-health` against a stand-in agent (plain HTTP on loopback, as the
//! agent serves there) and a stand-in `systemctl`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cloudlet-update");

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("updater-health-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Serves `GET /v1/system` as the agent does, on a free loopback port; returns its URL.
fn fake_agent() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let info = agent::http::SystemInfo {
        id: "cl-test".into(),
        board: "dev".into(),
        version: "0.2.0".into(),
        api: "1".into(),
        cores: 2,
        vm_cpus: 2,
        load1: 0.0,
        mem_total_mib: 1024,
        mem_free_mib: 512,
        vm_memory_mib: 256,
        vm_memory_used_mib: 0,
        instances: 0,
        max_vms: 4,
        builds: 0,
        build_memory_mib: 0,
        bases: vec![],
        services: vec![],
        services_digest: String::new(),
        uptime_s: 1,
        fingerprint: String::new(),
        boot: None,
    };
    let body = serde_json::to_string(&info).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let ok = req.starts_with(b"GET /v1/system ");
            let (status, body) = if ok {
                ("200 OK", body.as_str())
            } else {
                ("404 Not Found", "{}")
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

/// A `systemctl` that answers `show` with `state` and `restarts`.
fn fake_systemctl(dir: &std::path::Path, state: &str, restarts: u32) -> PathBuf {
    let p = dir.join("systemctl");
    std::fs::write(
        &p,
        format!("#!/bin/sh\necho ActiveState={state}\necho NRestarts={restarts}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// Runs the check with a 1 s settle time.
fn check(data: &std::path::Path, systemctl: &std::path::Path, timeout_s: u32) -> (Output, f64) {
    let t = Instant::now();
    let o = Command::new(BIN)
        .arg("--data-dir")
        .arg(data)
        .args([
            "check-health",
            "--settle-s",
            "1",
            "--timeout-s",
            &timeout_s.to_string(),
            "--systemctl",
        ])
        .arg(systemctl)
        .output()
        .unwrap();
    (o, t.elapsed().as_secs_f64())
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn healthy_once_the_agent_answers() {
    let d = scratch("ok");
    let sc = fake_systemctl(&d, "active", 0);
    let url = fake_agent();
    // The agent writes api.url a moment after the check starts.
    let file = d.join("api.url");
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        std::fs::write(file, format!("{url}\n")).unwrap();
    });
    let (o, secs) = check(&d, &sc, 20);
    writer.join().unwrap();
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("healthy: the agent (board dev, version 0.2.0)"),
        "{}",
        stdout(&o)
    );
    assert!(secs < 10.0, "{secs}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn unhealthy_when_the_unit_failed_or_restarts() {
    let d = scratch("failed");
    for (state, restarts, says) in [
        ("failed", 1, "is failed after 1 restarts"),
        ("activating", 3, "is activating after 3 restarts"),
    ] {
        let sc = fake_systemctl(&d, state, restarts);
        let (o, secs) = check(&d, &sc, 60);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        assert!(stdout(&o).contains(says), "{}", stdout(&o));
        // Early, not at the timeout.
        assert!(secs < 10.0, "{secs}");
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn unhealthy_at_the_timeout() {
    let d = scratch("timeout");
    let sc = fake_systemctl(&d, "active", 0);
    let (o, _) = check(&d, &sc, 1);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("within 1 s"), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("api.url not written yet"),
        "{}",
        stdout(&o)
    );

    // An api.url from before this boot, nothing listening there: its failure says it was stale.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let f = d.join("api.url");
    std::fs::write(&f, format!("http://{dead}\n")).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1000))
        .unwrap();
    let (o, _) = check(&d, &sc, 1);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("written before this boot"),
        "{}",
        stdout(&o)
    );

    // The same old file naming a live agent: only a live agent answers, so it counts (the
    // clock of a box without RTC may jump after the agent wrote it).
    std::fs::write(&f, format!("{}\n", fake_agent())).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1000))
        .unwrap();
    let (o, _) = check(&d, &sc, 5);
    assert!(o.status.success(), "{}", stdout(&o));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn an_agent_that_restarts_between_answers_is_not_healthy() {
    let d = scratch("flapping");
    std::fs::write(d.join("api.url"), format!("{}\n", fake_agent())).unwrap();
    // Each `systemctl show` sees one more restart.
    let sc = d.join("systemctl");
    std::fs::write(
        &sc,
        format!(
            "#!/bin/sh\nn=$(cat {c} 2>/dev/null || echo 0)\necho $((n+1)) > {c}\n\
             echo ActiveState=active\necho NRestarts=$n\n",
            c = d.join("count").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&sc, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (o, secs) = check(&d, &sc, 60);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains("after 3 restarts"), "{}", stdout(&o));
    assert!(secs < 20.0, "{secs}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// The real agent, in this process, on every address: `api.url` says `https://127.0.0.1:PORT`
/// and the check asks it with the appliance certificate from the data directory pinned.
#[test]
fn healthy_over_pinned_https_with_the_real_agent() {
    let d = scratch("https");
    let data = d.join("data");
    let board = agent::board::Board::parse(
        &format!(
            "name = \"dev\"\n[vms]\ncpus = 1\nmemory_mib = 256\nmax_vms = 1\nnetwork = \"user\"\n\
             [api]\nlisten = [\"0.0.0.0\"]\nport = 0\n[discovery]\nenabled = false\n\
             [storage]\ndata_dir = \"{}\"\n",
            data.display()
        ),
        "test board",
        None,
    )
    .unwrap();
    let opts = agent::daemon::Options {
        board,
        vmm: d.join("no-vmm"),
        image_builder: d.join("no-image-builder"),
        stop_on_exit: true,
        warm: false,
        jail: false,
        cgroups: false,
        token_file: None,
        boot: Default::default(),
    };
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let _ = rt.block_on(agent::daemon::run(opts));
    });
    let sc = fake_systemctl(&d, "active", 0);
    let (o, _) = check(&data, &sc, 30);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("answered on https://127.0.0.1:"),
        "{}",
        stdout(&o)
    );

    // Another certificate in the data directory than the agent's: the pin refuses it.
    std::fs::write(data.join("tls/cert.der"), b"not the agent's certificate").unwrap();
    let (o, _) = check(&data, &sc, 2);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains("is pinned"), "{}", stdout(&o));
    let _ = std::fs::remove_dir_all(&d);
}
