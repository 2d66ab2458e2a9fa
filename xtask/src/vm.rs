//! `cargo xtask vm-test`: moat's privileged integration tests on other kernels, each booted in a
//! throwaway VM by virtme-ng (QEMU, the host's filesystem shared read-only over 9p). The same
//! test binaries and the same veth/netns lab run inside; a probe reports the verifier's view of
//! the program on each kernel.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

use crate::{
    command::{build_binaries, cargo, describe, output, run, workspace_root},
    setup,
    test_results::{count_before, failures_section},
};

/// virtme-ng release this project is tested with (PyPI), installed in a venv under target/.
const VIRTME_NG: &str = "virtme-ng==1.42";
/// A healthy KVM guest boots in seconds; one that hangs is given up on after this.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(25);
/// One integration test binary inside a VM, and the whole pass. Under software emulation the
/// control-plane tests take about 5 minutes and the whole pass 20 to 27 here, 34 on CI's
/// machine (each program load alone takes 6 to 13 s): room for a slower machine, inside
/// CI's 90.
const TEST_BINARY_TIMEOUT: Duration = Duration::from_secs(12 * 60);
const VM_TIMEOUT: Duration = Duration::from_secs(50 * 60);
const VM_MEMORY: &str = "2G";

/// `cargo xtask vm-test`'s options.
#[derive(clap::Args)]
pub struct Options {
    /// A kernel image to boot (repeatable).
    #[arg(long = "kernel", value_name = "PATH")]
    kernels: Vec<PathBuf>,
}

/// Runs the integration tests on each kernel asked for: without `--kernel`, Debian's 6.1 LTS
/// image and the running kernel (natively).
pub fn run_tests(options: Options) -> anyhow::Result<()> {
    setup::ensure_ready()?;
    if !crate::command::is_root() {
        bail!("the VM tests need root (the lab inside needs it, and so does the host pass)");
    }
    let targets = if options.kernels.is_empty() {
        vec![Target::Image(setup::debian_kernel()?), Target::Host]
    } else {
        options.kernels.into_iter().map(Target::Image).collect()
    };
    run_all(&targets)
}

/// Where a kernel's tests run.
#[derive(Clone, Debug)]
pub enum Target {
    /// Boot this kernel image in a VM.
    Image(PathBuf),
    /// The running kernel, without a VM (no image of it may exist on disk).
    Host,
}

impl Target {
    fn label(&self) -> String {
        match self {
            Self::Image(path) => path
                .file_name()
                .map(|n| {
                    n.to_string_lossy()
                        .trim_start_matches("vmlinuz-")
                        .to_string()
                })
                .unwrap_or_else(|| path.display().to_string()),
            Self::Host => host_release(),
        }
    }
}

/// What one kernel's pass produced.
struct Outcome {
    kernel: String,
    runner: String,
    passed: u64,
    failed: u64,
    binaries_failed: Vec<String>,
    /// What each failed binary printed about its failures, for CI's log (the VM's files stay
    /// behind on the machine that ran it).
    failure_reports: Vec<(String, String)>,
    /// How long each binary ran, as libtest reported it: where the pass's time goes.
    durations: Vec<String>,
    verified_insns: String,
    load_ms: String,
}

/// Runs the pass on every target and prints the table; fails if any test failed.
pub fn run_all(targets: &[Target]) -> anyhow::Result<()> {
    let tests = build()?;
    let needs_vm = targets.iter().any(|t| matches!(t, Target::Image(_)));
    let vng = if needs_vm { Some(Vng::ready()?) } else { None };
    let mut outcomes = Vec::new();
    for target in targets {
        let started = Instant::now();
        let outcome = match target {
            Target::Image(image) => {
                let vng = vng.as_ref().expect("vng is ready when a VM is needed");
                run_in_vm(vng, image, &tests)?
            }
            Target::Host => run_on_host(&tests)?,
        };
        eprintln!(
            "vm-test: {} ({}) done in {:.0} s",
            outcome.kernel,
            outcome.runner,
            started.elapsed().as_secs_f64()
        );
        outcomes.push(outcome);
    }
    print_table(&outcomes);
    let failed: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.failed > 0 || !o.binaries_failed.is_empty() || o.passed == 0)
        .collect();
    if !failed.is_empty() {
        let names: Vec<String> = failed
            .iter()
            .map(|o| format!("{} ({})", o.kernel, o.binaries_failed.join(", ")))
            .collect();
        bail!(
            "tests failed on {}; logs under {}",
            names.join("; "),
            out_root().display()
        );
    }
    Ok(())
}

