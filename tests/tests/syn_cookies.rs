//! The SYN proxy's data path on crafted frames (BPF_PROG_TEST_RUN): the exact SYN-ACK the
//! program sends back (every field, checksums recomputed here by etherparse), the SYNs it does
//! not answer, a valid and an invalid cookie ACK, monitor mode, and bans limited to verified
//! sources.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use agent_common::stats::{Action, Reason};
use etherparse::{
    Ipv4Header, Ipv6Header, LinkSlice, NetSlice, SlicedPacket, TcpHeader, TcpOptionElement,
    TransportSlice,
};
use moat::config::{Config, Mode, Overrides, Policy};
use moat_tests::{
    frames::{Extension, Frame, TCP_ACK, TCP_RST, TCP_SYN},
    program::{LoadedProgram, TEST_RUN_IF_INDEX, XDP_DROP, action_name, xdp_action},
};

const CLIENT_V4: &str = "192.0.2.10";
const CLIENT_V6: &str = "2001:db8:c::10";
/// The SYN's sequence number (the frame builder's).
const SYN_SEQ: u32 = 1;
const CLIENT_TSVAL: u32 = 0x0102_0304;

const POLICY: &str = r#"
interfaces = ["lo"]
[blocklist]
cidrs = ["198.51.100.0/24"]
[syn_proxy]
ports = [80, "8000-8100"]
wscale = 9
"#;

/// Linux's SYN options: MSS 1460, SACK-permitted, timestamp, NOP, window scale 7.
fn linux_options() -> Vec<u8> {
    let mut options = vec![2, 4, 0x05, 0xb4, 4, 2, 8, 10];
    options.extend(CLIENT_TSVAL.to_be_bytes());
    options.extend([0, 0, 0, 0, 1, 3, 3, 7]);
    options
}

fn policy(text: &str) -> Policy {
    Config::from_str_at(text, Path::new("syn_cookies.toml"))
        .and_then(|c| c.resolve(&Overrides::default()))
        .unwrap_or_else(|e| panic!("test policy: {e}"))
        .policy
}

fn syn(source: &str, port: u16) -> Frame {
    Frame::tcp(source, 40000, port, TCP_SYN)
        .payload(0)
        .tcp_options(&linux_options())
}

/// The SYN-ACK as read back: its TCP header, and the addresses and checksums checked.
struct SynAck {
    tcp: TcpHeader,
    frame: Vec<u8>,
}

/// Reads `frame` back as the answer to `syn`: Ethernet addresses, IP addresses and ports
/// swapped, VLAN tags kept, checksums right (recomputed here), SYN|ACK acknowledging the
/// SYN's sequence number, window 0, nothing after the TCP header.
fn read_syn_ack(syn: &[u8], frame: Vec<u8>) -> SynAck {
    let sliced = SlicedPacket::from_ethernet(&frame)
        .unwrap_or_else(|e| panic!("the SYN-ACK does not parse ({e}): {frame:02x?}"));
    let request = SlicedPacket::from_ethernet(syn).expect("the SYN parses");
    let (Some(LinkSlice::Ethernet2(eth)), Some(LinkSlice::Ethernet2(syn_eth))) =
        (&sliced.link, &request.link)
    else {
        panic!("Ethernet frames");
    };
    assert_eq!(
        (eth.source(), eth.destination()),
        (syn_eth.destination(), syn_eth.source()),
        "MAC addresses swapped"
    );
    assert_eq!(
        frame[12..14],
        syn[12..14],
        "the EtherType (or VLAN tag) kept"
    );
    let Some(TransportSlice::Tcp(tcp)) = &sliced.transport else {
        panic!("a TCP segment: {frame:02x?}");
    };
    let Some(TransportSlice::Tcp(syn_tcp)) = &request.transport else {
        panic!("the SYN is TCP");
    };
    let header = tcp.to_header();
    assert!(
        tcp.payload().is_empty(),
        "no payload: the frame ends with the TCP header"
    );
    assert_eq!(
        (tcp.source_port(), tcp.destination_port()),
        (syn_tcp.destination_port(), syn_tcp.source_port()),
        "ports swapped"
    );
    assert!(
        header.syn && header.ack && !header.rst && !header.fin,
        "SYN|ACK"
    );
    assert_eq!(
        header.acknowledgment_number,
        SYN_SEQ + 1,
        "acknowledges the SYN"
    );
    assert_eq!(header.window_size, 0, "window 0 until synproxy opens it");
    match (&sliced.net, &request.net) {
        (Some(NetSlice::Ipv4(ip)), Some(NetSlice::Ipv4(syn_ip))) => {
            let ip = ip.header();
            assert_eq!(
                (ip.source(), ip.destination()),
                (syn_ip.header().destination(), syn_ip.header().source()),
                "addresses swapped"
            );
            let decoded = ip.to_header();
            assert_eq!(decoded.time_to_live, 64);
            assert!(decoded.dont_fragment && decoded.options.is_empty());
            assert_eq!(
                decoded.header_checksum,
                decoded.calc_header_checksum(),
                "IPv4 header checksum"
            );
            assert_eq!(
                usize::from(decoded.total_len),
                Ipv4Header::MIN_LEN + header.header_len()
            );
            let expected = header.calc_checksum_ipv4(&decoded, &[]).expect("checksum");
            assert_eq!(
                header.checksum, expected,
                "TCP checksum (IPv4 pseudo header)"
            );
        }
        (Some(NetSlice::Ipv6(ip)), Some(NetSlice::Ipv6(syn_ip))) => {
            let ip = ip.header();
            assert_eq!(
                (ip.source(), ip.destination()),
                (syn_ip.header().destination(), syn_ip.header().source()),
                "addresses swapped"
            );
            let decoded: Ipv6Header = ip.to_header();
            assert_eq!(decoded.hop_limit, 64);
            assert_eq!(usize::from(decoded.payload_length), header.header_len());
            let expected = header.calc_checksum_ipv6(&decoded, &[]).expect("checksum");
            assert_eq!(
                header.checksum, expected,
                "TCP checksum (IPv6 pseudo header)"
            );
        }
        _ => panic!("IP of the SYN's family: {frame:02x?}"),
    }
    drop(sliced);
    SynAck { tcp: header, frame }
}

