//! A UDP service on the protected host that counts what it receives by source, and legitimate
//! clients that send to it from the outside at a steady rate: what tests and benchmarks of
//! protected destinations measure legitimate loss with.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    Lab, Side,
    lab::{LEGIT_V4, PROTECTED_V4},
};

/// The protected UDP service's port.
pub const SERVICE_PORT: u16 = 5353;
/// Legitimate datagrams per second to the service, each from a new ephemeral port.
pub const LEGIT_PPS: u64 = 200;
/// The payload lengths legitimate clients send, in turn.
pub const LEGIT_LENGTHS: [usize; 8] = [12, 20, 28, 32, 36, 44, 52, 60];
/// The service's usual traffic before a flood: three of the agent's seconds (a second joins
/// the attack baseline once the next is quiet too).
pub const BASELINE: Duration = Duration::from_millis(3500);

/// The service on [`PROTECTED_V4`] and a client on [`LEGIT_V4`] sending it its usual traffic,
/// after [`BASELINE`] of it.
pub fn usual_traffic(lab: &Lab) -> (UdpService, UdpClient) {
    let service = UdpService::start(lab, Lab::addr(PROTECTED_V4), SERVICE_PORT);
    let client = UdpClient::start(
        lab,
        Lab::addr(LEGIT_V4),
        SocketAddr::new(Lab::addr(PROTECTED_V4), SERVICE_PORT),
        LEGIT_PPS,
        &LEGIT_LENGTHS,
    );
    std::thread::sleep(BASELINE);
    (service, client)
}

/// Datagrams received so far, by source address.
type Received = Arc<Mutex<HashMap<IpAddr, u64>>>;

/// Receives on `address:port` in the protected namespace until dropped.
pub struct UdpService {
    received: Received,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpService {
    pub fn start(lab: &Lab, address: IpAddr, port: u16) -> Self {
        let socket = lab
            .netns(Side::Protected)
            .enter(|| UdpSocket::bind(SocketAddr::new(address, port)))
            .unwrap_or_else(|e| panic!("cannot bind the service to {address}:{port}: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("a read timeout");
        let received = Received::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (counts, stopped) = (received.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buffer = [0u8; 2048];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = socket.recv_from(&mut buffer) {
                    *counts.lock().expect("counts").entry(peer.ip()).or_default() += 1;
                }
            }
        });
        Self {
            received,
            stop,
            thread: Some(thread),
        }
    }

    /// Datagrams received from `source`, and from everyone else.
    pub fn received(&self, source: IpAddr) -> (u64, u64) {
        let counts = self.received.lock().expect("counts");
        let from = counts.get(&source).copied().unwrap_or(0);
        let others = counts.values().sum::<u64>() - from;
        (from, others)
    }
}

impl Drop for UdpService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A legitimate client in the outside namespace: `pps` datagrams a second to the service, each
/// from a new socket (a new ephemeral port) and with a length from `lengths` in turn, until
/// dropped.
pub struct UdpClient {
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpClient {
    pub fn start(
        lab: &Lab,
        from: IpAddr,
        to: SocketAddr,
        pps: u64,
        lengths: &'static [usize],
    ) -> Self {
        let namespace = lab.netns(Side::Outside).path();
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (counter, stopped) = (sent.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let file = std::fs::File::open(&namespace).expect("open the outside namespace");
            // SAFETY: setns on this thread only, with a namespace fd it owns.
            let entered =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0, "setns into the outside namespace");
            let start = Instant::now();
            let mut n = 0u64;
            while !stopped.load(Ordering::Relaxed) {
                let due = (start.elapsed().as_secs_f64() * pps as f64) as u64;
                while n < due {
                    let socket = UdpSocket::bind(SocketAddr::new(from, 0)).expect("bind");
                    let len = lengths[n as usize % lengths.len()];
                    let payload: Vec<u8> = (0..len).map(|i| (i as u64 * 7 + n) as u8).collect();
                    if socket.send_to(&payload, to).is_ok() {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Self {
            sent,
            stop,
            thread: Some(thread),
        }
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for UdpClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
