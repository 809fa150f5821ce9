//! Handoff between two agents on loopback (two data directories, the same base staged in
//! both, each trusting the other): a running instance moves while a client keeps calling
//! it and changing its state, and the client follows it.
//!
//! `handoff_with_a_stand_in_vmm` runs the agents' whole flow with `stand_in_vmm.py` (the
//! control and report frames of the real contract, a toy guest); `handoff_of_a_running_vm`
//! does it with the real vmm and VM.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agent::client::{Client, Session};
use micro_service::client::field;

use crate::common::{wait_for, AgentProc, Scratch, TABLE_ENTRIES};

const SECRET: &str = "a-secret-both-appliances-share-0123456789";
/// Entries of the disk table the caller writes.
const KEYS: u64 = 64;

/// What a caller saw.
struct Calls {
    /// Requests answered.
    n: u64,
    /// The value last put into each key (None: never written).
    last: Vec<Option<u64>>,
    /// Reconnections (after a break or a move).
    reconnects: u32,
    /// The longest time between two replies.
    max_gap: Duration,
    /// The agent and endpoint it ended on.
    agent: String,
    endpoint: String,
}

/// A client that keeps writing entries of the disk table, reading them back and checking
/// the guest's request counter (RAM) never goes back, until `stop`.
fn caller(api: Client, id: String, stop: Arc<AtomicBool>) -> JoinHandle<Calls> {
    std::thread::spawn(move || {
        let mut s = Session::open(&api, &id, Duration::from_secs(5)).unwrap();
        let mut c = Calls {
            n: 0,
            last: vec![None; KEYS as usize],
            reconnects: 0,
            max_gap: Duration::ZERO,
            agent: String::new(),
            endpoint: String::new(),
        };
        let mut served = 0u64;
        let mut at = Instant::now();
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let k = seq % KEYS;
            let v = 1_000_000 + seq;
            let r = s.request(&format!("put {k} {v}")).unwrap();
            assert_eq!(r, format!("ok put i={k} value={v}"));
            c.last[k as usize] = Some(v);
            let r = s.request(&format!("get {k}")).unwrap();
            assert_eq!(r, format!("ok get i={k} value={v}"), "the write is there");
            let r = s.request("stats").unwrap();
            let now: u64 = field(&r, "requests").unwrap().parse().unwrap();
            assert!(
                now > served,
                "the request counter went back: {now} after {served}"
            );
            served = now;
            c.n += 3;
            c.max_gap = c.max_gap.max(at.elapsed());
            at = Instant::now();
            seq += 1;
        }
        c.reconnects = s.reconnects;
        c.agent = s.agent().to_string();
        c.endpoint = s.endpoint().to_string();
        c
    })
}

/// Two agents on `vmm` (None: the built one) that trust each other, discovery off.
fn pair(name: &str, vmm: Option<&PathBuf>) -> (AgentProc, AgentProc) {
    let edits = [("enabled = true", "enabled = false")];
    let start = |n: &str| match vmm {
        Some(v) => AgentProc::start_with_vmm(n, &edits, v),
        None => AgentProc::start(n, &edits),
    };
    let (a, b) = (start(&format!("{name}-a")), start(&format!("{name}-b")));
    a.trust(&b, SECRET);
    b.trust(&a, SECRET);
    (a, b)
}

