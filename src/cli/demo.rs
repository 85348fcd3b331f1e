//! `campaign-gate demo`: the gateway on a temporary embedded store, in front of a
//! built-in echo backend, with a demo API user, a UI user and a key; prints `curl` lines.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::server::{BoxError, Gateway};
use crate::store::records::generate_secret_key;
use crate::store::{NewUser, TokenHash, UserType};

/// The example configuration, also the demo's route table.
pub const EXAMPLE_CONFIG: &str = include_str!("../../campaign-gate.example.toml");

/// Runs the demo until Ctrl-C.
pub async fn run() -> Result<(), BoxError> {
    let dir = std::env::temp_dir().join(format!("campaign-gate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let store_url = format!("file:{}", dir.join("store.json").display());

    let backend = TcpListener::bind("127.0.0.1:0").await?;
    let backend_addr = backend.local_addr()?;
    tokio::spawn(echo_backend(backend));

    let mut gateway = None;
    for (listen, admin) in [
        ("127.0.0.1:8080", "127.0.0.1:9901"),
        ("127.0.0.1:0", "127.0.0.1:0"),
    ] {
        let env = vec![
            (
                "CAMPAIGN_GATE_SERVER_LISTEN".to_string(),
                listen.to_string(),
            ),
            ("CAMPAIGN_GATE_ADMIN_LISTEN".to_string(), admin.to_string()),
            (
                "CAMPAIGN_GATE_UPSTREAM_URL".to_string(),
                format!("http://{backend_addr}"),
            ),
            ("CAMPAIGN_GATE_STORE_URL".to_string(), store_url.clone()),
        ];
        let config = Config::parse(EXAMPLE_CONFIG, env)?;
        if let Ok(g) = Gateway::start(config).await {
            gateway = Some(g);
            break;
        }
    }
    let gateway = gateway.ok_or("could not bind the demo listeners")?;

    let store = gateway.gate.auth.store().clone();
    store
        .create_user(NewUser {
            id: "demo-api".into(),
            kind: UserType::Api,
            tenant: "demo".into(),
            name: "Demo API user".into(),
            grants: vec!["events".into(), "campaigns".into()],
        })
        .await?;
    store
        .create_user(NewUser {
            id: "demo-ui".into(),
            kind: UserType::Ui,
            tenant: "demo".into(),
            name: "Demo UI user".into(),
            grants: Vec::new(),
        })
        .await?;
    let (token, key_id) = generate_secret_key();
    store
        .add_key("demo-api", TokenHash::of(token.as_bytes()), &key_id)
        .await?;

    let g = gateway.addr;
    let v3 = "/campaignapi/resources/v3";
    println!(
        "campaign-gate demo\n\
         \n  gateway   http://{g}   (admin http://{admin})\
         \n  backend   http://{backend_addr}   (built-in echo: answers with what it received)\
         \n  store     {store_url}\
         \n  users     demo-api (api, granted: events, campaigns), demo-ui (ui)\
         \n  key 1     {token}\
         \n\nTry:\
         \n  # 200: granted; the echo shows the identity headers the backend received\
         \n  curl -i -X POST http://{g}{v3}/events -H 'Authorization: Bearer {token}' -d '{{\"event\":\"demo\"}}'\
         \n  # 401 missing_credentials: no key\
         \n  curl -i -X POST http://{g}{v3}/events\
         \n  # 401 invalid_token: unknown key\
         \n  curl -i -X POST http://{g}{v3}/events -H 'Authorization: Bearer bm90LWEta2V5'\
         \n  # 403 api_not_granted: demo-api was not granted the profiles API\
         \n  curl -i http://{g}{v3}/profilequerystatus/42 -H 'Authorization: Bearer {token}'\
         \n  # 404 unknown_api: no API has this path\
         \n  curl -i http://{g}{v3}/nothing-here -H 'Authorization: Bearer {token}'\
         \n\nManage it with the CLI against the same store, e.g.:\
         \n  cargo run -- --store {store_url} keys list demo-api\
         \n\nCtrl-C stops the demo and removes its store.",
        admin = gateway.admin_addr,
    );

    tokio::signal::ctrl_c().await?;
    gateway.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The echo backend: answers every request with a JSON description of it.
async fn echo_backend(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let svc = service_fn(echo);
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (head, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let headers: serde_json::Map<String, serde_json::Value> = head
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                serde_json::Value::from(String::from_utf8_lossy(v.as_bytes()).into_owned()),
            )
        })
        .collect();
    let echoed = serde_json::json!({
        "method": head.method.as_str(),
        "path": head.uri.path(),
        "query": head.uri.query(),
        "headers": headers,
        "body_bytes": body.len(),
    });
    let mut resp = Response::new(Full::new(Bytes::from(format!("{echoed:#}\n"))));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}
