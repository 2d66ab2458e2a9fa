//! The configuration: serde types, validation, and every default (this module is the only place a
//! default lives). A file is TOML; unknown keys are errors, and every error names the file, line
//! and column it comes from.

use std::{
    collections::BTreeSet,
    fmt,
    ops::Range,
    path::{Path, PathBuf},
    str::FromStr,
};

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const IFNAME_MAX_LEN: usize = 15;

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
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        })
    }
}

/// A CIDR as written in a list: the network address with no host bits set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr(IpNet);

impl Cidr {
    pub fn net(&self) -> IpNet {
        self.0
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        // A bare address means the single host (/32 or /128), as in FireHOL lists.
        let net = match text.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => text
                .parse::<std::net::IpAddr>()
                .map(IpNet::from)
                .map_err(|_| format!("{text:?} is not an IP address or CIDR"))?,
        };
        if net.trunc() != net {
            return Err(format!(
                "{text} has host bits set; did you mean {}?",
                net.trunc()
            ));
        }
        Ok(Cidr(net))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A list of CIDRs.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListConfig {
    /// CIDRs written in the config; parsed in [`Config::resolve`] so that an error can point at
    /// the entry itself.
    #[serde(default)]
    pub cidrs: Vec<Spanned<String>>,
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
    /// Sources whose packets are dropped.
    #[serde(default)]
    pub blocklist: ListConfig,
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
            Origin::Embedded => "<embedded default config>".to_string(),
            Origin::File { path, .. } => path.display().to_string(),
        }
    }

    /// 1-based line and column of a byte offset in the file.
    fn position(&self, span: &Range<usize>) -> (usize, usize) {
        let Origin::File { text, .. } = self else {
            return (0, 0);
        };
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        (line, column)
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
}

/// The validated configuration the agent runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpMode,
    /// Sorted and without duplicates.
    pub blocklist: BTreeSet<Cidr>,
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
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
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

    /// Applies command-line overrides and checks everything that does not need the system.
    pub fn resolve(&self, overrides: &Overrides) -> Result<Settings, ConfigError> {
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

        let mut blocklist = BTreeSet::new();
        for text in &self.blocklist.cidrs {
            let cidr = text
                .get_ref()
                .parse()
                .map_err(|message| self.invalid(&text.span(), message))?;
            blocklist.insert(cidr);
        }
        for text in &overrides.block {
            let cidr = text
                .parse()
                .map_err(|message| ConfigError::InvalidCliCidr {
                    value: text.clone(),
                    message,
                })?;
            blocklist.insert(cidr);
        }

        Ok(Settings {
            interfaces,
            xdp_mode: overrides.xdp_mode.unwrap_or(self.xdp_mode),
            blocklist,
        })
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

    fn resolve(text: &str) -> Result<Settings, ConfigError> {
        parse(text)?.resolve(&Overrides::default())
    }

    fn error(text: &str) -> String {
        match resolve(text) {
            Ok(settings) => panic!("expected an error for {text:?}, got {settings:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn cidrs(list: &[&str]) -> BTreeSet<Cidr> {
        list.iter().map(|c| c.parse().expect("test CIDR")).collect()
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
        assert_eq!(
            settings,
            Settings {
                interfaces: vec!["veth0".into()],
                xdp_mode: XdpMode::Auto,
                blocklist: cidrs(&["198.51.100.0/24", "2001:db8:bad::/48"]),
            }
        );
    }

    #[test]
    fn defaults_apply_to_absent_keys() {
        let settings = resolve("interfaces = [\"eth1\"]").expect("valid config");
        assert_eq!(settings.xdp_mode, XdpMode::Auto);
        assert!(settings.blocklist.is_empty());
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
            settings.blocklist,
            cidrs(&["203.0.113.9/32", "2001:db8::1/128"])
        );
    }

    #[test]
    fn duplicates_collapse() {
        let settings =
            resolve("interfaces = [\"a\"]\n[blocklist]\ncidrs = [\"10.0.0.0/8\", \"10.0.0.0/8\"]")
                .expect("valid");
        assert_eq!(settings.blocklist.len(), 1);
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
            })
            .expect("valid overrides");
        assert_eq!(settings.interfaces, ["b", "c"]);
        assert_eq!(settings.xdp_mode, XdpMode::Generic);
        assert_eq!(settings.blocklist, cidrs(&["10.0.0.0/8", "2001:db8::/32"]));
    }

    #[test]
    fn bad_cli_values_are_errors() {
        let config = Config::embedded();
        let e = config
            .resolve(&Overrides {
                interfaces: vec!["a".into()],
                block: vec!["nonsense".into()],
                xdp_mode: None,
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
        assert!(settings.blocklist.is_empty());
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
}
