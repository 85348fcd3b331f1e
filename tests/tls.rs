//! TLS termination: requests over TLS (HTTP/1.1 and h2 by ALPN) reach the backend with
//! `X-Forwarded-Proto: https`, and a replaced certificate is served to new handshakes
//! without a restart.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{EVENTS, RecordingBackend, TestEnv, wait_until};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Writes a self-signed certificate for `localhost` / 127.0.0.1 and returns its DER.
fn write_cert(dir: &Path, name: &str) -> CertificateDer<'static> {
    let params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("params");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed");
    std::fs::write(dir.join(format!("{name}.crt.tmp")), cert.pem()).expect("write cert");
    std::fs::write(dir.join(format!("{name}.key.tmp")), key.serialize_pem()).expect("write key");
    // Replace both files by rename, as a certificate manager would.
    std::fs::rename(
        dir.join(format!("{name}.key.tmp")),
        dir.join(format!("{name}.key")),
    )
    .expect("rename key");
    std::fs::rename(
        dir.join(format!("{name}.crt.tmp")),
        dir.join(format!("{name}.crt")),
    )
    .expect("rename cert");
    cert.der().clone()
}

fn connector(trusted: &[CertificateDer<'static>], alpn: &[u8]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in trusted {
        roots.add(c.clone()).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// One request over a fresh TLS connection; returns the status and the certificate
/// the server presented.
async fn request(
    addr: SocketAddr,
    trusted: &[CertificateDer<'static>],
    alpn: &[u8],
    token: &str,
) -> Result<(u16, CertificateDer<'static>), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let server = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let tls = connector(trusted, alpn)
        .connect(server, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first().cloned())
        .ok_or("no certificate")?;
    let req = http::Request::post(format!("https://localhost{EVENTS}"))
        .header("authorization", format!("Bearer {token}"))
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let io = TokioIo::new(tls);
    let status = if alpn == b"h2" {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let (mut parts, body) = req.into_parts();
        parts.headers.remove("host");
        let resp = send
            .send_request(http::Request::from_parts(parts, body))
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        status
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        status
    };
    Ok((status, presented))
}

/// A gateway serving TLS with a certificate written to `dir` (`gate.crt`, `gate.key`),
/// in front of a recording backend, and alice's key for `events`.
struct TlsGateway {
    backend: RecordingBackend,
    dir: tempfile::TempDir,
    cert: CertificateDer<'static>,
    token: String,
    gateway: campaign_gate::server::Gateway,
    /// Holds the store the gateway reads.
    _env: TestEnv,
}

impl TlsGateway {
    async fn start() -> TlsGateway {
        let backend = RecordingBackend::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = write_cert(dir.path(), "gate");
        let tls = format!(
            "{{ cert = {:?}, key = {:?} }}",
            dir.path().join("gate.crt").display().to_string(),
            dir.path().join("gate.key").display().to_string()
        );
        let env = TestEnv::builder()
            .upstream(&backend.url())
            .set("server", "tls", &tls)
            .build();
        let token = env.create_api_user("alice", &["events"]);
        let gateway = env.start_gateway().await;
        TlsGateway {
            backend,
            dir,
            cert,
            token,
            gateway,
            _env: env,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_terminates_and_certificates_reload_without_restart() {
    let TlsGateway {
        backend,
        dir,
        cert: first,
        token,
        gateway,
        _env,
    } = TlsGateway::start().await;

    for alpn in [&b"http/1.1"[..], b"h2"] {
        let (status, presented) = request(gateway.addr, std::slice::from_ref(&first), alpn, &token)
            .await
            .expect("TLS request");
        assert_eq!(status, 200, "alpn {}", String::from_utf8_lossy(alpn));
        assert_eq!(presented, first);
    }
    let seen = backend.requests();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_eq!(r.header("x-forwarded-proto").as_deref(), Some("https"));
        assert!(!r.has_header("authorization"));
    }

    // Plain HTTP on the TLS port is not served.
    let plain = common::Req::post(EVENTS)
        .bearer(&token)
        .try_send(gateway.addr)
        .await;
    assert!(plain.is_err(), "plain HTTP must not be answered: {plain:?}");

    // A new certificate replaces the old one for new handshakes, without a restart.
    let second = write_cert(dir.path(), "gate");
    let both = [first.clone(), second.clone()];
    let swapped = wait_until(Duration::from_secs(3), || {
        let both = both.clone();
        let token = token.clone();
        let second = second.clone();
        async move {
            matches!(request(gateway.addr, &both, b"http/1.1", &token).await,
                Ok((200, presented)) if presented == second)
        }
    })
    .await;
    assert!(
        swapped.is_ok(),
        "the new certificate was not served within 3 s"
    );

    // A broken replacement is refused; the current certificate keeps serving.
    std::fs::write(dir.path().join("gate.crt"), "not a certificate").expect("write");
    let metrics = gateway.gate.metrics.clone();
    let noticed = wait_until(Duration::from_secs(3), || {
        let m = metrics.clone();
        async move { m.tls_reload_errors.get() >= 1 }
    })
    .await;
    assert!(
        noticed.is_ok(),
        "the broken certificate file was not noticed"
    );
    let (status, presented) = request(gateway.addr, &both, b"http/1.1", &token)
        .await
        .expect("still served");
    assert_eq!((status, presented), (200, second));
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_framing_guard_works_inside_tls_too() {
    // The guard sits on the decrypted stream: Content-Length with Transfer-Encoding
    // over TLS is refused with the JSON 400 and the connection closed, nothing forwarded.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let TlsGateway {
        backend,
        dir: _dir,
        cert,
        token,
        gateway,
        _env,
    } = TlsGateway::start().await;
    let tcp = TcpStream::connect(gateway.addr).await.expect("connect");
    let mut stream = connector(std::slice::from_ref(&cert), b"http/1.1")
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    let request = format!(
        "POST {EVENTS} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply))
        .await
        .expect("the connection was not closed")
        .ok();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
    assert!(reply.contains(r#""error":"bad_request""#), "{reply}");
    assert!(
        reply.to_ascii_lowercase().contains("connection: close"),
        "{reply}"
    );
    backend.assert_untouched("CL+TE over TLS");
    gateway.shutdown().await;
}
