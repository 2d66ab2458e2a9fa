//! Floods from trafgen (netsniff-ng) on the lab's outside end: IPv4 UDP frames written as a
//! trafgen configuration, each field fixed or random per packet, sent from one or more cores
//! for a bounded time; and the protected host's UDP counters, to see what reached its stack.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use crate::{Lab, Side};

/// The UDP payload of a flood's frames.
#[derive(Clone, Copy, Debug)]
pub enum Payload {
    /// `len` bytes of `byte`.
    Fill(u8, usize),
    /// `len` random bytes, new for every packet.
    Random(usize),
}

/// One UDP frame, as trafgen sends it again and again; `None` fields are random per packet.
#[derive(Clone, Debug)]
pub struct UdpFlood {
    pub source: Option<Ipv4Addr>,
    pub destination: Ipv4Addr,
    pub src_port: Option<u16>,
    pub dst_port: u16,
    pub ttl: u8,
    pub payload: Payload,
}

impl UdpFlood {
    /// Writes the trafgen configuration into the lab's directory as `name`.
    pub fn write(&self, lab: &Lab, name: &str) -> PathBuf {
        let random_or = |value: Option<String>| value.unwrap_or_else(|| "drnd()".into());
        let payload = match self.payload {
            Payload::Fill(byte, len) => format!("fill({byte:#04x}, {len})"),
            Payload::Random(len) => format!("drnd({len})"),
        };
        let text = format!(
            "{{\n  eth(da={}, sa={}, type=0x0800),\n  ipv4(sa={}, da={}, ttl={}, id=drnd()),\n  \
             udp(sp={}, dp={}),\n  {payload}\n}}\n",
            lab.mac(Side::Protected),
            lab.mac(Side::Outside),
            random_or(self.source.map(|a| a.to_string())),
            self.destination,
            self.ttl,
            random_or(self.src_port.map(|p| p.to_string())),
            self.dst_port,
        );
        let path = lab.dir().join(name);
        std::fs::write(&path, text).expect("write the trafgen config");
        path
    }
}

/// A SYN flood forging a new source address, source port and sequence number for every
/// packet, to `destination:dst_port`; each SYN carries an MSS option, as real ones do.
#[derive(Clone, Debug)]
pub struct SynFlood {
    pub destination: IpAddr,
    pub dst_port: u16,
}

impl SynFlood {
    /// Writes the trafgen configuration into the lab's directory as `name`: raw bytes, since
    /// trafgen's header helpers take no random addresses.
    pub fn write(&self, lab: &Lab, name: &str) -> PathBuf {
        let bytes = |data: &[u8]| {
            data.iter()
                .map(|b| format!("{b:#04x}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mac = |side| {
            let text = lab.mac(side);
            let octets: Vec<u8> = text
                .split(':')
                .map(|o| u8::from_str_radix(o, 16).expect("a MAC octet"))
                .collect();
            bytes(&octets)
        };
        let port = bytes(&self.dst_port.to_be_bytes());
        // Ports, seq, ack 0, 6 words, SYN, window, checksum (computed), urgent, MSS 1460.
        let tcp = |checksum: &str| {
            format!(
                "drnd(2), {port}, drnd(4), 0, 0, 0, 0, 0x60, 0x02, 0xfa, 0xf0, {checksum},                  0, 0, 0x02, 0x04, 0x05, 0xb4"
            )
        };
        let text = match self.destination {
            IpAddr::V4(destination) => format!(
                "{{
  {}, {}, 0x08, 0x00,
  0x45, 0, 0, 44, drnd(2), 0x40, 0, 64, 6,                  csumip(14, 33), drnd(4), {},
  {}
}}
",
                mac(Side::Protected),
                mac(Side::Outside),
                bytes(&destination.octets()),
                tcp("csumtcp(14, 34)"),
            ),
            IpAddr::V6(destination) => format!(
                "{{
  {}, {}, 0x86, 0xdd,
  0x60, 0, 0, 0, 0, 24, 6, 64, 0x20, 0x01, 0x0d, 0xb8,                  drnd(12), {},
  {}
}}
",
                mac(Side::Protected),
                mac(Side::Outside),
                bytes(&destination.octets()),
                tcp("csumtcp6(14, 54)"),
            ),
        };
        let path = lab.dir().join(name);
        std::fs::write(&path, text).expect("write the trafgen config");
        path
    }
}

/// Runs trafgen with `config` on `cpus` cores for `duration` (at most `rate` packets per second
/// in all, when given); returns the packets it sent.
pub fn run(lab: &Lab, config: &Path, duration: Duration, cpus: u32, rate: Option<u64>) -> u64 {
    let mut command = lab.netns(Side::Outside).command("timeout");
    command
        // trafgen writes a scratch file into its working directory, which must be writable
        // (in a VM test the source tree is not).
        .current_dir(lab.dir())
        .args(["-s", "INT", &format!("{}", duration.as_secs_f64())])
        .args(["trafgen", "--dev", lab.interface(Side::Outside), "--conf"])
        .arg(config)
        // A small TX ring: trafgen treats EAGAIN from a full socket send buffer as fatal, and
        // inside a network namespace it cannot raise the (global) buffer sysctls.
        .args([
            "--cpus",
            &cpus.to_string(),
            "--num",
            "1000000000",
            "--no-sock-mem",
            "--ring-size",
            "256KiB",
        ]);
    if let Some(rate) = rate {
        command.args(["-b", &format!("{rate}pps")]);
    }
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run trafgen (netsniff-ng): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // "     1234567 packets outgoing"
    text.lines()
        .find_map(|l| {
            let l = l.trim();
            l.strip_suffix("packets outgoing")
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("trafgen printed no packet count:\n{text}"))
}

/// UDP datagrams that reached the protected host's stack (delivered, no port, or in error).
pub fn udp_arrived(lab: &Lab) -> u64 {
    lab.kernel_counters(
        Side::Protected,
        "snmp",
        "Udp",
        &["InDatagrams", "NoPorts", "InErrors"],
    )
    .iter()
    .sum()
}
