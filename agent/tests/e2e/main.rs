//! End-to-end tests of the agent: real agent processes, real service VMs (KVM), mDNS seen by
//! python3-zeroconf and by our client, and the web manager in headless Chromium.

mod api;
mod browser;
mod build;
mod catalogue;
mod common;
mod discovery;
mod glance;
mod handoff;
mod handoff_netns;
mod isolation;
mod pairing;
mod tls;
mod warm;
