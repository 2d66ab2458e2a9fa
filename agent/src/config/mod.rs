//! The configuration: serde types, validation, and every default (this module is the only place a
//! default lives). A file is TOML; unknown keys are errors, and every error names the file, line
//! and column it comes from.

mod cidr;
mod cidr_map;
pub mod fleet;
pub mod list_file;
pub mod protect;
pub mod rate_limit;
pub mod rules;
pub mod syn_proxy;

use std::{
    fmt,
    ops::Range,
    path::{Path, PathBuf},
};

use agent_common::lists::{SOURCE_CONFIG, SOURCE_FILE};
use rayon::slice::ParallelSliceMut as _;
use serde::Deserialize;
use toml::Spanned;

pub use self::{
    cidr::Cidr,
    cidr_map::CidrMap,
    fleet::{Fleet, FleetConfig, Share},
    protect::{ProtectConfig, Protected},
    rate_limit::{BanScope, RateLimit, RateLimitConfig},
    rules::{PortRange, Protocol, Rule, RuleAction, RuleConfig, TcpFlags},
    syn_proxy::{SynProxy, SynProxyConfig},
};

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const IFNAME_MAX_LEN: usize = 15;
/// Default: one in this many dropped packets is sampled to the log.
const DEFAULT_SAMPLE_EVERY: u32 = 1000;
/// Default room, in each list's hashes of long IPv4 and of IPv6 prefixes, for entries added
/// while running (`moat block add`, `moat block import`, …) beyond the configuration's own.
const DEFAULT_RUNTIME_ENTRIES: u32 = 65_536;
/// The most `runtime_entries` may ask for.
const MAX_RUNTIME_ENTRIES: i64 = 1 << 24;
/// Longest comment kept with an entry added at run time.
pub const MAX_COMMENT_BYTES: usize = 256;
/// Longest TTL of an entry added at run time: ten years.
pub const MAX_ENTRY_TTL: std::time::Duration = std::time::Duration::from_secs(10 * 365 * 24 * 3600);
/// Default control socket; the CLI uses it too unless `--socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/moat/moat.sock";
/// Default directory for dynamic entries (CLI blocks and allows, bans) that outlive a restart.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/moat";
/// Default directory on bpffs for the pinned links and maps.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/moat";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A syntax or type error from the TOML parser; its message carries line and column.
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    /// A value that parsed but is not acceptable.
    #[error("{origin}:{line}:{column}: {message}")]
    Invalid {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error(transparent)]
    ListFile(#[from] list_file::ListFileError),
    #[error("no interfaces to protect: set `interfaces` in the config or pass --iface")]
    NoInterfaces,
    #[error("too many interfaces: {count} given, at most {max}")]
    TooManyInterfaces { count: usize, max: usize },
    #[error("invalid CIDR {value:?} on the command line: {message}")]
    InvalidCliCidr { value: String, message: String },
    #[error("invalid interface name {value:?} on the command line: {message}")]
    InvalidCliInterface { value: String, message: String },
}

/// How to attach the XDP program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode, falling back to generic mode with a warning.
    #[default]
    Auto,
    /// Native (driver) mode only: fail if the driver cannot run XDP.
    Native,
    /// Generic (skb) mode: works on every interface, after the kernel has allocated the packet.
    Generic,
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Generic => "generic",
        })
    }
}

/// Enforce the policy, or only count what it would drop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Monitor,
}

/// Which list: one name for the idea from the socket protocol down to the map writer.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, Deserialize,
)]
pub enum ListKind {
    /// Sources always passed.
    #[serde(rename = "allowlist")]
    Allow,
    /// Sources always dropped.
    #[serde(rename = "blocklist")]
    Block,
}

impl ListKind {
    pub const ALL: [Self; 2] = [Self::Allow, Self::Block];

    pub fn name(self) -> &'static str {
        match self {
            Self::Allow => "allowlist",
            Self::Block => "blocklist",
        }
    }
}

/// A list of CIDRs, as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListConfig {
    /// CIDRs written in the config; parsed in [`Config::resolve`] so that an error can point at
    /// the entry itself.
    #[serde(default)]
    pub cidrs: Vec<Spanned<String>>,
    /// List files (FireHOL/Spamhaus format); relative paths are relative to the config file.
    #[serde(default)]
    pub files: Vec<Spanned<String>>,
}

/// `[events]` as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// Sample one in this many dropped packets to the log; 0: none.
    pub sample_every: Option<Spanned<i64>>,
}

/// The configuration as the file states it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Interfaces to attach to.
    #[serde(default)]
    pub interfaces: Vec<Spanned<String>>,
    #[serde(default)]
    pub xdp_mode: XdpMode,
    #[serde(default)]
    pub mode: Mode,
    /// Sources whose packets always pass.
    #[serde(default)]
    pub allowlist: ListConfig,
    /// Sources whose packets are dropped.
    #[serde(default)]
    pub blocklist: ListConfig,
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    /// Destinations held to a limit over all their sources.
    #[serde(default)]
    pub protect: Vec<ProtectConfig>,
    /// SYN cookies answered by the program, in front of netfilter's synproxy.
    pub syn_proxy: Option<Spanned<SynProxyConfig>>,
    #[serde(default)]
    pub events: EventsConfig,
    /// The NATS JetStream servers through which the fleet's nodes share their blocks.
    pub fleet: Option<Spanned<FleetConfig>>,
    /// Room for entries added while running; see [`DEFAULT_RUNTIME_ENTRIES`].
    pub runtime_entries: Option<Spanned<i64>>,
    /// The control socket's path.
    pub socket: Option<Spanned<String>>,
    /// A group whose members may use the control socket (mode 0660); absent: root only (0600).
    pub socket_group: Option<Spanned<String>>,
    /// Where dynamic entries are persisted.
    pub state_dir: Option<Spanned<String>>,
    /// Where links and maps are pinned, on a bpffs mount.
    pub bpffs: Option<Spanned<String>>,
    /// Address and port of the Prometheus `/metrics` endpoint; absent: no endpoint.
    pub metrics_listen: Option<Spanned<String>>,
    /// Where the config came from, for error messages.
    #[serde(skip)]
    origin: Origin,
}