/// Runs a handoff of a fresh `model` instance from `a` to `b` while a caller keeps using
/// it; checks every write reached the target and the source holds nothing; returns what
/// the caller saw and the moved instance as the source shows it.
fn hand_off_under_load(a: &AgentProc, b: &AgentProc) -> (Calls, agent::http::InstanceView) {
    let c = a.client();
    let i = c.start("model").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let calls = caller(a.client(), i.id.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let moved = c.handoff(&i.id, &b.url, None).unwrap();
    let took = t0.elapsed();
    // Keep calling a little on the target.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let calls = calls.join().unwrap();

    assert_eq!(moved.state, "moved", "{moved:?}");
    let to = moved.moved_to.clone().unwrap();
    assert_eq!(to.agent, b.url);
    assert_eq!(to.url, format!("{}/v1/instances/{}", b.url, to.instance));
    let h = moved.handoff.clone().unwrap();
    assert_eq!(h.phase, "done");
    assert!(h.bytes > 0 && h.downtime_ms.is_some(), "{h:?}");
    eprintln!(
        "handoff: {took:?} over HTTP, downtime {:?} ms, {} bytes, {} rounds; client: {} calls, {} reconnects, longest gap {:?}",
        h.downtime_ms, h.bytes, h.round, calls.n, calls.reconnects, calls.max_gap
    );
    // The source tells where it went; the client followed it there.
    let raw = c
        .raw("GET", &format!("/v1/instances/{}", i.id), None, true)
        .unwrap();
    assert_eq!(raw.status, 200);
    assert_eq!(raw.json()["state"], "moved");
    assert_eq!(raw.json()["moved_to"]["url"], to.url.as_str());
    let (there, v) = c.resolve(&i.id).unwrap();
    assert_eq!(there.base(), b.url);
    assert_eq!(
        (v.id.as_str(), v.state.as_str()),
        (to.instance.as_str(), "running")
    );
    assert_eq!(Some(v.endpoint.clone()), to.endpoint);
    assert_eq!(calls.agent, b.url, "the caller ended on the target");
    assert_eq!(calls.endpoint, v.endpoint);
    assert!(calls.reconnects >= 1);
    // Every write is there, on the target.
    let mut s = Session::open(&b.client(), &v.id, Duration::from_secs(5)).unwrap();
    for (k, want) in calls.last.iter().enumerate() {
        if let Some(want) = want {
            assert_eq!(
                s.request(&format!("get {k}")).unwrap(),
                format!("ok get i={k} value={want}")
            );
        }
    }
    // The source holds no VM and no slot.
    assert!(a.live_vmms().is_empty(), "the source vmm is gone");
    assert_eq!(c.system().unwrap().instances, 0);
    assert_eq!(b.client().system().unwrap().instances, 1);
    let m = c.raw("GET", "/metrics", None, true).unwrap().body;
    assert!(
        m.contains("cloudlet_handoffs_total{role=\"source\",outcome=\"moved\"} 1"),
        "{m}"
    );
    assert!(m.contains("cloudlet_handoff_downtime_ms_count 1"), "{m}");
    let m = b.client().raw("GET", "/metrics", None, true).unwrap().body;
    assert!(
        m.contains("cloudlet_handoffs_total{role=\"target\",outcome=\"received\"} 1"),
        "{m}"
    );
    (calls, moved)
}

/// A refusal (the target does not trust the source) leaves the instance running on the
/// source, serving, and nothing on the target.
fn refused_handoff_changes_nothing(a: &AgentProc, untrusting: &AgentProc) {
    let c = a.client();
    let i = c.start("model").unwrap();
    let e = c
        .handoff(&i.id, &untrusting.url, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("502") && e.contains("401"), "{e}");
    let v = c.instance(&i.id).unwrap();
    assert_eq!(v.state, "running");
    assert!(v.handoff.unwrap().error.unwrap().contains("refused"));
    let mut s = Session::open(&c, &i.id, Duration::from_secs(5)).unwrap();
    assert_eq!(s.request("health").unwrap(), "ok health");
    assert!(untrusting.client().instances().unwrap().is_empty());
    assert!(untrusting.instance_files().is_empty());
    c.delete(&i.id).unwrap();
}

/// A handoff that fails in the rounds (the stand-in's test mode) leaves the instance
/// running on the source with its state, and the target with no process or file.
fn link_cut_changes_nothing(a: &AgentProc, b: &AgentProc) {
    let c = a.client();
    let i = c.start("model").unwrap();
    let mut s = Session::open(&c, &i.id, Duration::from_secs(5)).unwrap();
    assert_eq!(s.request("put 3 77").unwrap(), "ok put i=3 value=77");
    let e = c.handoff(&i.id, &b.url, Some(1)).unwrap_err().to_string();
    assert!(e.contains("502") && e.contains("link cut"), "{e}");
    let v = c.instance(&i.id).unwrap();
    assert_eq!(v.state, "running", "{v:?}");
    assert_eq!(v.handoff.unwrap().phase, "failed");
    assert_eq!(s.request("get 3").unwrap(), "ok get i=3 value=77");
    wait_for(
        Duration::from_secs(10),
        "the target to drop the handoff",
        || (b.instance_files().is_empty() && b.live_vmms().is_empty()).then_some(()),
    );
    assert!(b.client().instances().unwrap().is_empty());
    c.delete(&i.id).unwrap();
}

/// The stand-in vmm: a copy, executable, in a scratch directory.
pub fn stand_in() -> (Scratch, PathBuf) {
    let d = Scratch::new("stand-in");
    let p = d.path("vmm");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/stand_in_vmm.py"),
        &p,
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    (d, p)
}

#[test]
fn handoff_with_a_stand_in_vmm() {
    let (_d, vmm) = stand_in();
    let (a, b) = pair("ho-stub", Some(&vmm));
    let stranger = AgentProc::start_with_vmm(
        "ho-stranger",
        &[("enabled = true", "enabled = false")],
        &vmm,
    );
    a.trust(&stranger, SECRET);
    refused_handoff_changes_nothing(&a, &stranger);
    link_cut_changes_nothing(&a, &b);
    let (calls, _) = hand_off_under_load(&a, &b);
    assert!(calls.n > 30, "{}", calls.n);
    // The CLI: `cloudlet handoff` prints where it went; `cloudlet call ID` follows it.
    let j = a.client().start("model").unwrap();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloudlet"))
            .args(args)
            .args(["--agent", &a.url, "--token-file"])
            .arg(a.token_file())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "cloudlet {args:?}: {out:?}");
        text
    };
    let out = cli(&["handoff", &j.id, "--to", &b.url]);
    eprintln!("cloudlet handoff: {out}");
    assert!(
        out.contains("moved") && out.contains(&b.url) && out.contains("downtime"),
        "{out}"
    );
    assert_eq!(cli(&["call", &j.id, "health"]).trim(), "ok health");
    // The target's instances are instances like any other: they stop and go.
    for i in b.client().instances().unwrap() {
        b.client().delete(&i.id).unwrap();
    }
    assert!(b.live_vmms().is_empty());
}

