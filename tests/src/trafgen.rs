//! Floods from trafgen (netsniff-ng) on the lab's outside end: IPv4 UDP frames written as a
//! trafgen configuration, each field fixed or random per packet, sent from one or more cores
//! for a bounded time; and the protected host's UDP counters, to see what reached its stack.

use std::{
    net::Ipv4Addr,
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
    lab.netns(Side::Protected).enter(|| {
        // thread-self: this thread is the one in the namespace.
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("snmp");
        let mut lines = snmp.lines().filter(|l| l.starts_with("Udp:"));
        let names: Vec<&str> = lines
            .next()
            .expect("Udp header")
            .split_whitespace()
            .collect();
        let values: Vec<&str> = lines
            .next()
            .expect("Udp values")
            .split_whitespace()
            .collect();
        ["InDatagrams", "NoPorts", "InErrors"]
            .iter()
            .map(|name| {
                let at = names.iter().position(|n| n == name).expect("a Udp counter");
                values[at].parse::<u64>().expect("a number")
            })
            .sum()
    })
}