fn options(tcp: &TcpHeader) -> Vec<TcpOptionElement> {
    tcp.options_iterator()
        .map(|o| o.expect("well-formed options"))
        .collect()
}

/// The handshake's final ACK for `answer` (its cookie + `cookie_offset` acknowledged).
fn final_ack(source: &str, port: u16, answer: &SynAck, cookie_offset: u32) -> Vec<u8> {
    let mut frame = Frame::tcp(source, 40000, port, TCP_ACK).payload(0).bytes();
    let tcp_at = frame.len() - 20;
    frame[tcp_at + 4..tcp_at + 8].copy_from_slice(&(SYN_SEQ + 1).to_be_bytes());
    let ack = answer.tcp.sequence_number.wrapping_add(cookie_offset);
    frame[tcp_at + 8..tcp_at + 12].copy_from_slice(&ack.to_be_bytes());
    frame
}

fn verified(program: &LoadedProgram) -> u64 {
    program
        .limiter
        .reader()
        .expect("a reader on the limiter's maps")
        .scan(Instant::now() + Duration::from_secs(5))
        .verified
}

/// One frame through the program: the action it returns, and the one counter it moved.
fn expect(program: &mut LoadedProgram, frame: &[u8], action: Action, reason: Reason) -> Vec<u8> {
    let before = program.snapshot();
    let (returned, out) = program.run_out(frame);
    let after = program.snapshot();
    let expected = xdp_action(action);
    assert_eq!(
        returned,
        expected,
        "expected {} ({}/{}), got {}",
        action_name(expected),
        action.name(),
        reason.name(),
        action_name(returned)
    );
    let moved = after.get(TEST_RUN_IF_INDEX, action, reason).packets
        - before.get(TEST_RUN_IF_INDEX, action, reason).packets;
    assert_eq!(
        moved,
        1,
        "counted under {}/{}",
        action.name(),
        reason.name()
    );
    out
}

#[test]
fn a_syn_is_answered_with_a_cookie_that_the_final_ack_proves() {
    let mut program = LoadedProgram::new(&policy(POLICY));
    let request = syn(CLIENT_V4, 80).bytes();
    let out = expect(&mut program, &request, Action::Tx, Reason::SynCookie);
    let answer = read_syn_ack(&request, out);
    assert_eq!(
        answer.tcp.header_len(),
        40,
        "MSS, SACK-permitted, timestamp, window scale"
    );
    let elements = options(&answer.tcp);
    assert_eq!(elements[0], TcpOptionElement::MaximumSegmentSize(1460));
    assert_eq!(
        elements[1],
        TcpOptionElement::SelectiveAcknowledgementPermitted
    );
    let TcpOptionElement::Timestamp(tsval, tsecr) = elements[2] else {
        panic!("a timestamp third: {elements:?}");
    };
    assert_eq!(tsecr, CLIENT_TSVAL, "echoes the client's timestamp");
    assert_eq!(
        tsval & 0x3f,
        7 | 1 << 4,
        "the timestamp keeps the client's window scale (7) and SACK-permitted"
    );
    assert_eq!(elements[3], TcpOptionElement::Noop);
    assert_eq!(
        elements[4],
        TcpOptionElement::WindowScale(9),
        "the configured scale"
    );
    assert_eq!(answer.frame.len(), 14 + 20 + 40);

    // A wrong cookie proves nothing; the right one verifies the source. Both pass on to the
    // stack, where synproxy has the last word.
    assert_eq!(verified(&program), 0);
    let wrong = final_ack(CLIENT_V4, 80, &answer, 2);
    expect(&mut program, &wrong, Action::Pass, Reason::NoMatch);
    assert_eq!(
        verified(&program),
        0,
        "an ACK with a wrong cookie verifies no one"
    );
    let right = final_ack(CLIENT_V4, 80, &answer, 1);
    expect(&mut program, &right, Action::Pass, Reason::NoMatch);
    assert_eq!(
        verified(&program),
        1,
        "the cookie's ACK verifies its source"
    );
}

