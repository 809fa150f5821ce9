//! Handoff between two agents in two network namespaces joined by a veth pair shaped to
//! 100 Mbit/s (made and removed by the test): agent A in namespace A, agent B in namespace
//! B, each listening on its end's address (so over HTTPS, each pinning the other's
//! certificate) and trusting the other. A client inside A keeps
//! changing the VM's state (`put` into the disk table, `incr` of a counter in RAM) while the
//! instance is handed off A → B over the agents' API; afterwards, from inside B, the target
//! answers every acknowledged change, and A's record is `moved` to B with its vmm gone.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use micro_service::client::{field, Client as Guest, DEFAULT_TIMEOUT};
use micro_service::oracle::{count_reply, get_reply, query_reply, table_value};
use netlab::{Ns, Pair, Shape};

use crate::common::{wait_for, AgentProc, TABLE_ENTRIES};

const SECRET: &str = "a-secret-both-namespaced-appliances-share";
/// The link's rate, each way.
const LINK_MBIT: u64 = 100;
/// Entries of the disk table the client writes.
const KEYS: u64 = 64;

/// What the client had acknowledged when it stopped.
#[derive(Debug, Default)]
struct Acked {
    /// Table entries, the last value acknowledged for each.
    puts: BTreeMap<u64, u64>,
    /// The counter before the first `incr`.
    first_count: u64,
    /// The counter as last acknowledged.
    count: Option<u64>,
    /// A put sent whose answer never came: it may or may not have been applied.
    unsure_put: Option<(u64, u64)>,
    /// The request left unanswered was an `incr` (it may have counted).
    unsure_incr: bool,
    /// Why it stopped (empty: it ran out of time instead).
    error: String,
}

/// Keeps sending `put K V` and `incr` to `endpoint`, one request at a time, until the
/// first error (the source VM is gone) or `deadline`; `progress` counts answered requests.
fn writer(endpoint: &str, progress: &AtomicU64, deadline: Instant) -> Acked {
    let mut g = Guest::connect(endpoint, DEFAULT_TIMEOUT).unwrap();
    let r = g.request("count").unwrap();
    let mut a = Acked {
        first_count: field(&r, "n").and_then(|n| n.parse().ok()).unwrap(),
        ..Acked::default()
    };
    for j in 0u64.. {
        if Instant::now() > deadline {
            break;
        }
        let (k, v) = (j % KEYS, 2_000_000 + j);
        match g.request(&format!("put {k} {v}")) {
            Ok(r) => assert_eq!(r, format!("ok put i={k} value={v}")),
            Err(e) => {
                a.unsure_put = Some((k, v));
                a.error = e.to_string();
                break;
            }
        }
        a.puts.insert(k, v);
        match g.request("incr") {
            Ok(r) => {
                let n = field(&r, "n").and_then(|n| n.parse::<u64>().ok());
                let want = a.count.unwrap_or(a.first_count) + 1;
                assert_eq!(n, Some(want), "one client, one incr at a time: {r}");
                a.count = n;
            }
            Err(e) => {
                a.unsure_incr = true;
                a.error = e.to_string();
                break;
            }
        }
        progress.fetch_add(2, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(2));
    }
    a
}

/// An agent inside `ns`, listening on its address, discovery off.
fn agent_in(name: &str, ns: &Ns) -> AgentProc {
    let listen = format!("listen = [\"{}\"]", ns.addr());
    AgentProc::start_in(
        name,
        &[
            ("enabled = true", "enabled = false"),
            ("listen = [\"127.0.0.1\"]", &listen),
        ],
        ns.name(),
    )
}

