//! `moat capture`, the daemon's side: sampled frames streamed to each client (in the spirit of
//! cloudflare's xdpcap). While a capture runs, the program's sampling override is set so that it
//! samples at the rate the capture asked for, and passed packets at all; the override is lifted
//! when the last capture ends, however it ends.

use std::{
    sync::{Arc, Mutex},
    time::UNIX_EPOCH,
};

use agent_common::stats::{Action, Reason};
use anyhow::Context as _;
use tokio::{io::AsyncReadExt as _, net::UnixStream, sync::broadcast};
use tracing::{info, warn};

use crate::{
    control::protocol::{
        self, FrameError, MAX_CAPTURE_COUNT, Reply, Response, SampleView, WRITE_TIMEOUT,
    },
    program::{events::Sample, map_source::MapAccessError, sampling::SamplingOverride},
};

/// Samples waiting for the slowest capture; beyond this, it misses some (and says how many).
const CAPTURE_BACKLOG: usize = 4096;

/// What a capture asked for, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureFilter {
    pub passed: bool,
    pub reason: Option<Reason>,
    pub count: u64,
    pub every: u32,
}

impl CaptureFilter {
    pub fn new(passed: bool, reason: Option<&str>, count: u64, every: u32) -> Result<Self, String> {
        let reason = reason
            .map(|name| {
                Reason::ALL
                    .into_iter()
                    .find(|r| r.name() == name)
                    .ok_or_else(|| {
                        let names: Vec<&str> = Reason::ALL.iter().map(|r| r.name()).collect();
                        format!("unknown reason {name:?} (one of {})", names.join(", "))
                    })
            })
            .transpose()?;
        if !(1..=MAX_CAPTURE_COUNT).contains(&count) {
            return Err(format!("count must be in 1..={MAX_CAPTURE_COUNT}"));
        }
        if every == 0 {
            return Err("every must be at least 1".into());
        }
        Ok(Self {
            passed,
            reason,
            count,
            every,
        })
    }

    fn matches(&self, sample: &Sample) -> bool {
        (sample.action == Action::Pass) == self.passed
            && self.reason.is_none_or(|r| r == sample.reason)
    }
}

/// The captures running, and the program's override that serves them.
pub struct CaptureHub {
    samples: broadcast::Sender<Arc<Sample>>,
    control: Mutex<Control>,
    interfaces: Vec<(u32, String)>,
}

struct Control {
    sampling: SamplingOverride,
    /// (id, passed, every) of each running capture.
    running: Vec<(u64, bool, u32)>,
    next_id: u64,
}

impl Control {
    /// The finest interval any running capture asked for, per kind; 0: none.
    fn write(&mut self) -> Result<(), MapAccessError> {
        let finest = |passed: bool| {
            self.running
                .iter()
                .filter(|(_, p, _)| *p == passed)
                .map(|(_, _, every)| *every)
                .min()
                .unwrap_or(0)
        };
        let (dropped_every, passed_every) = (finest(false), finest(true));
        self.sampling.set(dropped_every, passed_every)
    }
}

/// Lifts a capture's override when it ends.
struct Running<'a> {
    hub: &'a CaptureHub,
    id: u64,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let Ok(mut control) = self.hub.control.lock() else {
            return;
        };
        control.running.retain(|(id, _, _)| *id != self.id);
        if let Err(e) = control.write() {
            warn!(error = %e, "could not lift the capture's sampling override");
        }
    }
}

impl CaptureHub {
    /// Serves captures with the program's sampling override; `interfaces` names interfaces in
    /// frames.
    pub fn new(sampling: SamplingOverride, interfaces: Vec<(u32, String)>) -> anyhow::Result<Self> {
        let mut control = Control {
            sampling,
            running: Vec::new(),
            next_id: 0,
        };
        // No override until a capture asks for one.
        control.write().context("clearing the capture override")?;
        Ok(Self {
            samples: broadcast::channel(CAPTURE_BACKLOG).0,
            control: Mutex::new(control),
            interfaces,
        })
    }

    /// Where the event reader sends samples.
    pub fn sender(&self) -> broadcast::Sender<Arc<Sample>> {
        self.samples.clone()
    }

    fn start(&self, filter: &CaptureFilter) -> Result<Running<'_>, String> {
        let mut control = self
            .control
            .lock()
            .map_err(|_| "the capture state is poisoned".to_string())?;
        let id = control.next_id;
        control.next_id += 1;
        control.running.push((id, filter.passed, filter.every));
        if let Err(e) = control.write() {
            control.running.retain(|(i, _, _)| *i != id);
            return Err(format!("cannot set the sampling for the capture: {e}"));
        }
        Ok(Running { hub: self, id })
    }

    fn view(&self, sample: &Sample) -> SampleView {
        SampleView {
            unix_ns: sample
                .time
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64,
            interface: self
                .interfaces
                .iter()
                .find(|(i, _)| *i == sample.if_index)
                .map_or_else(|| format!("if{}", sample.if_index), |(_, n)| n.clone()),
            action: sample.action.name().into(),
            reason: sample.reason.name().into(),
            source: sample.source.to_string(),
            frame_len: sample.frame_len,
            data: sample.data.clone(),
        }
    }

    /// Serves one capture on `stream` until it has its frames or the client goes away.
    pub async fn serve(&self, stream: &mut UnixStream, filter: CaptureFilter) {
        // Subscribe before the override is set, so that no sample it causes is missed.
        let mut samples = self.samples.subscribe();
        let running = match self.start(&filter) {
            Ok(running) => running,
            Err(message) => {
                let _ = protocol::write_frame(stream, &Response::Error(message)).await;
                return;
            }
        };
        info!(
            passed = filter.passed,
            reason = filter.reason.map_or("any", Reason::name),
            count = filter.count,
            every = filter.every,
            "capture started"
        );
        let (mut captured, mut missed) = (0u64, 0u64);
        let mut probe = [0u8; 1];
        while captured < filter.count {
            let (mut reader, mut writer) = stream.split();
            let sample = tokio::select! {
                // The client sends nothing more: a read returning means it went away.
                _ = reader.read(&mut probe) => break,
                sample = samples.recv() => sample,
            };
            match sample {
                Ok(sample) if filter.matches(&sample) => {
                    let frame = Response::Ok(Reply::Sample(self.view(&sample)));
                    // A client that stops reading ends its capture.
                    match tokio::time::timeout(
                        WRITE_TIMEOUT,
                        protocol::write_frame(&mut writer, &frame),
                    )
                    .await
                    {
                        Ok(Err(FrameError::Write(_))) | Err(_) => break,
                        Ok(_) => {}
                    }
                    captured += 1;
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(count)) => missed += count,
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
        drop(running);
        info!(captured, missed, "capture ended");
        let done = Response::Ok(Reply::CaptureDone { captured, missed });
        let _ = tokio::time::timeout(WRITE_TIMEOUT, protocol::write_frame(stream, &done)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_validated() {
        assert!(CaptureFilter::new(false, Some("blocklist"), 10, 1).is_ok());
        assert!(
            CaptureFilter::new(false, Some("nonsense"), 10, 1)
                .unwrap_err()
                .contains("unknown reason")
        );
        assert!(CaptureFilter::new(false, None, 0, 1).is_err());
        assert!(CaptureFilter::new(false, None, MAX_CAPTURE_COUNT + 1, 1).is_err());
        assert!(CaptureFilter::new(true, None, 1, 0).is_err());
    }
}
