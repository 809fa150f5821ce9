//! Pairing end to end: a fake phone over the AOA path (the usb-aoa handshake at control and
//! bulk level, then the agent's exchange), and a phone simulator that scans the manager's QR
//! code and claims its credential from a real agent. Every refused attempt leaves nothing
//! issued.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::pairing::usb::serve;
use agent::pairing::{claim_nonce, ApplianceFacts, MemoryIssuer, Pairing, QrPayload};
use format::pairing::{Hello, Message, Reason, Welcome};
use usb_aoa::aoa::Timeouts;
use usb_aoa::fake::{FakePhone, Misbehave};

use crate::common::{verify_guest, wait_for, AgentProc};

fn hello(nonce: &[u8], id: &str) -> Vec<u8> {
    Message::Hello(Hello {
        nonce: nonce.to_vec(),
        device_id: id.into(),
        name: format!("{id}'s name"),
        model: "Pixel 8".into(),
    })
    .emit()
    .unwrap()
}

/// A phone app at bulk level: answers the Challenge with a Hello (through `tamper`), keeps
/// what the appliance said.
fn phone_app(
    id: &'static str,
    tamper: fn(Vec<u8>) -> Vec<u8>,
) -> (FakePhone, Arc<Mutex<Vec<Message>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let p = FakePhone::new(move |frame| {
        let m = Message::parse(frame).expect("the appliance sends valid frames");
        g.lock().unwrap().push(m.clone());
        match m {
            Message::Challenge(c) => tamper(hello(&c.nonce, id)),
            _ => Vec::new(),
        }
    });
    (p, got)
}

fn fast() -> Timeouts {
    Timeouts {
        control: Duration::from_millis(200),
        reenumerate: Duration::from_secs(2),
        bulk: Duration::from_secs(2),
    }
}

fn facts() -> ApplianceFacts {
    ApplianceFacts {
        appliance_id: "0123456789ab".into(),
        api: vec!["http://127.0.0.1:9999".into()],
        fingerprint: [5; 32],
        wifi: None,
    }
}

/// Runs the agent's USB watch over `phone` until `done` says the phone has finished.
fn run_usb(pairing: &Pairing, phone: &FakePhone, done: impl Fn() -> bool) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let h = s.spawn(|| serve(phone, pairing, &fast(), Duration::from_millis(5), &stop));
        // The watch is stopped also when the wait fails, so a failure fails, not hangs.
        let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for(Duration::from_secs(10), "the USB exchange", || {
                done().then_some(())
            })
        }));
        stop.store(true, Ordering::Release);
        h.join().unwrap().unwrap();
        if let Err(p) = waited {
            std::panic::resume_unwind(p);
        }
    });
}

#[test]
fn a_fake_phone_pairs_over_the_aoa_path_and_gets_its_credential() {
    let issuer = Arc::new(MemoryIssuer::new(Duration::from_secs(600)));
    let pairing = Pairing::new(facts(), issuer.clone());
    let confirm = pairing
        .open_window(Duration::from_secs(60))
        .unwrap()
        .confirmation_code
        .unwrap();
    let (phone, got) = phone_app("phone-1", |h| h);
    run_usb(&pairing, &phone, || {
        got.lock().unwrap().len() >= 2 && phone.resets() == 1
    });

    // The handshake ran at control-transfer level: identity strings 0..5, then the accessory.
    let id = phone.identity();
    assert_eq!(
        id.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4, 5]
    );
    assert_eq!(id[0].1, "Cloudlet");
    assert_eq!(id[4].1, "http://127.0.0.1:9999/v1/apps");
    assert_eq!(id[5].1, "0123456789ab");
    // Its bulk interface was claimed; once paired, the phone was released (USB reset).
    assert_eq!(phone.requests(), [51, 52, 52, 52, 52, 52, 52, 53]);
    assert_eq!(phone.resets(), 1);
    // Then the exchange over bulk: Challenge (with the manager's confirmation code), Welcome.
    let got = got.lock().unwrap().clone();
    let Message::Challenge(c) = &got[0] else {
        panic!("{got:?}")
    };
    assert_eq!(c.confirm, confirm);
    let Message::Welcome(w) = &got[1] else {
        panic!("{got:?}")
    };
    let issued = issuer.issued();
    assert_eq!(issued.len(), 1);
    assert_eq!(
        (issued[0].0.as_str(), &issued[0].1.secret),
        ("phone-1", &w.secret)
    );
    assert_eq!(w.fingerprint, [5; 32]);
    assert_eq!(w.api, ["http://127.0.0.1:9999"]);
    let st = pairing.status();
    assert_eq!(st.paired.len(), 1);
    assert_eq!(st.paired[0].via, "usb");
    assert_eq!(st.pending_device.unwrap().name, "phone-1's name");
}

