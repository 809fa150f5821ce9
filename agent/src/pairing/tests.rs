//! The exchange against scripted links: every refusal leaves nothing issued.

use std::collections::VecDeque;

use format::pairing::{Kind, Message, Reason};

use crate::auth::{CredentialStore, Role};

use super::*;

fn facts() -> ApplianceFacts {
    ApplianceFacts {
        appliance_id: "0123456789ab".into(),
        api: vec!["https://10.0.0.1:9999".into()],
        fingerprint: [9; 32],
        wifi: Some(WifiProfile {
            ssid: "cloudlet".into(),
            passphrase: "correct horse".into(),
        }),
    }
}

fn pairing() -> (Pairing, Arc<MemoryIssuer>) {
    let issuer = Arc::new(MemoryIssuer::new(Duration::from_secs(3600)));
    (Pairing::new(facts(), issuer.clone()), issuer)
}

fn hello(nonce: &[u8], id: &str) -> Vec<u8> {
    Message::Hello(Hello {
        nonce: nonce.to_vec(),
        device_id: id.into(),
        name: "Ana's phone".into(),
        model: "Pixel 8".into(),
    })
    .emit()
    .unwrap()
}

fn refusal(frame: &[u8]) -> Reason {
    match Message::parse(frame).unwrap() {
        Message::Refusal(r) => r.reason,
        m => panic!("expected a Refusal, got {m:?}"),
    }
}

/// A phone at frame level: answers a Challenge with `answer(nonce)`.
struct Phone<F: FnMut(&[u8]) -> Vec<u8>> {
    answer: F,
    inbox: VecDeque<Vec<u8>>,
    sent: Vec<Vec<u8>>,
}

impl<F: FnMut(&[u8]) -> Vec<u8>> FrameLink for Phone<F> {
    fn send(&mut self, frame: &[u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.sent.push(frame.to_vec());
        if let Ok(Message::Challenge(c)) = Message::parse(frame) {
            let a = (self.answer)(&c.nonce);
            self.inbox.push_back(a);
        }
        Ok(())
    }

    fn recv(&mut self) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
        self.inbox
            .pop_front()
            .ok_or_else(|| "the phone is silent".into())
    }
}

fn phone<F: FnMut(&[u8]) -> Vec<u8>>(answer: F) -> Phone<F> {
    Phone {
        answer,
        inbox: VecDeque::new(),
        sent: Vec::new(),
    }
}

#[test]
fn a_usb_session_pairs_only_inside_the_window_and_with_its_own_nonce() {
    let (p, issuer) = pairing();
    // Closed: refused before any challenge.
    let mut ph = phone(|n| hello(n, "phone-1"));
    assert!(matches!(
        p.exchange(&mut ph, Session::Usb),
        Err(PairingError::WindowClosed)
    ));
    assert_eq!(ph.sent.len(), 1);
    assert_eq!(refusal(&ph.sent[0]), Reason::WindowClosed);
    assert!(issuer.issued().is_empty());

    let view = p.open_window(Duration::from_secs(60)).unwrap();
    let confirm = view.confirmation_code.clone().unwrap();
    // A Hello replayed from an earlier session (another nonce) is refused.
    let old = hello(&[7; 32], "phone-1");
    let mut ph = phone(|_| old.clone());
    assert!(matches!(
        p.exchange(&mut ph, Session::Usb),
        Err(PairingError::BadNonce)
    ));
    assert_eq!(refusal(&ph.sent[1]), Reason::BadNonce);
    assert!(issuer.issued().is_empty());
    assert_eq!(p.status().pending_device.unwrap().state, "refused");

    // A tampered Hello (one bit flipped: the CRC no longer matches).
    let mut ph = phone(|n| {
        let mut h = hello(n, "phone-1");
        h[20] ^= 1;
        h
    });
    let e = p.exchange(&mut ph, Session::Usb).unwrap_err();
    assert!(
        matches!(e, PairingError::Frame(FrameError::Checksum)),
        "{e:?}"
    );
    assert_eq!(refusal(&ph.sent[1]), Reason::BadFrame);
    assert!(issuer.issued().is_empty());

    // The right answer: the Challenge carries the confirmation code, the Welcome everything.
    let mut ph = phone(|n| hello(n, "phone-1"));
    let paired = p.exchange(&mut ph, Session::Usb).unwrap();
    assert_eq!(paired.device.name, "Ana's phone");
    let Message::Challenge(c) = Message::parse(&ph.sent[0]).unwrap() else {
        panic!("no challenge first")
    };
    assert_eq!(c.confirm, confirm);
    assert_eq!(c.nonce.len(), NONCE_LEN);
    let Message::Welcome(w) = Message::parse(&ph.sent[1]).unwrap() else {
        panic!("no welcome")
    };
    let issued = issuer.issued();
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0].0, "phone-1");
    assert_eq!(w.secret, issued[0].1.secret);
    assert_eq!(w.secret.len(), 64, "256 bits, hex");
    assert_eq!(w.appliance_id, "0123456789ab");
    assert_eq!(w.fingerprint, [9; 32]);
    assert_eq!(w.wifi.unwrap().ssid, "cloudlet");
    assert!(w.expires_unix > unix_now());
    let st = p.status();
    assert_eq!(st.paired.len(), 1);
    assert_eq!(st.pending_device.unwrap().state, "paired");
    // The credential authenticates as that device.
    let who = issuer.authenticate(&w.secret).unwrap();
    assert_eq!(
        (who.name.as_str(), who.role),
        ("device:phone-1", Role::Device)
    );

    // After closing, refused again.
    p.close_window();
    let mut ph = phone(|n| hello(n, "phone-2"));
    assert!(p.exchange(&mut ph, Session::Usb).is_err());
    assert_eq!(issuer.issued().len(), 1);
}

