//! A TCP echo service on the protected host, legitimate clients that connect to it from the
//! outside and exchange data, and the protected host's TCP counters (`/proc/net/netstat`'s
//! TcpExt, what `nstat` reads): what the SYN proxy's tests and benchmarks measure with.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{Lab, Side};

/// The protected TCP service's port.
pub const TCP_SERVICE_PORT: u16 = 8080;
/// How long a client waits for a connection: long enough for SYN retransmissions (1 s, 3 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Echoes each line it receives, on `address` in the protected namespace, until dropped.
pub struct EchoService {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoService {
    pub fn start(lab: &Lab, address: SocketAddr) -> Self {
        let listener = lab
            .netns(Side::Protected)
            .enter(|| TcpListener::bind(address))
            .unwrap_or_else(|e| panic!("cannot listen on {address}: {e}"));
        listener.set_nonblocking(true).expect("non-blocking accept");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        std::thread::spawn(move || echo(stream));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

fn echo(stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        if writer.write_all(line.as_bytes()).is_err() {
            return;
        }
        line.clear();
    }
}

impl Drop for EchoService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One legitimate exchange: connect from the outside namespace, send a line, read it back.
/// Returns how long the connection took to open, or what went wrong.
pub fn exchange(lab: &Lab, to: SocketAddr, n: usize) -> Result<Duration, String> {
    lab.netns(Side::Outside).enter(|| {
        let start = Instant::now();
        let stream = TcpStream::connect_timeout(&to, CONNECT_TIMEOUT)
            .map_err(|e| format!("connect #{n}: {e}"))?;
        let connected = start.elapsed();
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
        let sent = format!("hello {n} through the SYN proxy\n");
        writer
            .write_all(sent.as_bytes())
            .map_err(|e| format!("send #{n}: {e}"))?;
        let mut received = String::new();
        BufReader::new(stream)
            .read_line(&mut received)
            .map_err(|e| format!("receive #{n}: {e}"))?;
        if received == sent {
            Ok(connected)
        } else {
            Err(format!("#{n}: sent {sent:?}, got back {received:?}"))
        }
    })
}

/// `count` exchanges from `threads` clients at once; the connect times of those that
/// succeeded, and the errors of the others.
pub fn exchanges(
    lab: &Lab,
    to: SocketAddr,
    count: usize,
    threads: usize,
) -> (Vec<Duration>, Vec<String>) {
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    (t..count)
                        .step_by(threads)
                        .map(|n| exchange(lab, to, n))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut times = Vec::new();
        let mut errors = Vec::new();
        for worker in workers {
            for result in worker.join().expect("a client thread") {
                match result {
                    Ok(time) => times.push(time),
                    Err(error) => errors.push(error),
                }
            }
        }
        (times, errors)
    })
}

/// The protected host's TcpExt counters named in `names`, in order.
pub fn tcp_ext(lab: &Lab, names: &[&str]) -> Vec<u64> {
    lab.kernel_counters(Side::Protected, "netstat", "TcpExt", names)
}
