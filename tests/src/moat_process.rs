//! The `moat` binary, running inside a lab namespace.

use std::{
    path::PathBuf,
    process::{Child, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::lab::{Lab, Side};

/// How long moat may take to load, fill its maps and attach. Natively it takes well under a
/// second; in a guest under software emulation the verifier alone takes 6 s on an idle machine
/// and over 30 s on a loaded one (CI's 6.1 pass failed at 30).
const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long moat may take to detach and exit after SIGTERM/SIGINT.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The moat binary under test: `MOAT_BIN` when set (the xtask sets it), else the `moat` that
/// cargo built beside this test binary.
pub fn moat_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("MOAT_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/moat
    let candidate = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("moat"))
        .expect("test binary lives in target/<profile>/deps");
    assert!(
        candidate.is_file(),
        "no moat binary at {}: build it first (`cargo xtask test` does) or set MOAT_BIN",
        candidate.display()
    );
    candidate
}

/// A running `moat`; killed on drop if the test did not stop it.
pub struct MoatProcess {
    child: Child,
    log: PathBuf,
}

impl MoatProcess {
    /// Starts `moat <args…>` inside the lab's protected namespace, output to a log file. A
    /// `run` gets the lab's socket, state directory and pin directory unless `args` name them.
    pub fn spawn(lab: &Lab, args: &[&str]) -> Self {
        let mut args: Vec<String> = args.iter().map(ToString::to_string).collect();
        if args.first().is_some_and(|a| a == "run") {
            for (option, value) in [
                ("--socket", lab.socket()),
                ("--state-dir", lab.state_dir()),
                ("--bpffs", lab.bpffs()),
            ] {
                if !args.iter().any(|a| a == option) {
                    args.push(option.to_string());
                    args.push(value.to_string_lossy().into_owned());
                }
            }
        }
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = lab.dir().join(format!("moat-{n}.log"));
        let file = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let stderr = file.try_clone().expect("clone log file");
        let child = lab
            .netns(Side::Protected)
            .command(&moat_bin().to_string_lossy())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start moat: {e}"));
        Self { child, log }
    }

    /// Starts moat and waits until it serves (it logs "moat is enforcing" or "… monitoring"
    /// once attached and listening: a program left pinned by an earlier daemon is attached
    /// before this one is ready); returns the process and the program's kernel id.
    pub fn start(lab: &Lab, args: &[&str]) -> (Self, u32) {
        let mut moat = Self::spawn(lab, args);
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            if moat.log_text().contains("moat is ")
                && let Some((id, _mode)) = lab.xdp(Side::Protected)
            {
                return (moat, id);
            }
            if let Some(status) = moat.child.try_wait().expect("try_wait") {
                panic!(
                    "moat exited ({status}) before attaching; its log:\n{}",
                    moat.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "moat did not attach within {ATTACH_TIMEOUT:?}; its log:\n{}",
                    moat.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs moat to completion (for invocations that must fail fast).
    pub fn run_to_exit(lab: &Lab, args: &[&str]) -> (ExitStatus, String) {
        let mut moat = Self::spawn(lab, args);
        let status = moat.wait(STOP_TIMEOUT * 3);
        (status, moat.log_text())
    }

    /// Runs a client command (`moat --socket <lab socket> args…`) to completion.
    pub fn cli(lab: &Lab, args: &[&str]) -> CliOutput {
        let socket = lab.socket();
        Self::cli_as(lab, args, None, &socket)
    }

    /// `moat status --json`, decoded.
    pub fn status(lab: &Lab) -> serde_json::Value {
        let text = Self::cli(lab, &["status", "--json"]).ok("moat status --json");
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("moat status --json printed {text:?}: {e}"))
    }

    /// `moat attacks --json`, decoded: the protected destinations and their attacks.
    pub fn attacks(lab: &Lab) -> moat::control::protocol::AttacksView {
        let text = Self::cli(lab, &["attacks", "--json"]).ok("moat attacks --json");
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("moat attacks --json printed {text:?}: {e}"))
    }

    /// Runs a client command in the test's own namespace, as an operator's shell does: no
    /// `nsenter` around it (a client needs none), so that timing it times moat alone.
    pub fn cli_here(lab: &Lab, args: &[&str]) -> CliOutput {
        run_client(std::process::Command::new(moat_bin()), &lab.socket(), args)
    }

    /// Runs a client command as `user` (uid, gid) when given, against `socket`.
    pub fn cli_as(
        lab: &Lab,
        args: &[&str],
        user: Option<(u32, u32)>,
        socket: &std::path::Path,
    ) -> CliOutput {
        // A client needs no network namespace (the socket is a path), and an unprivileged one
        // could not enter it: such a client runs where the test runs.
        let command = match user {
            None => lab
                .netns(Side::Protected)
                .command(&moat_bin().to_string_lossy()),
            Some((uid, gid)) => {
                use std::os::unix::process::CommandExt as _;
                let mut command = std::process::Command::new(moat_bin());
                command.uid(uid).gid(gid);
                command
            }
        };
        run_client(command, socket, args)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the daemon with SIGKILL: no destructor, no clean-up of its own.
    pub fn kill_hard(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` without waiting.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(pid, signal) };
    }

    /// Waits until the log holds `text` at least `count` times; returns the log.
    pub fn wait_for_log(&self, text: &str, count: usize) -> String {
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        loop {
            let log = self.log_text();
            if log.matches(text).count() >= count {
                return log;
            }
            if Instant::now() > deadline {
                panic!("moat did not log {text:?} within {ATTACH_TIMEOUT:?}; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` and waits for moat to exit.
    pub fn stop(mut self, signal: libc::c_int) -> (ExitStatus, String) {
        self.signal(signal);
        let status = self.wait(STOP_TIMEOUT);
        (status, self.log_text())
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "moat did not exit within {timeout:?}; its log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for MoatProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a client command printed, and how it exited.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Panics unless the command succeeded; returns its standard output.
    pub fn ok(self, what: &str) -> String {
        assert!(
            self.status.success(),
            "{what} should succeed, got {}; stderr: {}; stdout: {}",
            self.status,
            self.stderr,
            self.stdout
        );
        self.stdout
    }

    /// Panics unless the command failed with a one-line reason; returns that line.
    pub fn refused(self, what: &str) -> String {
        assert!(
            !self.status.success(),
            "{what} should fail, but succeeded; stdout: {}",
            self.stdout
        );
        let reason = self.stderr.trim_end();
        assert!(
            !reason.is_empty() && !reason.contains('\n'),
            "{what} should give a one-line reason, got {reason:?}"
        );
        reason.to_string()
    }
}

/// Runs `command` (moat, wrapped or not) as a client of `socket` to completion.
fn run_client(
    mut command: std::process::Command,
    socket: &std::path::Path,
    args: &[&str],
) -> CliOutput {
    let output = command
        .arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run moat {args:?}: {e}"));
    CliOutput {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}
