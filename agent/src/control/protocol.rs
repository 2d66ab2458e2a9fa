//! The control socket's protocol: one request, one response, each a frame of a 4-byte
//! big-endian length and that many bytes of JSON. Frames are bounded so that no client can
//! make the daemon allocate without limit.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::config::{Cidr, ListKind};

/// The largest request the daemon reads: room for `moat block import` of a few million
/// prefixes.
pub const MAX_REQUEST_BYTES: u32 = 128 << 20;
/// The largest response the CLI reads (a list of millions of entries).
pub const MAX_RESPONSE_BYTES: u32 = 1 << 30;
/// The most frames one capture may ask for.
pub const MAX_CAPTURE_COUNT: u64 = 1_000_000;
/// The most CIDRs one request may carry (four times a million-prefix import): with every entry
/// parsed as it is decoded, a request costs at most its frame and this many parsed CIDRs.
pub const MAX_REQUEST_CIDRS: usize = 4 << 20;
/// How long a peer may take to take a frame written to it.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// The CIDRs of a request: on the wire an array of strings, parsed as the frame is decoded, so
/// that a bad entry fails at once and no request decodes into more than [`MAX_REQUEST_CIDRS`]
/// entries (a frame of empty strings costs nothing but its bytes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cidrs(pub Vec<Cidr>);

impl Cidrs {
    /// Parses `texts`, or says which entry is wrong.
    pub fn parse(texts: &[String]) -> Result<Self, String> {
        if texts.len() > MAX_REQUEST_CIDRS {
            return Err(format!(
                "more than {MAX_REQUEST_CIDRS} CIDRs in one request"
            ));
        }
        texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                text.parse()
                    .map_err(|e| format!("entry {} of {}: {e}", i + 1, texts.len()))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

impl Serialize for Cidrs {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq as _;
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for cidr in &self.0 {
            seq.serialize_element(&format_args!("{cidr}"))?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Cidrs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = Cidrs;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of CIDRs or addresses")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Cidrs, A::Error> {
                let mut cidrs = Vec::new();
                while let Some(CidrEntry(parsed)) = seq.next_element()? {
                    let number = cidrs.len() + 1;
                    if number > MAX_REQUEST_CIDRS {
                        return Err(serde::de::Error::custom(format!(
                            "more than {MAX_REQUEST_CIDRS} CIDRs in one request"
                        )));
                    }
                    cidrs.push(
                        parsed.map_err(|e| {
                            serde::de::Error::custom(format!("entry {number}: {e}"))
                        })?,
                    );
                }
                Ok(Cidrs(cidrs))
            }
        }
        deserializer.deserialize_seq(Entries)
    }
}

/// One entry, parsed from the string where it lies in the frame (no copy of the text).
struct CidrEntry(Result<Cidr, String>);

impl<'de> Deserialize<'de> for CidrEntry {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = CidrEntry;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a CIDR or address as a string")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<CidrEntry, E> {
                Ok(CidrEntry(text.parse()))
            }
        }
        deserializer.deserialize_str(Text)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the peer closed the connection before sending a request")]
    Closed,
    #[error("the frame is truncated: {0}")]
    Truncated(std::io::Error),
    #[error("a frame of {length} bytes exceeds the limit of {limit} bytes")]
    Oversized { length: u32, limit: u32 },
    #[error("the frame is not valid JSON for this message: {0}")]
    Malformed(String),
    #[error("writing the frame failed: {0}")]
    Write(std::io::Error),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "command",
    content = "arguments",
    rename_all = "snake_case",
    deny_unknown_fields
)]
pub enum Request {
    /// Adds entries (CIDRs or addresses, validated by the daemon), all or none.
    ListAdd {
        list: ListKind,
        cidrs: Cidrs,
        /// Seconds until the entries expire; absent: never.
        ttl_seconds: Option<u64>,
        comment: Option<String>,
    },
    /// Deletes entries added at run time, all or none.
    ListDel {
        list: ListKind,
        cidrs: Cidrs,
    },
    /// Every entry of a list, with where it came from.
    ListShow {
        list: ListKind,
    },
    Stats,
    Status,
    Reload,
    /// The top sources by dropped and by passed packets per second.
    Top {
        /// The interval the client reads at: rates span about this long.
        interval_ms: u64,
        /// Rows per table.
        limit: u32,
    },
    /// The protected destinations, their traffic and counters, and the running and recent
    /// attacks on them.
    Attacks,
    /// Streams sampled frames (`Reply::Sample`) until `count` were sent, then
    /// `Reply::CaptureDone`; the only request answered with more than one frame.
    Capture {
        /// Passed frames instead of dropped ones.
        passed: bool,
        /// Only frames with this reason (`stats::Reason` names).
        reason: Option<String>,
        count: u64,
        /// Sample one in this many packets while the capture runs.
        every: u32,
    },
}

