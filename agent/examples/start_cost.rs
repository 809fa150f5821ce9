//! A start as a phone's client makes it, built optimised: the client library's
//! `POST /v1/instances` (a fresh connection each time, plain or pinned HTTPS), then the
//! instance's first verified reply; then `DELETE`. Prints one JSON object of medians (ms), so
//! `bench agent` compares plain HTTP and HTTPS through the same client code, both optimised.
//!
//! `cargo run --release -p agent --example start_cost -- RUNS URL TOKEN SERVICE REQUEST WANT
//! [FINGERPRINT]` (HTTPS when FINGERPRINT is given).

use std::time::{Duration, Instant};

use agent::client::Client;

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    if a.len() < 6 {
        eprintln!("usage: start_cost RUNS URL TOKEN SERVICE REQUEST WANT [FINGERPRINT]");
        std::process::exit(2);
    }
    let runs: usize = a[0].parse().expect("RUNS is a number");
    let (url, token, service, request, want) = (&a[1], &a[2], &a[3], &a[4], &a[5]);
    let mut total = Vec::with_capacity(runs);
    for _ in 0..runs {
        // As the bench's other starts: the appliance at rest (its standby made again).
        std::thread::sleep(Duration::from_millis(150));
        // A client per start: a phone's start is its first request on a fresh connection.
        let c = match a.get(6) {
            Some(fp) => Client::pinned(url, Some(token), fp),
            None => Client::new(url, Some(token)),
        };
        let t0 = Instant::now();
        let inst = c.start(service).expect("start");
        let mut g = micro_service::client::Client::connect(&inst.endpoint, Duration::from_secs(10))
            .expect("connect to the instance");
        g.expect(request, want).expect("the instance's first reply");
        total.push(t0.elapsed().as_secs_f64() * 1e3);
        drop(g);
        c.delete(&inst.id).expect("delete");
    }
    total.sort_by(|x, y| x.total_cmp(y));
    println!(
        "{}",
        serde_json::json!({ "start_p50_ms": total[total.len() / 2], "runs": runs })
    );
}
