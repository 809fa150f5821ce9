//! Encryption and the hostile LAN: the API is HTTPS off loopback and clients pin the
//! appliance's certificate; plain HTTP stays on loopback; an advertiser of `_cloudlet._tcp`
//! that accepts and never answers delays discovery by the probe deadline at most and is
//! shown unverified; a wildcard listen announces only the addresses it serves.

use std::collections::BTreeMap;
use std::net::{IpAddr, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

use agent::client::{
    choose, rank, Client, ClientError, PinEntry, PinStore, Trust, PINS_ENV, PROBE_TIMEOUT,
};
use agent::discovery::{browse_until, SERVICE_TYPE};
use netlab::Pair;

use crate::common::{run_agent_cmd, AgentProc, Scratch};

fn cloudlet() -> &'static str {
    env!("CARGO_BIN_EXE_cloudlet")
}

/// Runs `cmd`; returns (success, stdout, stderr).
fn output(cmd: &mut Command) -> (bool, String, String) {
    let o = cmd.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn https_off_loopback_is_pinned_and_plain_http_stays_on_loopback() {
    let lab = Pair::new().expect("two network namespaces (root and iproute2 needed)");
    let ns_addr = lab.a().addr().to_string();
    let listen = format!("listen = [\"{ns_addr}\"]");
    let a = AgentProc::start_in(
        "tls-ns",
        &[
            ("enabled = true", "enabled = false"),
            ("listen = [\"127.0.0.1\"]", &listen),
        ],
        lab.a().name(),
    );
    assert!(
        a.url.starts_with(&format!("https://{ns_addr}:")),
        "{}",
        a.url
    );
    // api.addr keeps "IP:PORT" for what reads it.
    let addr_file = std::fs::read_to_string(a.data.join("api.addr")).unwrap();
    assert_eq!(addr_file.trim(), a.addr());
    let fp = a.fingerprint();

    // From the other appliance's namespace: the right pin works, the fingerprint is shown.
    let sys = lab.b().run_in(|| a.client().system()).unwrap().unwrap();
    assert_eq!(sys.fingerprint, fp);
    let listed = lab.b().run_in(|| a.client().instances()).unwrap().unwrap();
    assert!(listed.is_empty());
    // A wrong pin is refused, naming both fingerprints; no pin is refused too.
    let wrong = "0f".repeat(32);
    let e = lab
        .b()
        .run_in(|| Client::pinned(&a.url, Some(&a.token()), &wrong).system())
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, ClientError::Pin { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(&fp) && msg.contains(&wrong), "{msg}");
    let e = lab
        .b()
        .run_in(|| Client::new(&a.url, None).system())
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, ClientError::Unpinned { .. }), "{e:?}");
    // Plain HTTP to the HTTPS port gets no answer from the API.
    let plain = a.url.replacen("https://", "http://", 1);
    let r = lab
        .b()
        .run_in(|| {
            Client::new(&plain, None)
                .with_timeout(Duration::from_secs(3))
                .raw("GET", "/v1/system", None, false)
        })
        .unwrap();
    assert!(!matches!(r, Ok(ref r) if r.status == 200), "{r:?}");

    // The CLI: --fingerprint, a wrong one, trust on first use (pinned in the store), and
    // then the store alone.
    let d = Scratch::new("tls-cli");
    let pins = d.path("pins.json");
    let cli = |args: &[&str]| {
        let mut c = lab.b().command(cloudlet());
        c.env(PINS_ENV, &pins)
            .env(agent::auth::TOKEN_ENV, a.token())
            .args(["--agent", &a.url])
            .args(args);
        output(&mut c)
    };
    let (ok, out, err) = cli(&["info", "--fingerprint", &fp]);
    assert!(ok && out.contains(&sys.id), "{out}{err}");
    let (ok, _, err) = cli(&["info", "--fingerprint", &wrong]);
    assert!(!ok && err.contains(&fp) && err.contains(&wrong), "{err}");
    let (ok, _, err) = cli(&["info"]);
    assert!(!ok && err.contains("--trust-first-use"), "{err}");
    assert!(!pins.exists(), "a refusal pins nothing");
    let (ok, out, err) = cli(&["info", "--trust-first-use"]);
    assert!(
        ok && out.contains(&sys.id) && err.contains(&fp),
        "{out}{err}"
    );
    assert_eq!(PinStore::at(&pins).get(&sys.id), Some(fp.clone()));
    let (ok, out, err) = cli(&["list"]);
    assert!(ok, "{out}{err}");

    // Loopback: plain HTTP, the fingerprint still shown.
    let l = AgentProc::start("tls-lo", &[("enabled = true", "enabled = false")]);
    assert!(l.url.starts_with("http://127.0.0.1:"), "{}", l.url);
    let s = Client::new(&l.url, None).system().unwrap();
    assert_eq!(s.fingerprint, l.fingerprint());
    let urls = std::fs::read_to_string(l.data.join("api.url")).unwrap();
    assert_eq!(urls.trim(), l.url);
}

