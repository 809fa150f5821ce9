//! The web manager in real headless Chromium, driven over the W3C WebDriver protocol
//! (plain HTTP/JSON to Debian's chromedriver): open the page, enter the token, start an
//! instance, see it listed as running, stop it, see it stopped, delete it.
//!
//! The agents listen on 0.0.0.0, so the manager is served over HTTPS (loopback included);
//! Chromium trusts exactly the appliance's key, pinned with
//! `--ignore-certificate-errors-spki-list` (any other certificate is still an error).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent::client::Client;
use serde_json::{json, Value};

use crate::common::{verify_guest, wait_for, AgentProc};

/// The W3C element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Driver {
    child: Child,
    http: Client,
    session: String,
}

impl Driver {
    /// Chromium trusting the certificates whose keys have these SPKI hashes (base64).
    fn start(spki: &[String]) -> Driver {
        for p in ["/usr/bin/chromedriver", "/usr/bin/chromium"] {
            assert!(
                std::path::Path::new(p).exists(),
                "{p} is missing: `cargo xtask test` installs chromium and chromium-driver"
            );
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let http = Client::new(&format!("http://127.0.0.1:{port}"), None);
        wait_for(Duration::from_secs(20), "chromedriver", || {
            http.raw("GET", "/status", None, false)
                .ok()
                .filter(|r| r.json()["value"]["ready"] == true)
        });
        let mut args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1200,900".into(),
        ];
        if !spki.is_empty() {
            args.push(format!(
                "--ignore-certificate-errors-spki-list={}",
                spki.join(",")
            ));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": args
            }
        }}});
        let r = http
            .raw("POST", "/session", Some(caps.to_string().as_bytes()), false)
            .unwrap();
        let v = r.json();
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {}", r.body))
            .to_string();
        Driver {
            child,
            http,
            session,
        }
    }

    /// Opens `a`'s web manager and types the operator token into it.
    fn open_manager(&self, a: &AgentProc) {
        self.cmd("POST", "/url", json!({"url": format!("{}/", a.url)}));
        let token = self.wait("#token");
        self.cmd(
            "POST",
            &format!("/element/{token}/value"),
            json!({"text": a.token()}),
        );
    }

    fn cmd(&self, method: &str, path: &str, body: Value) -> Value {
        let p = format!("/session/{}{path}", self.session);
        let b = body.to_string();
        let r = self
            .http
            .raw(method, &p, (method != "GET").then_some(b.as_bytes()), false)
            .unwrap();
        assert_eq!(r.status, 200, "WebDriver {method} {path}: {}", r.body);
        r.json()["value"].clone()
    }

    fn find(&self, css: &str) -> Option<String> {
        let p = format!("/session/{}/element", self.session);
        let b = json!({"using": "css selector", "value": css}).to_string();
        let r = self
            .http
            .raw("POST", &p, Some(b.as_bytes()), false)
            .unwrap();
        (r.status == 200).then(|| r.json()["value"][ELEMENT].as_str().unwrap().to_string())
    }

    fn wait(&self, css: &str) -> String {
        wait_for(Duration::from_secs(20), css, || self.find(css))
    }

    fn click(&self, el: &str) {
        self.cmd("POST", &format!("/element/{el}/click"), json!({}));
    }

    fn text(&self, el: &str) -> String {
        self.cmd("GET", &format!("/element/{el}/text"), json!({}))
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self
            .http
            .raw("DELETE", &format!("/session/{}", self.session), None, false);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The board edit that makes an agent serve HTTPS on every address.
const EVERYWHERE: (&str, &str) = ("listen = [\"127.0.0.1\"]", "listen = [\"0.0.0.0\"]");

#[test]
fn the_web_manager_starts_lists_and_stops_an_instance() {
    let a = AgentProc::start("web", &[EVERYWHERE]);
    assert!(a.url.starts_with("https://"), "{}", a.url);
    // Without the pin, Chromium shows its certificate error instead of the manager.
    let d = Driver::start(&[]);
    d.cmd("POST", "/url", json!({"url": format!("{}/", a.url)}));
    assert_ne!(d.cmd("GET", "/title", json!({})), "Cloudlet manager");
    drop(d);
    let d = Driver::start(&[a.spki()]);
    d.cmd("POST", "/url", json!({"url": format!("{}/", a.url)}));
    assert_eq!(d.cmd("GET", "/title", json!({})), "Cloudlet manager");
    assert_eq!(d.js("return location.protocol"), "https:");
    // Without the token the page shows the open system line and asks for it.
    let sys = d.wait("#system");
    wait_for(Duration::from_secs(10), "system line", || {
        d.text(&sys).contains("dev").then_some(())
    });
    wait_for(Duration::from_secs(10), "the request for a token", || {
        d.text(&d.wait("#msg"))
            .contains("enter the operator token")
            .then_some(())
    });
    assert!(
        d.find("button.start").is_none(),
        "no catalogue without a token"
    );
    let token = d.wait("#token");
    d.cmd(
        "POST",
        &format!("/element/{token}/value"),
        json!({"text": a.token()}),
    );
    // The catalogue is rendered from the API, with the token.
    let start = d.wait("button.start[data-service='model']");
    let t0 = Instant::now();
    d.click(&start);
    let row = wait_for(Duration::from_secs(20), "a running instance row", || {
        d.find("#instances tbody tr td.state.running")
    });
    assert_eq!(d.text(&row), "running");
    let id = d
        .js("return document.querySelector('#instances tbody tr').id")
        .as_str()
        .unwrap()
        .trim_start_matches("inst-")
        .to_string();
    let msg = d.text(&d.wait("#msg"));
    assert!(msg.contains(&id) && msg.contains("first reply"), "{msg}");
    eprintln!("web manager: start → listed running in {:?}", t0.elapsed());
    // The instance is real.
    let inst = a.client().instance(&id).unwrap();
    verify_guest(&inst.endpoint);

    let stop = d.wait(&format!("#inst-{id} button.stop"));
    d.click(&stop);
    wait_for(Duration::from_secs(20), "the row to show stopped", || {
        d.find(&format!("#inst-{id} td.state.stopped"))
    });
    assert_eq!(a.client().instance(&id).unwrap().state, "stopped");
    let del = d.wait(&format!("#inst-{id} button.delete"));
    d.click(&del);
    wait_for(Duration::from_secs(20), "the row to go", || {
        d.find(&format!("#inst-{id}")).is_none().then_some(())
    });
    assert!(a.client().instances().unwrap().is_empty());
    assert!(a.live_vmms().is_empty());

    // Paired devices are listed; Revoke (confirmed) revokes at once.
    let phone = a.device("phone-w", Duration::from_secs(3600));
    assert!(phone.instances().unwrap().is_empty());
    let revoke = d.wait("#dev-phone-w button.revoke");
    assert!(d.text(&d.wait("#dev-phone-w")).contains("active"));
    d.click(&revoke);
    d.cmd("POST", "/alert/accept", json!({}));
    wait_for(Duration::from_secs(20), "the row to show revoked", || {
        d.find("#dev-phone-w td.dev-status.revoked")
    });
    let e = phone.instances().unwrap_err().to_string();
    assert!(e.contains("401"), "{e}");
}

/// Decodes standard base64 (a WebDriver screenshot).
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= u32::from(val(*c)) << (18 - 6 * i);
        }
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

