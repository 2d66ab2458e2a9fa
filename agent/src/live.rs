//! Changing the policy of a running program so that packets never see a change half-done: every
//! change is validated whole first, written into the generation not in force, switched on with
//! one write (`ACTIVE_GEN`), and then written into the other generation once the packets that
//! were still using it have finished.

use std::time::Duration;

use agent_common::maps::GENERATIONS;
use aya::Ebpf;

use crate::{
    config::{ListEntries, Policy},
    lists::{self, CompiledList, ListChange, ListCounts, ListError, ListMaps},
    loader::Capacities,
    policy::{self, PolicyError},
    rule_tables::RuleTables,
};

/// An XDP program run takes well under a microsecond; after this long, no packet can still be
/// deciding with the generation that was just switched off.
const GRACE_PERIOD: Duration = Duration::from_millis(2);

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The change cannot be enforced by the loaded program; nothing was touched.
    #[error("{0}")]
    Rejected(String),
    #[error(transparent)]
    List(#[from] ListError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

/// Which list a change is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ListKind {
    Allow,
    Block,
}

impl ListKind {
    pub fn name(self) -> &'static str {
        match self {
            ListKind::Allow => "allowlist",
            ListKind::Block => "blocklist",
        }
    }

    fn maps(self, generation: usize) -> ListMaps {
        match self {
            ListKind::Allow => ListMaps::allowlist(generation),
            ListKind::Block => ListMaps::blocklist(generation),
        }
    }
}

/// A change to the policy in force.
#[derive(Debug, Default)]
pub struct PolicyChange {
    pub allowlist: ListChange,
    pub blocklist: ListChange,
    /// The new mode, rules, rate limit and sampling (its lists are ignored); `None`: unchanged.
    pub rest: Option<Policy>,
}

/// The policy a running program enforces. Both generations hold it, except one that a failed
/// write left unknown (`stale`), which is rebuilt whole before it is next switched on.
pub struct LivePolicy {
    policy: Policy,
    allow_counts: ListCounts,
    block_counts: ListCounts,
    active: usize,
    stale: [bool; GENERATIONS],
    capacities: Capacities,
}