/// A list entry as `moat block list --json` prints it (a stable format; see README).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryView {
    pub cidr: String,
    /// RFC 3339, or null.
    pub expires_at: Option<String>,
    pub comment: Option<String>,
    /// `config`, `cli`, `fleet` or `rate_limit`.
    pub source: String,
    /// The node that published a fleet entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// A counter as `moat stats --json` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterView {
    pub interface: String,
    pub action: String,
    pub reason: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceView {
    pub name: String,
    pub if_index: u32,
    /// `native`, `generic`, or `unknown` for a link adopted without a record of its mode.
    pub xdp_mode: String,
    /// How the interface's frames start: `ethernet`, or `ip` (tun, WireGuard, PPP, IPIP, GRE).
    #[serde(default)]
    pub framing: String,
    /// Whether the link's pin holds it (so it outlives the daemon), as the kernel says.
    pub pinned: bool,
    /// Whether the kernel has the link attached to this interface with this daemon's program.
    #[serde(default)]
    pub attached: bool,
    /// The link's kernel id, when it has one.
    #[serde(default)]
    pub link_id: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapFill {
    pub map: String,
    pub entries: u64,
    pub capacity: u64,
}

/// A protected destination as `moat attacks --json` prints it (a stable format; see README).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectedView {
    pub protect: String,
    pub destination: String,
    pub protocol: String,
    /// The limits over all sources; null: none.
    pub pps_limit: Option<u64>,
    pub bps_limit: Option<u64>,
    /// The traffic to it in the last second.
    pub pps: u64,
    pub bps: u64,
    pub under_attack: bool,
    pub attacks_total: u64,
    /// Packets since the program started: within the limit, over it (dropped as `dst_limit`),
    /// matching an attack's fingerprint (dropped as `fingerprint`).
    pub conforming_packets: u64,
    pub over_packets: u64,
    pub fingerprint_packets: u64,
}

/// An attack as `moat attacks --json` prints it (a stable format; see README).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttackView {
    pub protect: String,
    pub destination: String,
    pub protocol: String,
    /// RFC 3339; `ended` null while it runs.
    pub started: String,
    pub ended: Option<String>,
    pub peak_pps: u64,
    pub peak_bps: u64,
    /// Packets dropped (would-be drops in monitor mode) by reason: `dst_limit`, `fingerprint`.
    pub dropped: std::collections::BTreeMap<String, u64>,
    /// As `src_port=1900 length=60`; null: none.
    pub fingerprint: Option<String>,
    pub fingerprint_installed: Option<String>,
    /// Why no fingerprint is in force (fingerprints on, none found).
    pub no_fingerprint: Option<String>,
    /// Samples of the attack's packets, and how many distinct sources they came from.
    pub sources_sampled: u64,
    pub distinct_sources: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttacksView {
    pub protected: Vec<ProtectedView>,
    /// Running attacks first, then ended ones, newest first.
    pub attacks: Vec<AttackView>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusView {
    pub version: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    /// `enforce` or `monitor`.
    pub mode: String,
    pub program_id: Option<u32>,
    pub program_tag: Option<String>,
    pub interfaces: Vec<InterfaceView>,
    pub maps: Vec<MapFill>,
    /// The pin directory, or null when running with `--no-pin`.
    pub bpffs: Option<String>,
    pub state_dir: String,
    pub config: Option<String>,
    /// Why the state could not be saved, while it cannot; null when it is saved.
    #[serde(default)]
    pub persistence_error: Option<String>,
    /// The fleet's connection; null without `[fleet]`.
    #[serde(default)]
    pub fleet: Option<FleetView>,
}

/// The fleet as `moat status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetView {
    pub node: String,
    pub bucket: String,
    /// What this node publishes: `cli`, `bans`.
    pub share: Vec<String>,
    pub connected: bool,
    /// The server connected to, or last connected to.
    pub server: Option<String>,
    /// The latest connection or publish error; null once a session started cleanly.
    pub error: Option<String>,
    /// The bucket's revision of the last change read.
    pub last_revision: u64,
    /// From the last change's arrival in the bucket to its application here.
    pub lag_ms: Option<u64>,
    /// Changes made here and not yet published.
    pub queued: u64,
    /// Fleet entries in force here.
    pub entries: u64,
    pub publish_failures: u64,
    /// Values in the bucket that are not moat's, skipped.
    pub rejected: u64,
    /// Fleet entries the lists had no room for.
    pub refused: u64,
    /// Whether the bucket drops entries at their expiry itself (per-key TTLs).
    pub per_key_ttl: bool,
}

