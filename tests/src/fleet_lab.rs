//! A fleet in a box: several labs (each a protected node and its outside), and a hub namespace
//! where the NATS servers run, joined to every node's protected namespace by a management
//! link on a bridge. moat's XDP program sits on each lab's own link only; the fleet talks over
//! the management network, as an edge node's does.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use crate::{
    lab::{Lab, PREFIX, Side},
    nats::{NatsOptions, NatsServer},
    netns::Netns,
};

/// The hub's address on the management network; node `i` is `10.200.0.(10 + i)`.
pub const HUB_ADDRESS: &str = "10.200.0.1";
/// The first server's client port; the n-th listens on the n-th port after it.
const CLIENT_PORT: u16 = 4222;
/// The first server's cluster port.
const CLUSTER_PORT: u16 = 6222;

pub struct FleetLab {
    // Dropped in declaration order: servers first, then the hub (its bridge and links), then
    // the labs.
    servers: Vec<NatsServer>,
    hub: Netns,
    nodes: Vec<Lab>,
    dir: PathBuf,
}

impl FleetLab {
    /// `nodes` labs joined to a hub (no server yet).
    pub fn new(nodes: usize) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let labs: Vec<Lab> = (0..nodes).map(|_| Lab::new()).collect();
        let hub = Netns::create(&format!("{PREFIX}-{pid}-fleet{n}-hub"));
        hub.ip(&["link", "add", "br0", "type", "bridge"]);
        hub.ip(&["addr", "add", &format!("{HUB_ADDRESS}/24"), "dev", "br0"]);
        hub.ip(&["link", "set", "br0", "up"]);
        for (i, lab) in labs.iter().enumerate() {
            let hub_end = format!("mf{pid}{n}{i}h");
            let node_end = format!("mf{pid}{n}{i}n");
            assert!(hub_end.len() <= 15, "interface name {hub_end} too long");
            let node = lab.netns(Side::Protected);
            hub.ip(&[
                "link",
                "add",
                &hub_end,
                "type",
                "veth",
                "peer",
                "name",
                &node_end,
                "netns",
                node.name(),
            ]);
            hub.ip(&["link", "set", &hub_end, "master", "br0", "up"]);
            node.ip(&[
                "addr",
                "add",
                &format!("{}/24", Self::node_address(i)),
                "dev",
                &node_end,
            ]);
            node.ip(&["link", "set", &node_end, "up"]);
        }
        let dir = labs[0].dir().join("fleet");
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Self {
            servers: Vec::new(),
            hub,
            nodes: labs,
            dir,
        }
    }

    pub fn node_address(i: usize) -> String {
        format!("10.200.0.{}", 10 + i)
    }

    pub fn node(&self, i: usize) -> &Lab {
        &self.nodes[i]
    }

    pub fn hub(&self) -> &Netns {
        &self.hub
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts one server (a token if given); returns its URL.
    pub fn start_server(&mut self, token: Option<&str>) -> String {
        self.start_servers(1, token).remove(0)
    }

    /// Starts one server that speaks TLS only (a certificate for [`HUB_ADDRESS`], signed by
    /// the CA this returns) and lets in only the users of `nkeys`; returns its URL (tls://)
    /// and the CA's PEM file.
    pub fn start_tls_server(&mut self, nkeys: &[String]) -> (String, PathBuf) {
        let (ca, cert, key) = self.certificates();
        let options = NatsOptions {
            name: "tls0".into(),
            address: HUB_ADDRESS.into(),
            port: CLIENT_PORT,
            store: self.dir.join("store-tls0"),
            token: None,
            nkey_users: nkeys.to_vec(),
            tls: Some((cert, key)),
            cluster: None,
        };
        let server = NatsServer::start(&self.hub, options, &self.dir);
        self.servers.push(server);
        (format!("tls://{HUB_ADDRESS}:{CLIENT_PORT}"), ca)
    }

    /// A throwaway CA and a server certificate for [`HUB_ADDRESS`] (openssl): (CA, cert, key).
    fn certificates(&self) -> (PathBuf, PathBuf, PathBuf) {
        let path = |name: &str| self.dir.join(name);
        let san = path("san.ext");
        std::fs::write(&san, format!("subjectAltName=IP:{HUB_ADDRESS}\n")).expect("write san.ext");
        let openssl = |args: &[&str]| {
            let output = std::process::Command::new("openssl")
                .args(args)
                .current_dir(&self.dir)
                .output()
                .expect("run openssl");
            assert!(output.status.success(), "openssl {args:?}: {output:?}");
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "1",
                    "-subj",
                    "/CN=moat test CA",
                ],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req"][..],
                &ec,
                &[
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.csr",
                    "-subj",
                    "/CN=nats",
                ],
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ]);
        (path("ca.pem"), path("server.pem"), path("server.key"))
    }

    /// Starts `count` servers, clustered when more than one; returns their URLs.
    pub fn start_servers(&mut self, count: u16, token: Option<&str>) -> Vec<String> {
        let routes: Vec<String> = (0..count)
            .map(|i| format!("nats://{HUB_ADDRESS}:{}", CLUSTER_PORT + i))
            .collect();
        // A cluster's servers wait for each other: start them all, then wait for each.
        let mut urls = Vec::new();
        let started: Vec<_> = (0..count)
            .map(|i| {
                let options = NatsOptions {
                    name: format!("n{i}"),
                    address: HUB_ADDRESS.into(),
                    port: CLIENT_PORT + i,
                    store: self.dir.join(format!("store-n{i}")),
                    token: token.map(str::to_string),
                    nkey_users: Vec::new(),
                    tls: None,
                    cluster: (count > 1).then(|| (CLUSTER_PORT + i, routes.clone())),
                };
                NatsServer::start_pending(&self.hub, options, &self.dir)
            })
            .collect();
        for server in started {
            let server = server.wait_ready();
            urls.push(server.url());
            self.servers.push(server);
        }
        urls
    }

    pub fn server(&mut self, i: usize) -> &mut NatsServer {
        &mut self.servers[i]
    }

    /// The fleet table of node `i`'s config.
    pub fn fleet_config(&self, i: usize, servers: &[&str], extra: &str) -> String {
        let servers: Vec<String> = servers.iter().map(|s| format!("{s:?}")).collect();
        format!(
            "[fleet]\nservers = [{}]\nnode = \"edge-{}\"\n{extra}\n",
            servers.join(", "),
            (b'a' + i as u8) as char
        )
    }
}
