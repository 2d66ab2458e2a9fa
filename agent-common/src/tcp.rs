//! TCP header flags, as the program reads them (byte 13 of the header) and rules name them.

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
pub const URG: u8 = 0x20;
pub const ECE: u8 = 0x40;
pub const CWR: u8 = 0x80;

/// Every flag with its name, in bit order.
pub const FLAGS: [(&str, u8); 8] = [
    ("FIN", FIN),
    ("SYN", SYN),
    ("RST", RST),
    ("PSH", PSH),
    ("ACK", ACK),
    ("URG", URG),
    ("ECE", ECE),
    ("CWR", CWR),
];