/// One row of `moat top`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopRow {
    /// An address, or the rate limiter's prefix (e.g. an IPv6 /64).
    pub source: String,
    pub reason: String,
    pub packets_per_second: u64,
    pub bits_per_second: u64,
}

/// `moat top --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopView {
    /// How long the rates span; 0 on the first reading (no rates yet).
    pub interval_ms: u64,
    /// Every dropped (or, in monitor mode, would-be dropped) and every passed packet, from the
    /// counters.
    pub dropped_packets_per_second: u64,
    pub passed_packets_per_second: u64,
    /// Per source, estimated from samples of one in `sample_every` dropped packets.
    pub dropped: Vec<TopRow>,
    /// Per source, counted by the rate limiter (empty without a rate limit).
    pub passed: Vec<TopRow>,
    pub passed_by_source: bool,
    pub sample_every: u32,
    /// The protected destinations' traffic in the attack watch's last second.
    #[serde(default)]
    pub protected: Vec<TopProtected>,
    /// Sources the SYN proxy verified; null without `[syn_proxy]`.
    #[serde(default)]
    pub verified_sources: Option<u64>,
}

/// A protected destination in `moat top`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopProtected {
    pub protect: String,
    pub packets_per_second: u64,
    pub bits_per_second: u64,
    /// Over its limit or matching its attack's fingerprint.
    pub dropped_packets_per_second: u64,
    pub under_attack: bool,
}

/// One captured frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleView {
    /// When the program saw it, in nanoseconds since the Unix epoch.
    pub unix_ns: u64,
    pub interface: String,
    pub action: String,
    pub reason: String,
    pub source: String,
    /// The whole frame's length; `data` holds its start.
    pub frame_len: u32,
    pub data: Vec<u8>,
}

/// What a change did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeView {
    /// Entries that were not in the list before.
    pub added: u64,
    /// Entries already present whose expiry or comment was updated.
    pub updated: u64,
    pub removed: u64,
    /// Things the operator should know (e.g. an entry that the config also holds).
    pub notes: Vec<String>,
    /// Set when the change is in force but could not be saved (it is lost at a restart unless a
    /// later save succeeds): why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_persisted: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Changed(ChangeView),
    Entries {
        entries: Vec<EntryView>,
    },
    Stats {
        counters: Vec<CounterView>,
    },
    Status(Box<StatusView>),
    Reloaded {
        /// Keys the new configuration changes that only a restart applies.
        #[serde(default)]
        needs_restart: Vec<String>,
    },
    Top(TopView),
    Attacks(AttacksView),
    Sample(SampleView),
    /// The end of a capture: frames sent, and frames that matched but were missed because the
    /// capture fell behind.
    CaptureDone {
        captured: u64,
        missed: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(Reply),
    Error(String),
}

/// Reads one frame of at most `limit` bytes and decodes it.
pub async fn read_frame<T: serde::de::DeserializeOwned>(
    stream: &mut (impl AsyncRead + Unpin),
    limit: u32,
) -> Result<T, FrameError> {
    let length = read_length(stream, limit).await?;
    read_body(stream, length).await
}

