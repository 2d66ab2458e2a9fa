//! The real XDP program, loaded with a policy, run on crafted frames through
//! `BPF_PROG_TEST_RUN` (no interface involved): the program-level test harness.

use aya::{
    Ebpf,
    programs::{TestRun as _, TestRunOptions},
};
use moat::{
    config::Policy,
    program::{
        capacities::Capacities,
        counters::{CounterMaps, Framing, Snapshot},
        fingerprints::FingerprintMaps,
        limiter::LimiterMaps,
        live::LivePolicy,
        loader::{self, Loaded},
        map_source::MapHandles,
        maps::ProgramMaps,
        sampling::SamplingOverride,
    },
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// The interface test runs arrive on: the test process's loopback device.
pub const TEST_RUN_IF_INDEX: u32 = 1;

/// A program loaded (not attached) with a policy.
pub struct LoadedProgram {
    pub ebpf: Ebpf,
    /// The policy in the program's maps, for tests that change it.
    pub live: LivePolicy,
    pub limiter: LimiterMaps,
    pub counters: CounterMaps,
    pub sampling: SamplingOverride,
    pub fingerprints: FingerprintMaps,
    /// The name and kernel id of every map the agent resolved.
    pub map_handles: MapHandles,
}

impl LoadedProgram {
    pub fn new(policy: &Policy) -> Self {
        Self::with_framing(policy, Framing::Ethernet)
    }

    /// A program whose test-run interface's frames start as `framing` says.
    pub fn with_framing(policy: &Policy, framing: Framing) -> Self {
        crate::lab::require_root();
        let capacities = Capacities::for_policy(policy, 0);
        let Loaded { ebpf, maps } = loader::load(capacities)
            .unwrap_or_else(|e| panic!("loading the program failed: {}", moat::error_chain(&e)));
        let ProgramMaps {
            policy: policy_maps,
            limiter,
            mut counters,
            events: _,
            fingerprints,
            sampling,
            clock: _,
            handles: map_handles,
        } = maps;
        let live = LivePolicy::install(policy_maps, policy.clone(), capacities)
            .unwrap_or_else(|e| panic!("installing the test policy: {}", moat::error_chain(&e)));
        counters
            .register_interfaces(&[(TEST_RUN_IF_INDEX, framing)])
            .expect("registering lo");
        Self {
            ebpf,
            live,
            limiter,
            counters,
            sampling,
            fingerprints,
            map_handles,
        }
    }

    /// Runs the program once on `frame`; returns the XDP action.
    pub fn run(&mut self, frame: &[u8]) -> u32 {
        self.run_repeated(frame, 1)
    }

    /// Runs the program `repeat` times on `frame`; returns the last XDP action.
    pub fn run_repeated(&mut self, frame: &[u8], repeat: u32) -> u32 {
        let program = loader::program(&mut self.ebpf).expect("the program");
        let mut options = TestRunOptions::new();
        options.data_in = Some(frame);
        options.repeat = repeat;
        program
            .test_run(options)
            .unwrap_or_else(|e| {
                panic!(
                    "BPF_PROG_TEST_RUN failed on a {}-byte frame: {e}",
                    frame.len()
                )
            })
            .return_value
    }

    /// Runs the program once on `frame`; returns the XDP action and the frame as the program
    /// left it (rewritten, for an answer sent back out).
    pub fn run_out(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let program = loader::program(&mut self.ebpf).expect("the program");
        // Room for a frame that grows (a SYN-ACK may be longer than its SYN).
        let mut out = vec![0u8; frame.len() + 256];
        let mut options = TestRunOptions::new();
        options.data_in = Some(frame);
        options.data_out = Some(&mut out);
        let result = program.test_run(options).unwrap_or_else(|e| {
            panic!(
                "BPF_PROG_TEST_RUN failed on a {}-byte frame: {e}",
                frame.len()
            )
        });
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// The program's fd (a duplicate), for callers that run it themselves.
    pub fn fd(&mut self) -> std::os::fd::OwnedFd {
        use std::os::fd::AsFd as _;
        let program = loader::program(&mut self.ebpf).expect("the program");
        program
            .fd()
            .expect("a loaded program has an fd")
            .as_fd()
            .try_clone_to_owned()
            .expect("dup the program's fd")
    }

    /// The program's kernel id.
    pub fn program_id(&mut self) -> u32 {
        loader::program(&mut self.ebpf)
            .and_then(|p| p.info().map_err(loader::LoadError::Verify))
            .expect("the program's info")
            .id()
    }

    pub fn snapshot(&self) -> Snapshot {
        self.counters.snapshot().expect("reading the counters")
    }
}

/// The XDP action the program returns for a counted `action`.
pub fn xdp_action(action: agent_common::stats::Action) -> u32 {
    use agent_common::stats::Action;
    match action {
        Action::Drop => XDP_DROP,
        Action::Tx => XDP_TX,
        Action::Pass | Action::WouldDrop | Action::WouldTx => XDP_PASS,
    }
}

pub fn action_name(action: u32) -> &'static str {
    match action {
        XDP_ABORTED => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        _ => "unexpected XDP action",
    }
}