/// A `_cloudlet._tcp` advertiser whose port accepts connections and never answers, with an
/// attractive TXT record (idle, lots of room) and a made-up fingerprint.
struct Rogue {
    daemon: mdns_sd::ServiceDaemon,
    instance: String,
    _held: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Rogue {
    fn start(addrs: &[IpAddr]) -> Rogue {
        let l = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = held.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                h.lock().unwrap().push(s);
            }
        });
        let instance = format!("cloudlet-rogue-{}", std::process::id());
        let txt: BTreeMap<&str, String> = [
            ("id", "00000000beef".to_string()),
            ("port", port.to_string()),
            ("api", "v1".into()),
            ("cores", "16".into()),
            ("load", "0.0".into()),
            ("memfree", "65536".into()),
            ("vms", "0/64".into()),
            ("fp", "ee".repeat(32)),
            ("tls", "all".into()),
        ]
        .into_iter()
        .collect();
        let props: Vec<(&str, &str)> = txt.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let info = mdns_sd::ServiceInfo::new(
            SERVICE_TYPE,
            &instance,
            &format!("{instance}.local."),
            addrs,
            port,
            &props[..],
        )
        .unwrap();
        let daemon = mdns_sd::ServiceDaemon::new().unwrap();
        daemon.register(info).unwrap();
        Rogue {
            daemon,
            instance,
            _held: held,
        }
    }
}

impl Drop for Rogue {
    fn drop(&mut self) {
        let _ = self.daemon.shutdown();
    }
}

#[test]
fn a_silent_advertiser_stalls_nothing_and_is_never_chosen() {
    // Appliance A listens on every IPv4 address of its namespace (HTTPS everywhere); the
    // rogue advertises there too; the client browses from the other namespace, across the
    // veth, as a phone on the LAN would.
    let lab = Pair::new().expect("two network namespaces (root and iproute2 needed)");
    let a = AgentProc::start_in(
        "tls-mdns",
        &[("listen = [\"127.0.0.1\"]", "listen = [\"0.0.0.0\"]")],
        lab.a().name(),
    );
    assert!(a.url.starts_with("https://127.0.0.1:"), "{}", a.url);
    let sys = lab.a().run_in(|| a.client().system()).unwrap().unwrap();
    let me = format!("cloudlet-dev-{}", sys.id);
    let rogue = lab
        .a()
        .run_in(|| Rogue::start(&[IpAddr::V4(lab.a().addr())]))
        .unwrap();

    let both = |f: &[agent::discovery::Appliance]| {
        [&me, &rogue.instance]
            .iter()
            .all(|n| f.iter().any(|x| &x.instance == *n))
    };
    let found = lab
        .b()
        .run_in(|| browse_until(Duration::from_secs(10), both))
        .unwrap()
        .unwrap();
    assert!(both(&found), "not both resolved: {found:?}");
    // 0.0.0.0 serves IPv4 only, so no IPv6 (link-local) address is announced: only the
    // namespace's address reaches the other end (browsing a while, as the addresses of
    // each interface come in their own answers).
    let all = lab
        .b()
        .run_in(|| agent::discovery::browse(Duration::from_secs(3)))
        .unwrap()
        .unwrap();
    let mine = all.iter().find(|x| x.instance == me).unwrap();
    assert_eq!(mine.addrs, vec![IpAddr::V4(lab.a().addr())], "{mine:?}");
    assert_eq!(mine.txt.get("fp"), Some(&sys.fingerprint));
    assert_eq!(mine.txt.get("tls").map(String::as_str), Some("all"));

    // Probed in parallel: the silent one costs the probe deadline, not a minute.
    let pins = vec![PinEntry {
        id: sys.id.clone(),
        fingerprint: sys.fingerprint.clone(),
        name: String::new(),
    }];
    let t0 = Instant::now();
    let ranked = lab.b().run_in(|| rank(found.clone(), &pins)).unwrap();
    let took = t0.elapsed();
    assert!(
        took < PROBE_TIMEOUT + Duration::from_millis(1500),
        "ranking took {took:?}"
    );
    let r = ranked
        .iter()
        .find(|r| r.appliance.instance == rogue.instance)
        .unwrap();
    assert_eq!((r.trust, r.rtt_ms), (Trust::Unverified, None), "{r:?}");
    let m = ranked.iter().find(|r| r.appliance.instance == me).unwrap();
    assert_eq!(m.trust, Trust::Pinned, "{m:?}");
    assert_eq!(m.url, format!("https://{}:{}", lab.a().addr(), mine.port));
    let chosen = choose(ranked.clone(), &pins).unwrap();
    assert_eq!(chosen.appliance.instance, me);
    // Without a pin for it, the real appliance is unverified as well, and with a pin store
    // nothing unverified is chosen.
    let other = vec![PinEntry {
        id: "0123456789ab".into(),
        fingerprint: "12".repeat(32),
        name: String::new(),
    }];
    let unpinned = lab.b().run_in(|| rank(found.clone(), &other)).unwrap();
    assert!(
        unpinned.iter().all(|r| r.trust == Trust::Unverified),
        "{unpinned:?}"
    );
    assert!(choose(unpinned, &other).is_none());

    // The CLI: `discover` shows the rogue unverified and returns promptly; `list` (which
    // chooses by itself) uses the pinned appliance.
    let d = Scratch::new("tls-pins");
    let pins_file = d.path("pins.json");
    PinStore::at(&pins_file)
        .add(&sys.id, &sys.fingerprint, "")
        .unwrap();
    let t0 = Instant::now();
    let (ok, out, err) = output(lab.b().command(cloudlet()).env(PINS_ENV, &pins_file).args([
        "discover",
        "--browse-ms",
        "3000",
    ]));
    let took = t0.elapsed();
    assert!(ok, "{out}{err}");
    assert!(
        took < Duration::from_secs(3) + PROBE_TIMEOUT + Duration::from_secs(2),
        "discover took {took:?}"
    );
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .map(str::to_string)
    };
    let l = line(&rogue.instance).unwrap_or_else(|| panic!("the rogue is not listed: {out}"));
    assert!(l.contains("unverified"), "{l}");
    assert!(line(&me).is_some_and(|l| l.contains("pinned")), "{out}");
    let (ok, out, err) = output(
        lab.b()
            .command(cloudlet())
            .env(PINS_ENV, &pins_file)
            .env(agent::auth::TOKEN_ENV, a.token())
            .args(["list", "--browse-ms", "3000"]),
    );
    assert!(ok, "{out}{err}");
    assert!(err.contains(&me) && err.contains("Pinned"), "{err}");
    drop(rogue);
}