/// Test binaries that run on the host only: the package's (it boots systemd in a container
/// over the host's own root, which virtme-ng's guest neither has nor needs; the kernel under
/// the service is what the other binaries test), and the protected destinations' floods
/// (`protect`: they judge rates and timings at trafgen's full speed, which an emulated guest
/// reaches at a hundredth of the host's, with a clock that stalls; the kernel side of
/// protected destinations and fingerprints is tested in the guest by `program` and `fuzz`),
/// and the fleet's (`fleet`: NATS and moat's user space; what it writes goes through the same
/// list maps `control` tests in the guest).
const HOST_ONLY_TESTS: &[&str] = &["package", "protect", "fleet"];

/// The integration test binaries (name, path), plus the probe and moat itself, freshly built.
fn build() -> anyhow::Result<Vec<(String, PathBuf)>> {
    build_binaries()?;
    // The daemon the guest runs is the release build, as shipped: under software emulation a
    // debug build's own work (an import, a state save) costs a fifth of the control tests' time.
    run(cargo().args(["build", "--release", "--package", "moat"]))?;
    let json = output(cargo().args([
        "test",
        "--package",
        "moat-tests",
        "--tests",
        "--no-run",
        "--message-format=json",
    ]))?;
    let mut tests = Vec::new();
    for line in json.lines() {
        // A compiler-artifact line for a test target with an executable.
        let Some(executable) = json_field(line, "executable") else {
            continue;
        };
        if line.contains("\"kind\":[\"test\"]") {
            let name = Path::new(&executable)
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.rsplit_once('-').map(|(name, _hash)| name.to_string()))
                .ok_or_else(|| anyhow!("unexpected test executable name {executable}"))?;
            if !HOST_ONLY_TESTS.contains(&name.as_str()) {
                tests.push((name, PathBuf::from(executable)));
            }
        }
    }
    if tests.is_empty() {
        bail!("cargo built no integration test binaries for moat-tests");
    }
    tests.sort();
    Ok(tests)
}

/// The string value of `"key":"…"` in one line of cargo's JSON (paths contain no quotes).
fn json_field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let end = start + line[start..].find('"')?;
    Some(line[start..end].to_string())
}

fn out_root() -> PathBuf {
    workspace_root().join("target").join("vm")
}

