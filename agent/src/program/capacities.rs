//! How big the maps whose capacity depends on the configuration are made at load: room for the
//! policy's entries plus what may be added while running. A loaded program's maps cannot be
//! resized, so every later change is checked against these.

use agent_common::{
    lists::V4_LONG_BUCKET_SLOTS,
    maps::{LONG_PREFIXES_DEFAULT_CAPACITY, V4_LONG_STASH_SHARE},
};

use super::lists::ListCounts;
use crate::config::{ListKind, Policy, RateLimit};

/// Sizes of the maps whose capacity depends on the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// IPv4 prefixes longer than /24, both lists (their shared table).
    pub v4_long: u32,
    /// IPv6 prefixes, both lists (their shared hash).
    pub v6: u32,
    /// Sources the rate limiter (and the ban list) track at once.
    pub rate_sources: u32,
}

/// Entries of the long-prefix stores both lists share: the sum of the lists' counts (a prefix
/// in both lists is one entry, so this is an upper bound).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixCounts {
    pub v4_long: usize,
    pub v6: usize,
}

impl PrefixCounts {
    pub fn of(lists: &[&ListCounts]) -> Self {
        Self {
            v4_long: lists.iter().map(|l| l.v4_long()).sum(),
            v6: lists.iter().map(|l| l.v6()).sum(),
        }
    }
}

impl Capacities {
    /// Room for twice the policy's entries plus `runtime_entries` added while running, never
    /// below the built-in default. Until the generation a change switched off catches up, the
    /// shared stores hold the entries of both generations: twice the configuration's lets a
    /// reload replace every configured prefix at once (a refreshed feed), as it could when
    /// each generation had maps of its own. The room is counted once for both lists. Room costs
    /// 8 bytes per IPv4 prefix (a slot of the table) and half a byte for the stash's share of
    /// it; unused IPv6 room only the hash's buckets (16 bytes per entry, rounded up to a power
    /// of two).
    pub fn for_policy(policy: &Policy, runtime_entries: u32) -> Self {
        let lists = PrefixCounts::of(&[
            &ListCounts::of(policy.list(ListKind::Allow)),
            &ListCounts::of(policy.list(ListKind::Block)),
        ]);
        let fit = |n: usize| {
            u32::try_from(n.saturating_mul(2))
                .unwrap_or(u32::MAX)
                .saturating_add(runtime_entries)
                .max(LONG_PREFIXES_DEFAULT_CAPACITY)
        };
        Self {
            v4_long: fit(lists.v4_long),
            v6: fit(lists.v6),
            rate_sources: policy.rate_limit.max_sources,
        }
    }

    /// Slots of the rate limiter's table: a power of two, at least one per source.
    pub fn rate_slots(&self) -> u32 {
        // The config caps max_sources at 2^26.
        self.rate_sources.max(2).next_power_of_two()
    }

    /// Buckets of the IPv4 long-prefix table: a slot per prefix of capacity.
    pub fn v4_long_buckets(&self) -> u32 {
        self.v4_long.div_ceil(V4_LONG_BUCKET_SLOTS as u32)
    }

    /// Entries of the IPv4 table's stash (prefixes whose two buckets are both full).
    pub fn v4_long_stash(&self) -> u32 {
        (self.v4_long / V4_LONG_STASH_SHARE).max(1)
    }

    /// Whether the long-prefix stores can hold `prefixes` and the limiter is sized for
    /// `rate_limit` (a running program's maps cannot be resized).
    pub fn fit(&self, prefixes: &PrefixCounts, rate_limit: &RateLimit) -> Result<(), String> {
        let checks = [
            (
                "IPv4 prefixes longer than /24",
                prefixes.v4_long,
                self.v4_long,
            ),
            ("IPv6 prefixes", prefixes.v6, self.v6),
        ];
        for (what, count, capacity) in checks {
            if count > capacity as usize {
                return Err(format!(
                    "{count} {what} (allowlist and blocklist, counting a change's new entries \
                     beside the ones they replace until the switch) exceed the loaded maps' \
                     {capacity}; raise runtime_entries and restart moat to resize them"
                ));
            }
        }
        if rate_limit.max_sources != self.rate_sources {
            return Err(
                "rate_limit.max_sources changed; restart moat to resize the limiter".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Config, Overrides};

    #[test]
    fn a_reload_may_replace_every_configured_prefix_at_once() {
        let hosts: Vec<String> = (0..20_000u32)
            .map(|i| format!("\"{}\"", std::net::Ipv4Addr::from(0x0a00_0000 + i)))
            .collect();
        let text = format!(
            "interfaces = [\"lo\"]\n[blocklist]\ncidrs = [{}]\n",
            hosts.join(", ")
        );
        let policy = Config::from_str_at(&text, Path::new("t.toml"))
            .and_then(|c| c.resolve(&Overrides::default()))
            .expect("a policy")
            .policy;
        let capacities = Capacities::for_policy(&policy, 1_000);
        assert_eq!(capacities.v4_long, 41_000);
        let both = PrefixCounts {
            v4_long: 40_000,
            v6: 0,
        };
        assert!(capacities.fit(&both, &policy.rate_limit).is_ok());
        let more = PrefixCounts {
            v4_long: 41_001,
            v6: 0,
        };
        let error = capacities.fit(&more, &policy.rate_limit).expect_err("over");
        assert!(error.contains("raise runtime_entries"), "{error}");
    }
}