#[test]
fn a_claim_needs_the_window_its_code_once_and_the_claim_nonce() {
    let (p, issuer) = pairing();
    let (frame, r) = p.claim("ABCDEFGHJK", &hello(&claim_nonce("ABCDEFGHJK"), "p"));
    assert!(matches!(r, Err(PairingError::WindowClosed)));
    assert_eq!(refusal(&frame), Reason::WindowClosed);

    let v = p.open_window(Duration::from_secs(60)).unwrap();
    let code = v.claim_code.clone().unwrap();
    let qr = QrPayload::parse(v.qr_payload.as_deref().unwrap()).unwrap();
    assert_eq!(qr.code, code);
    assert_eq!(qr.fingerprint, [9; 32]);
    assert_eq!(qr.api, "https://10.0.0.1:9999");
    assert!(v.qr_svg.unwrap().contains("<svg"));

    // Wrong code; a Hello with the nonce of another code; a malformed frame; a Challenge
    // instead of a Hello: all refused, nothing issued, the code not spent.
    let good = hello(&claim_nonce(&code), "phone-9");
    let (f, r) = p.claim("WRONGCODE2", &good);
    assert!(matches!(r, Err(PairingError::WrongClaimCode)), "{r:?}");
    assert_eq!(refusal(&f), Reason::WrongClaimCode);
    let (f, r) = p.claim(&code, &hello(&claim_nonce("OTHERCODE3"), "phone-9"));
    assert!(matches!(r, Err(PairingError::BadNonce)), "{r:?}");
    assert_eq!(refusal(&f), Reason::BadNonce);
    let (f, r) = p.claim(&code, b"CLPR garbage");
    assert!(matches!(r, Err(PairingError::Frame(_))), "{r:?}");
    assert_eq!(refusal(&f), Reason::BadFrame);
    let ch = Message::Challenge(Challenge {
        nonce: vec![1; 16],
        confirm: "1".into(),
    })
    .emit()
    .unwrap();
    let (_, r) = p.claim(&code, &ch);
    assert!(matches!(r, Err(PairingError::Unexpected(Kind::Challenge))));
    assert!(issuer.issued().is_empty());
    assert!(!p.status().claim_used);

    let (f, r) = p.claim(&code, &good);
    assert_eq!(r.unwrap().device.via, "claim");
    let Message::Welcome(w) = Message::parse(&f).unwrap() else {
        panic!("no welcome")
    };
    assert_eq!(issuer.issued()[0].1.secret, w.secret);
    assert!(p.status().claim_used);

    // The same claim again (a replay), or another device with the same code: refused.
    let (f, r) = p.claim(&code, &good);
    assert!(matches!(r, Err(PairingError::ClaimCodeUsed)), "{r:?}");
    assert_eq!(refusal(&f), Reason::ClaimCodeUsed);
    let (_, r) = p.claim(&code, &hello(&claim_nonce(&code), "phone-10"));
    assert!(matches!(r, Err(PairingError::ClaimCodeUsed)));
    assert_eq!(issuer.issued().len(), 1);

    // Reopening draws new codes; the old one is then simply wrong.
    let v2 = p.open_window(Duration::from_secs(60)).unwrap();
    assert_ne!(v2.claim_code.unwrap(), code);
    let (_, r) = p.claim(&code, &good);
    assert!(matches!(r, Err(PairingError::WrongClaimCode)));
}

