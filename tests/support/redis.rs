//! `RedisServer`: a `redis-server` child process on a free `127.0.0.1` port, killed
//! (by its own pid) when dropped, plain or TLS-only with a [`TestCa`] of the test's own;
//! and gateways whose store is such a server.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use campaign_gate::config::Config;
use campaign_gate::server::Gateway;
use campaign_gate::store::records::generate_secret_key;
use campaign_gate::store::{NewUser, Store, TokenHash, UserType};
use redis::aio::MultiplexedConnection;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tempfile::TempDir;

/// How long a fresh `redis-server` may take to answer `PING`.
const STARTUP: Duration = Duration::from_secs(10);

/// A certificate authority made for one test, and a server certificate for `127.0.0.1`
/// and `localhost` that it signed: PEM files in a directory of its own.
pub struct TestCa {
    dir: TempDir,
}

impl TestCa {
    pub fn generate() -> TestCa {
        let dir = tempfile::Builder::new()
            .prefix("campaign-gate-ca-")
            .tempdir()
            .expect("temp dir for the CA");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "campaign-gate test CA");
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("server params");
        leaf.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let leaf_key = rcgen::KeyPair::generate().expect("server key");
        let leaf_cert = leaf
            .signed_by(&leaf_key, &ca_cert, &ca_key)
            .expect("server certificate");
        for (name, pem) in [
            ("ca.crt", ca_cert.pem()),
            ("server.crt", leaf_cert.pem()),
            ("server.key", leaf_key.serialize_pem()),
        ] {
            std::fs::write(dir.path().join(name), pem).expect("write PEM");
        }
        TestCa { dir }
    }

    /// The CA certificate: what a client trusts (`[store] tls_ca_file`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The certificate signed by the CA, good for a server on 127.0.0.1 and as a
    /// client certificate.
    pub fn cert_file(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.ca_file()).expect("read the CA certificate")
    }
}

/// What the readiness probe of a TLS-only server needs (the server's files are copied
/// into its directory, so that it can restart on its own): the CA to trust and, when
/// Redis requires client certificates, the PEM certificate and key to present.
#[derive(Clone)]
struct ServerTls {
    ca_pem: Vec<u8>,
    client_identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// A `redis-server` owned by one test.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    persistent: bool,
    tls: Option<ServerTls>,
}

impl RedisServer {
    /// A throw-away server: no RDB snapshots, no AOF.
    pub fn start() -> RedisServer {
        RedisServer::launch(false, None)
    }

    /// A server that survives a restart: AOF with `appendfsync always` in its own
    /// directory, so a kill loses nothing that was acknowledged.
    pub fn start_persistent() -> RedisServer {
        RedisServer::launch(true, None)
    }

    /// A throw-away server that speaks TLS only (no plain port), presenting the
    /// certificate `ca` signed; with `clients_need_certificates`, clients must present
    /// one that `ca` signed too. Fails the test (never skips it) when this
    /// `redis-server` was built without TLS.
    pub fn start_tls(ca: &TestCa, clients_need_certificates: bool) -> RedisServer {
        let read = |p: PathBuf| std::fs::read(p).expect("read a PEM file");
        let tls = ServerTls {
            ca_pem: ca.ca_pem(),
            client_identity: clients_need_certificates
                .then(|| (read(ca.cert_file()), read(ca.key_file()))),
        };
        RedisServer::launch(false, Some((tls, ca)))
    }