#[test]
fn a_handoff_over_https_needs_the_target_pinned() {
    let (_d, vmm) = crate::handoff::stand_in();
    let everywhere = [
        ("listen = [\"127.0.0.1\"]", "listen = [\"0.0.0.0\"]"),
        ("enabled = true", "enabled = false"),
    ];
    let a = AgentProc::start_with_vmm("tls-ho-a", &everywhere, &vmm);
    let b = AgentProc::start_with_vmm("tls-ho-b", &everywhere, &vmm);
    assert!(b.url.starts_with("https://"), "{}", b.url);
    let secret = "a-secret-both-https-appliances-share-0123";
    b.trust(&a, secret);
    let c = a.client();
    let i = c.start("model").unwrap();
    // Trusted without a fingerprint, then with another one: refused, nothing moves.
    let wrong = "0f".repeat(32);
    let bid = b.id();
    let secret_file = a.dir.path("peer.secret");
    agent::auth::write_private(&secret_file, secret.as_bytes()).unwrap();
    let secret_path = secret_file.to_str().unwrap();
    for fp in [None, Some(wrong.as_str())] {
        let mut args = vec!["add-peer", &bid, "--secret-file", secret_path];
        if let Some(f) = fp {
            args.extend(["--fingerprint", f]);
        }
        run_agent_cmd(&args, &a.data);
        let e = c.handoff(&i.id, &b.url, None).unwrap_err().to_string();
        assert!(
            e.contains("422") && e.contains("does not pin") && e.contains(&b.fingerprint()),
            "{e}"
        );
        let v = c.instance(&i.id).unwrap();
        assert_eq!(v.state, "running", "{v:?}");
        assert!(b.client().instances().unwrap().is_empty());
    }
    // Pinned: it moves, over HTTPS.
    a.trust(&b, secret);
    let moved = c.handoff(&i.id, &b.url, None).unwrap();
    assert_eq!(moved.state, "moved", "{moved:?}");
    let to = moved.moved_to.unwrap();
    assert_eq!(to.agent, b.url);
    let there = b.client().instance(&to.instance).unwrap();
    assert_eq!(there.state, "running", "{there:?}");
}
