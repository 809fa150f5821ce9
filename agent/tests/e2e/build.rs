//! Services made and edited on the appliance: a background job runs `image-builder overlay`
//! (a child process followed through its progress stream); the new version becomes current
//! only once built and verified, and a failed build leaves the catalogue as it was.

use std::time::Duration;

use agent::client::Client;
use agent::http::VersionView;
use agent::jobs::Job;
use micro_service::oracle::get_reply;

use crate::common::{verify_guest, wait_for, AgentProc};

fn follow(c: &Client, j: &Job) -> (Job, Vec<String>) {
    let mut steps = vec![j.step.clone()];
    let done = wait_for(Duration::from_secs(120), "the build", || {
        let now: Job = c.get_json(&format!("/v1/jobs/{}", j.id)).unwrap();
        if steps.last() != Some(&now.step) {
            steps.push(now.step.clone());
        }
        (now.state != "running").then_some(now)
    });
    (done, steps)
}

fn service(c: &Client, name: &str) -> agent::http::ServiceView {
    c.services()
        .unwrap()
        .into_iter()
        .find(|s| s.name == name)
        .unwrap()
}

fn post(c: &Client, name: &str, body: &str) -> agent::client::RawResponse {
    c.raw(
        "POST",
        &format!("/v1/services/{name}/build"),
        Some(body.as_bytes()),
        true,
    )
    .unwrap()
}

