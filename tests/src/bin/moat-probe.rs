//! Loads moat's XDP program on this kernel with a representative policy (lists, rules, rate
//! limit with bans) and reports what the verifier made of it, as one line of `key=value`
//! pairs for `cargo xtask vm-test`.

use std::{path::Path, time::Instant};

use moat::{
    config::{Config, Overrides},
    program::{
        capacities::Capacities,
        loader::{self, LoadError, Loaded},
    },
};

const POLICY: &str = r#"
interfaces = ["lo"]
[allowlist]
cidrs = ["192.0.2.0/24", "2001:db8:a11::/48"]
[blocklist]
cidrs = ["198.51.100.0/24", "203.0.113.77", "2001:db8:bad::/48", "2001:db8:beef::5"]
[[rules]]
name = "memcached-reflection"
protocol = "udp"
src_ports = [11211]
action = "drop"
[rate_limit]
pps = 1000
bps = "20Mbit"
ban_after = "2s"
ban_ttl = "10m"
"#;

fn main() {
    let policy = Config::from_str_at(POLICY, Path::new("probe.toml"))
        .and_then(|c| c.resolve(&Overrides::default()))
        .unwrap_or_else(|e| panic!("probe policy: {e}"))
        .policy;
    let started = Instant::now();
    let Loaded { mut ebpf, maps: _ } = match loader::load(Capacities::for_policy(&policy, 0)) {
        Ok(loaded) => loaded,
        Err(e) => {
            println!("loaded=false error={:?}", moat::error_chain(&e));
            std::process::exit(1);
        }
    };
    let load_time = started.elapsed();
    let info = loader::program(&mut ebpf)
        .and_then(|p| p.info().map_err(LoadError::Verify))
        .expect("program info");
    let insns = info
        .verified_instruction_count()
        .map_or_else(|| "unknown".to_string(), |n| n.to_string());
    println!(
        "loaded=true verified_insns={insns} load_ms={:.1}",
        load_time.as_secs_f64() * 1000.0
    );
}
