//! `moat capture`: sampled frames streamed from the daemon, written to a pcap file that
//! tcpdump and wireshark read.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};

use agent_common::stats::Reason;

use crate::control::{
    client::{StreamEnd, stream_until_interrupted},
    protocol::{MAX_CAPTURE_COUNT, Reply, Request, SampleView},
};

#[derive(Debug, clap::Args)]
pub struct CaptureArgs {
    /// Only frames with this reason.
    #[arg(long, value_name = "REASON", value_parser = clap::builder::PossibleValuesParser::new(Reason::ALL.map(Reason::name)))]
    pub reason: Option<String>,
    /// Capture passed frames instead of dropped ones.
    #[arg(long)]
    pub passed: bool,
    /// Stop after this many frames.
    #[arg(short, long, default_value_t = 100, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=MAX_CAPTURE_COUNT))]
    pub count: u64,
    /// Sample one in this many packets while capturing (1: every packet; raise it under a
    /// flood, since each sample costs the program a ring buffer write).
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub every: u32,
    /// The pcap file to write; `-` writes to standard output (e.g. for `tcpdump -r -`).
    #[arg(short = 'w', long = "write", value_name = "FILE")]
    pub file: PathBuf,
}

/// Runs `moat capture`. A file is written beside its final name and renamed over it only when
/// the capture ends well (or is interrupted with frames in it): a failed capture leaves any
/// file already at that name as it was.
pub fn capture(socket: &Path, args: CaptureArgs) -> anyhow::Result<()> {
    if args.file.as_os_str() == "-" {
        let mut pcap = PcapOutput::new(std::io::stdout())?;
        let (captured, missed) = stream_frames(socket, &args, &mut pcap, true)?;
        report(captured, missed, "standard output");
        return Ok(());
    }
    let dir = match args.file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = args
        .file
        .file_name()
        .with_context(|| format!("{} names no file", args.file.display()))?;
    let temporary = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".tmp")
        .tempfile_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    let mut pcap = PcapOutput::new(temporary)?;
    // On error the temporary file is dropped, which removes it.
    let (captured, missed) = stream_frames(socket, &args, &mut pcap, false)?;
    let mut temporary = pcap.into_inner();
    temporary
        .flush()
        .and_then(|()| temporary.as_file().sync_all())
        .with_context(|| format!("writing {}", temporary.path().display()))?;
    temporary
        .persist(&args.file)
        .with_context(|| format!("renaming the capture to {}", args.file.display()))?;
    report(captured, missed, &args.file.display().to_string());
    Ok(())
}

/// Streams the capture's frames into `pcap`; returns (captured, missed).
fn stream_frames<W: Write>(
    socket: &Path,
    args: &CaptureArgs,
    pcap: &mut PcapOutput<W>,
    to_stdout: bool,
) -> anyhow::Result<(u64, u64)> {
    let request = Request::Capture {
        passed: args.passed,
        reason: args.reason.clone(),
        count: args.count,
        every: args.every,
    };
    let (mut captured, mut summary) = (0, None);
    let end = stream_until_interrupted(socket, &request, |reply| match reply {
        Reply::Sample(frame) => {
            pcap.write(&frame)?;
            if to_stdout {
                // Each frame as it comes, e.g. for `tcpdump -r -`.
                std::io::stdout().flush()?;
            }
            captured += 1;
            Ok(true)
        }
        Reply::CaptureDone { captured, missed } => {
            summary = Some((captured, missed));
            Ok(false)
        }
        other => anyhow::bail!("the daemon answered with an unexpected reply: {other:?}"),
    })?;
    match (end, summary) {
        (_, Some(summary)) => Ok(summary),
        (StreamEnd::Interrupted, None) if captured > 0 => {
            eprintln!("moat: interrupted");
            Ok((captured, 0))
        }
        (StreamEnd::Interrupted, None) => anyhow::bail!("interrupted before any frame came"),
        (StreamEnd::Done, None) => anyhow::bail!("capture ended without a summary from the daemon"),
    }
}

fn report(captured: u64, missed: u64, output: &str) {
    eprintln!(
        "moat: captured {captured} frames to {output}{}",
        if missed > 0 {
            format!(" ({missed} more matched but were missed: the capture fell behind)")
        } else {
            String::new()
        }
    );
}

/// Writes frames to a pcap file (nanosecond timestamps, Ethernet), each as soon as it comes,
/// so that the file is complete up to the last frame whenever the capture stops.
pub struct PcapOutput<W: Write> {
    writer: PcapWriter<W>,
}

impl<W: Write> PcapOutput<W> {
    pub fn new(output: W) -> anyhow::Result<Self> {
        let header = PcapHeader {
            ts_resolution: pcap_file::TsResolution::NanoSecond,
            ..PcapHeader::default()
        };
        let writer = PcapWriter::with_header(output, header).context("writing the pcap header")?;
        Ok(Self { writer })
    }

    pub fn write(&mut self, frame: &SampleView) -> anyhow::Result<()> {
        let packet = PcapPacket::new(
            Duration::from_nanos(frame.unix_ns),
            frame.frame_len.max(frame.data.len() as u32),
            &frame.data,
        );
        self.writer
            .write_packet(&packet)
            .context("writing a frame to the pcap file")?;
        Ok(())
    }

    pub fn into_inner(self) -> W {
        self.writer.into_writer()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcap_output_is_readable_back() {
        let frame = SampleView {
            unix_ns: 1_700_000_000_123_456_789,
            interface: "veth0".into(),
            action: "drop".into(),
            reason: "blocklist".into(),
            source: "198.51.100.7".into(),
            frame_len: 1000,
            data: vec![0xab; 128],
        };
        let mut output = PcapOutput::new(Vec::new()).expect("header");
        output.write(&frame).expect("frame");
        let bytes = output.into_inner();
        let mut reader = pcap_file::pcap::PcapReader::new(&bytes[..]).expect("a pcap");
        let packet = reader.next_packet().expect("one packet").expect("valid");
        assert_eq!(packet.orig_len, 1000);
        assert_eq!(packet.data.len(), 128);
        assert_eq!(packet.timestamp.as_nanos(), 1_700_000_000_123_456_789);
        assert!(reader.next_packet().is_none());
    }
}