#[test]
fn a_phone_refused_outside_the_window_is_released_and_left_alone() {
    let issuer = Arc::new(MemoryIssuer::new(Duration::from_secs(600)));
    let pairing = Pairing::new(facts(), issuer.clone());
    let (phone, got) = phone_app("phone-1", |h| h);
    // Watch until the phone has been back as itself for a while: long enough for the watch
    // (polling every 5 ms) to take it for a new arrival, if it did.
    let back_since = std::cell::Cell::new(None::<std::time::Instant>);
    run_usb(&pairing, &phone, || {
        if !phone.on_bus_as_itself() || phone.resets() == 0 {
            return false;
        }
        let t = back_since.get().unwrap_or_else(std::time::Instant::now);
        back_since.set(Some(t));
        t.elapsed() > Duration::from_millis(300)
    });
    // It was told why, then released: out of accessory mode, on the bus as itself ...
    let g = got.lock().unwrap().clone();
    assert!(
        matches!(&g[..], [Message::Refusal(r)] if r.reason == Reason::WindowClosed),
        "{g:?}"
    );
    assert_eq!(phone.resets(), 1);
    assert!(!phone.in_accessory_mode());
    // ... and not switched to accessory mode again (one GET_PROTOCOL, one START).
    assert_eq!(phone.requests(), [51, 52, 52, 52, 52, 52, 52, 53]);
    assert!(issuer.issued().is_empty());

    // Unplugged and plugged in again (while a window is open), it is a new arrival and pairs.
    phone.unplug();
    pairing.open_window(Duration::from_secs(60)).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    phone.plug();
    run_usb(&pairing, &phone, || {
        got.lock().unwrap().len() >= 3 && phone.resets() == 2
    });
    let g = got.lock().unwrap().clone();
    assert!(matches!(&g[2], Message::Welcome(_)), "{g:?}");
    assert_eq!(issuer.issued().len(), 1);
}

#[test]
fn usb_pairing_outside_the_window_or_with_bad_frames_issues_nothing() {
    let issuer = Arc::new(MemoryIssuer::new(Duration::from_secs(600)));
    let pairing = Pairing::new(facts(), issuer.clone());

    // No window: the phone is told so, at once.
    let (phone, got) = phone_app("phone-1", |h| h);
    run_usb(&pairing, &phone, || !got.lock().unwrap().is_empty());
    let got1 = got.lock().unwrap().clone();
    assert!(
        matches!(&got1[0], Message::Refusal(r) if r.reason == Reason::WindowClosed),
        "{got1:?}"
    );

    pairing.open_window(Duration::from_secs(60)).unwrap();
    // A replayed Hello (the nonce of another session).
    let (phone, got) = phone_app("phone-2", |_| hello(&[1; 32], "phone-2"));
    run_usb(&pairing, &phone, || got.lock().unwrap().len() >= 2);
    let g = got.lock().unwrap().clone();
    assert!(
        matches!(&g[1], Message::Refusal(r) if r.reason == Reason::BadNonce),
        "{g:?}"
    );
    // A tampered Hello (a flipped bit: the CRC catches it).
    let (phone, got) = phone_app("phone-3", |mut h| {
        h[30] ^= 0x40;
        h
    });
    run_usb(&pairing, &phone, || got.lock().unwrap().len() >= 2);
    let g = got.lock().unwrap().clone();
    assert!(
        matches!(&g[1], Message::Refusal(r) if r.reason == Reason::BadFrame),
        "{g:?}"
    );
    // Phones that misbehave at USB level: refused AOA, garbage, leaving mid-exchange.
    for m in [
        Misbehave::RefuseAoa,
        Misbehave::Garbage,
        Misbehave::DisconnectMidExchange,
    ] {
        let (phone, _) = phone_app("phone-4", |h| h);
        let phone = phone.misbehaving(m);
        let p2 = phone.clone();
        run_usb(&pairing, &phone, || match m {
            Misbehave::RefuseAoa => !p2.requests().is_empty(),
            _ => !p2.frames_received().is_empty(),
        });
        if m == Misbehave::RefuseAoa {
            assert_eq!(phone.requests(), [51], "no identity after a refusal");
        }
    }
    assert!(issuer.issued().is_empty(), "{:?}", issuer.issued());
    assert!(pairing.status().paired.is_empty());
}

