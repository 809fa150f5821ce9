//! The Linux service-VM base's sample service: the micro guest's request protocol
//! (`micro_service::request`, docs/micro-guest.md) answered by an ordinary Linux program, so a
//! Linux base passes the same oracle checks as the micro guest.
//!
//! The parsing, the compute job and the table layouts are `micro-service`'s own code; this
//! crate only keeps the state (the model table and base content in heap memory, the RAM
//! counter, a disk table on a block device) and formats the replies exactly as the micro guest
//! does. [`server`] carries requests over TCP in `micro_service::frame`s; the binary
//! (`cloudlet-init`) is the base's PID 1.

pub mod disk;
pub mod server;

use std::fmt::Write as _;
use std::time::Instant;

use micro_service::request::Request;
use micro_service::{model, ram, PrimeCounter};

use crate::disk::TableDisk;

/// The network facts `net` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetInfo {
    /// The NIC's MAC address, `aa:bb:…`.
    pub mac: Option<String>,
    /// The address and prefix length, `A.B.C.D/N`.
    pub ip: Option<String>,
    /// The service's TCP port.
    pub port: u16,
}

/// The service's state: what `load`, `fill`, `incr` and the disk requests change.
pub struct Service {
    started: Instant,
    requests: u64,
    primes: Box<PrimeCounter>,
    model: Vec<u64>,
    fill: Vec<u64>,
    counter: u64,
    disk: Result<TableDisk, String>,
    net: NetInfo,
}

/// Microseconds since `t0`.
fn micros(t0: Instant) -> u128 {
    t0.elapsed().as_micros()
}

/// A table of `mib` MiB of `u64`s, or `None` when the memory cannot be had.
fn alloc_words(mib: u64) -> Option<Vec<u64>> {
    let words = usize::try_from(mib << 17).ok()?;
    let mut v = Vec::new();
    v.try_reserve_exact(words).ok()?;
    v.resize(words, 0);
    Some(v)
}

impl Service {
    /// A service with no model, no base content, the counter at 0, the given table disk (or
    /// why there is none) and network facts.
    pub fn new(disk: Result<TableDisk, String>, net: NetInfo) -> Service {
        Service {
            started: Instant::now(),
            requests: 0,
            primes: Box::new(PrimeCounter::new()),
            model: Vec::new(),
            fill: Vec::new(),
            counter: 0,
            disk,
            net,
        }
    }

