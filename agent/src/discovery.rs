//! Discovery over mDNS / DNS-SD (RFC 6762/6763) with the `mdns-sd` crate.
//!
//! The agent announces one instance of `_cloudlet._tcp.local.` named `cloudlet-BOARD-ID`,
//! with SRV → the API port, A/AAAA → its listen addresses (all of the host's when it listens
//! on 0.0.0.0), and a TXT record a client ranks appliances by (keys ≤ 9 characters):
//!
//! | key | value |
//! | --- | --- |
//! | `id` | the appliance id (12 hex digits, stable across restarts) |
//! | `port` | the API port |
//! | `ver` | the agent's version |
//! | `api` | the API version (`v1`) |
//! | `board` | the board name |
//! | `cores` | CPUs reserved for service VMs |
//! | `load` | 1-minute load average, one decimal |
//! | `memfree` | memory free for service VMs, MiB (board reserve − instances and builds, capped by the host's free memory) |
//! | `vms` | slots held (active instances and builds on the appliance) / max (`1/4`) |
//! | `svcs` | 8 hex digits of SHA-256 over the service catalogue (changes with it) |
//! | `fp` | SHA-256 of the appliance's TLS certificate (64 hex digits), when it serves HTTPS |
//! | `tls` | `lan`: HTTPS on every address but loopback ones (plain HTTP); `all`: HTTPS on loopback too (a wildcard listen address) |
//!
//! Addresses: a wildcard listen address announces the host's addresses of its family only
//! (`0.0.0.0`: IPv4; `::`: IPv4 and IPv6, as Linux serves both on it), so nothing is
//! announced that the API does not listen on. A client must not take `fp` on trust: it is
//! what the appliance claims; pinning happens in the TLS handshake (see [`crate::client`]).
//!
//! The record is re-announced when a value changes (checked every [`REFRESH`], and at once
//! when an instance changes state; `load`/`memfree`-only changes at most every
//! [`VOLATILE_INTERVAL`]), and withdrawn with a goodbye (TTL 0) on shutdown.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};

/// The DNS-SD service type.
pub const SERVICE_TYPE: &str = "_cloudlet._tcp.local.";
/// How often the TXT values are recomputed.
pub const REFRESH: Duration = Duration::from_secs(2);
/// TXT keys that change with the host's load, not with what the appliance offers.
pub const VOLATILE: [&str; 2] = ["load", "memfree"];
/// Least time between re-announcements for changes of [`VOLATILE`] keys only.
pub const VOLATILE_INTERVAL: Duration = Duration::from_secs(30);

/// Errors of discovery.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The mDNS daemon failed.
    #[error("the mDNS daemon failed")]
    Mdns(#[from] mdns_sd::Error),
}

/// Computes the current TXT values.
pub type TxtSource = Arc<dyn Fn() -> BTreeMap<String, String> + Send + Sync>;

/// An announced appliance.
pub struct Announcer {
    daemon: ServiceDaemon,
    fullname: String,
    instance: String,
    host: String,
    addrs: Vec<IpAddr>,
    auto_addrs: bool,
    v6: bool,
    port: u16,
    last: BTreeMap<String, String>,
    last_at: Instant,
}

impl Announcer {
    /// Registers `instance` on `port`, reachable at `listen` (unspecified addresses mean
    /// "every address of the host").
    pub fn start(
        instance: &str,
        listen: &[IpAddr],
        port: u16,
        txt: BTreeMap<String, String>,
    ) -> Result<Announcer, DiscoveryError> {
        let daemon = ServiceDaemon::new()?;
        let auto_addrs = listen.iter().any(|a| a.is_unspecified());
        let v6 = listen.iter().any(|a| a.is_unspecified() && a.is_ipv6());
        let addrs: Vec<IpAddr> = listen
            .iter()
            .copied()
            .filter(|a| !a.is_unspecified())
            .collect();
        let host = format!("{instance}.local.");
        let mut a = Announcer {
            daemon,
            fullname: String::new(),
            instance: instance.into(),
            host,
            addrs,
            auto_addrs,
            v6,
            port,
            last: BTreeMap::new(),
            last_at: Instant::now(),
        };
        a.register(txt)?;
        Ok(a)
    }

    fn register(&mut self, txt: BTreeMap<String, String>) -> Result<(), DiscoveryError> {
        let props: Vec<(&str, &str)> = txt.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut info = ServiceInfo::new(
            SERVICE_TYPE,
            &self.instance,
            &self.host,
            &self.addrs[..],
            self.port,
            &props[..],
        )?;
        if self.auto_addrs {
            info = info.enable_addr_auto();
            if !self.v6 {
                // 0.0.0.0 serves IPv4 only: announce no IPv6 (link-local) address.
                info.set_interfaces(vec![mdns_sd::IfKind::IPv4]);
            }
        }
        self.fullname = info.get_fullname().to_string();
        self.daemon.register(info)?;
        tracing::info!(name = %self.fullname, port = self.port, ?txt, "announced over mDNS");
        self.last = txt;
        self.last_at = Instant::now();
        Ok(())
    }

