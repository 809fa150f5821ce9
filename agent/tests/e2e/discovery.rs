//! Discovery: the announcement seen by python3-zeroconf (an independent implementation) and
//! by our client, with correct TXT values, re-announced on change, and a goodbye on
//! shutdown.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use agent::discovery::{browse, browse_until};

use crate::common::{spawn_lines, AgentProc};

/// A python3-zeroconf browser printing one JSON line per event.
const ZEROCONF: &str = r#"
import json, sys, time
from zeroconf import Zeroconf, ServiceBrowser, ServiceListener
T = "_cloudlet._tcp.local."
class L(ServiceListener):
    def show(self, zc, kind, name):
        rec = {"event": kind, "name": name}
        info = zc.get_service_info(T, name, timeout=3000) if kind != "remove" else None
        if info:
            rec["port"] = info.port
            rec["addrs"] = info.parsed_addresses()
            rec["txt"] = {k.decode(): (v.decode() if v is not None else "") for k, v in info.properties.items()}
        print(json.dumps(rec), flush=True)
    def add_service(self, zc, t, name): self.show(zc, "add", name)
    def update_service(self, zc, t, name): self.show(zc, "update", name)
    def remove_service(self, zc, t, name): self.show(zc, "remove", name)
zc = Zeroconf()
ServiceBrowser(zc, T, L())
print(json.dumps({"event": "ready"}), flush=True)
time.sleep(float(sys.argv[1]))
zc.close()
"#;

fn python() -> &'static str {
    // Debian's interpreter: python3-zeroconf installs into its dist-packages.
    let p = "/usr/bin/python3";
    let ok = Path::new(p).exists()
        && Command::new(p)
            .args(["-c", "import zeroconf"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    assert!(
        ok,
        "python3-zeroconf is missing: `cargo xtask test` installs it (apt-get install python3-zeroconf)"
    );
    p
}

#[test]
fn announced_updated_and_withdrawn() {
    let py = python();
    let mut a = AgentProc::start("mdns", &[("enabled = true", "enabled = true")]);
    let c = a.client();
    let sys = c.system().unwrap();
    let port = a.addr().rsplit_once(':').unwrap().1.to_string();
    let instance = format!("cloudlet-dev-{}", sys.id);

    // Our client.
    let t0 = Instant::now();
    let found = browse_until(Duration::from_secs(8), |f| {
        f.iter().any(|x| x.instance == instance)
    })
    .unwrap();
    let me = found
        .iter()
        .find(|x| x.instance == instance)
        .unwrap_or_else(|| panic!("{instance} not among {found:?} after {:?}", t0.elapsed()));
    let want: BTreeMap<&str, String> = [
        ("id", sys.id.clone()),
        ("port", port.clone()),
        ("ver", env!("CARGO_PKG_VERSION").to_string()),
        ("api", "v1".into()),
        ("board", "dev".into()),
        ("cores", "2".into()),
        ("vms", "0/4".into()),
        ("svcs", sys.services_digest.clone()),
    ]
    .into_iter()
    .collect();
    for (k, v) in &want {
        assert_eq!(me.txt.get(*k), Some(v), "TXT {k} in {:?}", me.txt);
    }
    assert!(me.txt["load"].parse::<f64>().is_ok());
    assert!(me.txt["memfree"].parse::<u64>().unwrap() <= 1024);
    assert!(me.txt.keys().all(|k| k.len() <= 9));
    assert_eq!(me.port.to_string(), port);
    assert_eq!(me.url().unwrap(), a.url);

    // python3-zeroconf, running across a TXT change and the agent's shutdown.
    let (mut child, lines) = spawn_lines(Command::new(py).args(["-c", ZEROCONF, "30"]));
    let next = |what: &str, pred: &dyn Fn(&serde_json::Value) -> bool| -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("python3-zeroconf did not report {what}"));
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            if v["name"].as_str().is_some_and(|n| n.starts_with(&instance)) && pred(&v) {
                return v;
            }
        }
    };
    let seen = next("the appliance", &|v| v["txt"].is_object());
    for (k, val) in &want {
        if *k != "vms" {
            assert_eq!(seen["txt"][*k].as_str(), Some(val.as_str()), "{k}: {seen}");
        }
    }
    assert_eq!(seen["port"].to_string(), port);
    assert!(
        seen["addrs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x == "127.0.0.1"),
        "{seen}"
    );

    // A change (an instance holds a slot) is re-announced.
    let i = c.start("model").unwrap();
    next("the updated TXT", &|v| v["txt"]["vms"] == "1/4");
    // Our browser may first resolve the record from before the change (or one whose TXT has
    // not arrived yet): wait for the updated one.
    let updated = |x: &agent::discovery::Appliance| {
        x.instance == instance && x.txt.get("vms").map(String::as_str) == Some("1/4")
    };
    let again = browse_until(Duration::from_secs(8), |f| f.iter().any(updated)).unwrap();
    assert!(
        again.iter().any(updated),
        "the re-announced TXT (vms=1/4) never resolved: {again:?}"
    );
    c.delete(&i.id).unwrap();

    // Goodbye on SIGTERM.
    assert!(a.terminate().unwrap().success());
    next("the goodbye", &|v| v["event"] == "remove");
    let _ = child.kill();
    let _ = child.wait();
    let after = browse(Duration::from_millis(1500)).unwrap();
    assert!(
        after.iter().all(|x| x.instance != instance),
        "withdrawn, yet still resolved: {after:?}"
    );
}