/// The whole path of a phone: it pairs over the AOA path (the fake phone, the agent's own
/// device store issuing its credential), finds the appliance over mDNS and proves it is the
/// one it paired with (its pinned certificate), starts and uses an instance over pinned
/// HTTPS; another device gets 403 on that instance; revoked, the phone gets 401 and its
/// instance is stopped.
#[test]
fn a_phone_paired_over_usb_finds_starts_and_uses_an_instance_over_pinned_https() {
    use agent::client::{discover_ranked_until, Client, ClientError, PinEntry, Trust};
    let a = AgentProc::start(
        "usb-https",
        &[("listen = [\"127.0.0.1\"]", "listen = [\"0.0.0.0\"]")],
    );
    assert!(a.url.starts_with("https://"), "{}", a.url);
    let pairing = Pairing::new(
        ApplianceFacts {
            appliance_id: a.id(),
            api: vec![a.url.clone()],
            fingerprint: agent::pairing::qr::unhex32(&a.fingerprint()).unwrap(),
            wifi: None,
        },
        Arc::new(agent::devices::DeviceStore::in_dir(&a.data)),
    );
    pairing.open_window(Duration::from_secs(60)).unwrap();
    let (phone, got) = phone_app("phone-1", |h| h);
    run_usb(&pairing, &phone, || {
        got.lock().unwrap().len() >= 2 && phone.resets() == 1
    });
    let got = got.lock().unwrap().clone();
    let Message::Welcome(w) = &got[1] else {
        panic!("{got:?}")
    };
    let fp = agent::store::hex(&w.fingerprint);
    assert_eq!(fp, a.fingerprint());

    // Discovery: the appliance announcing the certificate the phone pinned is trusted.
    let pins = [PinEntry {
        id: w.appliance_id.clone(),
        fingerprint: fp.clone(),
        name: String::new(),
    }];
    let found = discover_ranked_until(Duration::from_secs(15), &w.appliance_id, &pins).unwrap();
    let me = found
        .iter()
        .find(|r| r.appliance.txt.get("id") == Some(&w.appliance_id))
        .expect("the appliance is discovered");
    assert_eq!(me.trust, Trust::Pinned, "{me:?}");

    // Start and use an instance over HTTPS pinned to the Welcome's fingerprint.
    let c = Client::pinned(&w.api[0], Some(&w.secret), &fp);
    let inst = c.start("model").unwrap();
    assert_eq!(inst.owner.as_deref(), Some("device:phone-1"));
    verify_guest(&inst.endpoint);

    // Another device: 403 on it.
    let other = a.device("phone-2", Duration::from_secs(600));
    match other.instance(&inst.id) {
        Err(ClientError::Api { status: 403, .. }) => {}
        r => panic!("another device's view of the instance: {r:?}"),
    }

    // Revoked: 401 from the next request, and its instance is stopped.
    let r = a.client().revoke_device("phone-1").unwrap();
    assert_eq!(r.instances_stopped, std::slice::from_ref(&inst.id));
    match c.instances() {
        Err(ClientError::Api { status: 401, .. }) => {}
        r => panic!("a revoked device's request: {r:?}"),
    }
    let v = a.client().instance(&inst.id).unwrap();
    assert_eq!(v.state, agent::supervisor::State::Stopped);
}

