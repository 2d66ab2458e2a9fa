//! End to end: interfaces without an Ethernet header (issue 13, finding 2). A tun device is what
//! WireGuard's devices are to XDP (link type `ARPHRD_NONE`: IP packets, no link header); moat
//! parses its frames from the IP header and enforces the same policy, with real packets over
//! IPv4 and IPv6. (This machine's kernel has no ipip, gre or wireguard module to test those too;
//! their link types take the same path in the program.)

use std::{
    fs::File,
    io::{Read as _, Write as _},
    os::fd::{AsRawFd as _, FromRawFd as _},
    time::{Duration, Instant},
};

use moat_tests::{Lab, MoatProcess, Side};
use serde_json::Value;

/// `_IOW('T', 202, int)` of `linux/if_tun.h`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Starts moat on `interface` with `blocked` in the blocklist; waits until it enforces.
fn start_on(lab: &Lab, interface: &str, blocked: &str) -> MoatProcess {
    let config = lab.dir().join("ip-only.toml");
    std::fs::write(
        &config,
        format!("interfaces = [\"{interface}\"]\n[blocklist]\ncidrs = [\"{blocked}\"]\n"),
    )
    .expect("write the config");
    let moat = MoatProcess::spawn(lab, &["run", "--config", &config.to_string_lossy()]);
    moat.wait_for_log("moat is enforcing", 1);
    moat
}

/// `moat stats --json`'s packets for (interface, action, reason).
fn counted(lab: &Lab, interface: &str, action: &str, reason: &str) -> u64 {
    let out = MoatProcess::cli(lab, &["stats", "--json"]).ok("stats --json");
    let counters: Value = serde_json::from_str(&out).expect("JSON");
    counters
        .as_array()
        .expect("an array")
        .iter()
        .find(|c| c["interface"] == interface && c["action"] == action && c["reason"] == reason)
        .map_or(0, |c| c["packets"].as_u64().expect("a number"))
}

fn ip(lab: &Lab, side: Side, args: &[&str]) {
    let out = lab.netns(side).ip(args);
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

/// The Internet checksum (RFC 1071) of `bytes`.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 ICMP echo request, checksums right (the stack checks both).
fn echo_request(src: [u8; 4], dst: [u8; 4], sequence: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34];
    icmp.extend_from_slice(&sequence.to_be_bytes());
    icmp.extend_from_slice(b"moat-tun");
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut packet = vec![0x45, 0];
    packet.extend_from_slice(&total.to_be_bytes());
    packet.extend_from_slice(&[0, 1, 0, 0, 64, 1, 0, 0]);
    packet.extend_from_slice(&src);
    packet.extend_from_slice(&dst);
    let sum = checksum(&packet);
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
    packet.extend_from_slice(&icmp);
    packet
}

/// Whether an echo reply to `to` (IPv4 or IPv6) comes out of the tun within a second.
fn echo_reply_to(tun: &mut File, to: &[u8]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buffer = [0u8; 2048];
    while Instant::now() < deadline {
        let n = match tun.read(&mut buffer) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => panic!("reading the tun: {e}"),
        };
        let packet = &buffer[..n];
        let reply = match packet.first().map(|b| b >> 4) {
            // IPv4 ICMP echo reply (type 0) to `to`.
            Some(4) => n >= 28 && packet[9] == 1 && &packet[16..20] == to && packet[20] == 0,
            // ICMPv6 echo reply (type 129) to `to`.
            Some(6) => n >= 48 && packet[6] == 58 && &packet[24..40] == to && packet[40] == 129,
            _ => false,
        };
        if reply {
            return true;
        }
    }
    false
}

/// Writes `packet` (an echo request from `source`) into the tun; whether its reply comes out.
fn answered(tun: &mut File, packet: &[u8], source: &[u8]) -> bool {
    tun.write_all(packet).expect("write to the tun");
    echo_reply_to(tun, source)
}

/// `/dev/net/tun`: its module loaded and its node made where the system has not (a VM's
/// devtmpfs before the module is loaded).
fn tun_device() -> &'static std::path::Path {
    let path = std::path::Path::new("/dev/net/tun");
    if !path.exists() {
        let _ = std::process::Command::new("modprobe").arg("tun").status();
    }
    if !path.exists() {
        std::fs::create_dir_all("/dev/net").expect("create /dev/net");
        let node = std::ffi::CString::new("/dev/net/tun").expect("a path");
        // SAFETY: mknod with a valid path; the misc device 10:200 is the tun driver's.
        let rc =
            unsafe { libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(10, 200)) };
        assert_eq!(
            rc,
            0,
            "mknod /dev/net/tun: {}",
            std::io::Error::last_os_error()
        );
    }
    path
}