#[derive(Clone, Debug, Default)]
enum Origin {
    #[default]
    Embedded,
    File {
        path: PathBuf,
        text: String,
    },
}

impl Origin {
    fn name(&self) -> String {
        match self {
            Self::Embedded => "<embedded default config>".to_string(),
            Self::File { path, .. } => path.display().to_string(),
        }
    }

    /// 1-based line and column of a byte offset in the file.
    fn position(&self, span: &Range<usize>) -> (usize, usize) {
        let Self::File { text, .. } = self else {
            return (0, 0);
        };
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, column)
    }

    /// Where relative list file paths start.
    fn base_dir(&self) -> PathBuf {
        match self {
            Self::File { path, .. } => path.parent().map(Path::to_path_buf).unwrap_or_default(),
            Self::Embedded => PathBuf::new(),
        }
    }
}

/// Overrides given on the command line.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// Replaces `interfaces` when not empty.
    pub interfaces: Vec<String>,
    /// Added to `blocklist.cidrs`.
    pub block: Vec<String>,
    pub xdp_mode: Option<XdpMode>,
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub bpffs: Option<PathBuf>,
}

/// Where the daemon keeps what outlives it, and where operators reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paths {
    pub socket: PathBuf,
    /// Group allowed on the socket besides root.
    pub socket_group: Option<String>,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
}

/// A list after validation: each CIDR once, with the source of its first appearance.
pub type ListEntries = CidrMap<u32>;

/// What the XDP program enforces: everything but where it is attached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    pub allowlist: ListEntries,
    pub blocklist: ListEntries,
    pub rules: Vec<Rule>,
    pub rate_limit: RateLimit,
    /// Protected destinations, in config order (the first an overlap check lets a packet
    /// belong to is its entry).
    pub protect: Vec<Protected>,
    pub syn_proxy: Option<SynProxy>,
    /// One in this many dropped packets is sampled; 0: none.
    pub sample_every: u32,
}

impl Policy {
    /// The entries of one list.
    pub fn list(&self, kind: ListKind) -> &ListEntries {
        match kind {
            ListKind::Allow => &self.allowlist,
            ListKind::Block => &self.blocklist,
        }
    }

    pub fn list_mut(&mut self, kind: ListKind) -> &mut ListEntries {
        match kind {
            ListKind::Allow => &mut self.allowlist,
            ListKind::Block => &mut self.blocklist,
        }
    }
}

/// The configuration validated and resolved with the command line's overrides: what the
/// daemon runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    pub policy: Policy,
    pub paths: Paths,
    /// Room in the list maps for entries added while running.
    pub runtime_entries: u32,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The fleet this node shares its blocks with, if any.
    pub fleet: Option<Fleet>,
}

impl Config {
    /// The configuration used when no file is given.
    pub fn embedded() -> Self {
        Self::default()
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_str_at(&text, path)
    }

    pub fn from_str_at(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: path.display().to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.origin = Origin::File {
            path: path.to_path_buf(),
            text: text.to_string(),
        };
        Ok(config)
    }

    fn invalid(&self, span: &Range<usize>, message: String) -> ConfigError {
        let (line, column) = self.origin.position(span);
        ConfigError::Invalid {
            origin: self.origin.name(),
            line,
            column,
            message,
        }
    }

    fn located(&self, (span, message): rules::Located) -> ConfigError {
        self.invalid(&span, message)
    }