/// A frame's length, read from its header; an error past `limit`.
pub async fn read_length(
    stream: &mut (impl AsyncRead + Unpin),
    limit: u32,
) -> Result<u32, FrameError> {
    let mut header = [0u8; 4];
    let mut filled = 0;
    while filled < header.len() {
        match stream.read(&mut header[filled..]).await {
            Ok(0) if filled == 0 => return Err(FrameError::Closed),
            Ok(0) => {
                return Err(FrameError::Truncated(
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            Ok(n) => filled += n,
            Err(e) => return Err(FrameError::Truncated(e)),
        }
    }
    let length = u32::from_be_bytes(header);
    if length > limit {
        return Err(FrameError::Oversized { length, limit });
    }
    Ok(length)
}

/// A frame's body of `length` bytes (its header read), decoded.
pub async fn read_body<T: serde::de::DeserializeOwned>(
    stream: &mut (impl AsyncRead + Unpin),
    length: u32,
) -> Result<T, FrameError> {
    let mut body = vec![0u8; length as usize];
    stream
        .read_exact(&mut body)
        .await
        .map_err(FrameError::Truncated)?;
    serde_json::from_slice(&body).map_err(|e| FrameError::Malformed(e.to_string()))
}

pub async fn write_frame(
    stream: &mut (impl AsyncWrite + Unpin),
    message: &impl Serialize,
) -> Result<(), FrameError> {
    let body = serde_json::to_vec(message).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let length = u32::try_from(body.len()).map_err(|_| FrameError::Oversized {
        length: u32::MAX,
        limit: u32::MAX,
    })?;
    stream
        .write_all(&length.to_be_bytes())
        .await
        .map_err(FrameError::Write)?;
    stream.write_all(&body).await.map_err(FrameError::Write)?;
    stream.flush().await.map_err(FrameError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn decode(bytes: &[u8], limit: u32) -> Result<Request, FrameError> {
        let mut reader = bytes;
        read_frame(&mut reader, limit).await
    }

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(body);
        bytes
    }

    #[tokio::test]
    async fn requests_round_trip() {
        let request = Request::ListAdd {
            list: ListKind::Block,
            cidrs: Cidrs::parse(&["198.51.100.0/24".into()]).expect("a CIDR"),
            ttl_seconds: Some(600),
            comment: Some("scanner".into()),
        };
        let mut bytes = Vec::new();
        write_frame(&mut bytes, &request).await.expect("write");
        assert_eq!(decode(&bytes, 1024).await.expect("read"), request);
    }

    #[tokio::test]
    async fn cidrs_are_parsed_as_they_are_decoded() {
        let body = br#"{"command":"list_del","arguments":{"list":"allowlist","cidrs":["192.0.2.1","2001:db8::/32"]}}"#;
        let Request::ListDel { list, cidrs } = decode(&frame(body), 1024).await.expect("decodes")
        else {
            panic!("a list_del");
        };
        assert_eq!(list, ListKind::Allow);
        let texts: Vec<String> = cidrs.0.iter().map(ToString::to_string).collect();
        assert_eq!(texts, ["192.0.2.1/32", "2001:db8::/32"]);

        // The first bad entry ends the decoding, named.
        let body = br#"{"command":"list_del","arguments":{"list":"blocklist","cidrs":["192.0.2.1","",""]}}"#;
        let Err(FrameError::Malformed(message)) = decode(&frame(body), 1024).await else {
            panic!("an empty entry is malformed");
        };
        assert!(message.contains("entry 2"), "{message}");
    }

    #[test]
    fn too_many_cidrs_are_refused_without_decoding_them_all() {
        let mut body =
            String::from(r#"{"command":"list_del","arguments":{"list":"blocklist","cidrs":["#);
        for i in 0..=MAX_REQUEST_CIDRS {
            if i > 0 {
                body.push(',');
            }
            body.push_str("\"10.0.0.0/8\"");
        }
        body.push_str("]}}");
        let error = serde_json::from_str::<Request>(&body).expect_err("too many");
        assert!(error.to_string().contains("more than"), "{error}");
        let texts = vec!["10.0.0.0/8".to_string(); MAX_REQUEST_CIDRS + 1];
        assert!(Cidrs::parse(&texts).is_err());
    }

    #[tokio::test]
    async fn bad_frames_are_errors() {
        assert!(matches!(decode(b"", 1024).await, Err(FrameError::Closed)));
        assert!(matches!(
            decode(b"\0\0", 1024).await,
            Err(FrameError::Truncated(_))
        ));
        assert!(matches!(
            decode(&frame(b"{\"command\":"), 1024).await.map(|_| ()),
            Err(FrameError::Malformed(_))
        ));
        let mut short = frame(b"{\"command\":\"stats\"}");
        short.truncate(10);
        assert!(matches!(
            decode(&short, 1024).await,
            Err(FrameError::Truncated(_))
        ));
        assert!(matches!(
            decode(&frame(&[b' '; 2048]), 1024).await,
            Err(FrameError::Oversized { length: 2048, .. })
        ));
        assert!(matches!(
            decode(&frame(b"{\"command\":\"stats\",\"extra\":1}"), 1024).await,
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode(
                &frame(b"{\"command\":\"list_del\",\"arguments\":{\"list\":\"blocklist\",\"cidrs\":[],\"x\":1}}"),
                1024
            )
            .await,
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode(&frame(b"{\"command\":\"format_disk\"}"), 1024).await,
            Err(FrameError::Malformed(_))
        ));
    }
}
