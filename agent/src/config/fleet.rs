//! The `[fleet]` table: the NATS JetStream servers and key-value bucket through which the nodes
//! of a fleet share their blocks, and what this node shares.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::rules::Located;

const DEFAULT_BUCKET: &str = "moat";
const DEFAULT_REPLICAS: i64 = 1;
/// What a node shares unless told: what its operators add and delete.
const DEFAULT_SHARE: &[Share] = &[Share::Cli];
/// JetStream keeps a stream on 1, 3 or 5 servers (an odd Raft group).
const REPLICA_CHOICES: [i64; 3] = [1, 3, 5];
const MAX_SERVERS: usize = 16;
/// Longest bucket and node name; a bucket name is part of the stream's name.
const MAX_NAME_LEN: usize = 64;
/// Where the host name is read when `node` is not given.
const HOST_NAME_FILE: &str = "/proc/sys/kernel/hostname";

/// `[fleet]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// NATS server URLs; required.
    #[serde(default)]
    pub servers: Vec<Spanned<String>>,
    pub bucket: Option<Spanned<String>>,
    pub replicas: Option<Spanned<i64>>,
    /// This node's name in the entries it publishes; default: the host name.
    pub node: Option<Spanned<String>>,
    pub share: Option<Vec<Spanned<String>>>,
    /// A NATS credentials file (JWT and nkey seed).
    pub credentials: Option<Spanned<String>>,
    /// A token the servers accept.
    pub token: Option<Spanned<String>>,
    /// A file holding an nkey seed.
    pub nkey: Option<Spanned<String>>,
    /// A PEM file of the CA that signed the servers' certificates: TLS is then required.
    pub ca: Option<Spanned<String>>,
}

/// What a node publishes to the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Share {
    /// `moat block|allow add|del`.
    Cli,
    /// The rate limiter's bans (as blocklist entries that expire with the ban).
    Bans,
}

impl Share {
    const ALL: [Self; 2] = [Self::Cli, Self::Bans];

    pub fn name(self) -> &'static str {
        match self {
            Self::Cli => "cli",
            Self::Bans => "bans",
        }
    }
}

/// How the node proves itself to the servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FleetAuth {
    None,
    Credentials(PathBuf),
    Token(String),
    NkeySeedFile(PathBuf),
}

/// `[fleet]` after validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fleet {
    pub servers: Vec<String>,
    pub bucket: String,
    pub replicas: usize,
    pub node: String,
    pub share: Vec<Share>,
    pub auth: FleetAuth,
    pub ca: Option<PathBuf>,
}

impl Fleet {
    pub fn shares(&self, what: Share) -> bool {
        self.share.contains(&what)
    }
}

/// Whether `name` can name a node: what `node` accepts.
pub fn is_node_name(name: &str) -> bool {
    valid_name(name, true)
}

/// Whether `name` is a bucket or node name: letters, digits, `-` and `_` (and `.` in a node's).
fn valid_name(name: &str, dots: bool) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || (dots && c == '.'))
}

