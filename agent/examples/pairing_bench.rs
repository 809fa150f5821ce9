//! `pairing_ms` for `cargo xtask bench agent`: USB pairings against the fake phone (AOA
//! handshake at control level, re-enumeration, bulk claim, then Challenge → Hello →
//! Welcome with a credential issued), each timed from the phone's arrival to the Welcome in
//! its hands. The fake phone re-enumerates at once, so this is the appliance's own cost.
//! Prints one JSON object: `{"pairing_ms": median, "pairing_p99_ms": …, "runs": N}`.
//!
//! Usage: `pairing_bench [RUNS]` (default 200).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::pairing::usb::{identity, pair_device};
use agent::pairing::{ApplianceFacts, MemoryIssuer, Pairing};
use format::pairing::{Hello, Message};
use usb_aoa::aoa::{Arrivals, Timeouts};
use usb_aoa::fake::FakePhone;

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("RUNS is a number"))
        .unwrap_or(200);
    let facts = ApplianceFacts {
        appliance_id: "0123456789ab".into(),
        api: vec!["https://127.0.0.1:9999".into()],
        fingerprint: [1; 32],
        wifi: None,
    };
    let pairing = Pairing::new(
        facts.clone(),
        Arc::new(MemoryIssuer::new(Duration::from_secs(3600))),
    );
    pairing
        .open_window(Duration::from_secs(3600))
        .expect("a pairing window");
    let id = identity(&facts);
    let t = Timeouts::default();
    let mut ms = Vec::with_capacity(runs);
    for i in 0..runs {
        let welcomed = Arc::new(AtomicBool::new(false));
        let w = welcomed.clone();
        let device = format!("phone-{i}");
        let phone = FakePhone::new(move |frame| match Message::parse(frame) {
            Ok(Message::Challenge(c)) => Message::Hello(Hello {
                nonce: c.nonce,
                device_id: device.clone(),
                name: "bench phone".into(),
                model: "fake".into(),
            })
            .emit()
            .expect("a Hello"),
            Ok(Message::Welcome(_)) => {
                w.store(true, Ordering::Release);
                Vec::new()
            }
            _ => Vec::new(),
        })
        .reappearing_after(Duration::ZERO);
        let mut arrivals = Arrivals::new(&phone, Duration::from_millis(1));
        let hub = arrivals
            .next(|| false)
            .expect("the fake bus")
            .expect("a hub");
        let t0 = Instant::now();
        let dev = arrivals
            .next(|| false)
            .expect("the fake bus")
            .expect("a phone");
        assert_ne!(dev, hub);
        let r = pair_device(&phone, &dev, &pairing, &id, &t).result;
        r.expect("the fake phone pairs");
        assert!(
            welcomed.load(Ordering::Acquire),
            "no Welcome reached the phone"
        );
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    let pick = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    println!(
        "{}",
        serde_json::json!({ "pairing_ms": pick(0.5), "pairing_p99_ms": pick(0.99), "runs": runs })
    );
}