/// The phone side of a claim: scan, Hello, POST (over HTTPS pinned to the QR code's
/// fingerprint when the appliance serves HTTPS).
pub struct PhoneSim;

impl PhoneSim {
    /// A phone.
    pub fn new() -> PhoneSim {
        PhoneSim
    }

    fn post(&self, base: &str, code: &str, fp: &[u8; 32], frame: &[u8]) -> (u16, Vec<u8>) {
        let c = if base.starts_with("https://") {
            agent::client::Client::pinned(base, None, &agent::store::hex(fp))
        } else {
            agent::client::Client::new(base, None)
        };
        c.pairing_claim(code, frame).unwrap()
    }

    /// Claims with the QR payload; the answer's status and message.
    pub fn claim(&self, base: &str, qr: &QrPayload, id: &str) -> (u16, Message) {
        let (s, b) = self.post(
            base,
            &qr.code,
            &qr.fingerprint,
            &hello(&claim_nonce(&qr.code), id),
        );
        (s, Message::parse(&b).expect("a pairing frame"))
    }
}

fn welcome(m: Message) -> Welcome {
    match m {
        Message::Welcome(w) => w,
        m => panic!("expected a Welcome, got {m:?}"),
    }
}

fn refused(m: &Message) -> Reason {
    match m {
        Message::Refusal(r) => r.reason,
        m => panic!("expected a Refusal, got {m:?}"),
    }
}