impl FleetConfig {
    /// Validates the table; relative file paths are taken from `base_dir` (the config file's).
    pub fn validate(
        &self,
        span: std::ops::Range<usize>,
        base_dir: &Path,
    ) -> Result<Fleet, Located> {
        if self.servers.is_empty() {
            return Err((
                span,
                "fleet: `servers` is required (NATS URLs such as \"nats://10.0.0.5:4222\")".into(),
            ));
        }
        if let Some(extra) = self.servers.get(MAX_SERVERS) {
            return Err((
                extra.span(),
                format!("fleet: at most {MAX_SERVERS} servers"),
            ));
        }
        for server in &self.servers {
            let text = server.get_ref();
            // WebSocket URLs parse too, but this build speaks plain and TLS connections only.
            let scheme = text.split_once("://").map_or("nats", |(scheme, _)| scheme);
            let parsed = text
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| e.to_string());
            if let Err(why) = parsed.and_then(|_| match scheme {
                "nats" | "tls" => Ok(()),
                _ => Err(format!("the scheme is {scheme:?}, not \"nats\" or \"tls\"")),
            }) {
                return Err((
                    server.span(),
                    format!("fleet: servers: {text:?} is not a NATS URL: {why}"),
                ));
            }
        }
        let bucket = match &self.bucket {
            None => DEFAULT_BUCKET.to_string(),
            Some(name) if valid_name(name.get_ref(), false) => name.get_ref().clone(),
            Some(name) => {
                return Err((
                    name.span(),
                    format!(
                        "fleet: bucket = {:?}: at most {MAX_NAME_LEN} letters, digits, `-` and `_`",
                        name.get_ref()
                    ),
                ));
            }
        };
        let replicas = match &self.replicas {
            None => DEFAULT_REPLICAS,
            Some(n) if REPLICA_CHOICES.contains(n.get_ref()) => *n.get_ref(),
            Some(n) => {
                return Err((
                    n.span(),
                    format!("fleet: replicas = {} is not 1, 3 or 5", n.get_ref()),
                ));
            }
        } as usize;
        let node = match &self.node {
            Some(name) if valid_name(name.get_ref(), true) => name.get_ref().clone(),
            Some(name) => {
                return Err((
                    name.span(),
                    format!(
                        "fleet: node = {:?}: at most {MAX_NAME_LEN} letters, digits, `.`, `-` and `_`",
                        name.get_ref()
                    ),
                ));
            }
            None => host_name().ok_or_else(|| {
                (
                    span.clone(),
                    format!(
                        "fleet: `node` is not set and the host name ({HOST_NAME_FILE}) is not a \
                         valid node name: set `node`"
                    ),
                )
            })?,
        };
        let share = match &self.share {
            None => DEFAULT_SHARE.to_vec(),
            Some(list) => {
                let mut share = Vec::new();
                for item in list {
                    let what = Share::ALL
                        .into_iter()
                        .find(|s| s.name() == item.get_ref())
                        .ok_or_else(|| {
                            (
                                item.span(),
                                format!(
                                    "fleet: share: {:?} is not \"cli\" or \"bans\"",
                                    item.get_ref()
                                ),
                            )
                        })?;
                    share.push(what);
                }
                share.sort();
                share.dedup();
                share
            }
        };
        let file = |text: &Spanned<String>, key: &str| -> Result<PathBuf, Located> {
            let path = base_dir.join(text.get_ref());
            if path.is_file() {
                Ok(path)
            } else {
                Err((
                    text.span(),
                    format!("fleet: {key} = {:?}: no such file", text.get_ref()),
                ))
            }
        };
        let given: Vec<&Spanned<String>> = [&self.credentials, &self.token, &self.nkey]
            .into_iter()
            .flatten()
            .collect();
        if let Some(second) = given.get(1) {
            return Err((
                second.span(),
                "fleet: give one of credentials, token and nkey".into(),
            ));
        }
        let auth = if let Some(path) = &self.credentials {
            FleetAuth::Credentials(file(path, "credentials")?)
        } else if let Some(token) = &self.token {
            if token.get_ref().is_empty() || token.get_ref().chars().any(char::is_control) {
                return Err((
                    token.span(),
                    "fleet: token is empty or has control characters".into(),
                ));
            }
            FleetAuth::Token(token.get_ref().clone())
        } else if let Some(path) = &self.nkey {
            FleetAuth::NkeySeedFile(file(path, "nkey")?)
        } else {
            FleetAuth::None
        };
        let ca = self.ca.as_ref().map(|path| file(path, "ca")).transpose()?;
        Ok(Fleet {
            servers: self.servers.iter().map(|s| s.get_ref().clone()).collect(),
            bucket,
            replicas,
            node,
            share,
            auth,
            ca,
        })
    }
}

