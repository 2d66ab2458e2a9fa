//! One fleet entry in the bucket: its key (`blocklist.192.0.2.0/24`; `:` of IPv6 written `-`,
//! which NATS keys allow and addresses never hold) and its value (JSON). Anything in the bucket
//! that does not decode to exactly this is not moat's, and is skipped.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::{Cidr, ListKind, MAX_COMMENT_BYTES, MAX_ENTRY_TTL, fleet::is_node_name};

/// The value's schema; bumped when it changes incompatibly.
const RECORD_VERSION: u32 = 1;
/// How far past the longest TTL an expiry may lie.
const EXPIRY_SLACK: Duration = Duration::from_secs(86_400);
/// Longest value moat writes or reads (its JSON is a few hundred bytes).
const MAX_VALUE_BYTES: usize = 4096;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the key is not <allowlist|blocklist>.<CIDR>")]
    Key,
    #[error("the value is larger than {MAX_VALUE_BYTES} bytes")]
    TooLarge,
    #[error("the value is not moat's: {0}")]
    Schema(String),
    #[error("the value is version {0}; this moat reads version {RECORD_VERSION}")]
    Version(u32),
    #[error("the value names {0}, not the key's entry")]
    Mismatch(String),
    #[error(
        "expires_at is more than {} ahead",
        humantime::format_duration(MAX_ENTRY_TTL)
    )]
    AbsurdExpiry,
    #[error("the comment is over {MAX_COMMENT_BYTES} bytes or holds control characters")]
    Comment,
    #[error("origin {0:?} is not a node name")]
    Origin(String),
}

/// Which entry a key names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FleetKey {
    pub list: ListKind,
    pub cidr: Cidr,
}

impl FleetKey {
    pub fn encode(&self) -> String {
        format!(
            "{}.{}",
            self.list.name(),
            self.cidr.to_string().replace(':', "-")
        )
    }

    /// The entry `key` names; only the form [`Self::encode`] writes is accepted.
    pub fn decode(key: &str) -> Result<Self, RecordError> {
        let (list, cidr) = key.split_once('.').ok_or(RecordError::Key)?;
        let list = ListKind::ALL
            .into_iter()
            .find(|kind| kind.name() == list)
            .ok_or(RecordError::Key)?;
        let cidr: Cidr = cidr
            .replace('-', ":")
            .parse()
            .map_err(|_| RecordError::Key)?;
        let decoded = Self { list, cidr };
        if decoded.encode() != key {
            return Err(RecordError::Key);
        }
        Ok(decoded)
    }
}

/// What a fleet entry says beyond its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetRecord {
    /// `None`: until deleted.
    pub expires_at: Option<SystemTime>,
    pub comment: Option<String>,
    /// The node that published it.
    pub origin: String,
}

/// The value as JSON.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    version: u32,
    list: ListKind,
    cidr: String,
    /// Unix seconds.
    expires_at: Option<u64>,
    comment: Option<String>,
    origin: String,
}

fn unix(at: SystemTime) -> Duration {
    at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO)
}

impl FleetRecord {
    pub fn encode(&self, key: &FleetKey) -> Vec<u8> {
        let wire = Wire {
            version: RECORD_VERSION,
            list: key.list,
            cidr: key.cidr.to_string(),
            // Rounded up: an entry never ends before the time its node gave it.
            expires_at: self
                .expires_at
                .map(|at| unix(at).as_secs() + u64::from(unix(at).subsec_nanos() > 0)),
            comment: self.comment.clone(),
            origin: self.origin.clone(),
        };
        serde_json::to_vec(&wire).expect("a record serializes")
    }