    /// Answers one request (a frame's payload, or a console line without its `\n`); returns
    /// the reply and, for `poweroff`, the code to power off with once the reply is sent.
    pub fn respond(&mut self, line: &[u8]) -> (String, Option<u8>) {
        self.requests += 1;
        let mut r = String::new();
        let mut power_off = None;
        match Request::parse(line, b' ') {
            Ok(Request::Primes(n)) => {
                let t0 = Instant::now();
                let count = self.primes.count(n).unwrap_or(0);
                let _ = write!(r, "ok primes N={n} count={count} us={}", micros(t0));
            }
            Ok(Request::Echo(text)) => {
                r.push_str("ok echo ");
                r.push_str(&String::from_utf8_lossy(text));
            }
            Ok(Request::Stats) => {
                let _ = write!(
                    r,
                    "ok stats requests={} uptime_us={} console=linux",
                    self.requests,
                    micros(self.started)
                );
            }
            Ok(Request::Load(mib)) => match alloc_words(mib) {
                Some(mut table) => {
                    let t0 = Instant::now();
                    let sum = model::fill(&mut table, 0);
                    self.model = table;
                    let _ = write!(r, "ok load mib={mib} sum={sum} us={}", micros(t0));
                }
                None => {
                    let _ = write!(r, "err not enough memory: load {mib} needs {mib} MiB");
                }
            },
            Ok(Request::Query(i)) => {
                match usize::try_from(i).ok().and_then(|i| self.model.get(i)) {
                    Some(v) => {
                        let _ = write!(r, "ok query i={i} value={v}");
                    }
                    None => {
                        let _ = write!(
                            r,
                            "err query {i} is beyond the loaded table ({} entries; use load first)",
                            self.model.len()
                        );
                    }
                }
            }
            Ok(Request::Incr) => {
                self.counter = self.counter.wrapping_add(1);
                let _ = write!(r, "ok incr n={}", self.counter);
            }
            Ok(Request::Count) => {
                let _ = write!(r, "ok count n={}", self.counter);
            }
            Ok(Request::Fill(mib)) => match alloc_words(mib) {
                Some(mut words) => {
                    let t0 = Instant::now();
                    let sum = ram::fill(&mut words, 0);
                    self.fill = words;
                    let _ = write!(r, "ok fill mib={mib} sum={sum} us={}", micros(t0));
                }
                None => {
                    let _ = write!(r, "err fill {mib}: not enough memory");
                }
            },
            Ok(Request::Check) => {
                let _ = write!(
                    r,
                    "ok check fill_mib={} fill_sum={} model_mib={} model_sum={}",
                    self.fill.len() >> 17,
                    ram::sum(&self.fill),
                    self.model.len() >> 17,
                    ram::sum(&self.model)
                );
            }
            Ok(Request::Dirty(_)) => {
                r.push_str("err dirty: the Linux service has no page dirtier");
            }
            Ok(Request::Poweroff(code)) => {
                let _ = write!(r, "ok poweroff code={code}");
                power_off = Some(code);
            }
            Ok(Request::Health) => r.push_str("ok health"),
            Ok(Request::Get(i)) => match &mut self.disk {
                Ok(d) => {
                    let _ = match d.get(i) {
                        Ok(v) => write!(r, "ok get i={i} value={v}"),
                        Err(e) => write!(r, "err get {i}: {e}"),
                    };
                }
                Err(why) => {
                    let _ = write!(r, "err no disk ({why})");
                }
            },
            Ok(Request::Put(i, v)) => match &mut self.disk {
                Ok(d) => {
                    let _ = match d.put(i, v) {
                        Ok(()) => write!(r, "ok put i={i} value={v}"),
                        Err(e) => write!(r, "err put {i}: {e}"),
                    };
                }
                Err(why) => {
                    let _ = write!(r, "err no disk ({why})");
                }
            },
            Ok(Request::Disk) => match &self.disk {
                Ok(d) => r.push_str(&d.describe()),
                Err(why) => {
                    let _ = write!(r, "err no disk ({why})");
                }
            },
            Ok(Request::Scan {
                first,
                sectors,
                req_kib,
            }) => match &mut self.disk {
                Ok(d) => {
                    let t0 = Instant::now();
                    let _ = match d.scan(first, sectors, req_kib) {
                        Ok(sum) => write!(
                            r,
                            "ok scan sectors={sectors} req_kib={req_kib} sum={sum} us={}",
                            micros(t0)
                        ),
                        Err(e) => write!(r, "err scan {first} {sectors}: {e}"),
                    };
                }
                Err(why) => {
                    let _ = write!(r, "err no disk ({why})");
                }
            },
            Ok(Request::Net) => {
                let n = &self.net;
                let _ = write!(
                    r,
                    "ok net mac={} ip={} port={}",
                    n.mac.as_deref().unwrap_or("none"),
                    n.ip.as_deref().unwrap_or("none"),
                    n.port
                );
            }
            Err(e) => {
                let _ = write!(r, "err {e}");
            }
        }
        (r, power_off)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use micro_service::oracle;

    fn service() -> Service {
        Service::new(Err("none attached".into()), NetInfo::default())
    }

    fn ask(s: &mut Service, req: &str) -> String {
        s.respond(req.as_bytes()).0
    }

    #[test]
    fn answers_as_the_oracle_says() {
        let mut s = service();
        assert_eq!(ask(&mut s, "health"), "ok health");
        assert_eq!(ask(&mut s, "echo hi there"), "ok echo hi there");
        let primes = ask(&mut s, "primes 100000");
        assert!(
            primes.starts_with(&format!(
                "ok primes N=100000 count={} us=",
                oracle::prime_count(100_000)
            )),
            "{primes}"
        );
        let load = ask(&mut s, "load 2");
        assert!(
            load.starts_with(&format!("ok load mib=2 sum={} us=", oracle::model_sum(2))),
            "{load}"
        );
        for i in [0, 1, 77, (2 << 17) - 1] {
            assert_eq!(ask(&mut s, &format!("query {i}")), oracle::query_reply(i));
        }
        assert!(ask(&mut s, &format!("query {}", 2 << 17)).starts_with("err query"));
        for n in 0..3 {
            assert_eq!(ask(&mut s, "incr"), oracle::incr_reply(n));
        }
        assert_eq!(ask(&mut s, "count"), oracle::count_reply(3));
        assert!(ask(&mut s, "fill 1")
            .starts_with(&format!("ok fill mib=1 sum={} ", oracle::fill_sum(1))));
        assert_eq!(ask(&mut s, "check"), oracle::check_reply(1, 2));
    }

    #[test]
    fn refuses_bad_requests_and_missing_devices() {
        let mut s = service();
        assert!(ask(&mut s, "frobnicate").starts_with("err unknown command 'frobnicate'"));
        assert_eq!(ask(&mut s, "get 1"), "err no disk (none attached)");
        assert_eq!(ask(&mut s, "net"), "ok net mac=none ip=none port=0");
        assert_eq!(
            s.respond(b"poweroff 7"),
            ("ok poweroff code=7".to_string(), Some(7))
        );
        assert!(ask(&mut s, "stats").starts_with("ok stats requests=5 uptime_us="));
    }
}
