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
use fantoccini::{ClientBuilder, Locator};
use serde_json::{json, Value};

use crate::common::{verify_guest, wait_for, AgentProc};

/// Headless Chromium under chromedriver, driven with fantoccini (a WebDriver client) over
/// plain HTTP on loopback; the calls block on the driver's own runtime, so the tests read
/// as sequences of steps.
struct Driver {
    child: Child,
    rt: tokio::runtime::Runtime,
    client: Option<fantoccini::Client>,
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
            "--window-size=1280,1600".into(),
        ];
        if !spki.is_empty() {
            args.push(format!(
                "--ignore-certificate-errors-spki-list={}",
                spki.join(",")
            ));
        }
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = rt
            .block_on(
                ClientBuilder::new(connector)
                    .capabilities(caps.as_object().unwrap().clone())
                    .connect(&format!("http://127.0.0.1:{port}")),
            )
            .unwrap_or_else(|e| panic!("no WebDriver session: {e}"));
        Driver {
            child,
            rt,
            client: Some(client),
        }
    }

    fn c(&self) -> &fantoccini::Client {
        self.client.as_ref().expect("a session")
    }

    /// Opens `url`.
    fn goto(&self, url: &str) {
        self.rt.block_on(self.c().goto(url)).unwrap();
    }

    /// The page's title.
    fn title(&self) -> String {
        self.rt.block_on(self.c().title()).unwrap()
    }

    /// Opens `a`'s web manager and types the operator token into it.
    fn open_manager(&self, a: &AgentProc) {
        self.goto(&format!("{}/", a.url));
        self.type_into("#token", &a.token());
    }

    /// The element `css` selects, if any.
    fn find(&self, css: &str) -> Option<fantoccini::elements::Element> {
        match self.rt.block_on(self.c().find(Locator::Css(css))) {
            Ok(e) => Some(e),
            Err(e) if e.is_no_such_element() => None,
            Err(e) => panic!("find {css}: {e}"),
        }
    }

    /// The element `css` selects, waiting up to 20 s for it.
    fn wait(&self, css: &str) -> fantoccini::elements::Element {
        wait_for(Duration::from_secs(20), css, || self.find(css))
    }

    fn click(&self, el: &fantoccini::elements::Element) {
        self.rt.block_on(el.click()).unwrap();
    }

    /// Clicks the element `css` selects (waiting for it).
    fn click_on(&self, css: &str) {
        let el = self.wait(css);
        self.click(&el);
    }

    fn text(&self, el: &fantoccini::elements::Element) -> String {
        self.rt.block_on(el.text()).unwrap()
    }

    /// The text of the element `css` selects (waiting for it; found again when the page
    /// re-renders it between the find and the read).
    fn text_of(&self, css: &str) -> String {
        wait_for(Duration::from_secs(20), css, || {
            let el = self.find(css)?;
            match self.rt.block_on(el.text()) {
                Ok(t) => Some(t),
                Err(e) if e.is_stale_element_reference() => None,
                Err(e) => panic!("text of {css}: {e}"),
            }
        })
    }

    /// Types `text` into the element `css` selects (a file input takes a path).
    fn type_into(&self, css: &str, text: &str) {
        let el = self.wait(css);
        self.rt.block_on(el.send_keys(text)).unwrap();
    }

    /// Waits until `#msg` says `needle`; returns it.
    fn says(&self, needle: &str) -> String {
        wait_for(Duration::from_secs(60), needle, || {
            let t = self.text_of("#msg");
            t.contains(needle).then_some(t)
        })
    }

    /// Sets the value of the select or input `css` (as a user choosing it would).
    fn set_value(&self, css: &str, value: &str) {
        self.wait(css);
        self.js(&format!(
            "document.querySelector({}).value = {}",
            json!(css),
            json!(value)
        ));
    }

    fn accept_alert(&self) {
        self.rt.block_on(self.c().accept_alert()).unwrap();
    }

    fn js(&self, script: &str) -> Value {
        self.rt
            .block_on(self.c().execute(script, Vec::new()))
            .unwrap()
    }

    /// Saves a screenshot of the page as `CARGO_TARGET_TMPDIR/NAME.png`.
    fn screenshot(&self, name: &str) -> std::path::PathBuf {
        let png = self.rt.block_on(self.c().screenshot()).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let p = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.png"));
        std::fs::write(&p, png).unwrap();
        eprintln!("screenshot: {}", p.display());
        p
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self.rt.block_on(c.close());
        }
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
    d.goto(&format!("{}/", a.url));
    assert_ne!(d.title(), "Cloudlet manager");
    drop(d);
    let d = Driver::start(&[a.spki()]);
    d.goto(&format!("{}/", a.url));
    assert_eq!(d.title(), "Cloudlet manager");
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
    d.type_into("#token", &a.token());
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
    d.accept_alert();
    wait_for(Duration::from_secs(20), "the row to show revoked", || {
        d.find("#dev-phone-w td.dev-status.revoked")
    });
    let e = phone.instances().unwrap_err().to_string();
    assert!(e.contains("401"), "{e}");
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