/// The script that runs inside the VM (or on the host): the probe, then every test binary,
/// each writing its output into `out`.
fn write_script(out: &Path, tests: &[(String, PathBuf)]) -> anyhow::Result<PathBuf> {
    let debug = workspace_root().join("target").join("debug");
    let release = workspace_root().join("target").join("release");
    let mut script = format!(
        "#!/bin/bash\n# Written by cargo xtask vm-test.\nexport MOAT_BIN={moat}\nexport RUST_BACKTRACE=0\ncd {tests_dir}\n\
         uname -r > {out}/kernel\n{probe} > {out}/probe 2>&1\n",
        moat = release.join("moat").display(),
        tests_dir = workspace_root().join("tests").display(),
        out = out.display(),
        probe = debug.join("moat-probe").display(),
    );
    // One test at a time: under software emulation, parallel floods starve the other tests'
    // traffic; and a time limit per binary, so that one hang cannot hide the rest.
    for (name, path) in tests {
        script.push_str(&format!(
            "timeout {limit} {path} --test-threads=1 > {out}/{name}.log 2>&1; echo $? > {out}/{name}.rc\n",
            limit = TEST_BINARY_TIMEOUT.as_secs(),
            path = path.display(),
            out = out.display()
        ));
    }
    script.push_str(&format!("touch {}/done\n", out.display()));
    let path = out.join("run.sh");
    std::fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn fresh_dir(label: &str) -> anyhow::Result<PathBuf> {
    let dir = out_root().join("runs").join(label);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn run_on_host(tests: &[(String, PathBuf)]) -> anyhow::Result<Outcome> {
    let label = format!("host-{}", host_release());
    let out = fresh_dir(&label)?;
    let script = write_script(&out, tests)?;
    run(Command::new("bash").arg(&script))?;
    collect(&out, tests, "host (no VM)".into())
}

fn run_in_vm(vng: &Vng, image: &Path, tests: &[(String, PathBuf)]) -> anyhow::Result<Outcome> {
    let label = Target::Image(image.to_path_buf()).label();
    let out = fresh_dir(&label)?;
    let script = write_script(&out, tests)?;
    let mut command = vng.command(image);
    command
        .arg("--rwdir")
        .arg(&out)
        .arg("--")
        .arg(format!("bash {}", script.display()));
    // The guest's console is noisy (escape sequences); keep it beside the logs.
    let console_path = out.join("console.log");
    let console = std::fs::File::create(&console_path)
        .with_context(|| format!("creating {}", console_path.display()))?;
    command.stdout(console.try_clone()?).stderr(console);
    eprintln!("vm-test: booting {label} ({})", vng.accel_note());
    let status = run_with_timeout(&mut command, VM_TIMEOUT)?;
    if !out.join("done").exists() {
        bail!(
            "the VM for {label} stopped before the tests finished ({status}); its console is in {}",
            console_path.display()
        );
    }
    collect(&out, tests, format!("VM, {}", vng.accel_note()))
}

fn collect(out: &Path, tests: &[(String, PathBuf)], runner: String) -> anyhow::Result<Outcome> {
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    let probe = read("probe");
    let field = |key: &str| {
        probe
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .unwrap_or("not loaded")
            .to_string()
    };
    let mut outcome = Outcome {
        kernel: read("kernel").trim().to_string(),
        runner,
        passed: 0,
        failed: 0,
        binaries_failed: Vec::new(),
        failure_reports: Vec::new(),
        durations: Vec::new(),
        verified_insns: field("verified_insns"),
        load_ms: field("load_ms"),
    };
    if !probe.contains("loaded=true") {
        outcome
            .binaries_failed
            .push(format!("probe: {}", probe.trim()));
    }
    for (name, _) in tests {
        let log = read(&format!("{name}.log"));
        for result in log.lines().filter_map(|l| l.strip_prefix("test result: ")) {
            outcome.passed += count_before(result, " passed");
            outcome.failed += count_before(result, " failed");
            if let Some((_, took)) = result.rsplit_once("finished in ") {
                outcome.durations.push(format!("{name} {took}"));
            }
        }
        let rc = read(&format!("{name}.rc"));
        if rc.trim() != "0" {
            outcome.binaries_failed.push(name.clone());
            outcome
                .failure_reports
                .push((name.clone(), failure_report(&log, rc.trim())));
        }
    }
    Ok(outcome)
}

/// Lines of a failed binary's log that CI prints at most.
const FAILURE_REPORT_LINES: usize = 200;

/// Why a test binary failed, for CI's log: its exit and what libtest said about the failures
/// (or, when `timeout` killed it before it could, the end of its log).
fn failure_report(log: &str, rc: &str) -> String {
    let why = match rc {
        "124" => format!(
            "killed after {} s (the binary's time limit)",
            TEST_BINARY_TIMEOUT.as_secs()
        ),
        "" => "no exit status (the VM stopped first)".to_string(),
        code => format!("exit status {code}"),
    };
    format!("{why}\n{}", failures_section(log, FAILURE_REPORT_LINES))
}

fn print_table(outcomes: &[Outcome]) {
    for o in outcomes {
        for (name, report) in &o.failure_reports {
            println!("\n---- {name} on {} ({}): {report}", o.kernel, o.runner);
        }
    }
    println!();
    println!(
        "{:<22} {:<22} {:>7} {:>7} {:>15} {:>10}",
        "kernel", "where", "passed", "failed", "verifier insns", "load ms"
    );
    for o in outcomes {
        println!(
            "{:<22} {:<22} {:>7} {:>7} {:>15} {:>10}",
            o.kernel, o.runner, o.passed, o.failed, o.verified_insns, o.load_ms
        );
        println!("    took: {}", o.durations.join(", "));
        for failure in &o.binaries_failed {
            println!("    failed: {failure}");
        }
    }
    // The plain closing line CI reads.
    let passed: u64 = outcomes.iter().map(|o| o.passed).sum();
    let failed: u64 = outcomes.iter().map(|o| o.failed).sum();
    println!("vm-test: {passed} passed, {failed} failed");
}

fn host_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "running kernel".into())
}