    /// The record `value` holds for `key`, checked as strictly as a CLI request.
    pub fn decode(key: &FleetKey, value: &[u8], now: SystemTime) -> Result<Self, RecordError> {
        if value.len() > MAX_VALUE_BYTES {
            return Err(RecordError::TooLarge);
        }
        let wire: Wire =
            serde_json::from_slice(value).map_err(|e| RecordError::Schema(e.to_string()))?;
        if wire.version != RECORD_VERSION {
            return Err(RecordError::Version(wire.version));
        }
        let cidr: Option<Cidr> = wire.cidr.parse().ok();
        if wire.list != key.list || cidr != Some(key.cidr) {
            return Err(RecordError::Mismatch(format!(
                "{} {}",
                wire.list.name(),
                wire.cidr
            )));
        }
        let expires_at = match wire.expires_at {
            None => None,
            // A day's slack: an entry of the longest TTL, its expiry rounded up, read on a
            // node whose clock is a little behind, is still moat's.
            Some(secs) if secs > (unix(now) + MAX_ENTRY_TTL + EXPIRY_SLACK).as_secs() => {
                return Err(RecordError::AbsurdExpiry);
            }
            Some(secs) => Some(UNIX_EPOCH + Duration::from_secs(secs)),
        };
        if let Some(comment) = &wire.comment
            && (comment.len() > MAX_COMMENT_BYTES || comment.chars().any(char::is_control))
        {
            return Err(RecordError::Comment);
        }
        if !is_node_name(&wire.origin) {
            return Err(RecordError::Origin(wire.origin));
        }
        Ok(Self {
            expires_at,
            comment: wire.comment,
            origin: wire.origin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> FleetKey {
        FleetKey::decode(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn keys_name_the_list_and_the_cidr() {
        for (list, cidr, text) in [
            (ListKind::Block, "192.0.2.0/24", "blocklist.192.0.2.0/24"),
            (ListKind::Allow, "2001:db8::/32", "allowlist.2001-db8--/32"),
            (ListKind::Block, "::/0", "blocklist.--/0"),
        ] {
            let k = FleetKey {
                list,
                cidr: cidr.parse().unwrap(),
            };
            assert_eq!(k.encode(), text);
            assert_eq!(key(text), k);
        }
        for bad in [
            "blocklist",
            "blocklist.",
            "denylist.192.0.2.0/24",
            "blocklist.192.0.2.1/24",
            "blocklist.192.0.2.0",
            "blocklist.2001:db8::/32",
            "blocklist.300.0.0.0/8",
        ] {
            assert_eq!(FleetKey::decode(bad), Err(RecordError::Key), "{bad}");
        }
    }

    #[test]
    fn a_record_survives_the_wire() {
        let now = SystemTime::now();
        let k = key("blocklist.198.51.100.7/32");
        let record = FleetRecord {
            expires_at: Some(UNIX_EPOCH + Duration::from_secs(unix(now).as_secs() + 60)),
            comment: Some("scanner".into()),
            origin: "edge-a".into(),
        };
        assert_eq!(FleetRecord::decode(&k, &record.encode(&k), now), Ok(record));
    }

    #[test]
    fn values_that_are_not_moats_are_refused() {
        let now = SystemTime::now();
        let k = key("blocklist.192.0.2.0/24");
        let good = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut value = serde_json::json!({
                "version": 1, "list": "blocklist", "cidr": "192.0.2.0/24",
                "expires_at": null, "comment": null, "origin": "edge-a",
            });
            edit(&mut value);
            FleetRecord::decode(&k, value.to_string().as_bytes(), now)
        };
        assert!(good(&|_| {}).is_ok());
        let far = unix(now).as_secs() + (MAX_ENTRY_TTL + EXPIRY_SLACK).as_secs() + 10;
        for (edit, expected) in [
            (
                Box::new(|v: &mut serde_json::Value| v["version"] = 2.into())
                    as Box<dyn Fn(&mut serde_json::Value)>,
                RecordError::Version(2),
            ),
            (
                Box::new(|v| v["cidr"] = "192.0.3.0/24".into()),
                RecordError::Mismatch("blocklist 192.0.3.0/24".into()),
            ),
            (
                Box::new(|v| v["list"] = "allowlist".into()),
                RecordError::Mismatch("allowlist 192.0.2.0/24".into()),
            ),
            (
                Box::new(move |v| v["expires_at"] = far.into()),
                RecordError::AbsurdExpiry,
            ),
            (
                Box::new(|v| v["comment"] = "a\u{7}b".into()),
                RecordError::Comment,
            ),
            (
                Box::new(|v| v["origin"] = "".into()),
                RecordError::Origin(String::new()),
            ),
        ] {
            assert_eq!(good(&*edit), Err(expected));
        }
        for value in [
            &b"not json"[..],
            br#"{"version":1}"#,
            br#"{"version":1,"list":"blocklist","cidr":"192.0.2.0/24","expires_at":-1,"comment":null,"origin":"a"}"#,
            br#"{"version":1,"list":"blocklist","cidr":"192.0.2.0/24","expires_at":null,"comment":null,"origin":"a","extra":1}"#,
        ] {
            assert!(
                matches!(
                    FleetRecord::decode(&k, value, now),
                    Err(RecordError::Schema(_))
                ),
                "{}",
                String::from_utf8_lossy(value)
            );
        }
        assert_eq!(
            FleetRecord::decode(&k, &vec![b' '; MAX_VALUE_BYTES + 1], now),
            Err(RecordError::TooLarge)
        );
    }
}