/// The catalogue from the browser: a service built from a base with a script, started and
/// called, edited into a new version; the charts drawn; an app uploaded and downloaded with
/// its checksum checked in the page; the refusal to delete a running service.
#[test]
fn the_web_manager_builds_edits_and_curates_the_catalogue() {
    let a = AgentProc::start("web-catalogue", &[EVERYWHERE]);
    let d = Driver::start(&[a.spki()]);
    d.open_manager(&a);

    // Create a service from the base with a script, on the appliance.
    d.wait("#build-base option");
    d.type_into("#build-name", "kv");
    d.set_value("#build-base", "micro");
    d.type_into("#build-script", "load:1");
    d.type_into("#build-description", "built in the browser");
    // A file in a place the disk does not have is refused, and the page says why.
    d.type_into("#build-files", "/etc/motd=hello");
    d.click_on("#build-btn");
    let refusal = d.says("cannot build kv: 400");
    assert!(refusal.contains("write /dev/vda@OFFSET"), "{refusal}");
    d.screenshot("web-manager-file-refused");
    assert!(a
        .client()
        .get_json::<Vec<agent::jobs::Job>>("/v1/jobs")
        .unwrap()
        .is_empty());
    // A file on its disk: table entry 8 (byte 512 + 8·8) becomes "ABCDEFGH".
    d.set_value("#build-files", "/dev/vda@576=ABCDEFGH");
    d.click_on("#build-btn");
    d.says("building kv (job j-");
    wait_for(Duration::from_secs(120), "the build to finish", || {
        d.find("#jobs tr.job.done")
    });
    let result = d.text_of("#jobs tr.job.done td.job-result");
    assert!(result.contains("version 1"), "{result}");
    d.screenshot("web-manager-built");

    // Start it and call it.
    d.click_on("button.start[data-service='kv']");
    let row = wait_for(Duration::from_secs(30), "a running kv instance", || {
        d.find("#instances tbody tr[data-service='kv'] td.state.running")
    });
    assert_eq!(d.text(&row), "running");
    let first = a.client().instances().unwrap().remove(0);
    verify_guest(&first.endpoint);
    let mut g =
        micro_service::client::Client::connect(&first.endpoint, Duration::from_secs(10)).unwrap();
    g.expect(
        "get 8",
        &micro_service::oracle::get_reply(8, u64::from_le_bytes(*b"ABCDEFGH")),
    )
    .unwrap();

    // Edit: re-customise into version 2 (entry 7 of the model's disk set to 42).
    d.click_on("button.versions[data-service='kv']");
    d.wait("#versions tr#ver-1");
    d.type_into("#edit-script", "load:1,put:7:42");
    d.type_into("#edit-files", "/dev/vda@584=version2");
    d.click_on("#edit-build");
    wait_for(Duration::from_secs(120), "version 2 to be current", || {
        d.find("#versions tr#ver-2 td.current")
    });
    // The services table shows it at its next refresh.
    wait_for(
        Duration::from_secs(20),
        "the services table to show version 2",
        || {
            d.text_of("#svc-kv td.svc-version")
                .contains('2')
                .then_some(())
        },
    );
    d.click_on("button.start[data-service='kv']");
    d.says("started");
    let second = a
        .client()
        .instances()
        .unwrap()
        .into_iter()
        .find(|i| i.version == Some(2) && i.state == "running")
        .expect("an instance of version 2");
    let mut g =
        micro_service::client::Client::connect(&second.endpoint, Duration::from_secs(10)).unwrap();
    g.expect("get 7", &micro_service::oracle::get_reply(7, 42))
        .unwrap();
    g.expect(
        "get 9",
        &micro_service::oracle::get_reply(9, u64::from_le_bytes(*b"version2")),
    )
    .unwrap();
    d.screenshot("web-manager-versions");

    // The console of an instance, live.
    d.click_on(&format!("#inst-{} button.console", first.id));
    wait_for(Duration::from_secs(20), "the console to be live", || {
        d.text_of("#console-state").contains("live").then_some(())
    });

    // Deleting a service that runs is refused, and says why.
    d.click_on("button.svc-delete[data-service='kv']");
    d.accept_alert();
    let refusal = d.says("cannot delete service kv");
    assert!(
        refusal.contains("while 2 instance(s) of it run"),
        "{refusal}"
    );
    assert!(a
        .client()
        .services()
        .unwrap()
        .iter()
        .any(|s| s.name == "kv"));
    d.screenshot("web-manager-delete-refused");

    // Upload an app that offloads to kv, with its progress, then download it: the page
    // checks the SHA-256 the appliance announces.
    let apk = a.dir.path("kv-client.apk");
    std::fs::write(&apk, vec![0x5au8; 3 << 20]).unwrap();
    let (sha, _) = agent::store::sha256_file(&apk).unwrap();
    d.type_into("#app-name", "kv-client");
    d.type_into("#app-version", "1.2.0");
    d.set_value("#app-platform", "android");
    d.set_value("#app-service", "kv");
    d.type_into("#app-file", apk.to_str().unwrap());
    d.click_on("#app-btn");
    d.says(&format!("installed: sha256 {sha}"));
    let app = a
        .client()
        .get_json::<agent::store::AppRecord>("/v1/apps/kv-client")
        .unwrap();
    assert_eq!(
        (
            app.platform.as_str(),
            app.service.as_deref(),
            app.sha256.as_str()
        ),
        ("android", Some("kv"), sha.as_str())
    );
    d.click_on("#app-kv-client button.app-download");
    d.says(&format!("sha256 {sha} checked"));

    // The charts draw the last hour: the starts' latency and the instances running.
    wait_for(Duration::from_secs(30), "the charts", || {
        let lat = d.find("#chart-latency .series")?;
        let inst = d.find("#chart-instances polyline.series")?;
        drop((lat, inst));
        let n = d.js("return Number(document.querySelector('#chart-instances').dataset.points)");
        (n.as_f64() > Some(1.0)).then_some(())
    });
    let ys = d.js(
        "return Array.from(document.querySelectorAll('#chart-instances polyline.series')).map(p => p.getAttribute('points'))",
    );
    assert!(ys.as_array().is_some_and(|v| !v.is_empty()), "{ys}");
    d.js("document.querySelector('#charts').scrollIntoView()");
    d.screenshot("web-manager-at-a-glance");
    let events = d.text_of("#events");
    assert!(
        events.contains("service.built") && events.contains("instance.started"),
        "{events}"
    );
}

