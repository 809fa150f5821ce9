//! Two appliances on one machine for the handoff tests: the [`netlab`] crate (namespaces
//! joined by a veth pair, shaped, cut and restored, removed on drop), re-exported here so
//! the tests reach it as `cloudlet_tests::netns`. It is a crate of its own because
//! `cargo xtask bench handoff` uses it too, and xtask does not depend on this crate.

pub use netlab::*;
