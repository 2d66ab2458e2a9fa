//! A throwaway root running systemd: this machine's own root file system under an overlay whose
//! writable layer is a tmpfs, booted as a systemd-nspawn container inside one of the lab's
//! network namespaces. What happens in it (packages installed, units started, files removed)
//! goes with the tmpfs; what it attaches XDP to is the lab's interface.
//!
//! The test drives the container from outside: each command enters the namespaces of the
//! container's PID 1 (`nsenter`), while the services run under the container's own systemd,
//! with nspawn's and their unit's restrictions.

use std::{
    fs::File,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{
    lab::{owner_is_gone, unmount},
    netns::Netns,
};

/// How long systemd may take to boot or to power off.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Every directory a container creates starts with this, followed by the creating process's id.
const PREFIX: &str = "moatroot";

/// A booted container; powered off, unmounted and removed on drop.
pub struct SystemdContainer {
    dir: PathBuf,
    nspawn: Child,
    /// The container's PID 1 (0 until found).
    leader: u32,
    /// Dropped after the container has stopped.
    _mounts: Mounts,
}

impl SystemdContainer {
    /// Boots a container in `netns`, with a bpffs of its own at /sys/fs/bpf, `share` bound
    /// read-only at /share, and the capabilities moat's unit asks for in its bounding set.
    pub fn boot(netns: &Netns, share: &Path) -> Self {
        crate::lab::require_root();
        sweep_stale();
        let dir = std::env::temp_dir().join(format!("{PREFIX}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["rw", "root", "bpf"] {
            std::fs::create_dir_all(dir.join(sub))
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        }
        // A guard before anything is mounted: a failed step below still unmounts the rest.
        let mounts = Mounts { dir: dir.clone() };
        let path = |sub: &str| dir.join(sub).display().to_string();
        mount(&["-t", "tmpfs", "-o", "size=1g", "tmpfs", &path("rw")]);
        for sub in ["rw/upper", "rw/work"] {
            std::fs::create_dir(dir.join(sub)).expect("upper and work directories on the tmpfs");
        }
        let layers = format!(
            "lowerdir=/,upperdir={},workdir={}",
            path("rw/upper"),
            path("rw/work")
        );
        mount(&["-t", "overlay", "-o", &layers, "overlay", &path("root")]);
        // bpffs of the container's own: its pins are not the host's.
        mount(&["-t", "bpf", "-o", "mode=0700", "bpf", &path("bpf")]);

        let console = File::create(dir.join("console.log")).expect("console log");
        let mut command = Command::new("systemd-nspawn");
        command
            .arg("--directory")
            .arg(dir.join("root"))
            .arg(format!("--machine={PREFIX}{}", std::process::id()))
            // No machined, no host journal, no scope unit: the host runs no systemd.
            .args(["--register=no", "--keep-unit", "--link-journal=no"])
            .arg("--console=passive")
            .arg(format!(
                "--network-namespace-path={}",
                netns.path().display()
            ))
            // Beyond nspawn's defaults: what moat's unit grants, and the bpf() system call,
            // which nspawn's seccomp filter refuses otherwise.
            .args([
                "--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN,CAP_SYS_RESOURCE",
                "--system-call-filter=bpf",
            ])
            .arg(format!("--bind={}:/sys/fs/bpf", path("bpf")))
            .arg(format!("--bind-ro={}:/share", share.display()))
            .arg("--boot")
            .stdin(Stdio::null())
            .stdout(console.try_clone().expect("console log"))
            .stderr(console);
        // SAFETY: prctl is async-signal-safe. nspawn dies with the thread that started it (the
        // test's); a container init it leaves orphaned is killed by the next run's sweep.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let nspawn = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run systemd-nspawn: {e} (`cargo xtask setup` installs systemd-container)"
            )
        });
        let mut container = Self {
            dir,
            nspawn,
            leader: 0,
            _mounts: mounts,
        };
        container.leader = container.find_leader();
        container.wait_booted();
        container
    }

    /// Runs `script` with `sh -e` inside the container, as root; returns its output whatever
    /// the exit status.
    pub fn sh(&self, script: &str) -> Output {
        Command::new("nsenter")
            .arg(format!("--target={}", self.leader))
            .args([
                "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup", "--", "sh", "-ec",
            ])
            .arg(script)
            .output()
            .expect("nsenter into the container")
    }

    /// Runs `script` and panics, with its output and `context`, unless it exits 0; returns
    /// its standard output.
    pub fn ok(&self, script: &str, context: &str) -> String {
        let output = self.sh(script);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{context}: `{script}` failed ({}):\n{stdout}{}\n--- journal of the container:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            self.journal()
        );
        stdout
    }

    /// The container's journal (last lines), for failure messages.
    pub fn journal(&self) -> String {
        let output = self.sh("journalctl --no-pager -n 40 -o short-monotonic");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// systemd-nspawn forks the container's PID 1: the child of nspawn that runs systemd.
    fn find_leader(&mut self) -> u32 {
        let nspawn = self.nspawn.id();
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Some(pid) = child_running(nspawn, "systemd") {
                return pid;
            }
            if let Ok(Some(status)) = self.nspawn.try_wait() {
                panic!(
                    "systemd-nspawn exited ({status}) before systemd started:\n{}",
                    self.console()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no systemd under systemd-nspawn after {BOOT_TIMEOUT:?}:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_booted(&self) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            // "running", or "degraded" when a unit of this machine's own failed in a
            // container; moat's units are checked one by one by the test.
            // Bounded, so that a boot that hangs meets the deadline below.
            let state = self.sh("timeout 10 systemctl is-system-running --wait");
            let text = String::from_utf8_lossy(&state.stdout);
            if matches!(text.trim(), "running" | "degraded") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the container did not finish booting in {BOOT_TIMEOUT:?} (state {text:?}):\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }
}

impl Drop for SystemdContainer {
    fn drop(&mut self) {
        if self.leader != 0 {
            // SIGRTMIN+4 asks systemd to power off; nspawn exits when it has.
            // SAFETY: kill with the pid of the container's init (never 0, which would signal
            // this process group) and a signal number; failure (already gone) is fine.
            unsafe { libc::kill(self.leader as libc::pid_t, libc::SIGRTMIN() + 4) };
        }
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while self.leader != 0 && Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        // An init that outlived nspawn would keep the lab's namespace and the mounts busy.
        kill_rooted_in(&self.dir.join("root"));
    }
}

/// Unmounts a container directory's file systems and removes it.
struct Mounts {
    dir: PathBuf,
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for sub in ["root", "bpf", "rw"] {
            unmount(&self.dir.join(sub));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn mount(args: &[&str]) {
    crate::netns::run("mount", args);
}

/// The pid of every process (those that end meanwhile are skipped by the callers' reads).
fn processes() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
}

/// The pid of a running child of `parent` whose command is `comm`.
fn child_running(parent: u32, comm: &str) -> Option<u32> {
    for pid in processes() {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid …": comm may hold spaces, so split after its last ')'.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = head.split_once('(').map(|(_, n)| n);
        let ppid = tail
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if name == Some(comm) && ppid == Some(parent) {
            return Some(pid);
        }
    }
    None
}

/// Containers left by a test run that was killed: their directories are unmounted and removed
/// once the process that made them is gone.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        // Only a directory root made (the temporary directory is everyone's to write in).
        let ours = std::fs::symlink_metadata(entry.path())
            .is_ok_and(|m| m.is_dir() && std::os::unix::fs::MetadataExt::uid(&m) == 0);
        if ours && owner_is_gone(PREFIX, &entry.file_name().to_string_lossy()) {
            kill_rooted_in(&entry.path().join("root"));
            drop(Mounts { dir: entry.path() });
        }
    }
}

/// SIGKILL to every process whose root directory is `root`: the init of an orphaned container
/// (its pid namespace, and all in it, ends with it).
fn kill_rooted_in(root: &Path) {
    for pid in processes() {
        if std::fs::read_link(format!("/proc/{pid}/root")).is_ok_and(|r| r == root) {
            // SAFETY: kill with a pid read from /proc (positive) and a signal number.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}
