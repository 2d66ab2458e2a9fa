//! Changing the policy of a running program so that packets never see a change half-done: every
//! change is validated whole first, written into the generation not in force, switched on with
//! one write (`ACTIVE_GEN`), and then written into the other generation once the packets that
//! were still using it have finished. That last copy is the caller's to schedule
//! ([`LivePolicy::catch_up_due`]): the change is in force, and its reply need not wait for it.

use std::time::{Duration, Instant};

use agent_common::maps::GENERATIONS;

use super::{
    capacities::{Capacities, PrefixCounts},
    lists::{CompiledList, Holdings, ListChange, ListCounts, ListError, LongPrefixes, V4Table},
    map_source::{MapAccessError, MapSource, ResolveError},
    protect_tables::{ProtectBuckets, ProtectMaps, ProtectTables},
    rule_tables::{self, RuleMaps, RuleTables},
    settings::{self, SettingsMaps},
    v6_gate::V6Gate,
};
use crate::config::{ListEntries, ListKind, Policy};

/// An XDP program run takes well under a microsecond; after this long, no packet can still be
/// deciding with the generation that was just switched off (or with what it read of a map
/// before a change).
pub const GRACE_PERIOD: Duration = Duration::from_millis(2);

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The change cannot be enforced by the loaded program; nothing was touched.
    #[error("{0}")]
    Rejected(String),
    #[error(transparent)]
    List(#[from] ListError),
    #[error(transparent)]
    Access(#[from] MapAccessError),
}

/// Changes of at least this many entries write the long-prefix stores and the /24 tables side by
/// side (and the daemon spreads such a request's own work over its threads); a smaller one is
/// written before a worker thread would have woken.
pub const SIDE_BY_SIDE_FROM: usize = 4096;

/// Writes the long-prefix stores (the IPv6 hash's inserts, the IPv4 table's stores) and the
/// /24 tables (mostly ours: compiling them), side by side when `large`. Both are written whatever the other does;
/// the first error stands, and the tables' is logged when both fail.
fn hashes_and_tables(
    large: bool,
    hashes: impl FnOnce() -> Result<(), ListError> + Send,
    tables: impl FnOnce() -> Result<(), ChangeError> + Send,
) -> Result<(), ChangeError> {
    let (hashes, tables) = if large {
        rayon::join(hashes, tables)
    } else {
        (hashes(), tables())
    };
    if let (Err(_), Err(also)) = (&hashes, &tables) {
        tracing::warn!(error = %crate::error_chain(also), "writing the /24 tables failed too");
    }
    hashes?;
    tables
}

/// Checks what only the program's layout limits (IPv6 prefix lengths per list), so that a
/// policy it cannot enforce is refused before anything is loaded.
pub fn check(policy: &Policy) -> Result<(), ListError> {
    for kind in ListKind::ALL {
        ListCounts::of(policy.list(kind)).shape(kind)?;
    }
    Ok(())
}

/// One generation's /24 table, rule tables and protect tables.
struct GenerationMaps {
    v4_table: V4Table,
    rules: RuleMaps,
    protect: ProtectMaps,
}

/// The maps that hold the policy: both generations, the long-prefix stores, the IPv6 gate and the
/// protected entries' buckets they share, their settings, and the switch.
pub struct PolicyMaps {
    generations: [GenerationMaps; GENERATIONS],
    prefixes: LongPrefixes,
    protect_buckets: ProtectBuckets,
    settings: SettingsMaps,
    v6_gate: V6Gate,
}

impl PolicyMaps {
    pub fn resolve(source: &mut MapSource) -> Result<Self, ResolveError> {
        let generations: Vec<GenerationMaps> = (0..GENERATIONS)
            .map(|generation| {
                Ok(GenerationMaps {
                    v4_table: V4Table::resolve(source, generation)?,
                    rules: RuleMaps::resolve(source, generation)?,
                    protect: ProtectMaps::resolve(source, generation)?,
                })
            })
            .collect::<Result<_, ResolveError>>()?;
        Ok(Self {
            generations: generations
                .try_into()
                .unwrap_or_else(|_| unreachable!("one set of maps per generation")),
            prefixes: LongPrefixes::resolve(source)?,
            protect_buckets: ProtectBuckets::resolve(source)?,
            settings: SettingsMaps::resolve(source)?,
            v6_gate: V6Gate::resolve(source)?,
        })
    }
}

/// A change to the policy in force.
#[derive(Debug, Default)]
pub struct PolicyChange {
    pub allowlist: ListChange,
    pub blocklist: ListChange,
    /// The new mode, rules, rate limit, protected entries and sampling (its lists are
    /// ignored); `None`: unchanged.
    pub rest: Option<Policy>,
}

impl PolicyChange {
    /// A change to one list only.
    pub fn of_list(kind: ListKind, change: ListChange) -> Self {
        match kind {
            ListKind::Allow => Self {
                allowlist: change,
                ..Self::default()
            },
            ListKind::Block => Self {
                blocklist: change,
                ..Self::default()
            },
        }
    }
}

/// The policy a running program enforces. Both generations hold it, except one that a failed
/// write left unknown (`stale`), which is rebuilt whole before it is next switched on, and the
/// one switched off by the last change until it catches up (`behind`).
pub struct LivePolicy {
    maps: PolicyMaps,
    policy: Policy,
    allow_counts: ListCounts,
    block_counts: ListCounts,
    active: usize,
    stale: [bool; GENERATIONS],
    behind: Option<Behind>,
    capacities: Capacities,
}

/// The last change, still to be written into the generation it switched off.
struct Behind {
    generation: usize,
    allowlist: ListChange,
    blocklist: ListChange,
    rest: Option<CompiledRest>,
    /// Until then, a packet may still be deciding with that generation.
    due: Instant,
}

/// The tables compiled from the policy's rules and protected entries: once per change, written
/// into both generations.
struct CompiledRest {
    rules: RuleTables,
    protect: ProtectTables,
}

impl CompiledRest {
    fn compile(policy: &Policy) -> Self {
        Self {
            rules: RuleTables::compile(&policy.rules),
            protect: ProtectTables::compile(&policy.protect),
        }
    }

    fn install(&self, maps: &mut GenerationMaps) -> Result<(), MapAccessError> {
        self.rules.install(&mut maps.rules)?;
        self.protect.install(&mut maps.protect)
    }
}

impl LivePolicy {
    /// Writes `policy` into both generations of a freshly loaded program.
    pub fn install(
        maps: PolicyMaps,
        policy: Policy,
        capacities: Capacities,
    ) -> Result<Self, ChangeError> {
        let allow_counts = ListCounts::of(&policy.allowlist);
        let block_counts = ListCounts::of(&policy.blocklist);
        capacities
            .fit(
                &PrefixCounts::of(&[&allow_counts, &block_counts]),
                &policy.rate_limit,
            )
            .map_err(ChangeError::Rejected)?;
        let mut live = Self {
            maps,
            policy,
            allow_counts,
            block_counts,
            active: 0,
            stale: [true; GENERATIONS],
            behind: None,
            capacities,
        };
        live.fill()?;
        live.maps.settings.activate(0)?;
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
        self.policy.list(list)
    }

    /// Entries of each kind in a list.
    pub fn counts(&self, list: ListKind) -> &ListCounts {
        match list {
            ListKind::Allow => &self.allow_counts,
            ListKind::Block => &self.block_counts,
        }
    }

    /// Replaces the policy in force with `new`, or changes nothing and says why.
    pub fn replace(&mut self, mut new: Policy) -> Result<(), ChangeError> {
        let change = PolicyChange {
            allowlist: ListChange::between(&self.policy.allowlist, &new.allowlist),
            blocklist: ListChange::between(&self.policy.blocklist, &new.blocklist),
            rest: {
                new.allowlist = ListEntries::new();
                new.blocklist = ListEntries::new();
                Some(new)
            },
        };
        self.apply(change)
    }

    /// When the generation the last change switched off should catch up ([`Self::catch_up`]);
    /// `None`: both are up to date.
    pub fn catch_up_due(&self) -> Option<Instant> {
        self.behind.as_ref().map(|behind| behind.due)
    }

    /// Writes the last change into the generation it switched off, after waiting out what is
    /// left of the grace period. A failure leaves that generation to be rebuilt before its next
    /// use: the change itself is in force either way.
    pub fn catch_up(&mut self) {
        let Some(behind) = self.behind.take() else {
            return;
        };
        std::thread::sleep(behind.due.saturating_duration_since(Instant::now()));
        // Both generations hold the policy in force once this is written.
        let written = self.write(
            behind.generation,
            &behind.allowlist,
            &behind.blocklist,
            behind.rest.as_ref(),
            None,
        );
        if let Err(e) = written {
            self.stale[behind.generation] = true;
            tracing::warn!(
                error = %crate::error_chain(&e),
                generation = behind.generation,
                "the standby copy of the policy could not be updated; it is rebuilt on the next change"
            );
        }
    }

    /// Applies `change`, or changes nothing and says why. The change is in force when this
    /// returns; the generation it switched off catches up later (see [`Self::catch_up_due`]).
    pub fn apply(&mut self, change: PolicyChange) -> Result<(), ChangeError> {
        // The standby generation must hold the policy in force before a change goes into it.
        self.catch_up();
        // Everything that can fail on the change itself fails here, before any map is touched.
        let (allow_counts, allow_added) = self
            .allow_counts
            .after(&self.policy.allowlist, &change.allowlist);
        let (block_counts, block_added) = self
            .block_counts
            .after(&self.policy.blocklist, &change.blocklist);
        let rate_limit = change
            .rest
            .as_ref()
            .map_or(&self.policy.rate_limit, |rest| &rest.rate_limit);
        // Until the switched-off generation catches up, the shared stores hold the entries of
        // both: the old ones and the change's new ones.
        let peak = PrefixCounts::of(&[
            &self.allow_counts,
            &self.block_counts,
            &allow_added,
            &block_added,
        ]);
        self.capacities
            .fit(&peak, rate_limit)
            .map_err(ChangeError::Rejected)?;
        allow_counts.shape(ListKind::Allow)?;
        block_counts.shape(ListKind::Block)?;

        // What the generation in force holds, in both lists, of every CIDR the change names
        // (in either list): the shared stores keep its slots as they are while the standby's
        // are written.
        let touched = || change.allowlist.cidrs().chain(change.blocklist.cidrs());
        let in_force = (
            ListChange::subset_of(&self.policy.allowlist, touched()),
            ListChange::subset_of(&self.policy.blocklist, touched()),
        );
        // An entry that changed starts with an empty bucket (harmless to the one in force
        // meanwhile: at most one burst more passes).
        if let Some(rest) = &change.rest {
            self.maps
                .protect_buckets
                .reset_changed(&self.policy.protect, &rest.protect)?;
        }
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
        let rest = undo
            .rest
            .is_some()
            .then(|| CompiledRest::compile(&self.policy));

        let standby = 1 - self.active;
        let switched = self
            .write(
                standby,
                &change.allowlist,
                &change.blocklist,
                rest.as_ref(),
                Some((&in_force.0, &in_force.1)),
            )
            .and_then(|()| Ok(self.maps.settings.activate(standby)?));
        if let Err(e) = switched {
            // Packets still decide with the active generation, which holds the old policy.
            self.stale[standby] = true;
            self.take(undo.allowlist, undo.blocklist, undo.rest);
            (self.allow_counts, self.block_counts) = old_counts;
            return Err(e);
        }
        self.active = standby;
        self.behind = Some(Behind {
            generation: 1 - standby,
            allowlist: change.allowlist,
            blocklist: change.blocklist,
            rest,
            due: Instant::now() + GRACE_PERIOD,
        });
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
            std::mem::swap(&mut rest.protect, &mut self.policy.protect);
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
    /// `rest` are the new rules and protected entries, compiled, when they changed; `other` is what the other
    /// generation holds of the entries the change touches (`None`: the policy in force).
    fn write(
        &mut self,
        generation: usize,
        allowlist: &ListChange,
        blocklist: &ListChange,
        rest: Option<&CompiledRest>,
        other: Option<(&ListEntries, &ListEntries)>,
    ) -> Result<(), ChangeError> {
        if self.stale[generation] {
            return self.rebuild(generation);
        }
        // The gate opens before the generation holding the new prefixes can be switched on.
        let added = (allowlist.upserts.iter()).chain(&blocklist.upserts);
        self.maps.v6_gate.open_for(added.map(|(cidr, _)| *cidr))?;
        let current = (&self.policy.allowlist, &self.policy.blocklist);
        let mut holdings: Holdings<'_> = [other.unwrap_or(current); GENERATIONS];
        holdings[generation] = current;
        let (prefixes, maps) = (
            &mut self.maps.prefixes,
            &mut self.maps.generations[generation],
        );
        hashes_and_tables(
            allowlist.len() + blocklist.len() >= SIDE_BY_SIDE_FROM,
            || {
                prefixes.write(
                    allowlist.cidrs().chain(blocklist.cidrs()).copied(),
                    holdings,
                )
            },
            || {
                Ok(maps.v4_table.write_change(
                    (&self.policy.allowlist, allowlist),
                    (&self.policy.blocklist, blocklist),
                )?)
            },
        )?;
        let maps = &mut self.maps.generations[generation];
        if let Some(rest) = rest {
            rest.install(maps)?;
        }
        self.write_settings(generation)
    }

    /// Fills the maps of a freshly loaded program: every generation holds the policy.
    fn fill(&mut self) -> Result<(), ChangeError> {
        let policy = &self.policy;
        for kind in ListKind::ALL {
            self.maps.v6_gate.open_for(policy.list(kind).keys())?;
        }
        let (prefixes, generations) = (&mut self.maps.prefixes, &mut self.maps.generations);
        hashes_and_tables(
            true,
            || prefixes.install([(&policy.allowlist, &policy.blocklist); GENERATIONS]),
            || {
                let (allow, block) = compile_lists(policy)?;
                for generation in generations.iter_mut() {
                    generation.v4_table.install(&allow, &block)?;
                }
                Ok(())
            },
        )?;
        let rest = CompiledRest::compile(&self.policy);
        for generation in 0..GENERATIONS {
            rest.install(&mut self.maps.generations[generation])?;
            self.write_settings(generation)?;
            self.stale[generation] = false;
        }
        Ok(())
    }

    /// Writes the whole policy into `generation`, whatever a failed write left in it, without
    /// touching what the other generation holds.
    fn rebuild(&mut self, generation: usize) -> Result<(), ChangeError> {
        let policy = &self.policy;
        for kind in ListKind::ALL {
            self.maps.v6_gate.open_for(policy.list(kind).keys())?;
        }
        let (allow, block) = compile_lists(policy)?;
        self.maps.generations[generation]
            .v4_table
            .install(&allow, &block)?;
        self.maps
            .prefixes
            .rebuild(generation, &policy.allowlist, &policy.blocklist)?;
        CompiledRest::compile(policy).install(&mut self.maps.generations[generation])?;
        self.write_settings(generation)?;
        self.stale[generation] = false;
        Ok(())
    }

    fn write_settings(&mut self, generation: usize) -> Result<(), ChangeError> {
        let settings = settings::settings(
            &self.policy,
            self.allow_counts.shape(ListKind::Allow)?,
            self.block_counts.shape(ListKind::Block)?,
            rule_tables::optional_fields(&self.policy.rules),
        );
        let syn_proxy = settings::syn_proxy_settings(&self.policy);
        Ok(self.maps.settings.write(generation, settings, syn_proxy)?)
    }
}

/// The policy's allowlist and blocklist, compiled.
fn compile_lists(policy: &Policy) -> Result<(CompiledList, CompiledList), ListError> {
    Ok((
        CompiledList::compile(ListKind::Allow, &policy.allowlist)?,
        CompiledList::compile(ListKind::Block, &policy.blocklist)?,
    ))
}