#[test]
fn a_service_is_built_edited_and_a_failed_build_changes_nothing() {
    let a = AgentProc::start("build", &[]);
    let c = a.client();

    // Create: a new service from the staged base with a script.
    let r = post(
        &c,
        "kv",
        r#"{"base":"micro","script":"load:1","description":"built here"}"#,
    );
    assert_eq!(r.status, 202, "{r:?}");
    let j: Job = serde_json::from_str(&r.body).unwrap();
    assert_eq!((j.kind.as_str(), j.state.as_str()), ("create", "running"));
    let (j, steps) = follow(&c, &j);
    assert_eq!(j.state, "done", "{j:?}");
    assert_eq!(j.version, Some(1));
    assert_eq!((j.commands_done, j.commands_total), (1, 1));
    assert!(j.replies[0].contains("ok load"), "{j:?}");
    assert!(steps.len() >= 2, "progress was seen: {steps:?}");
    assert!(
        j.trial_ms.is_some_and(|ms| ms > 0.0),
        "tried before current: {j:?}"
    );
    let s = service(&c, "kv");
    assert_eq!((s.version, s.description.as_str()), (1, "built here"));
    let i = c.start("kv").unwrap();
    verify_guest(&i.endpoint);

    // Edit: the next version, with the model's entry 7 changed on its disk; version 1 stays.
    let r = post(
        &c,
        "kv",
        r#"{"script":"load:1,put:7:42","description":"entry 7 is 42"}"#,
    );
    assert_eq!(r.status, 202, "{r:?}");
    let (j, _) = follow(&c, &serde_json::from_str(&r.body).unwrap());
    assert_eq!(
        (j.state.as_str(), j.kind.as_str(), j.version),
        ("done", "edit", Some(2)),
        "{j:?}"
    );
    let vs: Vec<VersionView> = c.get_json("/v1/services/kv/versions").unwrap();
    assert_eq!(vs.len(), 2);
    assert!(
        vs[1].current && vs[1].record.note.contains("put:7:42"),
        "{vs:?}"
    );
    assert_eq!(vs[0].instances, 1, "version 1 still runs");
    let i2 = c.start("kv").unwrap();
    let mut g =
        micro_service::client::Client::connect(&i2.endpoint, Duration::from_secs(10)).unwrap();
    g.expect("get 7", &get_reply(7, 42)).unwrap();

    // A script the guest refuses: the job fails with its reason; nothing changes.
    let before = c
        .raw("GET", "/v1/services/kv/versions", None, true)
        .unwrap()
        .body;
    let r = post(&c, "kv", r#"{"script":"load:1,no-such-command"}"#);
    assert_eq!(r.status, 202, "{r:?}");
    let (j, _) = follow(&c, &serde_json::from_str(&r.body).unwrap());
    assert_eq!(j.state, "failed", "{j:?}");
    let e = j.error.unwrap();
    assert!(
        e.contains("no-such-command") && !e.contains(a.data.to_str().unwrap()),
        "{e}"
    );
    assert_eq!(
        c.raw("GET", "/v1/services/kv/versions", None, true)
            .unwrap()
            .body,
        before
    );

    // Bad requests: a clear error, no job.
    let jobs_before = c.get_json::<Vec<Job>>("/v1/jobs").unwrap().len();
    for (name, body, code, needle) in [
        ("new", r#"{"script":"load:1"}"#, 400, "name the base"),
        (
            "new",
            r#"{"base":"nope","script":"load:1"}"#,
            404,
            "no base image named 'nope'",
        ),
        (
            "new",
            r#"{"base":"micro","script":""}"#,
            400,
            "the script must be",
        ),
        (
            "new",
            r#"{"base":"micro","script":"load:1\u0007"}"#,
            400,
            "printable ASCII",
        ),
        (
            "new",
            r#"{"base":"micro","script":"load:1","colour":1}"#,
            400,
            "unknown field",
        ),
        (
            "Bad%20Name",
            r#"{"base":"micro","script":"load:1"}"#,
            400,
            "not a valid name",
        ),
    ] {
        let r = post(&c, name, body);
        assert_eq!(r.status, code, "{name} {body}: {r:?}");
        assert!(r.body.contains(needle), "{needle}: {r:?}");
    }
    assert_eq!(
        c.get_json::<Vec<Job>>("/v1/jobs").unwrap().len(),
        jobs_before
    );
    // One build per service at a time.
    let r1 = post(&c, "kv", r#"{"script":"load:1"}"#);
    assert_eq!(r1.status, 202, "{r1:?}");
    let r2 = post(&c, "kv", r#"{"script":"load:1"}"#);
    assert_eq!(r2.status, 409, "{r2:?}");
    assert!(r2.body.contains("being built already"), "{r2:?}");
    let (j, _) = follow(&c, &serde_json::from_str(&r1.body).unwrap());
    assert_eq!((j.state.as_str(), j.version), ("done", Some(3)));
    assert_eq!(
        c.raw("GET", "/v1/jobs/j-nope", None, true).unwrap().status,
        404
    );
    a.tmp_is_empty();
    let events = agent::audit::Audit::in_dir(&a.data).events();
    assert!(events.iter().any(|e| e["event"] == "service.built"));
    assert!(events.iter().any(|e| e["event"] == "service.build_failed"));
}

/// A new version whose trial VM does not come up (here: a vmm that refuses it) is removed,
/// and the service keeps its current version.
#[test]
fn a_version_that_fails_its_trial_is_removed() {
    let d = crate::common::Scratch::new("trial-vmm");
    let vmm = d.path("vmm");
    std::fs::write(
        &vmm,
        format!(
            "#!/bin/sh\ncase \"$*\" in *versions/2/*) echo 'no VM of version 2 here' >&2; exit 3;; esac\nexec {} \"$@\"\n",
            crate::common::built("vmm").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
    let a = AgentProc::start_with_vmm("trial", &[], &vmm);
    let c = a.client();
    let r = post(&c, "kv", r#"{"base":"micro","script":"load:1"}"#);
    let (j, _) = follow(&c, &serde_json::from_str(&r.body).unwrap());
    assert_eq!((j.state.as_str(), j.version), ("done", Some(1)), "{j:?}");
    let before = c
        .raw("GET", "/v1/services/kv/versions", None, true)
        .unwrap()
        .body;
    let r = post(
        &c,
        "kv",
        r#"{"script":"load:1,put:7:42","description":"never"}"#,
    );
    let (j, steps) = follow(&c, &serde_json::from_str(&r.body).unwrap());
    assert_eq!(j.state, "failed", "{j:?} {steps:?}");
    let e = j.error.unwrap();
    assert!(
        e.contains("version 2 was built but its trial VM did not answer") && e.contains("removed"),
        "{e}"
    );
    assert_eq!(
        c.raw("GET", "/v1/services/kv/versions", None, true)
            .unwrap()
            .body,
        before,
        "version 1 stays current, alone"
    );
    let s = service(&c, "kv");
    assert_eq!((s.version, s.description.as_str()), (1, ""));
    let i = c.start("kv").unwrap();
    verify_guest(&i.endpoint);
}

/// Files placed on the guest's disk by a build (the API and the CLI) are what the guest
/// reads back from its disk table; a bad place or content is refused before any job starts.
#[test]
fn files_placed_on_the_disk_are_read_by_the_guest() {
    use base64::Engine;
    let a = AgentProc::start("build-files", &[]);
    let c = a.client();
    // Entry 7 of the table (byte 512 + 8·7) gets "ABCDEFGH", entry 8 the u64 4242, and no
    // console command runs.
    let b64 = base64::engine::general_purpose::STANDARD.encode(4242u64.to_le_bytes());
    let body = format!(
        r#"{{"base":"micro","files":[{{"path":"/dev/vda@568","content":"ABCDEFGH"}},{{"path":"/dev/vda@0x240","content_base64":"{b64}"}}]}}"#
    );
    let r = post(&c, "files", &body);
    assert_eq!(r.status, 202, "{r:?}");
    let (j, steps) = follow(&c, &serde_json::from_str(&r.body).unwrap());
    assert_eq!((j.state.as_str(), j.version), ("done", Some(1)), "{j:?}");
    assert_eq!(j.files.len(), 2);
    assert!(j.files.iter().all(|f| f.placed && f.bytes == 8), "{j:?}");
    assert_eq!(j.commands_total, 0);
    assert!(!steps.is_empty(), "{steps:?}");
    let i = c.start("files").unwrap();
    let mut g =
        micro_service::client::Client::connect(&i.endpoint, Duration::from_secs(10)).unwrap();
    let abc = u64::from_le_bytes(*b"ABCDEFGH");
    g.expect("get 7", &get_reply(7, abc)).unwrap();
    g.expect("get 8", &get_reply(8, 4242)).unwrap();
    g.expect(
        "get 9",
        &get_reply(9, micro_service::oracle::table_value(9)),
    )
    .unwrap();
    let vs: Vec<VersionView> = c.get_json("/v1/services/files/versions").unwrap();
    assert!(
        vs[0].record.note.contains("file /dev/vda@568 (8 bytes)"),
        "{vs:?}"
    );

    // The CLI sends a local file the same way: a next version, the base with entry 7
    // changed (its script reads it back during the build).
    let d = crate::common::Scratch::new("build-files-cli");
    let local = d.path("entry7.bin");
    std::fs::write(&local, 77u64.to_le_bytes()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloudlet"))
        .args(["build-service", "files", "--script", "get:7", "--file"])
        .arg(format!("/dev/vda@568={}", local.display()))
        .args(["--agent", &a.url])
        .env(agent::auth::TOKEN_ENV, crate::common::operator_token())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1/1 files"), "progress shows the files: {err}");
    let i2 = c.start("files").unwrap();
    let mut g =
        micro_service::client::Client::connect(&i2.endpoint, Duration::from_secs(10)).unwrap();
    g.expect("get 7", &get_reply(7, 77)).unwrap();
    // A version customises the base afresh: version 1's entry 8 is not in it.
    g.expect(
        "get 8",
        &get_reply(8, micro_service::oracle::table_value(8)),
    )
    .unwrap();

    // Bad files: a clear error, no job, the catalogue as it was.
    let before = c
        .raw("GET", "/v1/services/files/versions", None, true)
        .unwrap()
        .body;
    let jobs_before = c.get_json::<Vec<Job>>("/v1/jobs").unwrap().len();
    let big = "x".repeat(format::disk_file::MAX_FILE_BYTES + 1);
    let many: Vec<String> = (0..17)
        .map(|i| format!(r#"{{"path":"/dev/vda@{}","content":"x"}}"#, 4096 + i))
        .collect();
    for (body, needle) in [
        (
            r#"{"files":[{"path":"/etc/motd","content":"hi"}]}"#.to_string(),
            "write /dev/vda@OFFSET",
        ),
        (
            r#"{"files":[{"path":"/dev/vda@1048570","content":"12345678"}]}"#.to_string(),
            "runs past the end of the disk (1048576 bytes)",
        ),
        (
            r#"{"files":[{"path":"/dev/vda@568","content":"a","content_base64":"YQ=="}]}"#
                .to_string(),
            "one of them",
        ),
        (
            r#"{"files":[{"path":"/dev/vda@568","content_base64":"not base64!"}]}"#.to_string(),
            "not base64",
        ),
        (
            r#"{"files":[{"path":"/dev/vda@568","content":""}]}"#.to_string(),
            "is empty",
        ),
        (
            format!(r#"{{"files":[{{"path":"/dev/vda@4096","content":"{big}"}}]}}"#),
            "at most 262144 are placed per file",
        ),
        (format!(r#"{{"files":[{}]}}"#, many.join(",")), "at most 16"),
    ] {
        let r = post(&c, "files", &body);
        assert_eq!(r.status, 400, "{needle}: {r:?}");
        assert!(r.body.contains(needle), "{needle}: {r:?}");
    }
    assert_eq!(
        c.get_json::<Vec<Job>>("/v1/jobs").unwrap().len(),
        jobs_before
    );
    assert_eq!(
        c.raw("GET", "/v1/services/files/versions", None, true)
            .unwrap()
            .body,
        before
    );
    a.tmp_is_empty();
    // A request too large for a JSON body: the API's error form, not a bare text.
    let huge = format!(
        r#"{{"files":[{{"path":"/dev/vda@4096","content":"{}"}}]}}"#,
        "x".repeat(3 << 20)
    );
    let r = post(&c, "files", &huge);
    assert_eq!(r.status, 413, "{}", &r.body[..r.body.len().min(300)]);
    assert!(
        r.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("larger than the API takes")),
        "{r:?}"
    );
}

/// A build's VMs (the build VM, then its trial VM) take a slot under the board's limits like
/// an instance: a full board refuses a build with the reason, and a running build refuses
/// the start that would overshoot.
#[test]
fn a_build_takes_a_slot_on_the_board() {
    let a = AgentProc::start("build-limits", &[("max_vms = 4", "max_vms = 1")]);
    let c = a.client();
    let i = c.start("model").unwrap();
    let r = post(&c, "kv", r#"{"base":"micro","script":"load:1"}"#);
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.body.contains("no room to build 'kv'") && r.body.contains("max_vms: 1 instance(s)"),
        "{r:?}"
    );
    assert!(c.get_json::<Vec<Job>>("/v1/jobs").unwrap().is_empty());
    assert!(c.services().unwrap().iter().all(|s| s.name != "kv"));

    // A freed slot takes the build; meanwhile a start is refused, saying why.
    c.delete(&i.id).unwrap();
    let r = post(
        &c,
        "kv",
        r#"{"base":"micro","script":"load:16,load:16,load:16"}"#,
    );
    assert_eq!(r.status, 202, "{r:?}");
    let j: Job = serde_json::from_str(&r.body).unwrap();
    let refused = c
        .raw(
            "POST",
            "/v1/instances",
            Some(br#"{"service":"model"}"#),
            true,
        )
        .unwrap();
    assert_eq!(refused.status, 503, "{refused:?}");
    assert!(refused.body.contains("by a build"), "{refused:?}");
    let sys = c.system().unwrap();
    assert_eq!(
        (sys.instances, sys.builds, sys.max_vms),
        (0, 1, 1),
        "{sys:?}"
    );
    assert_eq!(sys.build_memory_mib, 64);
    let (j, _) = follow(&c, &j);
    assert_eq!((j.state.as_str(), j.version), ("done", Some(1)), "{j:?}");
    // The slot is given back once the build (and its trial) ended.
    let i = c.start("kv").unwrap();
    verify_guest(&i.endpoint);
}

/// A build cut short by the agent's death is reported failed after the restart (not lost),
/// the service keeps its current version, and earlier jobs stay listed.
#[test]
fn a_build_cut_short_by_a_restart_is_reported_failed() {
    let mut a = AgentProc::start_opts("build-restart", &[], false);
    let c = a.client();
    let r = post(&c, "kv", r#"{"base":"micro","script":"load:1"}"#);
    let (first, _) = follow(&c, &serde_json::from_str(&r.body).unwrap());
    assert_eq!(first.state, "done", "{first:?}");
    let before = c
        .raw("GET", "/v1/services/kv/versions", None, true)
        .unwrap()
        .body;

    // An edit long enough to be killed in the middle of its commands.
    let script = vec!["load:16"; 40].join(",");
    let r = post(&c, "kv", &format!(r#"{{"script":"{script}"}}"#));
    assert_eq!(r.status, 202, "{r:?}");
    let j: Job = serde_json::from_str(&r.body).unwrap();
    wait_for(Duration::from_secs(60), "the build's commands", || {
        let now: Job = c.get_json(&format!("/v1/jobs/{}", j.id)).unwrap();
        (now.commands_done >= 1).then_some(())
    });
    let pid = a.child.as_ref().unwrap().id();
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    a.child.take().unwrap().wait().unwrap();
    // The orphaned builder stops at its next step: nobody reads its progress.
    let data = a.data.to_str().unwrap().to_string();
    wait_for(
        Duration::from_secs(30),
        "the orphaned builder to stop",
        || {
            let left = std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .any(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("image-builder") && c.contains(&data)
                });
            (!left).then_some(())
        },
    );
    a.spawn();

    let c = a.client();
    let now: Job = c.get_json(&format!("/v1/jobs/{}", j.id)).unwrap();
    assert_eq!(now.state, "failed", "{now:?}");
    let e = now.error.unwrap();
    assert!(
        e.contains("the agent restarted during the build")
            && e.contains("version 1 is still current"),
        "{e}"
    );
    let jobs: Vec<Job> = c.get_json("/v1/jobs").unwrap();
    let mut ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
    ids.sort();
    let mut want = [j.id.as_str(), first.id.as_str()];
    want.sort();
    assert_eq!(ids, want, "both jobs listed");
    let kept = jobs.iter().find(|x| x.id == first.id).unwrap();
    assert_eq!(
        (kept.state.as_str(), kept.version),
        ("done", Some(1)),
        "the finished one keeps its result"
    );
    assert_eq!(
        c.raw("GET", "/v1/services/kv/versions", None, true)
            .unwrap()
            .body,
        before,
        "version 1 alone, current"
    );
    let ev: Vec<serde_json::Value> = c.get_json("/v1/events").unwrap();
    assert!(
        ev.iter().any(|e| e["event"] == "service.build_failed"
            && e["reason"].as_str().unwrap_or("").contains("restarted")),
        "{ev:?}"
    );
    // The service still starts (its version 1), and builds again.
    let i = c.start("kv").unwrap();
    verify_guest(&i.endpoint);
    let r = post(&c, "kv", r#"{"script":"load:1,put:7:42"}"#);
    let (j, _) = follow(&c, &serde_json::from_str(&r.body).unwrap());
    assert_eq!((j.state.as_str(), j.version), ("done", Some(2)), "{j:?}");
    a.tmp_is_empty();
}

/// A build cut short while its new version is on trial: after the restart the tried version
/// is gone and the previous one is still current.
#[test]
fn a_build_cut_short_in_its_trial_removes_the_tried_version() {
    let d = crate::common::Scratch::new("trial-hang-vmm");
    let vmm = d.path("vmm");
    // Version 2's trial VM never answers (it waits, holding its arguments, until killed).
    std::fs::write(
        &vmm,
        format!(
            "#!/bin/sh\ncase \"$*\" in *versions/2/*) exec python3 -c 'import time; time.sleep(60)' \"$@\";; esac\nexec {} \"$@\"\n",
            crate::common::built("vmm").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut a = AgentProc::start_full("trial-cut", &[], false, Some(vmm.clone()));
    let c = a.client();
    let r = post(&c, "kv", r#"{"base":"micro","script":"load:1"}"#);
    let (j, _) = follow(&c, &serde_json::from_str(&r.body).unwrap());
    assert_eq!((j.state.as_str(), j.version), ("done", Some(1)), "{j:?}");
    let before = c
        .raw("GET", "/v1/services/kv/versions", None, true)
        .unwrap()
        .body;
    let r = post(&c, "kv", r#"{"script":"load:1,put:7:42"}"#);
    let j: Job = serde_json::from_str(&r.body).unwrap();
    wait_for(Duration::from_secs(60), "the trial", || {
        let now: Job = c.get_json(&format!("/v1/jobs/{}", j.id)).unwrap();
        (now.step == "trial").then_some(())
    });
    let pid = a.child.as_ref().unwrap().id();
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    a.child.take().unwrap().wait().unwrap();
    // The hung trial "vmm" this test made.
    let data = a.data.to_str().unwrap().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("time.sleep(60)") && cmd.contains(&data) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &e.file_name().to_string_lossy()])
                .status();
        }
    }
    a.spawn();
    let c = a.client();
    let now: Job = c.get_json(&format!("/v1/jobs/{}", j.id)).unwrap();
    assert_eq!(now.state, "failed", "{now:?}");
    let e = now.error.unwrap();
    assert!(
        e.contains("at step 'trial'") && e.contains("version 1 is still current"),
        "{e}"
    );
    assert_eq!(
        c.raw("GET", "/v1/services/kv/versions", None, true)
            .unwrap()
            .body,
        before,
        "the tried version 2 is gone"
    );
    assert!(!a.data.join("services/kv/versions/2").exists());
}