    /// Re-announces when `txt` differs from what was announced: at once when a structural
    /// value changed (instances, catalogue, …), at most every [`VOLATILE_INTERVAL`] when only
    /// the load figures did. Every announcement makes responders hold back answers to
    /// queries for a second (RFC 6762 §6 rate limit), so the load is not re-announced at
    /// every wobble.
    pub fn update(&mut self, txt: BTreeMap<String, String>) -> Result<bool, DiscoveryError> {
        if txt == self.last {
            return Ok(false);
        }
        let fixed = |t: &BTreeMap<String, String>| {
            t.iter()
                .filter(|(k, _)| !VOLATILE.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<Vec<_>>()
        };
        if fixed(&txt) == fixed(&self.last) && self.last_at.elapsed() < VOLATILE_INTERVAL {
            return Ok(false);
        }
        self.register(txt)?;
        Ok(true)
    }

    /// The full service instance name.
    pub fn fullname(&self) -> &str {
        &self.fullname
    }

    /// Sends the goodbye (unregister) and stops the daemon.
    pub fn goodbye(self) {
        match self.daemon.unregister(&self.fullname) {
            Ok(rx) => match rx.recv_timeout(Duration::from_secs(2)) {
                Ok(st) => tracing::info!(name = %self.fullname, ?st, "mDNS goodbye sent"),
                Err(e) => tracing::warn!(
                    "mDNS goodbye not confirmed: {}",
                    crate::store::error_chain(&e)
                ),
            },
            Err(e) => tracing::warn!("mDNS unregister failed: {}", crate::store::error_chain(&e)),
        }
        if let Ok(rx) = self.daemon.shutdown() {
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
    }
}

/// An appliance seen on the network.
#[derive(Clone, Debug, serde::Serialize, PartialEq)]
pub struct Appliance {
    /// Instance name (`cloudlet-dev-0123456789ab`).
    pub instance: String,
    /// Host name of its SRV record.
    pub host: String,
    /// Its addresses.
    pub addrs: Vec<IpAddr>,
    /// API port (SRV).
    pub port: u16,
    /// TXT values.
    pub txt: BTreeMap<String, String>,
    /// Milliseconds from the start of browsing to this appliance's resolution.
    pub resolved_ms: f64,
}

impl Appliance {
    /// The API's base URL, preferring a non-loopback IPv4 address unless only loopback ones
    /// are offered; `https://` unless the appliance serves that address over plain HTTP
    /// (loopback, or an agent without TLS: no TXT `fp`).
    pub fn url(&self) -> Option<String> {
        let pick = self
            .addrs
            .iter()
            .find(|a| a.is_ipv4() && !a.is_loopback())
            .or_else(|| self.addrs.iter().find(|a| a.is_ipv4()))
            .or_else(|| self.addrs.first())?;
        let https = self.txt.contains_key("fp")
            && (!pick.is_loopback() || self.txt.get("tls").is_some_and(|t| t == "all"));
        let scheme = if https { "https" } else { "http" };
        Some(match pick {
            IpAddr::V4(v4) => format!("{scheme}://{v4}:{}", self.port),
            IpAddr::V6(v6) => format!("{scheme}://[{v6}]:{}", self.port),
        })
    }

    /// A TXT value parsed as a number.
    pub fn txt_num(&self, key: &str) -> Option<f64> {
        self.txt.get(key).and_then(|v| v.parse().ok())
    }
}

/// Browses `_cloudlet._tcp` for `window`; returns every appliance resolved.
pub fn browse(window: Duration) -> Result<Vec<Appliance>, DiscoveryError> {
    browse_until(window, |_| false)
}

/// Browses like [`browse`] but returns as soon as `done` holds for what has been resolved.
pub fn browse_until(
    window: Duration,
    done: impl Fn(&[Appliance]) -> bool,
) -> Result<Vec<Appliance>, DiscoveryError> {
    let daemon = ServiceDaemon::new()?;
    let t0 = Instant::now();
    let rx = daemon.browse(SERVICE_TYPE)?;
    let mut found: BTreeMap<String, Appliance> = BTreeMap::new();
    let deadline = t0 + window;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(ev) = rx.recv_timeout(left) else { break };
        match ev {
            ServiceEvent::ServiceResolved(r) => {
                let txt = r
                    .get_properties()
                    .iter()
                    .map(|p| (p.key().to_string(), p.val_str().to_string()))
                    .collect();
                let mut addrs: Vec<IpAddr> =
                    r.get_addresses().iter().map(|a| a.to_ip_addr()).collect();
                addrs.sort();
                let instance = r
                    .get_fullname()
                    .strip_suffix(&format!(".{SERVICE_TYPE}"))
                    .unwrap_or(r.get_fullname())
                    .to_string();
                let a = Appliance {
                    instance: instance.clone(),
                    host: r.get_hostname().to_string(),
                    addrs,
                    port: r.get_port(),
                    txt,
                    resolved_ms: t0.elapsed().as_secs_f64() * 1e3,
                };
                found.insert(instance, a);
                let all: Vec<Appliance> = found.values().cloned().collect();
                if done(&all) {
                    break;
                }
            }
            ServiceEvent::ServiceRemoved(_, full) => {
                let inst = full
                    .strip_suffix(&format!(".{SERVICE_TYPE}"))
                    .unwrap_or(&full);
                found.remove(inst);
            }
            _ => {}
        }
    }
    let _ = daemon.stop_browse(SERVICE_TYPE);
    if let Ok(rx) = daemon.shutdown() {
        let _ = rx.recv_timeout(Duration::from_millis(500));
    }
    Ok(found.into_values().collect())
}