fn host_name() -> Option<String> {
    let name = std::fs::read_to_string(HOST_NAME_FILE).ok()?;
    let name = name.trim();
    valid_name(name, true).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Result<Fleet, String> {
        #[derive(Deserialize)]
        struct File {
            fleet: FleetConfig,
        }
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        file.fleet
            .validate(0..0, Path::new("/"))
            .map_err(|(_, m)| m)
    }

    #[test]
    fn defaults_share_the_cli_into_the_moat_bucket() {
        let fleet =
            config("[fleet]\nservers = [\"nats://10.0.0.5:4222\"]\nnode = \"edge-1\"").unwrap();
        assert_eq!(fleet.bucket, "moat");
        assert_eq!(fleet.replicas, 1);
        assert_eq!(fleet.share, [Share::Cli]);
        assert_eq!(fleet.auth, FleetAuth::None);
        assert!(fleet.shares(Share::Cli) && !fleet.shares(Share::Bans));
        let fleet = config(
            "[fleet]\nservers = [\"nats://a:4222\", \"tls://b:4222\"]\nnode = \"n\"\n\
             share = [\"bans\", \"cli\", \"bans\"]\nreplicas = 3\ntoken = \"s3cret\"",
        )
        .unwrap();
        assert_eq!(fleet.share, [Share::Cli, Share::Bans]);
        assert_eq!(fleet.replicas, 3);
        assert_eq!(fleet.auth, FleetAuth::Token("s3cret".into()));
    }

    #[test]
    fn the_node_defaults_to_the_host_name() {
        let fleet = config("[fleet]\nservers = [\"nats://10.0.0.5:4222\"]");
        if let Some(host) = host_name() {
            assert_eq!(fleet.unwrap().node, host);
        } else {
            assert!(fleet.unwrap_err().contains("set `node`"));
        }
    }

    #[test]
    fn bad_values_are_refused_with_their_key() {
        let ok = "servers = [\"nats://10.0.0.5:4222\"]\nnode = \"n\"\n";
        for (text, expected) in [
            ("[fleet]\nnode = \"n\"".to_string(), "`servers` is required"),
            (
                "[fleet]\nservers = [\"http://x:80/\"]\nnode = \"n\"".into(),
                "not a NATS URL",
            ),
            (
                "[fleet]\nservers = [\"ws://x:80\"]\nnode = \"n\"".into(),
                "not \"nats\" or \"tls\"",
            ),
            (format!("[fleet]\n{ok}bucket = \"a.b\""), "bucket = \"a.b\""),
            (
                format!("[fleet]\n{ok}replicas = 2"),
                "replicas = 2 is not 1, 3 or 5",
            ),
            (
                "[fleet]\nservers = [\"nats://a:1\"]\nnode = \"a b\"".into(),
                "node = \"a b\"",
            ),
            (format!("[fleet]\n{ok}share = [\"all\"]"), "share: \"all\""),
            (
                format!("[fleet]\n{ok}credentials = \"/nonexistent.creds\""),
                "no such file",
            ),
            (
                format!("[fleet]\n{ok}token = \"t\"\nnkey = \"/etc/hostname\""),
                "one of credentials, token and nkey",
            ),
            (format!("[fleet]\n{ok}token = \"\""), "token is empty"),
            (format!("[fleet]\n{ok}ca = \"/nonexistent.pem\""), "ca = "),
            (format!("[fleet]\n{ok}cluster = \"x\""), "unknown field"),
        ] {
            let error = config(&text).expect_err(&text);
            assert!(error.contains(expected), "{text}: {error}");
        }
        let many: Vec<String> = (0..17).map(|n| format!("nats://10.0.0.{n}:4222")).collect();
        let error = config(&format!("[fleet]\nservers = {many:?}\nnode = \"n\"")).unwrap_err();
        assert!(error.contains("at most 16"), "{error}");
    }
}