#[test]
fn options_follow_what_the_client_sent() {
    let mut program = LoadedProgram::new(&policy(POLICY));
    // MSS only: nowhere to keep anything else, so MSS alone.
    let request = Frame::tcp(CLIENT_V4, 40001, 80, TCP_SYN)
        .payload(0)
        .tcp_options(&[2, 4, 0x05, 0xb4, 1, 3, 3, 7, 4, 2])
        .bytes();
    let out = expect(&mut program, &request, Action::Tx, Reason::SynCookie);
    let answer = read_syn_ack(&request, out);
    assert_eq!(
        options(&answer.tcp),
        vec![TcpOptionElement::MaximumSegmentSize(1460)]
    );
    // A timestamp without SACK or window scale: two NOPs where SACK-permitted would be, and
    // 0xf (none) in the timestamp's scale bits.
    let mut ts_only = vec![1, 1, 8, 10];
    ts_only.extend(CLIENT_TSVAL.to_be_bytes());
    ts_only.extend([0, 0, 0, 0]);
    let request = Frame::tcp(CLIENT_V4, 40002, 8050, TCP_SYN)
        .payload(0)
        .tcp_options(&ts_only)
        .bytes();
    let out = expect(&mut program, &request, Action::Tx, Reason::SynCookie);
    let answer = read_syn_ack(&request, out);
    let elements = options(&answer.tcp);
    assert_eq!(answer.tcp.header_len(), 36);
    assert_eq!(
        &elements[1..3],
        &[TcpOptionElement::Noop, TcpOptionElement::Noop]
    );
    let TcpOptionElement::Timestamp(tsval, _) = elements[3] else {
        panic!("a timestamp: {elements:?}");
    };
    assert_eq!(tsval & 0x3f, 0xf);
}

#[test]
fn tagged_padded_and_ipv6_syns_are_answered_in_place() {
    let mut program = LoadedProgram::new(&policy(POLICY));
    // VLAN: the tag stays where it was.
    let request = syn(CLIENT_V4, 80).vlan(42).bytes();
    let out = expect(&mut program, &request, Action::Tx, Reason::SynCookie);
    assert_eq!(
        &out[12..18],
        &request[12..18],
        "802.1Q tag and EtherType kept"
    );
    let answer = read_syn_ack(&request, out);
    assert_eq!(answer.frame.len(), 18 + 20 + 40);
    // A SYN carrying data: the answer ends with its header.
    let request = syn(CLIENT_V4, 80).payload(100).bytes();
    let out = expect(&mut program, &request, Action::Tx, Reason::SynCookie);
    assert_eq!(read_syn_ack(&request, out).frame.len(), 14 + 20 + 40);
    // IPv6: 20 bytes less of MSS.
    let request = syn(CLIENT_V6, 80).bytes();
    let out = expect(&mut program, &request, Action::Tx, Reason::SynCookie);
    let answer = read_syn_ack(&request, out);
    assert_eq!(
        options(&answer.tcp)[0],
        TcpOptionElement::MaximumSegmentSize(1440)
    );
    let right = final_ack(CLIENT_V6, 80, &answer, 1);
    expect(&mut program, &right, Action::Pass, Reason::NoMatch);
    assert_eq!(verified(&program), 1, "an IPv6 source is verified too");
}