#[test]
fn guessing_claim_codes_closes_the_window() {
    let (p, issuer) = pairing();
    let v = p.open_window(Duration::from_secs(60)).unwrap();
    let code = v.claim_code.unwrap();
    for _ in 0..window::MAX_WRONG_CODES {
        let (_, r) = p.claim("GUESSGUESS", &hello(&claim_nonce("GUESSGUESS"), "x"));
        assert!(r.is_err());
    }
    assert!(!p.status().open);
    let (_, r) = p.claim(&code, &hello(&claim_nonce(&code), "x"));
    assert!(matches!(r, Err(PairingError::WindowClosed)));
    assert!(issuer.issued().is_empty());
}

#[test]
fn an_expired_window_refuses_and_a_failing_issuer_spends_nothing() {
    struct Broken;
    impl CredentialIssuer for Broken {
        fn issue(
            &self,
            _: &str,
            _: &str,
            _: &str,
        ) -> Result<IssuedCredential, Box<dyn std::error::Error + Send + Sync>> {
            Err("disk full".into())
        }
    }
    let p = Pairing::new(facts(), Arc::new(Broken));
    let code = p
        .open_window(Duration::from_secs(60))
        .unwrap()
        .claim_code
        .unwrap();
    let (f, r) = p.claim(&code, &hello(&claim_nonce(&code), "x"));
    assert!(matches!(r, Err(PairingError::Issue(_))));
    assert_eq!(refusal(&f), Reason::Internal);
    assert!(!p.status().claim_used, "the code survives a failed issue");

    let (p, issuer) = pairing();
    p.open_window(Duration::from_secs(1)).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let mut ph = phone(|n| hello(n, "late"));
    assert!(matches!(
        p.exchange(&mut ph, Session::Usb),
        Err(PairingError::WindowClosed)
    ));
    assert!(!p.status().open);
    assert!(issuer.issued().is_empty());
}

#[test]
fn expired_memory_credentials_do_not_authenticate() {
    let issuer = MemoryIssuer::new(Duration::ZERO);
    let c = issuer.issue("d", "n", "m").unwrap();
    assert!(issuer.authenticate(&c.secret).is_none());
    assert!(issuer.authenticate("nothing").is_none());
}

#[test]
fn the_wifi_profile_comes_from_the_data_directory() {
    let d = std::env::temp_dir().join(format!("agent-wifi-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    assert_eq!(load_wifi(&d).unwrap(), None, "no file: no profile");
    std::fs::write(
        d.join(WIFI_FILE),
        r#"{"ssid": "hall-b", "passphrase": "correct horse"}"#,
    )
    .unwrap();
    let w = load_wifi(&d).unwrap().unwrap();
    assert_eq!(
        (w.ssid.as_str(), w.passphrase.as_str()),
        ("hall-b", "correct horse")
    );
    std::fs::write(
        d.join(WIFI_FILE),
        r#"{"ssid": "hall-b", "passphrase": "short"}"#,
    )
    .unwrap();
    let e = load_wifi(&d).unwrap_err();
    assert!(e.to_string().contains("8-63 characters"), "{e}");
    std::fs::write(
        d.join(WIFI_FILE),
        r#"{"ssid": "x", "pass": "correct horse"}"#,
    )
    .unwrap();
    assert!(load_wifi(&d).is_err());
    std::fs::remove_dir_all(&d).unwrap();
}
