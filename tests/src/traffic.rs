//! Traffic for the lab: pings (answered or not) and a bounded UDP flood.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use crate::{
    MoatProcess,
    lab::{ATTACKER_V4, Lab, PROTECTED_V4, Side},
};

/// ICMP payload size every ping here uses, so that frame sizes are known.
pub const PING_PAYLOAD: usize = 56;

/// Ethernet frame length of one of our echo requests.
pub fn ping_frame_len(to: IpAddr) -> u64 {
    let ip_header = if to.is_ipv4() { 20 } else { 40 };
    (14 + ip_header + 8 + PING_PAYLOAD) as u64
}

/// Result of one `ping` run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PingResult {
    pub transmitted: u64,
    pub received: u64,
}

/// Sends `count` echo requests from `from` (an address of the outside namespace) to `to`, 10 ms
/// apart, and waits up to a second for the last reply.
pub fn ping(lab: &Lab, from: &str, to: &str, count: u32) -> PingResult {
    let output = lab
        .netns(Side::Outside)
        .command("ping")
        .args([
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            "0.01",
            "-W",
            "1",
        ])
        .args(["-s", &PING_PAYLOAD.to_string(), "-I", from, to])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run ping: {e} (`cargo xtask setup` installs iputils-ping)")
        });
    let text = String::from_utf8_lossy(&output.stdout);
    // "5 packets transmitted, 5 received, 0% packet loss, time 41ms"
    let summary = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| {
            panic!(
                "ping printed no summary: {text}{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
    let number_before = |word: &str| -> u64 {
        let words: Vec<&str> = summary
            .split([' ', ','])
            .filter(|w| !w.is_empty())
            .collect();
        let at = words
            .iter()
            .position(|w| *w == word)
            .unwrap_or_else(|| panic!("no {word:?} in ping summary {summary:?}"));
        words[at - 1]
            .parse()
            .unwrap_or_else(|_| panic!("bad number before {word:?} in {summary:?}"))
    };
    PingResult {
        transmitted: number_before("packets"),
        received: number_before("received"),
    }
}

/// Sends `count` UDP datagrams of `payload` bytes from `from` to `to:9` (discard) as fast as
/// the socket takes them, inside the outside namespace. Returns how many the kernel accepted
/// and how long it took. Bounded by count and by `max_time`.
pub fn udp_flood(
    lab: &Lab,
    from: IpAddr,
    to: IpAddr,
    count: u64,
    payload: usize,
    max_time: Duration,
) -> (u64, Duration) {
    lab.netns(Side::Outside).enter(|| {
        let socket = UdpSocket::bind(SocketAddr::new(from, 0))
            .unwrap_or_else(|e| panic!("cannot bind a UDP socket to {from}: {e}"));
        let target = SocketAddr::new(to, 9);
        let data = vec![0u8; payload];
        let start = Instant::now();
        let mut sent = 0;
        while sent < count && start.elapsed() < max_time {
            if socket.send_to(&data, target).is_ok() {
                sent += 1;
            }
        }
        (sent, start.elapsed())
    })
}

/// Sends UDP datagrams from `from` to `to:9` at about `rate` packets per second for `duration`
/// (paced per millisecond). Returns how many were sent and over how long.
pub fn udp_paced(
    lab: &Lab,
    from: IpAddr,
    to: IpAddr,
    rate: u64,
    duration: Duration,
) -> (u64, Duration) {
    udp_paced_until(lab, from, to, rate, &AtomicBool::new(false), duration)
}

/// [`udp_paced`] until `stop` is set (or `limit` has passed): for a flood that must outlast
/// what a test does meanwhile, however slow the machine.
pub fn udp_paced_until(
    lab: &Lab,
    from: IpAddr,
    to: IpAddr,
    rate: u64,
    stop: &AtomicBool,
    limit: Duration,
) -> (u64, Duration) {
    lab.netns(Side::Outside).enter(|| {
        let socket = UdpSocket::bind(SocketAddr::new(from, 0))
            .unwrap_or_else(|e| panic!("cannot bind a UDP socket to {from}: {e}"));
        let target = SocketAddr::new(to, 9);
        let data = [0u8; 32];
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < limit && !stop.load(Ordering::Relaxed) {
            // Catch up to where the schedule says we should be.
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            while sent < due {
                if socket.send_to(&data, target).is_ok() {
                    sent += 1;
                }
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        (sent, start.elapsed())
    })
}

/// A rate limit that bans `ATTACKER_V4` after a second over 100 pkt/s, for ten minutes: what
/// [`flood_until_banned`] needs in the daemon's config.
pub const BANNING: &str =
    "[rate_limit]\npps = 100\nburst_packets = 100\nban_after = \"1s\"\nban_ttl = \"10m\"\n";

/// Floods from `ATTACKER_V4` until the lab's daemon (configured with [`BANNING`]) has logged a
/// ban: over its limit for longer than `ban_after`.
pub fn flood_until_banned(lab: &Lab, moat: &MoatProcess) {
    udp_flood(
        lab,
        Lab::addr(ATTACKER_V4),
        Lab::addr(PROTECTED_V4),
        5_000_000,
        64,
        Duration::from_millis(2500),
    );
    moat.wait_for_log("banned source=", 1);
}

/// Pings each assertion sends.
pub const ASSERT_PINGS: u32 = 5;

/// Asserts that every one of [`ASSERT_PINGS`] echo requests from `from` to `to` is answered.
pub fn assert_answered(lab: &Lab, from: &str, to: &str) {
    let result = ping(lab, from, to, ASSERT_PINGS);
    assert_eq!(
        (result.transmitted, result.received),
        (u64::from(ASSERT_PINGS), u64::from(ASSERT_PINGS)),
        "every ping from {from} to {to} should be answered"
    );
}

/// Asserts that none of [`ASSERT_PINGS`] echo requests from `from` to `to` is answered.
pub fn assert_unanswered(lab: &Lab, from: &str, to: &str) {
    let result = ping(lab, from, to, ASSERT_PINGS);
    assert_eq!(
        (result.transmitted, result.received),
        (u64::from(ASSERT_PINGS), 0),
        "no ping from blocked {from} to {to} should be answered"
    );
}
