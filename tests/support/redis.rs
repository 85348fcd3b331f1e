//! `RedisServer`: a `redis-server` child process on a free `127.0.0.1` port, killed
//! (by its own pid) when dropped; and gateways whose store is such a server.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use campaign_gate::config::Config;
use campaign_gate::server::Gateway;
use redis::aio::MultiplexedConnection;
use tempfile::TempDir;

/// How long a fresh `redis-server` may take to answer `PING`.
const STARTUP: Duration = Duration::from_secs(10);

/// A `redis-server` owned by one test.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    persistent: bool,
}

impl RedisServer {
    /// A throw-away server: no RDB snapshots, no AOF.
    pub fn start() -> RedisServer {
        RedisServer::launch(false)
    }

    /// A server that survives a restart: AOF with `appendfsync always` in its own
    /// directory, so a kill loses nothing that was acknowledged.
    pub fn start_persistent() -> RedisServer {
        RedisServer::launch(true)
    }

    fn launch(persistent: bool) -> RedisServer {
        let mut dir = tempfile::Builder::new()
            .prefix("campaign-gate-redis-")
            .tempdir()
            .expect("temp dir for redis");
        let mut last_error = String::new();
        // A port found free can be taken by someone else before redis binds it: retry.
        for _ in 0..5 {
            let port = free_port();
            let mut server = RedisServer {
                child: None,
                port,
                dir,
                persistent,
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
        cmd.args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--daemonize", "no"])
            .args(["--save", ""])
            // `DEBUG SLEEP` is off by default since Redis 7 (needs 7 or later).
            .args(["--enable-debug-command", "local"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--logfile", "redis.log"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
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
            if ping(self.port) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                let log =
                    std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
                return Err(format!("redis-server exited with {status}: {log}"));
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

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("redis url")
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

/// Whether something on `port` answers `PING` with `+PONG`.
fn ping(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
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
