//! The PRoot runtime: the host-directory runtime of [`crate::mock`] with
//! every command run under `proot` in an image's root filesystem.
//!
//! Owns: the image table (`runtimes.proot.images.<name> = PATH`, a rootfs
//! directory per image), the `proot` command line, and its health check.
//!
//! Does not own: the sandbox layout, keeper, evidence log and file
//! operations (all the mock's, see [`crate::mock`]).
//!
//! Each sandbox gets its own writable `/workspace` (the host directory
//! `<state_dir>/<sandbox_id>/root/workspace`, bound in with `-b`); the image's
//! rootfs is shared by every sandbox of that image and seen read-mostly
//! (PRoot does not make it read-only: run workers as an unprivileged user
//! and keep the rootfs owned by another one). Commands run with `-r ROOTFS`,
//! `/proc` and `/dev` bound, in the exec's workdir; file operations accept
//! only paths in `/workspace`. PRoot confines the *filesystem view* through
//! ptrace; it is not a privilege boundary (no namespaces, same uid, host
//! network).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::mock::{Jail, MockOptions, MockRuntime};
use crate::{ExecMode, ExecSpec, RuntimeError, shell_line};

/// Where `proot` is and which images it can run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProotOptions {
    /// The `proot` binary (`proot` on `PATH` when empty).
    pub binary: PathBuf,
    /// Image name → root filesystem directory (it needs `/bin/sh`).
    pub images: BTreeMap<String, PathBuf>,
}

impl ProotOptions {
    fn binary(&self) -> &Path {
        if self.binary.as_os_str().is_empty() {
            Path::new("proot")
        } else {
            &self.binary
        }
    }

    /// The rootfs of `image`; `Invalid` when the image is not configured or
    /// its directory has no `/bin/sh`.
    pub(crate) fn rootfs(&self, image: &str) -> Result<&Path, RuntimeError> {
        let dir = self.images.get(image).ok_or_else(|| {
            RuntimeError::Invalid(format!(
                "image {image:?} is not configured for proot (runtimes.proot.images.<name>; \
                 configured: {})",
                self.images.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        if std::fs::symlink_metadata(dir.join("bin/sh")).is_err() {
            return Err(RuntimeError::Invalid(format!(
                "the rootfs of image {image:?} ({}) has no /bin/sh",
                dir.display()
            )));
        }
        Ok(dir)
    }

    /// `proot` runs, and at least one image has a usable rootfs.
    pub(crate) async fn health(&self) -> Result<(), RuntimeError> {
        let probe = tokio::process::Command::new(self.binary())
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .status();
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Ok(st)) if st.success() => {}
            Ok(Ok(st)) => {
                return Err(RuntimeError::Unavailable(format!(
                    "{} --version failed ({st})",
                    self.binary().display()
                )));
            }
            Ok(Err(e)) => {
                return Err(RuntimeError::Unavailable(format!(
                    "{} cannot run: {e}",
                    self.binary().display()
                )));
            }
            Err(_) => {
                return Err(RuntimeError::Unavailable(
                    "proot --version did not answer in 5 s".into(),
                ));
            }
        }
        if self.images.is_empty() {
            return Err(RuntimeError::Unavailable(
                "no proot images configured (runtimes.proot.images.<name> = ROOTFS)".into(),
            ));
        }
        if !self.images.keys().any(|i| self.rootfs(i).is_ok()) {
            return Err(RuntimeError::Unavailable(
                "no configured proot image has a rootfs with /bin/sh".into(),
            ));
        }
        Ok(())
    }

    /// The host command running `spec` in `image` with `workspace` as
    /// `/workspace` and `workdir` (in-sandbox) as its working directory.
    pub(crate) fn command(
        &self,
        image: &str,
        workspace: &Path,
        workdir: &str,
        spec: &ExecSpec,
    ) -> Result<tokio::process::Command, RuntimeError> {
        let rootfs = self.rootfs(image)?;
        let mut cmd = tokio::process::Command::new(self.binary());
        cmd.arg("-r")
            .arg(rootfs)
            .arg("-b")
            .arg(format!("{}:{}", workspace.display(), crate::WORKSPACE))
            .args(["-b", "/proc", "-b", "/dev"])
            .arg("-w")
            .arg(workdir)
            .args(["/bin/sh", "-c"]);
        match spec.mode {
            ExecMode::Shell => {
                cmd.arg(shell_line(&spec.command, &spec.args));
            }
            // No shell parsing of the arguments; a missing program is 127.
            ExecMode::Argv => {
                cmd.arg("exec \"$0\" \"$@\"")
                    .arg(&spec.command)
                    .args(&spec.args);
            }
        }
        Ok(cmd)
    }
}

impl MockRuntime {
    /// A PRoot runtime keeping its sandboxes under `state_dir`.
    pub fn proot(
        state_dir: impl Into<PathBuf>,
        options: MockOptions,
        proot: ProotOptions,
    ) -> Result<MockRuntime, RuntimeError> {
        Ok(MockRuntime::with_options(state_dir, options)?.jailed(Jail::Proot(proot)))
    }
}
