//! Writes the benchmark frames (one file each, raw Ethernet) into a directory, for
//! `bpftool prog run … data_in FILE repeat N`.

use moat_tests::frames::{Extension, Frame};

fn main() {
    let Some(dir) = std::env::args_os().nth(1).map(std::path::PathBuf::from) else {
        eprintln!("usage: moat-frames DIR");
        std::process::exit(2);
    };
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let frames = [
        ("pass-v4", Frame::udp("203.0.113.9", 40000, 443).bytes()),
        ("pass-v6", Frame::udp("2001:db8:1::2", 40000, 443).bytes()),
        (
            "blocklist-v4",
            Frame::udp("198.51.100.7", 40000, 443).bytes(),
        ),
        (
            "blocklist-v6",
            Frame::udp("2001:db8:bad::7", 40000, 443).bytes(),
        ),
        ("rule", Frame::udp("203.0.113.9", 11211, 443).bytes()),
        ("rate-limit", Frame::udp("203.0.113.10", 40000, 443).bytes()),
        (
            "ipv6-two-extensions",
            Frame::udp("2001:db8:1::2", 40000, 443)
                .extension(Extension::HopByHop)
                .extension(Extension::DestinationOptions)
                .bytes(),
        ),
        (
            "vlan",
            Frame::udp("203.0.113.9", 40000, 443).vlan(42).bytes(),
        ),
        ("allowlist", Frame::udp("192.0.2.10", 40000, 443).bytes()),
        ("malformed", {
            let mut frame = Frame::udp("203.0.113.9", 40000, 443).bytes();
            // IHL 4: shorter than the fixed header.
            frame[moat_tests::frames::L3_OFFSET] = 0x44;
            frame
        }),
    ];
    for (name, bytes) in frames {
        let path = dir.join(format!("{name}.bin"));
        std::fs::write(&path, bytes)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        println!("{}", path.display());
    }
}