    fn launch(persistent: bool, tls: Option<(ServerTls, &TestCa)>) -> RedisServer {
        let mut dir = tempfile::Builder::new()
            .prefix("campaign-gate-redis-")
            .tempdir()
            .expect("temp dir for redis");
        let tls = tls.map(|(tls, ca)| {
            for (from, to) in [
                (ca.ca_file(), "ca.crt"),
                (ca.cert_file(), "server.crt"),
                (ca.key_file(), "server.key"),
            ] {
                std::fs::copy(from, dir.path().join(to)).expect("copy the TLS files");
            }
            tls
        });
        let mut last_error = String::new();
        // A port found free can be taken by someone else before redis binds it: retry.
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer {
                child: None,
                port,
                dir,
                persistent,
                tls: tls.clone(),
            };
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => {
                    last_error = e;
                    dir = server.take_dir();
                }
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    fn take_dir(mut self) -> TempDir {
        self.stop();
        let placeholder = tempfile::tempdir().expect("temp dir");
        std::mem::replace(&mut self.dir, placeholder)
    }

    /// Starts the process on `self.port` and waits until it answers `PING`.
    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => {
                cmd.args(["--port", &self.port.to_string()]);
            }
            Some(tls) => {
                let file = |name: &str| self.dir.path().join(name);
                cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(file("server.crt"))
                    .arg("--tls-key-file")
                    .arg(file("server.key"))
                    .arg("--tls-ca-cert-file")
                    .arg(file("ca.crt"))
                    .args([
                        "--tls-auth-clients",
                        if tls.client_identity.is_some() {
                            "yes"
                        } else {
                            "no"
                        },
                    ]);
            }
        }
        cmd.args(["--bind", "127.0.0.1"])
            .args(["--daemonize", "no"])
            .args(["--save", ""])
            // `DEBUG SLEEP` is off by default since Redis 7 (needs 7 or later).
            .args(["--enable-debug-command", "local"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--logfile", "redis.log"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Errors in the arguments are printed here, before the log file is open.
            .stderr(
                std::fs::File::create(self.dir.path().join("stderr.log"))
                    .map(Stdio::from)
                    .map_err(|e| format!("create stderr.log: {e}"))?,
            );
        if self.persistent {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn redis-server (is it installed?): {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP;
        loop {
            if ping(self.port, self.tls.as_ref()) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                let read = |name: &str| {
                    std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
                };
                let hint = if self.tls.is_some() {
                    " (a redis-server built without TLS rejects the tls-* arguments)"
                } else {
                    ""
                };
                return Err(format!(
                    "redis-server exited with {status}{hint}: {}{}",
                    read("stderr.log"),
                    read("redis.log")
                ));
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!("redis-server did not answer within {STARTUP:?}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/0`, or `rediss://` for a TLS server.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// A client of the test's own; for a TLS server, one trusting the server's CA and
    /// presenting no certificate.
    pub fn client(&self) -> redis::Client {
        match &self.tls {
            None => redis::Client::open(self.url()).expect("redis url"),
            Some(tls) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(tls.ca_pem.clone()),
                },
            )
            .expect("rediss url and CA"),
        }
    }

    /// A connection of the test's own, as `redis-cli` would use.
    pub async fn conn(&self) -> MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test's redis")
    }

    /// Kills the server (SIGKILL): what a crash looks like to the gateways.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same data directory.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + STARTUP;
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The old socket may linger for a moment.
                Err(e) if Instant::now() > deadline => panic!("redis restart failed: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Whether something on `port` answers `PING` with `+PONG`; over TLS trusting only the
/// server's CA.
fn ping(port: u16, tls: Option<&ServerTls>) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let Some(tls) = tls else {
        return pong(&mut s);
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&tls.ca_pem) {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_root_certificates(roots);
    let config = match &tls.client_identity {
        None => config.with_no_client_auth(),
        Some((cert, key)) => config
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert)
                    .collect::<Result<_, _>>()
                    .expect("client certificate PEM"),
                PrivateKeyDer::from_pem_slice(key).expect("client key PEM"),
            )
            .expect("client certificate and key"),
    };
    let name = ServerName::try_from("127.0.0.1").expect("server name");
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("TLS client");
    pong(&mut rustls::StreamOwned::new(conn, s))
}

fn pong(s: &mut (impl Read + Write)) -> bool {
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// `calls` of `cmdstat_evalsha` in `INFO commandstats`: with the scripts loaded at
/// connect, one per store lookup or change. 0 when the command was never called.
pub async fn evalsha_calls(conn: &mut MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO commandstats");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("calls is a number"))
}

/// The config of a gateway under test, as `[section] key = value` TOML literals.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    values: BTreeMap<String, BTreeMap<String, String>>,
}

/// `POST` here needs the `events` grant.
pub const EVENTS: &str = "/campaignapi/resources/v3/events";
/// `GET` here needs the `campaigns` grant.
pub const CAMPAIGNS: &str = "/campaignapi/resources/v3/campaigns";

const APIS: &str = r#"
[[apis]]
name = "events"
routes = ["POST /campaignapi/resources/v3/events"]

[[apis]]
name = "campaigns"
routes = ["GET /campaignapi/resources/v3/campaigns"]
"#;

impl GatewaySettings {
    /// Listeners on `127.0.0.1:0`, the store at `store_url`, a short check interval, a
    /// store timeout generous enough for a loaded test machine, no failed-auth
    /// throttling (these tests count store lookups, not guesses).
    pub fn new(store_url: &str, upstream: &str) -> GatewaySettings {
        GatewaySettings {
            values: BTreeMap::new(),
        }
        .set("server", "listen", "\"127.0.0.1:0\"")
        .set("server", "max_connections_per_ip", "5000")
        .set("admin", "listen", "\"127.0.0.1:0\"")
        .set("upstream", "url", &format!("{upstream:?}"))
        .set("store", "url", &format!("{store_url:?}"))
        .set("store", "timeout", "\"2s\"")
        .set("auth", "invalidation_check_interval", "\"300ms\"")
        .set("auth", "failure_limit", "0")
    }

    pub fn set(mut self, section: &str, key: &str, value: &str) -> GatewaySettings {
        self.values
            .entry(section.into())
            .or_default()
            .insert(key.into(), value.into());
        self
    }

    pub fn toml(&self) -> String {
        let mut out = String::new();
        for (section, values) in &self.values {
            out.push_str(&format!("[{section}]\n"));
            for (k, v) in values {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        out.push_str(APIS);
        out
    }

    /// `[store] tls_ca_file` (and a client certificate, when given), for a `rediss://`
    /// store.
    pub fn trust(self, ca_file: &Path, client: Option<(&Path, &Path)>) -> GatewaySettings {
        let path = |p: &Path| format!("{:?}", p.display().to_string());
        let settings = self.set("store", "tls_ca_file", &path(ca_file));
        match client {
            None => settings,
            Some((cert, key)) => settings
                .set("store", "tls_client_cert_file", &path(cert))
                .set("store", "tls_client_key_file", &path(key)),
        }
    }

    pub fn config(&self) -> Config {
        Config::parse(&self.toml(), Vec::<(String, String)>::new())
            .unwrap_or_else(|e| panic!("invalid test config: {e}\n{}", self.toml()))
    }
}

/// Starts a gateway in-process and waits until it is ready (store reached, subscriber
/// live).
pub async fn start_gateway(settings: &GatewaySettings) -> Gateway {
    let gateway = Gateway::start(settings.config())
        .await
        .unwrap_or_else(|e| panic!("gateway did not start: {e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gateway
        .gate
        .ready
        .load(std::sync::atomic::Ordering::Acquire)
    {
        assert!(
            Instant::now() < deadline,
            "gateway not ready within 10 s (store not reached or subscriber not live)"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    gateway
}

/// A keep-alive HTTP/1.1 client for floods of requests (one TCP connection per request
/// would run the machine out of ports).
pub type PooledClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
>;

pub fn pooled_client() -> PooledClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http()
}

/// `POST /campaignapi/resources/v3/events` with `token`: the status and how long the
/// whole exchange took.
pub async fn pooled_events(
    client: &PooledClient,
    addr: SocketAddr,
    token: &str,
) -> (u16, Duration) {
    pooled(client, addr, "POST", EVENTS, token).await
}

/// One request with `token` on a pooled connection: the status and how long the whole
/// exchange took.
pub async fn pooled(
    client: &PooledClient,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
) -> (u16, Duration) {
    use http_body_util::BodyExt as _;
    let started = Instant::now();
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(http_body_util::Empty::new())
        .expect("request");
    let response = client.request(request).await.expect("gateway answers");
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await.expect("body");
    (status, started.elapsed())
}

/// Creates an API user of tenant `acme` granted `grants`, with one key, through
/// `store`; returns the key.
pub async fn api_user(store: &Store, id: &str, grants: &[&str]) -> String {
    store
        .create_user(NewUser {
            id: id.into(),
            kind: UserType::Api,
            tenant: "acme".into(),
            name: String::new(),
            grants: grants.iter().map(|g| g.to_string()).collect(),
        })
        .await
        .expect("create user");
    new_key(store, id).await
}

/// Adds a key to user `id` through `store`; returns it.
pub async fn new_key(store: &Store, id: &str) -> String {
    let (token, key_id) = generate_secret_key();
    store
        .add_key(id, TokenHash::of(token.as_bytes()), &key_id)
        .await
        .expect("add key");
    token
}
