//! moat's nftables table, written as nftables' JSON and applied with `nft -j -f -` in one
//! batch (atomic: the table is replaced whole or not at all). Per family, on the protected
//! ports (and destinations):
//!
//! - prerouting, before conntrack: SYNs are not tracked (`notrack`), so that a SYN the program
//!   did not answer reaches synproxy untracked;
//! - input, and forward (for servers behind this host): an untracked SYN or an ACK conntrack
//!   does not know (`ct state invalid,untracked`) goes to `synproxy`, which answers the SYN with
//!   a cookie, or checks the ACK's cookie and opens the connection to the server; what is still
//!   invalid then is dropped.

use std::{
    io::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
};

use serde_json::{Value, json};

use crate::config::{PortRange, syn_proxy::SynProxy};

/// The table's family and name: moat's alone, replaced and deleted whole.
pub const FAMILY: &str = "inet";
pub const TABLE: &str = "moat";
const NFT: &str = "nft";
/// Chain priorities: raw (before conntrack) and filter.
const PRIORITY_RAW: i32 = -300;
const PRIORITY_FILTER: i32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum RulesetError {
    #[error("[syn_proxy] needs nftables: cannot run `nft` ({0}); install the nftables package")]
    NftMissing(std::io::Error),
    #[error(
        "nftables refused moat's synproxy table: {0} (does the kernel lack nftables synproxy or \
         connection tracking: nft_synproxy, nf_synproxy_core, nf_conntrack?)"
    )]
    Refused(String),
    #[error("cannot talk to nft: {0}")]
    Io(std::io::Error),
}

#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn nfproto(self) -> &'static str {
        match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        }
    }

    fn protocol(self) -> &'static str {
        match self {
            Self::V4 => "ip",
            Self::V6 => "ip6",
        }
    }
}

fn table() -> Value {
    json!({ "family": FAMILY, "name": TABLE })
}

fn chain(name: &str, hook: &str, priority: i32) -> Value {
    json!({ "add": { "chain": {
        "family": FAMILY, "table": TABLE, "name": name,
        "type": "filter", "hook": hook, "prio": priority, "policy": "accept",
    } } })
}

fn rule(chain: &str, expr: Vec<Value>) -> Value {
    json!({ "add": { "rule": { "family": FAMILY, "table": TABLE, "chain": chain, "expr": expr } } })
}

fn equals(left: Value, right: Value) -> Value {
    json!({ "match": { "op": "==", "left": left, "right": right } })
}

/// The packet is of `family`, to one of the destinations (none: any of the family).
fn destination_match(family: Family, destinations: &[(IpAddr, u8)]) -> Value {
    if destinations.is_empty() {
        return equals(
            json!({ "meta": { "key": "nfproto" } }),
            json!(family.nfproto()),
        );
    }
    let prefixes: Vec<Value> = destinations
        .iter()
        .map(|(addr, len)| json!({ "prefix": { "addr": addr.to_string(), "len": len } }))
        .collect();
    equals(
        json!({ "payload": { "protocol": family.protocol(), "field": "daddr" } }),
        json!({ "set": prefixes }),
    )
}

fn ports_match(ports: &[PortRange]) -> Value {
    let set: Vec<Value> = ports
        .iter()
        .map(|p| {
            if p.first == p.last {
                json!(p.first)
            } else {
                json!({ "range": [p.first, p.last] })
            }
        })
        .collect();
    equals(
        json!({ "payload": { "protocol": "tcp", "field": "dport" } }),
        json!({ "set": set }),
    )
}