#[test]
fn handoff_of_a_running_vm() {
    let (a, b) = pair("ho-vm", None);
    let stranger = AgentProc::start("ho-vm-stranger", &[("enabled = true", "enabled = false")]);
    a.trust(&stranger, SECRET);
    refused_handoff_changes_nothing(&a, &stranger);
    assert!(
        stranger.live_vmms().is_empty(),
        "the refusing target runs nothing"
    );

    let (calls, moved) = hand_off_under_load(&a, &b);
    const { assert!(KEYS + 4 < TABLE_ENTRIES) };
    // The refused handoff's start left a warm standby, on the service's shared RAM image:
    // that is what moved (its δ against the base includes pages it never wrote).
    assert!(moved.warm_start, "{moved:?}");
    assert!(a
        .data
        .join("services/model/versions/1/app.overlay.ram.id")
        .exists());
    let h = moved.handoff.unwrap();
    assert!(h.round >= 1, "{h:?}");
    // The guest's own state came along: the model and the table outside what was written.
    let to = moved.moved_to.unwrap();
    let ep = to.endpoint.unwrap();
    // The target's vmm (`vmm receive`) runs jailed, as every vmm an agent starts.
    let (_, there) = b.client().resolve(&to.instance).unwrap();
    crate::common::assert_jailed(&b.data, &to.instance, there.pid.unwrap());
    let mut s = Session::open(&b.client(), &to.instance, Duration::from_secs(5)).unwrap();
    for k in KEYS..KEYS + 4 {
        assert_eq!(
            s.request(&format!("get {k}")).unwrap(),
            micro_service::oracle::get_reply(k, micro_service::oracle::table_value(k))
        );
    }
    for q in [0u64, 5, 77_777] {
        assert_eq!(
            s.request(&format!("query {q}")).unwrap(),
            micro_service::oracle::query_reply(q)
        );
    }
    assert!(calls.n > 30, "{}", calls.n);
    // Handed back again, to the first appliance: it goes both ways.
    let back = b.client().handoff(&to.instance, &a.url, None).unwrap();
    assert_eq!(back.state, "moved");
    let again = back.moved_to.unwrap();
    let (_, v) = a.client().resolve(&again.instance).unwrap();
    assert_eq!(v.state, "running");
    assert_ne!(v.endpoint, ep);
    wait_for(Duration::from_secs(5), "the middle vmm to go", || {
        b.live_vmms().is_empty().then_some(())
    });
}