    /// Applies command-line overrides, reads list files, and checks everything that does not
    /// need the kernel.
    pub fn resolve(&self, overrides: &Overrides) -> Result<Resolved, ConfigError> {
        let interfaces = self.resolve_interfaces(overrides)?;
        let mut blocklist = self.resolve_list(&self.blocklist)?;
        for text in &overrides.block {
            let cidr = text
                .parse()
                .map_err(|message| ConfigError::InvalidCliCidr {
                    value: text.clone(),
                    message,
                })?;
            blocklist.get_or_insert(cidr, SOURCE_CONFIG);
        }
        let sample_every = match &self.events.sample_every {
            None => DEFAULT_SAMPLE_EVERY,
            Some(n) => u32::try_from(*n.get_ref()).map_err(|_| {
                self.invalid(
                    &n.span(),
                    format!(
                        "events: sample_every = {} is outside 0..={}",
                        n.get_ref(),
                        u32::MAX
                    ),
                )
            })?,
        };
        let syn_proxy = self
            .syn_proxy
            .as_ref()
            .map(|table| table.get_ref().validate(table.span()))
            .transpose()
            .map_err(|e| self.located(e))?;
        let rate_limit = self.rate_limit.validate().map_err(|e| self.located(e))?;
        if let Some(ban) = &self.rate_limit.ban
            && rate_limit.ban_scope == BanScope::Verified
        {
            let missing = if syn_proxy.is_none() {
                Some("[syn_proxy]: only the SYN proxy verifies sources")
            } else if !rate_limit.bans() {
                Some("a rate limit and ban_ttl: without them nobody is banned")
            } else {
                None
            };
            if let Some(missing) = missing {
                return Err(self.invalid(
                    &ban.span(),
                    format!("rate_limit: ban = \"verified\" needs {missing}"),
                ));
            }
        }
        let policy = Policy {
            mode: self.mode,
            allowlist: self.resolve_list(&self.allowlist)?,
            blocklist,
            rules: rules::validate(&self.rules).map_err(|e| self.located(e))?,
            rate_limit,
            protect: protect::validate(&self.protect).map_err(|e| self.located(e))?,
            syn_proxy,
            sample_every,
        };
        let fleet = self
            .fleet
            .as_ref()
            .map(|table| {
                table
                    .get_ref()
                    .validate(table.span(), &self.origin.base_dir())
            })
            .transpose()
            .map_err(|e| self.located(e))?;
        Ok(Resolved {
            interfaces,
            xdp_mode: overrides.xdp_mode.unwrap_or(self.xdp_mode),
            policy,
            fleet,
            paths: self.resolve_paths(overrides)?,
            metrics_listen: self
                .metrics_listen
                .as_ref()
                .map(|text| {
                    text.get_ref().parse().map_err(|_| {
                        self.invalid(
                            &text.span(),
                            format!(
                                "metrics_listen = {:?} is not an address and port such as \
                                 \"127.0.0.1:9977\"",
                                text.get_ref()
                            ),
                        )
                    })
                })
                .transpose()?,
            runtime_entries: match &self.runtime_entries {
                None => DEFAULT_RUNTIME_ENTRIES,
                Some(n) if (0..=MAX_RUNTIME_ENTRIES).contains(n.get_ref()) => *n.get_ref() as u32,
                Some(n) => {
                    return Err(self.invalid(
                        &n.span(),
                        format!(
                            "runtime_entries = {} is outside 0..={MAX_RUNTIME_ENTRIES}",
                            n.get_ref()
                        ),
                    ));
                }
            },
        })
    }

    /// The daemon's paths: command line first, then the file, then the defaults.
    pub fn resolve_paths(&self, overrides: &Overrides) -> Result<Paths, ConfigError> {
        let path = |given: &Option<PathBuf>, key: &Option<Spanned<String>>, default: &str| {
            if let Some(path) = given {
                return Ok(path.clone());
            }
            match key {
                None => Ok(PathBuf::from(default)),
                Some(text) if Path::new(text.get_ref()).is_absolute() => {
                    Ok(PathBuf::from(text.get_ref()))
                }
                Some(text) => Err(self.invalid(
                    &text.span(),
                    format!("{:?} is not an absolute path", text.get_ref()),
                )),
            }
        };
        let socket_group = match &self.socket_group {
            Some(group) if group.get_ref().is_empty() || group.get_ref().contains('\0') => {
                return Err(self.invalid(&group.span(), "socket_group is not a group name".into()));
            }
            group => group.as_ref().map(|g| g.get_ref().clone()),
        };
        Ok(Paths {
            socket: path(&overrides.socket, &self.socket, DEFAULT_SOCKET)?,
            socket_group,
            state_dir: path(&overrides.state_dir, &self.state_dir, DEFAULT_STATE_DIR)?,
            bpffs: path(&overrides.bpffs, &self.bpffs, DEFAULT_BPFFS)?,
        })
    }

    fn resolve_interfaces(&self, overrides: &Overrides) -> Result<Vec<String>, ConfigError> {
        let interfaces = if overrides.interfaces.is_empty() {
            let mut names = Vec::with_capacity(self.interfaces.len());
            for name in &self.interfaces {
                check_interface_name(name.get_ref())
                    .map_err(|message| self.invalid(&name.span(), message))?;
                if names.contains(name.get_ref()) {
                    return Err(self.invalid(
                        &name.span(),
                        format!("interface {:?} is listed twice", name.get_ref()),
                    ));
                }
                names.push(name.get_ref().clone());
            }
            names
        } else {
            let mut names: Vec<String> = Vec::with_capacity(overrides.interfaces.len());
            for name in &overrides.interfaces {
                check_interface_name(name).map_err(|message| ConfigError::InvalidCliInterface {
                    value: name.clone(),
                    message,
                })?;
                if !names.contains(name) {
                    names.push(name.clone());
                }
            }
            names
        };
        if interfaces.is_empty() {
            return Err(ConfigError::NoInterfaces);
        }
        // Slot 0 of the counters is for unregistered interfaces.
        let max = agent_common::maps::MAX_INTERFACES as usize - 1;
        if interfaces.len() > max {
            return Err(ConfigError::TooManyInterfaces {
                count: interfaces.len(),
                max,
            });
        }
        Ok(interfaces)
    }