/// The batch that replaces moat's table with the one `proxy` needs.
pub fn batch(proxy: &SynProxy) -> Value {
    let mut commands = vec![
        json!({ "metainfo": { "json_schema_version": 1 } }),
        // Add, then delete: the delete never fails for want of a table.
        json!({ "add": { "table": table() } }),
        json!({ "delete": { "table": table() } }),
        json!({ "add": { "table": table() } }),
        chain("syn_notrack", "prerouting", PRIORITY_RAW),
        chain("syn_proxy", "input", PRIORITY_FILTER),
        chain("syn_proxy_forward", "forward", PRIORITY_FILTER),
    ];
    let ports = ports_match(&proxy.ports);
    for family in [Family::V4, Family::V6] {
        let destinations: Vec<(IpAddr, u8)> = proxy
            .destinations
            .iter()
            .map(|c| (c.net().network(), c.net().prefix_len()))
            .filter(|(addr, _)| addr.is_ipv4() == matches!(family, Family::V4))
            .collect();
        if destinations.is_empty() && !proxy.destinations.is_empty() {
            // Destinations are configured, none of this family: it is not protected.
            continue;
        }
        let to = destination_match(family, &destinations);
        let mss = match family {
            Family::V4 => proxy.mss,
            Family::V6 => proxy.mss_v6(),
        };
        let mut flags = Vec::new();
        if proxy.timestamps {
            flags.push("timestamp");
            if proxy.sack {
                flags.push("sack-perm");
            }
        }
        commands.push(rule(
            "syn_notrack",
            vec![
                to.clone(),
                ports.clone(),
                equals(
                    json!({ "&": [
                        { "payload": { "protocol": "tcp", "field": "flags" } },
                        ["fin", "syn", "rst", "ack"],
                    ] }),
                    json!("syn"),
                ),
                json!({ "notrack": null }),
            ],
        ));
        for chain in ["syn_proxy", "syn_proxy_forward"] {
            let synproxy =
                json!({ "synproxy": { "mss": mss, "wscale": proxy.wscale, "flags": flags } });
            for (states, verdict) in [
                (json!(["invalid", "untracked"]), synproxy),
                (json!("invalid"), json!({ "drop": null })),
            ] {
                let state = json!({ "match": { "op": "in", "left": { "ct": { "key": "state" } },
                                               "right": states } });
                commands.push(rule(chain, vec![to.clone(), ports.clone(), state, verdict]));
            }
        }
    }
    json!({ "nftables": commands })
}

/// Installs (or replaces) moat's table.
pub fn install(proxy: &SynProxy) -> Result<(), RulesetError> {
    apply(&batch(proxy))
}

/// Deletes moat's table; returns whether nft was there to ask (no nft: no table of moat's).
pub fn remove() -> Result<bool, RulesetError> {
    let batch = json!({ "nftables": [
        { "metainfo": { "json_schema_version": 1 } },
        { "add": { "table": table() } },
        { "delete": { "table": table() } },
    ] });
    match apply(&batch) {
        Ok(()) => Ok(true),
        Err(RulesetError::NftMissing(_)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Hands `batch` to `nft -j -f -` on its standard input: no shell, no string building.
fn apply(batch: &Value) -> Result<(), RulesetError> {
    let mut child = Command::new(NFT)
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(RulesetError::NftMissing)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(batch.to_string().as_bytes())
            .map_err(RulesetError::Io)?;
    }
    let output = child.wait_with_output().map_err(RulesetError::Io)?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    Err(RulesetError::Refused(stderr.trim().replace('\n', " | ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Overrides};

    fn proxy(text: &str) -> SynProxy {
        Config::from_str_at(&format!("interfaces = [\"lo\"]\n{text}"), "t.toml".as_ref())
            .and_then(|c| c.resolve(&Overrides::default()))
            .expect("a valid config")
            .policy
            .syn_proxy
            .expect("[syn_proxy]")
    }

    fn rules(batch: &Value) -> Vec<&Value> {
        batch["nftables"]
            .as_array()
            .expect("commands")
            .iter()
            .filter_map(|c| c.get("add").and_then(|a| a.get("rule")))
            .collect()
    }

    #[test]
    fn every_family_gets_its_rules_and_mss() {
        let batch = batch(&proxy("[syn_proxy]\nports = [80, \"8000-8100\"]"));
        let rules = rules(&batch);
        assert_eq!(
            rules.len(),
            10,
            "notrack, and synproxy and drop in input and forward, for each family"
        );
        let synproxies: Vec<&Value> = rules
            .iter()
            .filter_map(|r| r["expr"].as_array()?.iter().find_map(|e| e.get("synproxy")))
            .collect();
        assert_eq!(synproxies[0]["mss"], 1460);
        assert_eq!(synproxies[1]["mss"], 1460, "forward");
        assert_eq!(synproxies[2]["mss"], 1440);
        assert_eq!(synproxies[0]["flags"], json!(["timestamp", "sack-perm"]));
        assert_eq!(
            rules[0]["expr"][1]["match"]["right"],
            json!({ "set": [80, { "range": [8000, 8100] }] })
        );
    }

    #[test]
    fn destinations_of_one_family_leave_the_other_unprotected() {
        let batch = batch(&proxy(
            "[syn_proxy]\nports = [443]\ndestinations = [\"192.0.2.0/24\"]\ntimestamps = false",
        ));
        let rules = rules(&batch);
        assert_eq!(rules.len(), 5);
        assert_eq!(
            rules[0]["expr"][0]["match"]["right"],
            json!({ "set": [{ "prefix": { "addr": "192.0.2.0", "len": 24 } }] })
        );
        let synproxy = rules[1]["expr"][3]["synproxy"].clone();
        assert_eq!(
            synproxy["flags"],
            json!([]),
            "no timestamps: no SACK either"
        );
    }
}