/// virtme-ng, installed and with its accelerator chosen.
pub struct Vng {
    bin_dir: PathBuf,
    kvm: bool,
}

impl Vng {
    /// Installs virtme-ng into target/vm/venv if needed and probes KVM.
    pub fn ready() -> anyhow::Result<Self> {
        let venv = out_root().join("venv");
        let bin_dir = venv.join("bin");
        if !bin_dir.join("vng").exists() {
            setup::pip_install(&venv, VIRTME_NG)?;
        }
        let mut vng = Self {
            bin_dir,
            kvm: false,
        };
        vng.kvm = vng.kvm_works()?;
        Ok(vng)
    }

    /// A guest that hangs at boot under KVM is a known failure of nested setups: try a
    /// trivial boot and fall back to software emulation if it does not come back.
    fn kvm_works(&self) -> anyhow::Result<bool> {
        if !Path::new("/dev/kvm").exists() {
            eprintln!("vm-test: no /dev/kvm; using software emulation (TCG)");
            return Ok(false);
        }
        let image = setup::debian_kernel()?;
        let mut probe = self.base_command(&image, true);
        probe
            .args(["--", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let status = run_with_timeout(&mut probe, KVM_PROBE_TIMEOUT);
        match status {
            Ok(status) if status.success() => {
                eprintln!("vm-test: KVM works; using it");
                Ok(true)
            }
            _ => {
                eprintln!(
                    "vm-test: a KVM guest did not boot within {KVM_PROBE_TIMEOUT:?}; falling back to software emulation (TCG)"
                );
                Ok(false)
            }
        }
    }

    fn base_command(&self, image: &Path, kvm: bool) -> Command {
        let mut command = Command::new(self.bin_dir.join("vng"));
        // vng runs virtme-run from the same venv.
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![self.bin_dir.clone()];
        paths.extend(std::env::split_paths(&path));
        command.env("PATH", std::env::join_paths(paths).unwrap_or(path));
        command
            .arg("--run")
            .arg(image)
            .args(["--force-9p", "--memory", VM_MEMORY, "--cpus", "2"]);
        if !kvm {
            command.arg("--disable-kvm");
        }
        command.stdin(Stdio::null());
        command
    }

    fn command(&self, image: &Path) -> Command {
        self.base_command(image, self.kvm)
    }

    fn accel_note(&self) -> &'static str {
        if self.kvm { "KVM" } else { "TCG" }
    }
}

/// Runs `command` in its own process group, killing the whole group (vng and the QEMU it
/// started) and failing after `timeout`.
fn run_with_timeout(
    command: &mut Command,
    timeout: Duration,
) -> anyhow::Result<std::process::ExitStatus> {
    use std::os::unix::process::CommandExt as _;
    let mut child = command
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start `{}`", describe(command)))?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            if let Ok(pgid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: kill(2) on the process group we created.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
            let _ = child.wait();
            bail!("`{}` did not finish within {timeout:?}", describe(command));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