#[test]
fn handoff_between_namespaces_under_load() {
    let t0 = Instant::now();
    // Declared first, dropped last: the agents go (killing their vmms) before the lab.
    let lab = Pair::new().expect("two network namespaces (root and iproute2 needed)");
    lab.shape(Shape::mbit(LINK_MBIT)).unwrap();
    let (a, b) = (agent_in("ho-ns-a", lab.a()), agent_in("ho-ns-b", lab.b()));
    a.trust(&b, SECRET);
    b.trust(&a, SECRET);
    assert_eq!(a.url, format!("https://{}", a.addr()));
    assert!(a.url.contains(&lab.a().addr().to_string()), "{}", a.url);
    assert!(b.url.contains(&lab.b().addr().to_string()), "{}", b.url);

    let (ca, cb) = (a.client(), b.client());
    let i = lab.a().run_in(|| ca.start("model")).unwrap().unwrap();
    let pid = i.pid.expect("a running instance has a vmm pid");
    assert!(agent::supervisor::pid_alive(pid));

    let progress = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let (acked, moved, took) = std::thread::scope(|s| {
        let w = s.spawn(|| {
            lab.a()
                .run_in(|| writer(&i.endpoint, &progress, deadline))
                .unwrap()
        });
        wait_for(
            Duration::from_secs(10),
            "the client's first answers",
            || (progress.load(Ordering::Relaxed) >= 100 || w.is_finished()).then_some(()),
        );
        let t = Instant::now();
        let moved = lab.a().run_in(|| ca.handoff(&i.id, &b.url, None)).unwrap();
        let took = t.elapsed();
        let moved =
            moved.unwrap_or_else(|e| panic!("handoff: {e}\nA:\n{}\nB:\n{}", a.log(), b.log()));
        // The source's vmm goes, so the client's connection breaks.
        wait_for(Duration::from_secs(5), "the source vmm to exit", || {
            (!agent::supervisor::pid_alive(pid)).then_some(())
        });
        (w.join().unwrap(), moved, took)
    });
    assert!(
        !acked.error.is_empty(),
        "the client wrote until the source stopped: {acked:?}"
    );
    assert!(acked.puts.len() > 5, "{acked:?}");

    // A's record: moved, pointing at B; no vmm, no slot.
    assert_eq!(moved.state, "moved", "{moved:?}");
    let to = moved.moved_to.clone().unwrap();
    assert_eq!(to.agent, b.url);
    assert_eq!(to.url, format!("{}/v1/instances/{}", b.url, to.instance));
    let h = moved.handoff.clone().unwrap();
    assert_eq!(h.phase, "done", "{h:?}");
    let (rec, sys_a) = lab
        .a()
        .run_in(|| (ca.instance(&i.id).unwrap(), ca.system().unwrap()))
        .unwrap();
    assert_eq!(rec.state, "moved", "{rec:?}");
    assert_eq!(rec.moved_to.unwrap().agent, b.url);
    assert_eq!(sys_a.instances, 0);
    assert!(!agent::supervisor::pid_alive(pid), "the source vmm is gone");
    assert!(a.live_vmms().is_empty(), "A holds no vmm");

    // From inside B: every acknowledged change is there.
    let last = acked.count.unwrap_or(acked.first_count);
    let counts = if acked.unsure_incr {
        last..=last + 1
    } else {
        last..=last
    };
    lab.b()
        .run_in(|| {
            let v = cb.instance(&to.instance).unwrap();
            assert_eq!(v.state, "running", "{v:?}");
            assert_eq!(Some(v.endpoint.clone()), to.endpoint);
            assert_eq!(v.received_from.as_deref(), Some(a.id().as_str()));
            assert_eq!(cb.system().unwrap().instances, 1);
            let mut g = Guest::connect(&v.endpoint, DEFAULT_TIMEOUT).unwrap();
            let mut ask = |q: &str| g.request(q).unwrap_or_else(|e| panic!("{q}: {e}"));
            for k in 0..KEYS {
                let got = ask(&format!("get {k}"));
                let acked_v = acked.puts.get(&k).copied().unwrap_or(table_value(k));
                match acked.unsure_put {
                    Some((u, w)) if u == k => assert!(
                        got == get_reply(k, w) || got == get_reply(k, acked_v),
                        "entry {k} (put {w} unanswered): {got}"
                    ),
                    _ => assert_eq!(got, get_reply(k, acked_v), "entry {k}"),
                }
            }
            const { assert!(KEYS + 4 < TABLE_ENTRIES) };
            for k in KEYS..KEYS + 4 {
                assert_eq!(ask(&format!("get {k}")), get_reply(k, table_value(k)));
            }
            for q in [0u64, 5, 77_777] {
                assert_eq!(ask(&format!("query {q}")), query_reply(q));
            }
            let r = ask("count");
            let n: u64 = field(&r, "n").unwrap().parse().unwrap();
            assert!(
                counts.contains(&n),
                "counter {n}, acknowledged {last} (unsure incr: {})",
                acked.unsure_incr
            );
            assert_eq!(r, count_reply(n));
            assert_eq!(ask("put 9 99"), "ok put i=9 value=99");
            drop(g);
            cb.delete(&v.id).unwrap();
        })
        .unwrap();
    wait_for(Duration::from_secs(5), "the target vmm to go", || {
        b.live_vmms().is_empty().then_some(())
    });
    eprintln!(
        "netns handoff at {LINK_MBIT} Mbit/s: {took:?} over HTTPS, downtime {:?} ms, {} bytes, {} rounds; \
         client: {} puts, counter {last} (unsure put {:?}, unsure incr {}), stopped on: {}; whole test {:.1} s",
        h.downtime_ms,
        h.bytes,
        h.round,
        acked.puts.len(),
        acked.unsure_put,
        acked.unsure_incr,
        acked.error,
        t0.elapsed().as_secs_f64()
    );
}