#[test]
fn a_phone_claims_its_credential_with_the_qr_code_once_and_only_in_the_window() {
    let a = AgentProc::start("pair", &[]);
    let op = a.client();
    let phone = PhoneSim::new();

    // The operator opens the window from the command line, as an operator would.
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["pair", "--window", "5m", "--data-dir"])
        .arg(&a.data)
        .arg("--token-file")
        .arg(a.token_file())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "agent pair: {out:?}");
    let w = op
        .raw("GET", "/v1/pairing/window", None, true)
        .unwrap()
        .json();
    assert_eq!(w["open"], true, "{w}");
    let confirm = w["confirmation_code"].as_str().unwrap();
    let payload = w["qr_payload"].as_str().unwrap();
    assert!(text.contains(confirm) && text.contains(payload), "{text}");
    assert!(w["qr_svg"].as_str().unwrap().contains("<svg"));
    let qr = QrPayload::parse(payload).unwrap();
    assert_eq!(qr.appliance_id, a.id());
    assert_eq!(qr.api, a.url);

    // The window is the operator's: no token → 401 (even to read it, it shows the code).
    let anon = a.anon();
    assert_eq!(
        anon.raw("GET", "/v1/pairing/window", None, false)
            .unwrap()
            .status,
        401
    );
    let r = anon
        .raw(
            "POST",
            "/v1/pairing/window",
            Some(br#"{"duration_s":60}"#),
            false,
        )
        .unwrap();
    assert_eq!(r.status, 401);

    // Wrong code, tampered frame, Hello bound to another code: refused, nothing issued.
    let (s, m) = phone.claim(
        &a.url,
        &QrPayload {
            code: "WRONGCODE2".into(),
            ..qr.clone()
        },
        "phone-x",
    );
    assert_eq!((s, refused(&m)), (403, Reason::WrongClaimCode));
    let mut bad = hello(&claim_nonce(&qr.code), "phone-x");
    bad[25] ^= 1;
    let (s, b) = phone.post(&a.url, &qr.code, &qr.fingerprint, &bad);
    assert_eq!(
        (s, refused(&Message::parse(&b).unwrap())),
        (400, Reason::BadFrame)
    );
    let (s, b) = phone.post(
        &a.url,
        &qr.code,
        &qr.fingerprint,
        &hello(&claim_nonce("OTHERCODE3"), "phone-x"),
    );
    assert_eq!(
        (s, refused(&Message::parse(&b).unwrap())),
        (403, Reason::BadNonce)
    );
    let w = op
        .raw("GET", "/v1/pairing/window", None, true)
        .unwrap()
        .json();
    assert_eq!(w["claim_used"], false);
    assert_eq!(w["paired"].as_array().unwrap().len(), 0);

    // The claim: no bearer token needed, the code is the credential.
    let (s, m) = phone.claim(&a.url, &qr, "phone-1");
    assert_eq!(s, 200);
    let cred = welcome(m);
    assert_eq!(cred.appliance_id, a.id());
    assert_eq!(cred.api, std::slice::from_ref(&a.url));
    assert_eq!(cred.secret.len(), 64);
    // The appliance's certificate, to pin; the credential kept (hashed) in the device store.
    assert_eq!(agent::store::hex(&cred.fingerprint), a.fingerprint());
    let stored = agent::devices::DeviceStore::in_dir(&a.data)
        .get("phone-1")
        .expect("phone-1 in the device store");
    assert_eq!(stored.expires_unix, cred.expires_unix);
    let w = op
        .raw("GET", "/v1/pairing/window", None, true)
        .unwrap()
        .json();
    assert_eq!(w["claim_used"], true);
    assert_eq!(w["pending_device"]["name"], "phone-1's name");
    assert_eq!(w["pending_device"]["state"], "paired");

    // The credential authenticates this device (a mutating route answers 404, not 401), but
    // does not manage pairing (403).
    let dev = agent::client::Client::new(&a.url, Some(&cred.secret));
    let r = dev.raw("DELETE", "/v1/instances/nope", None, true).unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    let r = dev
        .raw(
            "POST",
            "/v1/pairing/window",
            Some(br#"{"duration_s":60}"#),
            true,
        )
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);

    // The same claim replayed, or another phone with the spent code: refused.
    let (s, m) = phone.claim(&a.url, &qr, "phone-1");
    assert_eq!((s, refused(&m)), (403, Reason::ClaimCodeUsed));
    let (s, m) = phone.claim(&a.url, &qr, "phone-2");
    assert_eq!((s, refused(&m)), (403, Reason::ClaimCodeUsed));

    // Closed (`agent pair --close`): a fresh window's code no longer works either.
    let w2 = op
        .raw(
            "POST",
            "/v1/pairing/window",
            Some(br#"{"duration_s":60}"#),
            true,
        )
        .unwrap()
        .json();
    let qr2 = QrPayload::parse(w2["qr_payload"].as_str().unwrap()).unwrap();
    assert_ne!(qr2.code, qr.code);
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["pair", "--close", "--data-dir"])
        .arg(&a.data)
        .arg("--token-file")
        .arg(a.token_file())
        .output()
        .unwrap();
    assert!(out.status.success(), "agent pair --close: {out:?}");
    let (s, m) = phone.claim(&a.url, &qr2, "phone-3");
    assert_eq!((s, refused(&m)), (403, Reason::WindowClosed));
    let w = op
        .raw("GET", "/v1/pairing/window", None, true)
        .unwrap()
        .json();
    assert_eq!(w["open"], false);
    // Only the one credential was ever issued: the refused phones' would-be secrets do not
    // exist, so the only device token that works is phone-1's.
    let log = a.log();
    assert_eq!(log.matches("device paired").count(), 1, "{log}");
    assert!(log.contains("pairing refused"), "{log}");
    // This machine's USB (none here): said once, and the agent went on.
    if std::path::Path::new("/sys/bus/usb").exists() {
        assert_eq!(log.matches("watching USB for phones").count(), 1, "{log}");
    } else {
        assert_eq!(log.matches("USB pairing is off").count(), 1, "{log}");
        assert!(log.contains("/sys/bus/usb is absent"), "{log}");
    }
}
