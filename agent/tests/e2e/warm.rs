//! Warm standbys: a start of a service started before hands out the standby the previous
//! start left (see `agent::warm`).

use std::process::Command;
use std::time::Duration;

use agent::supervisor::pid_alive;

use crate::common::{built, images, verify_guest, wait_for, AgentProc};

/// The next standby of `a` other than `not`, once its vmm is up.
fn next_standby(a: &AgentProc, not: &[&str]) -> (String, u32) {
    wait_for(Duration::from_secs(20), "a warm standby", || {
        a.standbys()
            .into_iter()
            .find(|(id, _)| !not.contains(&id.as_str()))
    })
}

/// A second start hands out the standby the first left: it is a new instance with its own
/// files and port, it answers as the oracle says, another standby is made behind it, and an
/// agent that exits leaves no vmm of a standby behind.
#[test]
fn a_second_start_hands_out_the_standby_the_first_left() {
    let mut a = AgentProc::start("warm", &[]);
    let c = a.client();
    let first = c.start("model").unwrap();
    assert!(!first.warm_start, "nothing was warm yet: {first:?}");
    let (standby, pid) = next_standby(&a, &[]);
    assert_ne!(standby, first.id);
    wait_for(Duration::from_secs(10), "the standby in /metrics", || {
        let m = c.raw("GET", "/metrics", None, true).unwrap().body;
        m.contains("cloudlet_warm_standbys 1").then_some(())
    });
    assert_eq!(
        c.instances().unwrap().len(),
        1,
        "a standby is not an instance"
    );

    let second = c.start("model").unwrap();
    assert!(second.warm_start, "{second:?}");
    assert_eq!(
        (second.id.as_str(), second.pid),
        (standby.as_str(), Some(pid))
    );
    assert_eq!(second.state, "running");
    // Its guest answered before it was handed out.
    assert!(second.first_reply_ms.unwrap() > 0.0, "{second:?}");
    assert_ne!(second.endpoint, first.endpoint);
    verify_guest(&second.endpoint);
    verify_guest(&first.endpoint);
    wait_for(Duration::from_secs(5), "the taken standby's record", || {
        let dir = a.data.join("instances");
        (dir.join(format!("{standby}.json")).exists()
            && !dir.join(&standby).join(agent::warm::PID_FILE).exists())
        .then_some(())
    });

    let (next, next_pid) = next_standby(&a, &[&standby]);
    assert_eq!(c.instances().unwrap().len(), 2);
    // A stopped instance is stopped; the standby stays for the next start.
    c.stop(&second.id).unwrap();
    assert!(a.standbys().contains(&(next.clone(), next_pid)));

    a.terminate();
    assert!(!pid_alive(next_pid), "the agent killed its standby on exit");
    assert!(!a.data.join("instances").join(&next).exists());
}

/// A standby of an overlay that was replaced since is not handed out; the start synthesises
/// the new overlay.
#[test]
fn a_replaced_overlay_is_not_served_from_a_stale_standby() {
    let a = AgentProc::start("warm-stale", &[]);
    let c = a.client();
    let first = c.start("model").unwrap();
    let (stale, stale_pid) = next_standby(&a, &[]);

    let newer = a.dir.path("newer.overlay");
    let out = Command::new(built("image-builder"))
        .args(["overlay", "--base"])
        .arg(&images().base)
        .args(["--script", "load:2", "--out"])
        .arg(&newer)
        .output()
        .unwrap();
    assert!(out.status.success(), "image-builder overlay: {out:?}");
    c.upload_overlay("model", &newer).unwrap();

    let second = c.start("model").unwrap();
    assert!(!second.warm_start, "{second:?}");
    assert_ne!(second.id, stale);
    wait_for(Duration::from_secs(10), "the stale standby's end", || {
        (!pid_alive(stale_pid)).then_some(())
    });
    let mut g =
        agent::guest::GuestConn::connect(second.endpoint.as_str(), Duration::from_secs(5)).unwrap();
    assert_eq!(g.request("health").unwrap(), "ok health");
    drop(first);
}

/// A standby left by an agent that was killed is killed and removed by the next agent, which
/// re-adopts the instance that ran.
#[test]
fn a_restarted_agent_removes_the_standby_a_killed_one_left() {
    let mut a = AgentProc::start_opts("warm-crash", &[], false);
    let c = a.client();
    let first = c.start("model").unwrap();
    let (standby, pid) = next_standby(&a, &[]);
    let mut child = a.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        pid_alive(pid),
        "a standby outlives its agent until the next one"
    );

    a.spawn();
    wait_for(Duration::from_secs(5), "the old standby's end", || {
        (!pid_alive(pid)).then_some(())
    });
    assert!(!a.data.join("instances").join(&standby).exists());
    let i = a.client().instance(&first.id).unwrap();
    assert_eq!(i.state, "running");
    assert!(i.adopted);
    verify_guest(&i.endpoint);
    a.client().stop(&first.id).unwrap();
}