/// Opens a tun device (IP packets, no packet-information header) in the protected namespace;
/// it lives as long as the file.
fn open_tun(lab: &Lab, name: &str) -> File {
    let device = tun_device();
    lab.netns(Side::Protected).enter(|| {
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(device)
            .expect("open /dev/net/tun (the tun driver)");
        // SAFETY: plain C data for which all zeroes is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
            *slot = byte as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads the ifreq we own; the fd is the tun's.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut request) };
        assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        // SAFETY: fcntl on our own fd.
        unsafe {
            let flags = libc::fcntl(tun.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(tun.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        // SAFETY: a duplicate of the fd we own, owned by the new File.
        unsafe { File::from_raw_fd(libc::dup(tun.as_raw_fd())) }
    })
}

#[test]
fn a_tun_device_is_protected_from_its_ip_header() {
    let lab = Lab::new();
    let name = "moattun0";
    let mut tun = open_tun(&lab, name);
    ip(
        &lab,
        Side::Protected,
        &["addr", "add", "10.77.0.1/24", "dev", name],
    );
    ip(&lab, Side::Protected, &["link", "set", name, "up"]);
    for net in ["100.64.1.0/24", "100.64.2.0/24"] {
        ip(&lab, Side::Protected, &["route", "add", net, "dev", name]);
    }
    let moat = start_on(&lab, name, "100.64.1.0/24");
    let status = MoatProcess::status(&lab);
    assert_eq!(status["interfaces"][0]["framing"], "ip", "{status}");

    let (blocked, allowed, host) = ([100, 64, 1, 7], [100, 64, 2, 7], [10, 77, 0, 1]);
    for sequence in 0..3 {
        let request = echo_request(allowed, host, sequence);
        assert!(
            answered(&mut tun, &request, &allowed),
            "the allowed source is answered"
        );
        let request = echo_request(blocked, host, sequence);
        assert!(
            !answered(&mut tun, &request, &blocked),
            "the blocked source is not"
        );
    }
    assert_eq!(counted(&lab, name, "drop", "blocklist"), 3);
    assert!(counted(&lab, name, "pass", "no_match") >= 3);
    assert_eq!(counted(&lab, name, "pass", "not_ip"), 0);
    drop(moat);
}

/// An ICMPv6 echo request, checksum right (over the IPv6 pseudo-header).
fn echo_request_v6(src: [u8; 16], dst: [u8; 16], sequence: u16) -> Vec<u8> {
    let mut icmp = vec![128, 0, 0, 0, 0x12, 0x34];
    icmp.extend_from_slice(&sequence.to_be_bytes());
    icmp.extend_from_slice(b"moat-tun");
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&icmp);
    let sum = checksum(&pseudo);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut packet = vec![0x60, 0, 0, 0];
    packet.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    packet.extend_from_slice(&[58, 64]);
    packet.extend_from_slice(&src);
    packet.extend_from_slice(&dst);
    packet.extend_from_slice(&icmp);
    packet
}

fn v6(text: &str) -> [u8; 16] {
    text.parse::<std::net::Ipv6Addr>()
        .expect("an address")
        .octets()
}

#[test]
fn a_tun_device_carrying_ipv6_is_protected_from_its_ip_header() {
    let lab = Lab::new();
    let name = "moattun6";
    let mut tun = open_tun(&lab, name);
    ip(
        &lab,
        Side::Protected,
        &["-6", "addr", "add", "fd77::1/64", "dev", name, "nodad"],
    );
    ip(&lab, Side::Protected, &["link", "set", name, "up"]);
    for net in ["fd78:1::/64", "fd78:2::/64"] {
        ip(
            &lab,
            Side::Protected,
            &["-6", "route", "add", net, "dev", name],
        );
    }
    let moat = start_on(&lab, name, "fd78:1::/64");
    let (blocked, allowed, host) = (v6("fd78:1::7"), v6("fd78:2::7"), v6("fd77::1"));
    for sequence in 0..3 {
        let request = echo_request_v6(allowed, host, sequence);
        assert!(
            answered(&mut tun, &request, &allowed),
            "the allowed source is answered"
        );
        let request = echo_request_v6(blocked, host, sequence);
        assert!(
            !answered(&mut tun, &request, &blocked),
            "the blocked source is not"
        );
    }
    assert_eq!(counted(&lab, name, "drop", "blocklist"), 3);
    assert!(counted(&lab, name, "pass", "no_match") >= 3);
    assert_eq!(counted(&lab, name, "pass", "not_ip"), 0);
    drop(moat);
}