#[test]
fn syns_it_must_not_answer_pass_or_drop_untouched() {
    let mut program = LoadedProgram::new(&policy(POLICY));
    let untouched = |program: &mut LoadedProgram, name: &str, frame: Vec<u8>, reason: Reason| {
        let action = if reason == Reason::NoMatch {
            Action::Pass
        } else {
            Action::Drop
        };
        let out = expect(program, &frame, action, reason);
        assert_eq!(out, frame, "{name}: the frame is left as it came");
    };
    let with_flags = |flags: u8| {
        Frame::tcp(CLIENT_V4, 40000, 80, flags)
            .payload(0)
            .tcp_options(&linux_options())
            .bytes()
    };
    untouched(
        &mut program,
        "SYN+ACK",
        with_flags(TCP_SYN | TCP_ACK),
        Reason::NoMatch,
    );
    untouched(
        &mut program,
        "SYN+RST",
        with_flags(TCP_SYN | TCP_RST),
        Reason::NoMatch,
    );
    untouched(
        &mut program,
        "other port",
        syn(CLIENT_V4, 81).bytes(),
        Reason::NoMatch,
    );
    // netfilter's synproxy answers these itself (the program does not strip options or walk
    // extension headers to answer them).
    untouched(
        &mut program,
        "IPv4 options",
        syn(CLIENT_V4, 80).ipv4_options(2).bytes(),
        Reason::NoMatch,
    );
    untouched(
        &mut program,
        "IPv6 extension header",
        syn(CLIENT_V6, 80)
            .extension(Extension::DestinationOptions)
            .bytes(),
        Reason::NoMatch,
    );
    // The lists come first.
    untouched(
        &mut program,
        "blocked source",
        syn("198.51.100.7", 80).bytes(),
        Reason::Blocklist,
    );
    // Options that claim more than the header holds: a timestamp cut after 4 of its 10 bytes.
    let truncated = Frame::tcp(CLIENT_V4, 40000, 80, TCP_SYN)
        .payload(0)
        .tcp_options_truncated(&[2, 4, 0x05, 0xb4, 8, 10, 0, 0, 0, 0, 0, 0], 2)
        .bytes();
    untouched(
        &mut program,
        "truncated options",
        truncated,
        Reason::Malformed,
    );
}

#[test]
fn monitor_mode_counts_what_it_would_answer_and_passes_it() {
    let mut monitored = policy(POLICY);
    monitored.mode = Mode::Monitor;
    let mut program = LoadedProgram::new(&monitored);
    let request = syn(CLIENT_V4, 80).bytes();
    let out = expect(&mut program, &request, Action::WouldTx, Reason::SynCookie);
    assert_eq!(out, request, "the SYN goes on untouched");
}

/// The review's case: a stream forged with a client's address, far over its limit, is dropped
/// as excess but bans no one; once the address proves itself in a handshake, its flood is
/// banned.
#[test]
fn with_ban_verified_only_a_verified_source_is_banned() {
    let text = format!(
        "{POLICY}[rate_limit]\npps = 1\nburst_packets = 10\nban_after = \"0s\"\n\
         ban_ttl = \"1h\"\nban = \"verified\"\n"
    );
    let mut program = LoadedProgram::new(&policy(&text));
    let flood = Frame::udp(CLIENT_V4, 40000, 443).bytes();
    let last = program.run_repeated(&flood, 80);
    assert_eq!(last, XDP_DROP, "the excess is dropped");
    let snapshot = program.snapshot();
    let get = |s: &moat::program::counters::Snapshot, a, r| s.get(TEST_RUN_IF_INDEX, a, r).packets;
    assert_eq!(
        get(&snapshot, Action::Pass, Reason::NoMatch),
        10,
        "the burst passes"
    );
    assert_eq!(get(&snapshot, Action::Drop, Reason::RateLimit), 70);
    assert_eq!(
        get(&snapshot, Action::Drop, Reason::Ban),
        0,
        "no ban: {snapshot:?}"
    );

    let request = syn(CLIENT_V4, 80).bytes();
    let out = expect(&mut program, &request, Action::Tx, Reason::SynCookie);
    let answer = read_syn_ack(&request, out);
    // The source is over its limit: its ACK is dropped as excess, after it proved the address.
    let ack = final_ack(CLIENT_V4, 80, &answer, 1);
    assert_eq!(program.run(&ack), XDP_DROP);
    assert_eq!(verified(&program), 1);
    program.run_repeated(&flood, 10);
    let snapshot = program.snapshot();
    assert!(
        get(&snapshot, Action::Drop, Reason::Ban) > 0,
        "a verified source over its limit is banned: {snapshot:?}"
    );
}

#[test]
fn ban_verified_without_the_syn_proxy_or_a_ban_ttl_is_refused() {
    let error = Config::from_str_at(
        "interfaces = [\"lo\"]\n[rate_limit]\npps = 10\nban_ttl = \"1m\"\nban = \"verified\"\n",
        Path::new("moat.toml"),
    )
    .and_then(|c| c.resolve(&Overrides::default()))
    .expect_err("ban = \"verified\" needs [syn_proxy]");
    let text = error.to_string();
    assert!(
        text.contains("moat.toml:5:7") && text.contains("[syn_proxy]"),
        "{text}"
    );
}
