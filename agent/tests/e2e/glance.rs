//! What is going on at a glance: the metrics history, an instance's console log (long poll),
//! the events list.

use std::io::Write;
use std::time::{Duration, Instant};

use agent::http::HistoryView;

use crate::common::{verify_guest, wait_for, AgentProc};

#[test]
fn history_console_and_events_show_what_happened() {
    let a = AgentProc::start("glance", &[]);
    let c = a.client();
    let i = c.start("model").unwrap();
    verify_guest(&i.endpoint);

    // The history: the sample taken at the agent's start, then the window so far (now),
    // which holds the start and the requests.
    let h: HistoryView = c.get_json("/v1/metrics/history").unwrap();
    assert_eq!(h.interval_s, 10);
    assert!(h.samples.len() >= 2, "{h:?}");
    let now = h.samples.last().unwrap();
    assert_eq!((now.running, now.active), (1, 1), "{now:?}");
    assert!(
        now.vm_memory_mib >= 64 && now.agent_rss_mib > 1.0,
        "{now:?}"
    );
    let starts: u64 = h.samples.iter().map(|s| s.starts).sum();
    let requests: u64 = h.samples.iter().map(|s| s.requests).sum();
    assert_eq!(starts, 1, "{h:?}");
    assert!(requests >= 1, "the start's request: {h:?}");
    let p50 = h.samples.iter().find_map(|s| s.start_p50_ms).unwrap();
    assert!(p50 > 0.0 && p50 < 10_000.0, "{h:?}");
    assert!(h.samples.windows(2).all(|w| w[0].unix <= w[1].unix));

    // The web manager's own reads (X-Cloudlet-Refresh) are counted apart, not as requests.
    let sums = |h: &HistoryView| -> (u64, u64) {
        h.samples
            .iter()
            .fold((0, 0), |(r, m), s| (r + s.requests, m + s.manager_reads))
    };
    let (r0, m0) = sums(&h);
    for _ in 0..5 {
        let resp = ureq::get(&format!("{}/v1/system", a.url))
            .header("Authorization", format!("Bearer {}", a.token()))
            .header("X-Cloudlet-Refresh", "1")
            .call()
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let h2: HistoryView = c.get_json("/v1/metrics/history").unwrap();
    let (r1, m1) = sums(&h2);
    assert_eq!(m1 - m0, 5, "{h2:?}");
    assert_eq!(r1 - r0, 1, "only the history read itself: {h2:?}");

    // The console: what the log holds, then a long poll that answers as soon as more comes.
    let serial = a.data.join("instances").join(&i.id).join("serial.log");
    let path = format!("/v1/instances/{}/console", i.id);
    let r = c.raw("GET", &path, None, true).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let size = std::fs::metadata(&serial).map(|m| m.len()).unwrap_or(0);
    let url = format!("{}?offset={size}&wait_ms=15000", path);
    let c2 = c.clone();
    let t0 = Instant::now();
    let poll = std::thread::spawn(move || c2.raw("GET", &url, None, true).unwrap());
    std::thread::sleep(Duration::from_millis(500));
    std::fs::OpenOptions::new()
        .append(true)
        .open(&serial)
        .unwrap()
        .write_all(b"a line on the console\n")
        .unwrap();
    let r = poll.join().unwrap();
    let waited = t0.elapsed();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "a line on the console\n");
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    // Nothing new: the poll waits its time, then answers empty.
    let end = std::fs::metadata(&serial).unwrap().len();
    let t0 = Instant::now();
    let r = c
        .raw(
            "GET",
            &format!("{path}?offset={end}&wait_ms=600"),
            None,
            true,
        )
        .unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, ""));
    assert!(t0.elapsed() >= Duration::from_millis(550));
    for (q, code, needle) in [
        ("?offset=x", 400, "malformed query"),
        ("?tail=1", 400, "malformed query"),
    ] {
        let r = c.raw("GET", &format!("{path}{q}"), None, true).unwrap();
        assert_eq!(r.status, code, "{r:?}");
        assert!(r.body.contains(needle), "{r:?}");
    }
    let r = c
        .raw("GET", "/v1/instances/i-00000000/console", None, true)
        .unwrap();
    assert_eq!(r.status, 404, "{r:?}");
    let phone = a.device("phone-1", Duration::from_secs(600));
    assert_eq!(phone.raw("GET", &path, None, true).unwrap().status, 403);

    // The CLI prints the console too, and (below) the events.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cloudlet"))
            .args(args)
            .args(["--agent", &a.url])
            .env(agent::auth::TOKEN_ENV, crate::common::operator_token())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(cli(&["console", &i.id]), "a line on the console\n");

    // A character cut by the end of a 64 KiB answer is not garbled: the answer stops before
    // it and the next one (from the offset the body's length gives) starts with it.
    let end = std::fs::metadata(&serial).unwrap().len();
    let mut text = "a".repeat(65535);
    text.push_str("é€\n");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&serial)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let first = c
        .raw("GET", &format!("{path}?offset={end}"), None, true)
        .unwrap();
    assert_eq!(first.body, "a".repeat(65535), "no U+FFFD at the cut");
    let next = end + first.body.len() as u64;
    let rest = c
        .raw("GET", &format!("{path}?offset={next}"), None, true)
        .unwrap();
    assert_eq!(rest.body, "é€\n");

    // Events: the start and the stop, then a start that fails, with its reason.
    c.delete(&i.id).unwrap();
    // A version 2 (its upload drops version 1's warm standby), damaged on disk after its
    // verified install: its start fails.
    let _: agent::http::ServiceView = c
        .upload(
            "/v1/services/model/overlay",
            &crate::common::images().overlay,
            &mut |_, _| {},
        )
        .unwrap();
    let overlay = a.data.join("services/model/versions/2/app.overlay");
    let mut bytes = std::fs::read(&overlay).unwrap();
    bytes[200] ^= 1;
    std::fs::write(&overlay, &bytes).unwrap();
    assert!(c.start("model").is_err());
    let ev: Vec<serde_json::Value> = wait_for(Duration::from_secs(10), "the events", || {
        let ev: Vec<serde_json::Value> = c.get_json("/v1/events").unwrap();
        ev.iter()
            .any(|e| e["event"] == "instance.failed")
            .then_some(ev)
    });
    let names: Vec<&str> = ev.iter().map(|e| e["event"].as_str().unwrap()).collect();
    let at = |n: &str| names.iter().position(|x| *x == n).unwrap_or(usize::MAX);
    assert!(
        at("instance.failed") < at("instance.stopped")
            && at("instance.stopped") < at("instance.started"),
        "newest first: {names:?}"
    );
    let started = &ev[at("instance.started")];
    assert_eq!(started["instance"], i.id.as_str());
    assert_eq!(started["service"], "model");
    assert_eq!(started["version"], 1);
    assert!(names.contains(&"service.imported"), "{names:?}");
    let failed = &ev[at("instance.failed")];
    let reason = failed["reason"].as_str().unwrap();
    assert!(
        reason.contains("app.overlay") && !reason.contains("/services/"),
        "{failed}"
    );
    let out = cli(&["events", "--limit", "20"]);
    assert!(
        out.contains("instance.failed") && out.contains(&format!("instance={}", i.id)),
        "{out}"
    );
    let one: Vec<serde_json::Value> = c.get_json("/v1/events?limit=1").unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(
        c.raw("GET", "/v1/events?limit=x", None, true)
            .unwrap()
            .status,
        400
    );
}
