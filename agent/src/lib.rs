//! The cloudlet appliance agent: what mobile clients and operators see.
//!
//! - [`board`]: board configurations (`board-configs/*.toml`), validated.
//! - [`store`]: the data directory (bases, services, app store, instance records).
//! - [`jobs`]: builds of service versions on the appliance (`image-builder overlay` as a
//!   child process, followed through its progress stream).
//! - [`supervisor`]: one `vmm synthesize` process per service-VM instance; limits; re-adoption
//!   after an agent restart; [`warm`]: a paused standby per started service, so the next
//!   start is a resume.
//! - [`http`]: the client API (`/v1/...`, OpenAPI at `/v1/openapi.json`), the web manager at
//!   `/`, `/metrics`; [`auth`] checks bearer credentials and says who made a request.
//! - [`devices`]: the paired devices' credentials (salted hashes, expiry, revocation);
//!   [`audit`]: the audit trail and events list (pairings, revocations, imports, instance
//!   starts, stops and failures); [`history`]: the last hour of the agent's metrics;
//!   [`revocation`]: a device no longer trusted has its instances stopped.
//! - [`discovery`]: `_cloudlet._tcp` over mDNS (announce with TXT, browse).
//! - [`client`]: discover, rank, and use an agent (the `cloudlet` CLI is built on it);
//!   [`guest`]: the service VM's framed TCP protocol; [`manage`]: the CLI's catalogue
//!   commands (versions, uploads with progress, checked app downloads).
//! - [`handoff`]: moving a running instance to another appliance (source and target
//!   orchestration; the vmms stream the VM).
//! - [`tls`]: the appliance certificate (HTTPS off loopback) and fingerprint pinning.
//! - [`pairing`]: phones get their own credential, over USB (Android Open Accessory) or with
//!   the manager's QR claim code, while the operator holds a pairing window open.
//! - [`daemon`]: the `agent` process wiring it all together.

pub mod audit;
pub mod auth;
pub mod board;
pub mod cgroup;
pub mod client;
pub mod daemon;
pub mod devices;
pub mod discovery;
pub mod guest;
pub mod handoff;
pub mod history;
pub mod http;
pub mod jail;
pub mod jobs;
pub mod manage;
pub mod metrics;
pub mod pairing;
pub mod revocation;
pub mod store;
pub mod supervisor;
pub mod sysinfo;
pub mod tls;
pub mod update;
pub mod warm;