    /// Config entries first, then files in order; a CIDR keeps the source it first had.
    fn resolve_list(&self, list: &ListConfig) -> Result<ListEntries, ConfigError> {
        let mut entries = Vec::new();
        for text in &list.cidrs {
            let cidr = text
                .get_ref()
                .parse()
                .map_err(|message| self.invalid(&text.span(), message))?;
            entries.push((cidr, SOURCE_CONFIG));
        }
        for file in &list.files {
            let path = self.origin.base_dir().join(file.get_ref());
            entries.extend(
                list_file::read(&path)?
                    .into_iter()
                    .map(|cidr| (cidr, SOURCE_FILE)),
            );
        }
        // Sorted (on every CPU), then built in one pass: a million inserts into the tree, each
        // a search, took several times longer. A CIDR both in `cidrs` and in a file keeps the
        // source `cidrs` (sorted first, and `dedup` keeps the first of equal ones).
        entries
            .par_sort_unstable_by_key(|(cidr, source)| (cidr.sort_key(), *source != SOURCE_CONFIG));
        entries.dedup_by_key(|(cidr, _)| *cidr);
        Ok(entries.into_iter().collect())
    }

    /// Line and column of interface `name` in the file, for errors found later (e.g. it does
    /// not exist).
    pub fn locate_interface(&self, name: &str) -> Option<String> {
        let spanned = self.interfaces.iter().find(|i| i.get_ref() == name)?;
        let (line, column) = self.origin.position(&spanned.span());
        Some(format!("{}:{line}:{column}", self.origin.name()))
    }
}

fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("interface name is empty".to_string());
    }
    if name.len() > IFNAME_MAX_LEN {
        return Err(format!(
            "interface name {name:?} is longer than {IFNAME_MAX_LEN} bytes"
        ));
    }
    if name == "."
        || name == ".."
        || name.contains(['/', ':', '\0'])
        || name.contains(char::is_whitespace)
    {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_str_at(text, Path::new("moat.toml"))
    }

    fn resolve(text: &str) -> Result<Resolved, ConfigError> {
        parse(text)?.resolve(&Overrides::default())
    }

    fn error(text: &str) -> String {
        match resolve(text) {
            Ok(settings) => panic!("expected an error for {text:?}, got {settings:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn cidrs(list: &[&str]) -> ListEntries {
        list.iter()
            .map(|c| (c.parse().expect("test CIDR"), SOURCE_CONFIG))
            .collect()
    }

    #[test]
    fn the_issue_example_parses() {
        let settings = resolve(
            r#"
interfaces = ["veth0"]
xdp_mode = "auto"            # auto | native | generic
[blocklist]
cidrs = ["198.51.100.0/24", "2001:db8:bad::/48"]
"#,
        )
        .expect("valid config");
        assert_eq!(settings.interfaces, ["veth0"]);
        assert_eq!(settings.xdp_mode, XdpMode::Auto);
        assert_eq!(
            settings.policy.blocklist,
            cidrs(&["198.51.100.0/24", "2001:db8:bad::/48"])
        );
    }

    #[test]
    fn the_packaged_example_is_valid() {
        let settings = resolve(include_str!("../../../packaging/moat.toml")).expect("valid");
        assert_eq!(settings.interfaces, ["eth1"]);
        assert_eq!(settings.policy.rules.len(), 2);
        assert!(settings.policy.rate_limit.is_on());
        assert_eq!(settings.paths.socket, Path::new(DEFAULT_SOCKET));
    }

    #[test]
    fn defaults_apply_to_absent_keys() {
        let settings = resolve("interfaces = [\"eth1\"]").expect("valid config");
        assert_eq!(settings.xdp_mode, XdpMode::Auto);
        assert!(settings.policy.blocklist.is_empty());
    }

    #[test]
    fn every_mode_parses() {
        for (text, mode) in [
            ("auto", XdpMode::Auto),
            ("native", XdpMode::Native),
            ("generic", XdpMode::Generic),
        ] {
            let settings =
                resolve(&format!("interfaces = [\"a\"]\nxdp_mode = \"{text}\"")).expect(text);
            assert_eq!(settings.xdp_mode, mode);
        }
    }

    #[test]
    fn bare_addresses_are_host_routes() {
        let settings = resolve(
            "interfaces = [\"a\"]\n[blocklist]\ncidrs = [\"203.0.113.9\", \"2001:db8::1\"]",
        )
        .expect("valid");
        assert_eq!(
            settings.policy.blocklist,
            cidrs(&["203.0.113.9/32", "2001:db8::1/128"])
        );
    }

    #[test]
    fn duplicates_collapse() {
        let settings =
            resolve("interfaces = [\"a\"]\n[blocklist]\ncidrs = [\"10.0.0.0/8\", \"10.0.0.0/8\"]")
                .expect("valid");
        assert_eq!(settings.policy.blocklist.len(), 1);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = error("interfaces = [\"a\"]\nxdp_mdoe = \"auto\"\n");
        assert!(e.contains("xdp_mdoe"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        assert!(e.starts_with("moat.toml"), "{e}");
    }

    #[test]
    fn unknown_key_in_a_table_is_an_error() {
        let e = error("interfaces = [\"a\"]\n[blocklist]\ncidr = [\"10.0.0.0/8\"]\n");
        assert!(e.contains("cidr"), "{e}");
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn bad_cidr_is_named_with_its_line() {
        let e = error(
            "interfaces = [\"a\"]\n[blocklist]\ncidrs = [\"10.0.0.0/8\",\n  \"300.1.2.0/24\"]\n",
        );
        assert!(e.contains("300.1.2.0/24"), "{e}");
        assert!(e.starts_with("moat.toml:4:3:"), "{e}");
    }

    #[test]
    fn prefix_too_long_is_an_error() {
        let e = error("interfaces = [\"a\"]\n[blocklist]\ncidrs = [\"10.0.0.0/33\"]\n");
        assert!(e.contains("10.0.0.0/33"), "{e}");
    }

    #[test]
    fn host_bits_are_an_error_with_a_suggestion() {
        let e = error("interfaces = [\"a\"]\n[blocklist]\ncidrs = [\"198.51.100.7/24\"]\n");
        assert!(e.contains("did you mean 198.51.100.0/24"), "{e}");
        assert!(e.starts_with("moat.toml:3:10:"), "{e}");
    }

    #[test]
    fn bad_mode_is_an_error() {
        let e = error("interfaces = [\"a\"]\nxdp_mode = \"fast\"\n");
        assert!(e.contains("fast") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn wrong_type_is_an_error() {
        let e = error("interfaces = \"eth0\"\n");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn broken_toml_is_an_error() {
        let e = error("interfaces = [\"a\"\n");
        assert!(e.starts_with("moat.toml"), "{e}");
    }

    #[test]
    fn no_interface_is_an_error() {
        assert!(matches!(resolve(""), Err(ConfigError::NoInterfaces)));
    }

    #[test]
    fn bad_interface_names_are_located() {
        for name in ["", "a/b", "a b", "sixteen-chars-xx"] {
            let e = error(&format!("\n\ninterfaces = [\"ok\", \"{name}\"]\n"));
            assert!(e.contains("moat.toml:3:"), "{name:?}: {e}");
        }
    }

    #[test]
    fn an_interface_listed_twice_is_an_error() {
        let e = error("interfaces = [\"a\", \"a\"]\n");
        assert!(
            e.contains("listed twice") && e.contains("moat.toml:1:20"),
            "{e}"
        );
    }

    #[test]
    fn interface_locations_point_at_the_name() {
        let config =
            parse("xdp_mode = \"auto\"\ninterfaces = [\"eth0\", \"eth1\"]\n").expect("valid");
        assert_eq!(
            config.locate_interface("eth1").as_deref(),
            Some("moat.toml:2:23")
        );
        assert_eq!(config.locate_interface("eth9"), None);
    }

    #[test]
    fn overrides_replace_interfaces_and_add_blocks() {
        let config = parse(
            "interfaces = [\"a\"]\nxdp_mode = \"native\"\n[blocklist]\ncidrs = [\"10.0.0.0/8\"]",
        )
        .expect("valid");
        let settings = config
            .resolve(&Overrides {
                interfaces: vec!["b".into(), "c".into()],
                block: vec!["2001:db8::/32".into()],
                xdp_mode: Some(XdpMode::Generic),
                ..Overrides::default()
            })
            .expect("valid overrides");
        assert_eq!(settings.interfaces, ["b", "c"]);
        assert_eq!(settings.xdp_mode, XdpMode::Generic);
        assert_eq!(
            settings.policy.blocklist,
            cidrs(&["10.0.0.0/8", "2001:db8::/32"])
        );
    }

    #[test]
    fn bad_cli_values_are_errors() {
        let config = Config::embedded();
        let e = config
            .resolve(&Overrides {
                interfaces: vec!["a".into()],
                block: vec!["nonsense".into()],
                ..Overrides::default()
            })
            .expect_err("bad CIDR");
        assert!(e.to_string().contains("nonsense"), "{e}");
        let e = config
            .resolve(&Overrides {
                interfaces: vec!["a/b".into()],
                ..Overrides::default()
            })
            .expect_err("bad name");
        assert!(e.to_string().contains("a/b"), "{e}");
    }

    #[test]
    fn the_embedded_default_needs_only_an_interface() {
        let settings = Config::embedded()
            .resolve(&Overrides {
                interfaces: vec!["veth0".into()],
                ..Overrides::default()
            })
            .expect("embedded default is valid");
        assert_eq!(settings.xdp_mode, XdpMode::Auto);
        assert!(settings.policy.blocklist.is_empty());
    }

    #[test]
    fn paths_come_from_the_command_line_the_file_or_the_defaults() {
        let config = parse(
            "interfaces = [\"a\"]\nsocket = \"/tmp/m.sock\"\nsocket_group = \"moat\"\nstate_dir = \"/tmp/state\"\n",
        )
        .expect("parses");
        let paths = config
            .resolve_paths(&Overrides {
                state_dir: Some("/elsewhere".into()),
                ..Overrides::default()
            })
            .expect("valid");
        assert_eq!(paths.socket, Path::new("/tmp/m.sock"));
        assert_eq!(paths.socket_group.as_deref(), Some("moat"));
        assert_eq!(paths.state_dir, Path::new("/elsewhere"));
        assert_eq!(paths.bpffs, Path::new(DEFAULT_BPFFS));
        let e = error("interfaces = [\"a\"]\nbpffs = \"relative/dir\"\n");
        assert!(
            e.starts_with("moat.toml:2:9:") && e.contains("absolute"),
            "{e}"
        );
    }

    #[test]
    fn too_many_interfaces_is_an_error() {
        let names: Vec<String> = (0..64).map(|i| format!("if{i}")).collect();
        let e = Config::embedded()
            .resolve(&Overrides {
                interfaces: names,
                ..Overrides::default()
            })
            .expect_err("64 interfaces");
        assert!(matches!(
            e,
            ConfigError::TooManyInterfaces { count: 64, max: 63 }
        ));
    }

    #[test]
    fn the_data_path_example_parses() {
        let dir = std::env::temp_dir().join(format!("moat-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(
            dir.join("drop.txt"),
            "# list\n203.0.113.0/25 ; SBL1\n198.51.100.0/24\n",
        )
        .expect("list file");
        let text = r#"
interfaces = ["veth0"]
mode = "enforce"
[allowlist]
cidrs = ["192.0.2.0/24"]
files = []
[blocklist]
cidrs = ["198.51.100.0/24", "2001:db8:bad::/48"]
files = ["drop.txt"]
[[rules]]
name = "memcached-reflection"
protocol = "udp"
src_ports = ["11211"]
dst_ports = []
action = "drop"
[[rules]]
name = "null-scan"
protocol = "tcp"
tcp_flags = "ALL/NONE"
action = "drop"
[rate_limit]
pps = 1000
bps = "20Mbit"
burst_packets = 2000
ban_after = "2s"
ban_ttl = "10m"
[events]
sample_every = 100
"#;
        let path = dir.join("moat.toml");
        let settings = Config::from_str_at(text, &path)
            .and_then(|c| c.resolve(&Overrides::default()))
            .expect("valid config");
        let _ = std::fs::remove_dir_all(&dir);
        let policy = settings.policy;
        assert_eq!(policy.mode, Mode::Enforce);
        assert_eq!(policy.allowlist, cidrs(&["192.0.2.0/24"]));
        let mut blocklist = cidrs(&["198.51.100.0/24", "2001:db8:bad::/48"]);
        blocklist.insert("203.0.113.0/25".parse().expect("CIDR"), SOURCE_FILE);
        assert_eq!(
            policy.blocklist, blocklist,
            "config entries keep their source; files add theirs"
        );
        assert_eq!(policy.rules.len(), 2);
        assert_eq!(
            policy.rules[0].src_ports,
            [PortRange {
                first: 11211,
                last: 11211
            }]
        );
        assert_eq!(
            policy.rules[1].tcp_flags,
            Some(TcpFlags { mask: 0xff, set: 0 })
        );
        let rate = policy.rate_limit;
        assert_eq!(
            (rate.pps, rate.bps, rate.burst_packets),
            (1000, 20_000_000, 2000)
        );
        assert_eq!(rate.ban_after, std::time::Duration::from_secs(2));
        assert_eq!(rate.ban_ttl, Some(std::time::Duration::from_secs(600)));
        assert_eq!(policy.sample_every, 100);
    }

    #[test]
    fn data_path_defaults() {
        let policy = resolve("interfaces = [\"a\"]").expect("valid").policy;
        assert_eq!(policy.mode, Mode::Enforce);
        assert!(!policy.rate_limit.is_on());
        assert_eq!(policy.rate_limit.ban_ttl, None);
        assert_eq!(
            (policy.rate_limit.ipv4_prefix, policy.rate_limit.ipv6_prefix),
            (32, 64)
        );
        assert_eq!(policy.sample_every, DEFAULT_SAMPLE_EVERY);
        let rate = resolve("interfaces = [\"a\"]\n[rate_limit]\npps = 500")
            .expect("valid")
            .policy
            .rate_limit;
        assert_eq!(
            rate.burst_packets, 500,
            "a second's worth of burst by default"
        );
    }

    #[test]
    fn data_path_errors_are_located() {
        let cases = [
            ("mode = \"audit\"\n", "line 2"),
            (
                "[blocklist]\nfiles = [\"/nonexistent/drop.txt\"]\n",
                "/nonexistent/drop.txt",
            ),
            (
                "[[rules]]\nname = \"x\"\nprotocol = \"sctp\"\naction = \"drop\"\n",
                "line 4",
            ),
            (
                "[[rules]]\nname = \"x\"\nprotocol = \"udp\"\nsrc_ports = [\"70000\"]\naction = \"drop\"\n",
                "moat.toml:5:14",
            ),
            (
                "[[rules]]\nname = \"x\"\nprotocol = \"udp\"\nsrc_ports = [\"9-3\"]\naction = \"drop\"\n",
                "runs backwards",
            ),
            (
                "[[rules]]\nname = \"x\"\nprotocol = \"icmp\"\nsrc_ports = [1]\naction = \"drop\"\n",
                "needs protocol tcp, udp or any",
            ),
            (
                "[[rules]]\nname = \"x\"\nprotocol = \"udp\"\ntcp_flags = \"ALL/NONE\"\naction = \"drop\"\n",
                "tcp_flags needs protocol tcp",
            ),
            (
                "[[rules]]\nname = \"x\"\nprotocol = \"tcp\"\ntcp_flags = \"ALL/SYNN\"\naction = \"drop\"\n",
                "moat.toml:5:13",
            ),
            (
                "[[rules]]\nname = \"x\"\nprotocol = \"tcp\"\naction = \"reject\"\n",
                "line 5",
            ),
            (
                "[[rules]]\nname = \"x\"\nprotocol = \"tcp\"\naction = \"drop\"\n[[rules]]\nname = \"x\"\nprotocol = \"udp\"\naction = \"drop\"\n",
                "used twice",
            ),
            ("[[rules]]\nprotocol = \"tcp\"\naction = \"drop\"\n", "name"),
            ("[rate_limit]\npps = -1\n", "moat.toml:3:7"),
            ("[rate_limit]\nbps = \"20MB\"\n", "unknown bit rate unit"),
            (
                "[rate_limit]\nban_ttl = \"10 fortnights\"\n",
                "moat.toml:3:11",
            ),
            ("[rate_limit]\nipv6_prefix = 129\n", "ipv6_prefix = 129"),
            ("[rate_limit]\nburst = 5\n", "unknown field `burst`"),
            ("[events]\nsample_every = -5\n", "sample_every"),
            (
                "metrics_listen = \"localhost\"\n",
                "moat.toml:2:18: metrics_listen",
            ),
            ("metrics_listen = 9977\n", "invalid type"),
        ];
        for (text, expected) in cases {
            let e = error(&format!("interfaces = [\"a\"]\n{text}"));
            assert!(
                e.contains(expected),
                "{text:?}: expected {expected:?} in {e:?}"
            );
        }
    }

    #[test]
    fn too_many_rules_is_an_error() {
        let rules: String = (0..=agent_common::rules::MAX_RULES)
            .map(|i| format!("[[rules]]\nname = \"r{i}\"\nprotocol = \"any\"\naction = \"drop\"\n"))
            .collect();
        let e = error(&format!("interfaces = [\"a\"]\n{rules}"));
        assert!(e.contains("129 rules given, at most 128"), "{e}");
    }

    #[test]
    fn protected_destinations_parse_with_their_defaults() {
        let resolved = resolve(
            r#"
interfaces = ["veth0"]
[[protect]]
name = "dns"
destination = "203.0.113.53/32"
protocol = "udp"
dst_ports = ["53"]
pps = 20000
bps = "200Mbit"
burst_packets = 20000
attack_after = "1s"
attack_end_after = "10s"
fingerprints = "auto"
[[protect]]
name = "web"
destination = "2001:db8::/64"
protocol = "tcp"
pps = 50000
[[protect]]
name = "dns-tcp"
destination = "203.0.113.53"
protocol = "tcp"
dst_ports = [53]
bps = "10Mbit"
fingerprints = "off"
"#,
        )
        .expect("valid");
        let [dns, web, dns_tcp] = resolved.policy.protect.as_slice() else {
            panic!("three entries: {:?}", resolved.policy.protect);
        };
        assert_eq!(
            (dns.pps, dns.bps, dns.burst_packets),
            (20_000, 200_000_000, 20_000)
        );
        assert_eq!(
            dns.dst_ports,
            vec![PortRange {
                first: 53,
                last: 53
            }]
        );
        assert_eq!(web.burst_packets, 50_000, "a second's worth by default");
        assert_eq!(
            (web.attack_after, web.attack_end_after),
            (
                protect::DEFAULT_ATTACK_AFTER,
                protect::DEFAULT_ATTACK_END_AFTER
            )
        );
        assert_eq!(web.fingerprints, protect::Fingerprints::Auto);
        assert_eq!(dns_tcp.fingerprints, protect::Fingerprints::Off);
        assert_eq!(dns_tcp.destination.to_string(), "203.0.113.53/32");
    }

    #[test]
    fn protected_destination_errors_are_located() {
        let entry = |body: &str| {
            format!("[[protect]]\nname = \"p\"\ndestination = \"203.0.113.0/24\"\n{body}")
        };
        let cases = [
            (
                entry("pps = 0\n"),
                "moat.toml:5:7: protect \"p\": pps = 0 is outside",
            ),
            (entry("pps = 2000000000\n"), "pps = 2000000000 is outside"),
            (entry("bps = \"1kbit\"\n"), "bps = 1000 is outside"),
            (
                entry("bps = \"2Tbit\"\n"),
                "is outside 8000..=1000000000000",
            ),
            (
                entry("pps = 1\nprotocol = \"icmpv6\"\n"),
                "protocol icmpv6 never reaches an IPv4 destination",
            ),
            (entry("bps = \"20MB\"\n"), "unknown bit rate unit"),
            (entry("protocol = \"udp\"\n"), "set pps, bps or both"),
            (entry("pps = 100\nburst_packets = 1\n"), "under one tick"),
            (
                entry("bps = \"1Mbit\"\nburst_packets = 10\n"),
                "moat.toml:6:17: protect \"p\": burst_packets needs pps",
            ),
            (
                entry("pps = 100\nattack_after = \"10ms\"\n"),
                "outside 1s..=24h",
            ),
            (
                entry("pps = 100\nattack_end_after = \"forever\"\n"),
                "attack_end_after",
            ),
            (entry("pps = 100\nfingerprints = \"maybe\"\n"), "line 6"),
            (
                entry("pps = 100\nprotocol = \"icmp\"\ndst_ports = [1]\n"),
                "dst_ports needs protocol",
            ),
            (
                entry("pps = 100\npayload = \"00\"\n"),
                "unknown field `payload`",
            ),
            (
                "[[protect]]\nname = \"p\"\ndestination = \"203.0.113.1/24\"\npps = 1\n".into(),
                "host bits set",
            ),
            (
                "[[protect]]\nname = \"p\"\npps = 1\n".into(),
                "missing field `destination`",
            ),
            (
                format!("{}{}", entry("pps = 100\n"), entry("pps = 100\n")),
                "protect name \"p\" is used twice",
            ),
            (
                format!(
                    "{}[[protect]]\nname = \"q\"\ndestination = \"203.0.113.7\"\nprotocol = \"udp\"\npps = 1\n",
                    entry("pps = 100\ndst_ports = [53]\n")
                ),
                "moat.toml:9:15: protect \"q\" overlaps \"p\"",
            ),
        ];
        for (text, expected) in cases {
            let e = error(&format!("interfaces = [\"a\"]\n{text}"));
            assert!(
                e.contains(expected),
                "{text:?}: expected {expected:?} in {e:?}"
            );
        }
        // Disjoint ports or protocols on the same destination do not overlap, nor do ports and
        // a protocol without them.
        resolve(&format!(
            "interfaces = [\"a\"]\n{}[[protect]]\nname = \"q\"\ndestination = \"203.0.113.7\"\nprotocol = \"icmp\"\npps = 1\n",
            entry("protocol = \"any\"\npps = 100\ndst_ports = [53]\n")
        ))
        .expect("ports and icmp");
        resolve(&format!(
            "interfaces = [\"a\"]\n{}[[protect]]\nname = \"q\"\ndestination = \"203.0.113.7\"\nprotocol = \"udp\"\ndst_ports = [\"54-60\"]\npps = 1\n\
             [[protect]]\nname = \"r\"\ndestination = \"203.0.113.7\"\nprotocol = \"tcp\"\npps = 1\n",
            entry("protocol = \"udp\"\npps = 100\ndst_ports = [53]\n")
        ))
        .expect("disjoint entries");
        let too_many: String = (0..=agent_common::protect::MAX_PROTECTED)
            .map(|i| {
                format!(
                    "[[protect]]\nname = \"p{i}\"\ndestination = \"10.0.{}.{}\"\npps = 1\n",
                    i / 256,
                    i % 256
                )
            })
            .collect();
        let e = error(&format!("interfaces = [\"a\"]\n{too_many}"));
        assert!(e.contains("257 protect entries given, at most 256"), "{e}");
    }

    #[test]
    fn rules_on_payload_bytes_parse() {
        let resolved = resolve(
            r#"
interfaces = ["a"]
[[rules]]
name = "stats"
protocol = "udp"
payload = "0x7374617473"
payload_offset = 8
action = "drop"
[[rules]]
name = "get"
protocol = "tcp"
payload = "474554"
action = "drop"
"#,
        )
        .expect("valid");
        let payloads: Vec<_> = resolved
            .policy
            .rules
            .iter()
            .map(|r| r.payload.clone())
            .collect();
        assert_eq!(
            payloads,
            vec![
                Some(rules::PayloadMatch {
                    offset: 8,
                    bytes: b"stats".to_vec()
                }),
                Some(rules::PayloadMatch {
                    offset: 0,
                    bytes: b"GET".to_vec()
                }),
            ]
        );
    }

    #[test]
    fn rules_on_ttl_and_length_parse_and_their_errors_are_located() {
        let resolved = resolve(
            r#"
interfaces = ["a"]
[[rules]]
name = "low-ttl"
protocol = "any"
ttl = [1, "2-5"]
action = "drop"
[[rules]]
name = "big-dns"
protocol = "udp"
length = ["1000-1500"]
action = "drop"
"#,
        )
        .expect("valid");
        let [ttl, big] = resolved.policy.rules.as_slice() else {
            panic!("two rules");
        };
        assert_eq!(
            ttl.ttl,
            vec![
                PortRange { first: 1, last: 1 },
                PortRange { first: 2, last: 5 }
            ]
        );
        assert_eq!(
            big.length,
            vec![PortRange {
                first: 1000,
                last: 1500
            }]
        );
        let rule = |body: &str| {
            format!("[[rules]]\nname = \"r\"\nprotocol = \"udp\"\naction = \"drop\"\n{body}")
        };
        let cases = [
            (
                rule("ttl = [300]\n"),
                "moat.toml:6:8: rule \"r\": ttl 300 is not a TTL",
            ),
            (rule("length = [\"9-3\"]\n"), "runs backwards"),
            (
                rule("payload = \"0x010203040506070809\"\n"),
                "moat.toml:6:11: rule \"r\": payload \"0x010203040506070809\" is 9 bytes: 1 to 8 are matched",
            ),
            (
                rule("payload = \"xyz\"\n"),
                "moat.toml:6:11: rule \"r\": payload \"xyz\" is not hex",
            ),
            (
                rule("payload = \"01\"\npayload_offset = 9001\n"),
                "moat.toml:7:18: rule \"r\": payload_offset 9001 is outside 0-9000",
            ),
            (
                rule("payload_offset = 4\n"),
                "moat.toml:6:18: rule \"r\": payload_offset without payload",
            ),
            (rule("payload = [1, 2]\n"), "line 6, column 11"),
            (
                (0..5)
                    .map(|i| {
                        format!(
                            "[[rules]]\nname = \"p{i}\"\nprotocol = \"udp\"\npayload = \"01\"\n\
                             payload_offset = {i}\naction = \"drop\"\n"
                        )
                    })
                    .collect(),
                "rule \"p4\": payloads are matched at 4 distinct (payload_offset, length) pairs at most",
            ),
        ];
        for (text, expected) in cases {
            let e = error(&format!("interfaces = [\"a\"]\n{text}"));
            assert!(
                e.contains(expected),
                "{text:?}: expected {expected:?} in {e:?}"
            );
        }
    }
}
