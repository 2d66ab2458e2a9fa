//! A CIDR as lists write it.

use std::{fmt, str::FromStr};

use ipnet::IpNet;

/// A network with no host bits set; a bare address is a /32 or /128.
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
        Ok(Self(net))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<IpNet> for Cidr {
    /// The network of `net` (host bits cleared).
    fn from(net: IpNet) -> Self {
        Self(net.trunc())
    }
}
