//! Deployments over the real device link: the real agent (`Agent::run`) connects with its
//! certificate over mutual TLS to a minimal link server written here (hello, welcome, pongs),
//! which offers an artifact and reads the statuses and the inventory the agent sends.

mod common;

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use atrium_agent::{Agent, AgentConfig};
use atrium_pki::{CertificateAuthority, DeviceKey as _, FileKey};
use atrium_proto::{
    DeploymentOffer, DeploymentStatus, Frame, Message, PROTOCOL_VERSION, SeqCounter, Welcome,
};
use common::*;
use futures_util::{SinkExt as _, StreamExt as _};
use sha2::Digest as _;
use tokio_tungstenite::tungstenite::Message as WsMessage;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

/// The server's end of one link.
struct Link {
    ws: Ws,
    out: SeqCounter,
}

impl Link {
    async fn send(&mut self, message: Message) {
        let bytes = self.out.encode(message);
        self.ws
            .send(WsMessage::Binary(bytes.into()))
            .await
            .expect("send");
    }

    /// The next message that is not a heartbeat (pings are answered).
    async fn recv(&mut self) -> Message {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(60), self.ws.next())
                .await
                .expect("a message within a minute")
                .expect("link open")
                .expect("link error");
            let WsMessage::Binary(bytes) = next else {
                continue;
            };
            match Frame::decode(&bytes).expect("frame").message {
                Message::Ping(n) => self.send(Message::Pong(n)).await,
                message => return message,
            }
        }
    }

    /// Messages until a deployment status that ends the attempt; the inventories seen on the way.
    async fn statuses(&mut self) -> (Vec<DeploymentStatus>, Vec<Message>) {
        let mut statuses = Vec::new();
        let mut other = Vec::new();
        loop {
            match self.recv().await {
                Message::DeploymentStatus(s) => {
                    let end = atrium_agent::update::deploy::is_end(&s.status);
                    statuses.push(s);
                    if end {
                        return (statuses, other);
                    }
                }
                message => other.push(message),
            }
        }
    }

    /// The next inventory.
    async fn inventory(&mut self) -> std::collections::BTreeMap<String, String> {
        loop {
            if let Message::Inventory(inventory) = self.recv().await {
                return inventory;
            }
        }
    }
}

#[tokio::test]
async fn offers_over_the_link_install_report_and_update_the_inventory() {
    let d = Device::new();
    let health = d.path("bin/healthy");
    script(&health, "exit 0");
    d.config(&format!("health_check = [{health:?}]\n"));

    // A CA, the device's certificate (as enrollment would have stored it), the link's server
    // certificate.
    let ca = CertificateAuthority::load_or_create(&d.path("ca"), "Atrium test").expect("ca");
    let ca_file = d.path("ca.pem");
    fs::write(&ca_file, ca.bundle_pem()).expect("ca file");
    fs::create_dir_all(d.path("data")).expect("data");
    let key = FileKey::load_or_generate(&d.path("data/identity.key")).expect("key");
    let csr = atrium_pki::verify_csr(&key.csr_der("gw-1").expect("csr")).expect("verified csr");
    let issued = ca
        .issue_device_cert(&csr, "gw-1", Duration::from_secs(86400))
        .expect("device cert");
    atrium_pki::write_secret_file(&d.path("data/device.crt"), issued.chain_pem.as_bytes())
        .expect("device cert file");
    let identity = ca
        .issue_server_cert(&["127.0.0.1".into()], Duration::from_secs(86400))
        .expect("server cert");
    let tls = atrium_pki::tls::server_config_client_auth(&identity, &[ca.root_der()])
        .expect("server tls");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();

    let dest = d.path("etc-app");
    let a = d.path("a.mender");
    single_file("conf-2", &dest, "v2\n").write(&a, None);
    let served = serve_with(fs::read(&a).expect("artifact"), 0, None);
    let bytes = fs::read(&a).expect("artifact");
    let offer = DeploymentOffer {
        deployment: "dep-1".into(),
        artifact_id: "art-1".into(),
        artifact_name: "conf-2".into(),
        size: bytes.len() as u64,
        sha256: hex::encode(sha2::Sha256::digest(&bytes)),
        url: served.url.clone(),
        attempt: 1,
    };

    let config = AgentConfig::load(
        Some(&d.path("agent.toml")),
        serde_json::json!({
            "server_url": "https://127.0.0.1:1",
            "link_url": format!("wss://127.0.0.1:{port}"),
            "ca_file": ca_file,
            "mqtt_mode": "off",
            "inventory_interval_s": 3600,
        }),
    )
    .expect("configuration");
    let agent = Agent::new(config).expect("agent");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(agent.run(shutdown.clone()));

    let (tcp, _) = tokio::time::timeout(Duration::from_secs(60), listener.accept())
        .await
        .expect("the agent connects")
        .expect("accept");
    let tls = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls))
        .accept(tcp)
        .await
        .expect("mutual TLS");
    let ws = tokio_tungstenite::accept_async(tls)
        .await
        .expect("websocket");
    let mut link = Link {
        ws,
        out: SeqCounter::default(),
    };
    assert!(matches!(link.recv().await, Message::Hello(_)));
    link.send(Message::Welcome(Welcome {
        protocol: PROTOCOL_VERSION,
        device_id: "gw-1".into(),
        server_time_ms: 0,
        heartbeat_s: 5,
    }))
    .await;

    let inventory = link.inventory().await;
    assert_eq!(
        inventory.get("device_type").map(String::as_str),
        Some(DEVICE)
    );
    assert_eq!(
        inventory.get("artifact_name").map(String::as_str),
        Some("release-1")
    );

    link.send(Message::DeploymentOffer(offer.clone())).await;
    let (statuses, _) = link.statuses().await;
    let mut names: Vec<&str> = statuses.iter().map(|s| s.status.as_str()).collect();
    names.dedup();
    assert_eq!(names, ["downloading", "installing", "verifying", "success"]);
    assert_eq!(
        fs::read_to_string(dest.join("app.conf")).expect("file"),
        "v2\n"
    );
    // The inventory follows the end at once (the interval is an hour).
    let inventory = link.inventory().await;
    assert_eq!(
        inventory.get("artifact_name").map(String::as_str),
        Some("conf-2")
    );
    assert_eq!(
        inventory
            .get("rootfs-image.single-file.version")
            .map(String::as_str),
        Some("conf-2")
    );

    // Offered again (as after a reconnect): the answer is the end, nothing is downloaded.
    link.send(Message::DeploymentOffer(offer)).await;
    let (again, _) = link.statuses().await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].status, "success");
    assert_eq!(served.requests.lock().expect("requests").len(), 1);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the agent stops")
        .expect("task")
        .expect("agent");
}
