//! Changing the policy of a running program so that packets never see a change half-done: every
//! change is validated whole first, written into the generation not in force, switched on with
//! one write (`ACTIVE_GEN`), and then copied into the other generation once the packets that
//! were still using it have finished.

use std::time::Duration;

use agent_common::maps::GENERATIONS;
use aya::Ebpf;

use crate::{
    config::Policy,
    lists::{self, ListError, ListMaps},
    loader::Capacities,
    policy::{self, CompiledPolicy, PolicyError},
    rule_tables::RuleTables,
};

/// An XDP program run takes well under a microsecond; after this long, no packet can still be
/// deciding with the generation that was just switched off.
const GRACE_PERIOD: Duration = Duration::from_millis(2);

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The new policy cannot be enforced by the loaded program; nothing was touched.
    #[error("{0}")]
    Rejected(String),
    #[error(transparent)]
    List(#[from] ListError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// The policy a running program enforces, and what each of its generations holds.
pub struct LivePolicy {
    active: usize,
    /// The policy each generation's maps hold; `None` after a failed write left it unknown.
    held: [Option<Policy>; GENERATIONS],
    capacities: Capacities,
}

impl LivePolicy {
    /// Writes `policy` into both generations of a freshly loaded program.
    pub fn install(
        ebpf: &mut Ebpf,
        policy: &Policy,
        compiled: &CompiledPolicy,
    ) -> Result<Self, PolicyError> {
        compiled.install(ebpf)?;
        Ok(Self {
            active: 0,
            held: [Some(policy.clone()), Some(policy.clone())],
            capacities: compiled.capacities,
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        self.held[self.active]
            .as_ref()
            .expect("the active generation always holds a known policy")
    }

    /// Replaces the policy in force with `new`, or changes nothing and says why.
    pub fn replace(&mut self, ebpf: &mut Ebpf, new: Policy) -> Result<(), ChangeError> {
        // Everything that can fail on the policy itself fails here, before any map is touched.
        self.capacities.fit(&new).map_err(ChangeError::Rejected)?;
        let allow = lists::shape_of("allowlist", &new.allowlist)?;
        let block = lists::shape_of("blocklist", &new.blocklist)?;
        let settings = policy::settings(&new, allow, block);
        let rules = RuleTables::compile(&new.rules);

        let standby = 1 - self.active;
        self.write(ebpf, standby, &new, &rules, settings)?;
        policy::activate(ebpf, standby)?;
        self.active = standby;
        std::thread::sleep(GRACE_PERIOD);
        let other = 1 - standby;
        self.write(ebpf, other, &new, &rules, settings)?;
        Ok(())
    }

    /// Brings generation `generation` from what it holds to `new`.
    fn write(
        &mut self,
        ebpf: &mut Ebpf,
        generation: usize,
        new: &Policy,
        rules: &RuleTables,
        settings: agent_common::settings::Settings,
    ) -> Result<(), ChangeError> {
        let held = self.held[generation].take();
        let result = (|| -> Result<(), ChangeError> {
            // A generation left unknown by a failed write is emptied and rebuilt.
            let from = match held {
                Some(policy) => policy,
                None => {
                    lists::clear(ebpf, &ListMaps::allowlist(generation))?;
                    lists::clear(ebpf, &ListMaps::blocklist(generation))?;
                    Policy::default()
                }
            };
            lists::apply_delta(
                ebpf,
                &ListMaps::allowlist(generation),
                &from.allowlist,
                &new.allowlist,
            )?;
            lists::apply_delta(
                ebpf,
                &ListMaps::blocklist(generation),
                &from.blocklist,
                &new.blocklist,
            )?;
            rules.install(ebpf, generation).map_err(PolicyError::from)?;
            policy::write_settings(ebpf, generation, settings)?;
            Ok(())
        })();
        if result.is_ok() {
            self.held[generation] = Some(new.clone());
        }
        result
    }
}
