//! `cargo xtask check`: what must pass before pushing — formatting, clippy on the workspace
//! and on the guest, then the tests.

use anyhow::Result;

use crate::util::{cargo, root, run, step};

/// Runs every check.
pub fn check() -> Result<()> {
    step("cargo fmt --check");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    let guest = root().join("rootfs/guest");
    run(cargo().current_dir(&guest).args(["fmt", "--", "--check"]))?;
    step("cargo clippy (workspace)");
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("cargo clippy (micro guest)");
    run(cargo()
        .current_dir(&guest)
        .env(
            "CARGO_TARGET_DIR",
            crate::util::target_dir().join("guest-build"),
        )
        .args(["clippy", "--release", "--", "-D", "warnings"]))?;
    crate::test::run_tests(&crate::test::TestArgs {
        linux_boot: false,
        test_args: Vec::new(),
    })
}