impl Driver {
    /// Saves a screenshot of the page as `CARGO_TARGET_TMPDIR/NAME.png`.
    fn screenshot(&self, name: &str) -> std::path::PathBuf {
        let v = self.cmd("GET", "/screenshot", json!({}));
        let png = base64_decode(v.as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let p = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.png"));
        std::fs::write(&p, png).unwrap();
        eprintln!("screenshot: {}", p.display());
        p
    }
}

/// The hand-off action: choose a discovered appliance, watch the instance move, see where
/// it went. With the stand-in vmm (see handoff.rs), so it runs before the real vmm can hand
/// off.
#[test]
fn the_web_manager_hands_an_instance_off() {
    let (_d, vmm) = crate::handoff::stand_in();
    let a = AgentProc::start_with_vmm("web-ho-a", &[EVERYWHERE], &vmm);
    let b = AgentProc::start_with_vmm("web-ho-b", &[EVERYWHERE], &vmm);
    let secret = "a-secret-both-appliances-share-web-0123";
    a.trust(&b, secret);
    // Before b trusts a, b's chooser lists a as unverified.
    let a_id = a.id();
    wait_for(Duration::from_secs(30), "a listed by b", || {
        let r = b
            .client()
            .raw("GET", "/v1/appliances?window_ms=1500", None, true)
            .ok()?;
        let found = r.json();
        let f = found
            .as_array()?
            .iter()
            .find(|f| f["txt"]["id"] == a_id.as_str())?
            .clone();
        assert_eq!(f["trusted"], false, "{f}");
        Some(())
    });
    b.trust(&a, secret);
    let i = a.client().start("model").unwrap();

    let d = Driver::start(&[a.spki()]);
    d.open_manager(&a);
    let ho = d.wait(&format!("#inst-{} button.handoff", i.id));
    d.click(&ho);
    // The chooser lists the other appliance, found over mDNS at a network address of this
    // host: HTTPS, on its port.
    let port = b.addr().rsplit_once(':').unwrap().1.to_string();
    // Each trusts the other with its certificate pinned: it is listed as a trusted peer.
    let option = format!("#handoff-to option.trusted[value^='https://'][value$=':{port}']");
    let t0 = Instant::now();
    let opt = loop {
        if let Some(o) = wait_for(Duration::from_secs(10), "the scan to end", || {
            let searching = d
                .js("return document.querySelector('#handoff-to').textContent")
                .as_str()
                .is_some_and(|t| t.contains("searching"));
            (!searching).then(|| d.find(&option))
        }) {
            break o;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{} was never discovered",
            b.url
        );
        d.click(&d.wait("#handoff-rescan"));
    };
    let b_url = d
        .js(&format!(
            "return document.querySelector(\"{option}\").value"
        ))
        .as_str()
        .unwrap()
        .to_string();
    d.click(&opt);
    d.screenshot("web-manager-handoff-chooser");
    d.click(&d.wait("#handoff-go"));
    let moved = wait_for(Duration::from_secs(20), "the row to show moved", || {
        d.find(&format!("#inst-{} td.state.moved", i.id))
    });
    assert_eq!(d.text(&moved), "moved");
    let cell = d.text(&d.wait(&format!("#inst-{} td.ho", i.id)));
    assert!(
        cell.contains(&b_url) && cell.contains("downtime") && cell.contains("rounds"),
        "{cell}"
    );
    let msg = d.text(&d.wait("#msg"));
    assert!(msg.contains("handed") && msg.contains(&b_url), "{msg}");
    d.screenshot("web-manager-handoff-moved");
    // It runs there.
    let there = b.client().instances().unwrap();
    assert_eq!(there.len(), 1);
    assert_eq!(there[0].state, "running");
}

#[test]
fn the_web_manager_pairs_a_device_with_its_qr_code() {
    let a = AgentProc::start("web-pair", &[EVERYWHERE]);
    let d = Driver::start(&[a.spki()]);
    d.open_manager(&a);
    d.click(&d.wait("#pair-start"));
    wait_for(Duration::from_secs(20), "the QR code", || {
        d.find("#pair-qr svg")
    });
    // What the page shows is the agent's window: its confirmation code and QR payload.
    let w = a
        .client()
        .raw("GET", "/v1/pairing/window", None, true)
        .unwrap()
        .json();
    assert_eq!(w["open"], true, "{w}");
    assert_eq!(
        d.text(&d.wait("#pair-confirm")),
        w["confirmation_code"].as_str().unwrap()
    );
    assert_eq!(
        d.js("return document.querySelector('#pair-qr').title"),
        w["qr_payload"]
    );
    // A phone scans it and claims; the panel names the device.
    let payload = agent::pairing::QrPayload::parse(w["qr_payload"].as_str().unwrap()).unwrap();
    let (status, _) = crate::pairing::PhoneSim::new().claim(&a.url, &payload, "ana");
    assert_eq!(status, 200);
    let paired = d.wait("#pair-paired");
    wait_for(
        Duration::from_secs(10),
        "the paired device in the panel",
        || d.text(&paired).contains("ana's name").then_some(()),
    );
    d.screenshot("web-manager-pairing");
    d.click(&d.wait("#pair-stop"));
    wait_for(Duration::from_secs(10), "the window to close", || {
        (a.client()
            .raw("GET", "/v1/pairing/window", None, true)
            .unwrap()
            .json()["open"]
            == false)
            .then_some(())
    });
}
