//! How big the maps whose capacity depends on the configuration are made at load: room for the
//! policy's entries plus what may be added while running. A loaded program's maps cannot be
//! resized, so every later change is checked against these.

use agent_common::maps::LONG_PREFIXES_DEFAULT_CAPACITY;

use super::lists::ListCounts;
use crate::config::{ListKind, Policy, RateLimit};

/// Sizes of the maps whose capacity depends on the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub allow_v4_long: u32,
    pub allow_v6: u32,
    pub block_v4_long: u32,
    pub block_v6: u32,
    /// Sources the rate limiter (and the ban list) track at once.
    pub rate_sources: u32,
}

impl Capacities {
    /// Room for the policy's entries plus `runtime_entries` added while running, never below
    /// the built-in default.
    pub fn for_policy(policy: &Policy, runtime_entries: u32) -> Self {
        let allow = ListCounts::of(policy.list(ListKind::Allow));
        let block = ListCounts::of(policy.list(ListKind::Block));
        let fit = |n: usize| {
            u32::try_from(n)
                .unwrap_or(u32::MAX)
                .saturating_add(runtime_entries)
                .max(LONG_PREFIXES_DEFAULT_CAPACITY)
        };
        Self {
            allow_v4_long: fit(allow.v4_long()),
            allow_v6: fit(allow.v6()),
            block_v4_long: fit(block.v4_long()),
            block_v6: fit(block.v6()),
            rate_sources: policy.rate_limit.max_sources,
        }
    }

    /// Whether lists of these counts and this rate limit fit maps of these sizes (a running
    /// program's maps cannot be resized).
    pub fn fit(
        &self,
        allow: &ListCounts,
        block: &ListCounts,
        rate_limit: &RateLimit,
    ) -> Result<(), String> {
        let checks = [
            (
                "allowlist IPv4 prefixes longer than /24",
                allow.v4_long(),
                self.allow_v4_long,
            ),
            ("allowlist IPv6 prefixes", allow.v6(), self.allow_v6),
            (
                "blocklist IPv4 prefixes longer than /24",
                block.v4_long(),
                self.block_v4_long,
            ),
            ("blocklist IPv6 prefixes", block.v6(), self.block_v6),
        ];
        for (what, count, capacity) in checks {
            if count > capacity as usize {
                return Err(format!(
                    "{count} {what} exceed the loaded maps' {capacity}; raise runtime_entries \
                     and restart moat to resize them"
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