/// An A/B appliance image in the manager: the slot, generation and slot entries it booted
/// with; a damaged update refused with the reason; a good one accepted for the other slot and
/// left for the root updater.
#[test]
fn the_web_manager_updates_an_appliance_image() {
    let boot = crate::common::Scratch::new("web-update-boot");
    std::fs::create_dir_all(boot.path("entries")).unwrap();
    std::fs::write(
        boot.path("cmdline"),
        "root=PARTLABEL=cloudlet-root-a rw cloudlet.slot=a cloudlet.generation=5\n",
    )
    .unwrap();
    std::fs::write(boot.path("entries/cloudlet-a.conf"), "title x\nversion 5\n").unwrap();
    let a = AgentProc::start_args(
        "web-update",
        &[EVERYWHERE],
        None,
        &["--boot-info-dir", boot.0.to_str().unwrap()],
    );
    let d = Driver::start(&[a.spki()]);
    d.open_manager(&a);
    wait_for(Duration::from_secs(20), "the image line", || {
        let t = d.text_of("#boot-text");
        (t.contains("slot a, generation 5") && t.contains("a: generation 5 good")).then_some(())
    });
    // A damaged artifact: refused, nothing pending.
    let bad = boot.path("damaged.cup");
    std::fs::write(&bad, b"CLDUPDT\0 but not an update artifact".repeat(100)).unwrap();
    d.type_into("#update-file", bad.to_str().unwrap());
    d.click_on("#update-btn");
    let said = d.says("update refused");
    assert!(said.contains("422") && said.contains("damaged"), "{said}");
    assert!(!a.data.join(format::update::PENDING_PATH).exists());
    // A good one for this board, newer: accepted for slot b.
    let good = boot.path("cloudlet-dev-6.cup");
    let mut f = std::fs::File::create(&good).unwrap();
    format::update::write_artifact_from(
        &mut f,
        "dev",
        6,
        "0.1.0",
        1,
        vec![
            (format::update::PartKind::Root, &[0u8; 65536][..]),
            (format::update::PartKind::Kernel, &b"a kernel"[..]),
            (format::update::PartKind::Initrd, &b"an initrd"[..]),
        ],
    )
    .unwrap();
    drop(f);
    d.js("document.querySelector('#update-file').value = ''");
    d.type_into("#update-file", good.to_str().unwrap());
    d.click_on("#update-btn");
    d.says("update accepted: generation 6 goes to slot b");
    assert!(a.data.join(format::update::PENDING_PATH).exists());
    wait_for(Duration::from_secs(20), "the pending update shown", || {
        d.text_of("#boot-text")
            .contains("an update is being written")
            .then_some(())
    });
    d.screenshot("web-manager-update");
}