impl LivePolicy {
    /// Writes `policy` into both generations of a freshly loaded program.
    pub fn install(
        ebpf: &mut Ebpf,
        policy: Policy,
        capacities: Capacities,
    ) -> Result<Self, ChangeError> {
        let allow_counts = ListCounts::of(&policy.allowlist);
        let block_counts = ListCounts::of(&policy.blocklist);
        capacities
            .fit(&allow_counts, &block_counts, &policy.rate_limit)
            .map_err(ChangeError::Rejected)?;
        let mut live = Self {
            policy,
            allow_counts,
            block_counts,
            active: 0,
            stale: [true; GENERATIONS],
            capacities,
        };
        let generations: Vec<usize> = (0..GENERATIONS).collect();
        live.rebuild(ebpf, &generations)?;
        policy::activate(ebpf, 0)?;
        Ok(live)
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn capacities(&self) -> Capacities {
        self.capacities
    }

    /// The entries of a list in force, with their sources.
    pub fn entries(&self, list: ListKind) -> &ListEntries {
        match list {
            ListKind::Allow => &self.policy.allowlist,
            ListKind::Block => &self.policy.blocklist,
        }
    }

    /// Entries of each kind in a list.
    pub fn counts(&self, list: ListKind) -> &ListCounts {
        match list {
            ListKind::Allow => &self.allow_counts,
            ListKind::Block => &self.block_counts,
        }
    }

    /// Replaces the policy in force with `new`, or changes nothing and says why.
    pub fn replace(&mut self, ebpf: &mut Ebpf, mut new: Policy) -> Result<(), ChangeError> {
        let change = PolicyChange {
            allowlist: ListChange::between(&self.policy.allowlist, &new.allowlist),
            blocklist: ListChange::between(&self.policy.blocklist, &new.blocklist),
            rest: {
                new.allowlist.clear();
                new.blocklist.clear();
                Some(new)
            },
        };
        self.apply(ebpf, change)
    }

    /// Applies `change`, or changes nothing and says why.
    pub fn apply(&mut self, ebpf: &mut Ebpf, change: PolicyChange) -> Result<(), ChangeError> {
        // Everything that can fail on the change itself fails here, before any map is touched.
        let allow_counts = self
            .allow_counts
            .after(&self.policy.allowlist, &change.allowlist);
        let block_counts = self
            .block_counts
            .after(&self.policy.blocklist, &change.blocklist);
        let rate_limit = change
            .rest
            .as_ref()
            .map_or(&self.policy.rate_limit, |rest| &rest.rate_limit);
        self.capacities
            .fit(&allow_counts, &block_counts, rate_limit)
            .map_err(ChangeError::Rejected)?;
        allow_counts.shape(ListKind::Allow.name())?;
        block_counts.shape(ListKind::Block.name())?;

        let undo = self.take(
            change.allowlist.clone(),
            change.blocklist.clone(),
            change.rest,
        );
        let old_counts = (
            std::mem::replace(&mut self.allow_counts, allow_counts),
            std::mem::replace(&mut self.block_counts, block_counts),
        );
        // Compiled once, written into both generations.
        let rules = undo
            .rest
            .is_some()
            .then(|| RuleTables::compile(&self.policy.rules));

        let standby = 1 - self.active;
        let switched = self
            .write(
                ebpf,
                standby,
                &change.allowlist,
                &change.blocklist,
                rules.as_ref(),
            )
            .and_then(|()| Ok(policy::activate(ebpf, standby)?));
        if let Err(e) = switched {
            // Packets still decide with the active generation, which holds the old policy.
            self.stale[standby] = true;
            self.take(undo.allowlist, undo.blocklist, undo.rest);
            (self.allow_counts, self.block_counts) = old_counts;
            return Err(e);
        }
        self.active = standby;
        std::thread::sleep(GRACE_PERIOD);
        let other = 1 - standby;
        if let Err(e) = self.write(
            ebpf,
            other,
            &change.allowlist,
            &change.blocklist,
            rules.as_ref(),
        ) {
            // The change is in force; the other generation is rebuilt before its next use.
            self.stale[other] = true;
            tracing::warn!(
                error = %crate::error_chain(&e),
                generation = other,
                "the standby copy of the policy could not be updated; it is rebuilt on the next change"
            );
        }
        Ok(())
    }

    /// Puts the change into `self.policy` and returns the change that takes it out again.
    fn take(
        &mut self,
        allowlist: ListChange,
        blocklist: ListChange,
        rest: Option<Policy>,
    ) -> PolicyChange {
        let undo_allow = allowlist.apply_to(&mut self.policy.allowlist);
        let undo_block = blocklist.apply_to(&mut self.policy.blocklist);
        let undo_rest = rest.map(|mut rest| {
            std::mem::swap(&mut rest.mode, &mut self.policy.mode);
            std::mem::swap(&mut rest.rules, &mut self.policy.rules);
            std::mem::swap(&mut rest.rate_limit, &mut self.policy.rate_limit);
            std::mem::swap(&mut rest.sample_every, &mut self.policy.sample_every);
            rest
        });
        PolicyChange {
            allowlist: undo_allow,
            blocklist: undo_block,
            rest: undo_rest,
        }
    }

    /// Brings `generation`, which held the policy before the change, to `self.policy`;
    /// `rules` are the new rules, compiled, when they changed.
    fn write(
        &mut self,
        ebpf: &mut Ebpf,
        generation: usize,
        allowlist: &ListChange,
        blocklist: &ListChange,
        rules: Option<&RuleTables>,
    ) -> Result<(), ChangeError> {
        if self.stale[generation] {
            return self.rebuild(ebpf, &[generation]);
        }
        lists::write_change(
            ebpf,
            &ListKind::Allow.maps(generation),
            &self.policy.allowlist,
            allowlist,
        )?;
        lists::write_change(
            ebpf,
            &ListKind::Block.maps(generation),
            &self.policy.blocklist,
            blocklist,
        )?;
        if let Some(rules) = rules {
            rules.install(ebpf, generation).map_err(PolicyError::from)?;
        }
        self.write_settings(ebpf, generation)
    }

    /// Empties each of `generations` and writes the whole policy into it, compiling the lists
    /// and rules once for all of them.
    fn rebuild(&mut self, ebpf: &mut Ebpf, generations: &[usize]) -> Result<(), ChangeError> {
        for (kind, entries) in [
            (ListKind::Allow, &self.policy.allowlist),
            (ListKind::Block, &self.policy.blocklist),
        ] {
            let compiled = CompiledList::compile(&kind.maps(0), entries)?;
            for &generation in generations {
                let maps = kind.maps(generation);
                lists::clear(ebpf, &maps)?;
                compiled.install(ebpf, &maps)?;
            }
        }
        let rules = RuleTables::compile(&self.policy.rules);
        for &generation in generations {
            rules.install(ebpf, generation).map_err(PolicyError::from)?;
            self.write_settings(ebpf, generation)?;
            self.stale[generation] = false;
        }
        Ok(())
    }

    fn write_settings(&self, ebpf: &mut Ebpf, generation: usize) -> Result<(), ChangeError> {
        let settings = policy::settings(
            &self.policy,
            self.allow_counts.shape(ListKind::Allow.name())?,
            self.block_counts.shape(ListKind::Block.name())?,
        );
        Ok(policy::write_settings(ebpf, generation, settings)?)
    }
}
