//! The MQTT bridge over TLS to a real Mosquitto started here with a TLS listener that
//! requires client certificates (certificates made with rcgen): the bridge with the right CA
//! and a client certificate publishes the retained device topics; one trusting another CA and
//! one without a client certificate say why in `GET /api/v1/integrations`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use atrium_server::config::{IntegrationConfig, MqttBridgeConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tokio::time::Instant;

use crate::harness::{Backend, TestAgent, TestServer};

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// A CA and what it signed, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    other_ca: PathBuf,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("CA certificate");
    (params, key, cert.pem())
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("params");
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().copied().unwrap_or("client"),
    );
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer).expect("certificate");
    (cert.pem(), key.serialize_pem())
}

fn make_pki(dir: &Path) -> Pki {
    let (params, key, ca_pem) = ca("Broker Test CA");
    let issuer = Issuer::new(params, key);
    let (server_pem, server_key) = leaf(
        &issuer,
        &["127.0.0.1", "localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_pem, client_key) = leaf(
        &issuer,
        &["atrium-bridge"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let (_, _, other_pem) = ca("Some Other CA");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write PEM");
        path
    };
    Pki {
        ca: write("ca.pem", &ca_pem),
        server_cert: write("server.pem", &server_pem),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_pem),
        client_key: write("client.key", &client_key),
        other_ca: write("other-ca.pem", &other_pem),
    }
}

/// A Mosquitto with one TLS listener on a free loopback port, stopped on drop.
struct Broker {
    child: std::process::Child,
    port: u16,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_broker(dir: &Path, pki: &Pki) -> Broker {
    assert!(
        Path::new(MOSQUITTO).exists(),
        "this test starts its own Mosquitto with a TLS listener: install it ({MOSQUITTO}, \
         Debian package mosquitto)"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings false\nallow_anonymous true\npersistence false\n\
             user root\nlog_dest stderr\nlistener {port} 127.0.0.1\ncafile {}\ncertfile {}\n\
             keyfile {}\nrequire_certificate true\n",
            pki.ca.display(),
            pki.server_cert.display(),
            pki.server_key.display()
        ),
    )
    .expect("write mosquitto.conf");
    let child = std::process::Command::new(MOSQUITTO)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("mosquitto.log")).expect("log file"))
        .spawn()
        .expect("starting mosquitto");
    let mut broker = Broker { child, port };
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Ok(Some(status)) = broker.child.try_wait() {
            panic!(
                "mosquitto exited ({status}): {}",
                std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "mosquitto did not listen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.port = port;
    broker
}

/// A subscriber over mutual TLS, subscribed to `topic` (confirmed).
async fn subscriber(pki: &Pki, port: u16, topic: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&pki.ca).expect("CA") {
        roots.add(cert.expect("CA cert")).expect("root");
    }
    let chain = CertificateDer::pem_file_iter(&pki.client_cert)
        .expect("client cert")
        .collect::<Result<Vec<_>, _>>()
        .expect("client chain");
    let key = PrivateKeyDer::from_pem_file(&pki.client_key).expect("client key");
    let tls = rustls::ClientConfig::builder_with_provider(atrium_pki::crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client auth");
    let mut options = MqttOptions::new(
        format!("atrium-e2e-tls-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    client
        .subscribe(topic, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("the test's own TLS subscriber cannot use the broker: {e}"),
            }
        }
    })
    .await
    .expect("the broker confirms the subscription");
    (client, eventloop)
}

fn bridge(name: &str, port: u16, prefix: &str) -> MqttBridgeConfig {
    MqttBridgeConfig {
        name: name.into(),
        url: format!("mqtts://127.0.0.1:{port}"),
        topic_prefix: prefix.into(),
        client_id: None,
        username: None,
        password_file: None,
        password_env: None,
        ca_file: None,
        cert_file: None,
        key_file: None,
        rooms: false,
        events: false,
    }
}

async fn integration_status(server: &TestServer, name: &str) -> Value {
    let (status, list) = server.get("/api/v1/integrations").await;
    assert!(status.is_success(), "{list}");
    list.as_array()
        .and_then(|l| l.iter().find(|i| i["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("integration {name} not listed: {list}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_bridge_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = make_pki(dir.path());
    let broker = start_broker(dir.path(), &pki).await;
    let prefix = format!("atrium-e2e-tls-{}", std::process::id());
    let (_sub, mut events) = subscriber(&pki, broker.port, &format!("{prefix}/#")).await;

    let mut server = TestServer::start_with(Backend::Sqlite, |c| {
        let mut good = bridge("tls-broker", broker.port, &prefix);
        good.ca_file = Some(pki.ca.clone());
        good.cert_file = Some(pki.client_cert.clone());
        good.key_file = Some(pki.client_key.clone());
        let mut wrong_ca = bridge("wrong-ca", broker.port, &format!("{prefix}-wrong"));
        wrong_ca.ca_file = Some(pki.other_ca.clone());
        wrong_ca.cert_file = Some(pki.client_cert.clone());
        wrong_ca.key_file = Some(pki.client_key.clone());
        let mut no_cert = bridge("no-client-cert", broker.port, &format!("{prefix}-nocert"));
        no_cert.ca_file = Some(pki.ca.clone());
        c.integrations = vec![
            IntegrationConfig::Mqtt(good),
            IntegrationConfig::Mqtt(wrong_ca),
            IntegrationConfig::Mqtt(no_cert),
        ];
    })
    .await;

    let mut agent = TestAgent::start(&server, "MQTTS-1").await;
    let id = agent.pending().await;
    server.decide(&id, "accept").await;
    agent.connected().await;

    // The retained device topics arrive over TLS.
    let device_topic = format!("{prefix}/devices/{id}");
    let mut seen: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mirrored = |seen: &BTreeMap<String, Vec<u8>>| {
        seen.get(&device_topic)
            .and_then(|p| serde_json::from_slice::<Value>(p).ok())
            .is_some_and(|d| d["status"] == "accepted")
            && seen.contains_key(&format!("{device_topic}/twin/reported"))
    };
    while !mirrored(&seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "device topics over TLS: seen {:?}; integrations {}",
            seen.keys(),
            server.get("/api/v1/integrations").await.1
        );
        match tokio::time::timeout(left, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                assert!(
                    p.topic.starts_with(&format!("{prefix}/")),
                    "only the bridge that trusts the broker publishes: {}",
                    p.topic
                );
                seen.insert(p.topic.clone(), p.payload.to_vec());
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => panic!("subscriber lost the broker: {e}"),
        }
    }

    // The good bridge is healthy; the other two say why they cannot connect.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let good = integration_status(&server, "tls-broker").await;
        let wrong = integration_status(&server, "wrong-ca").await;
        let no_cert = integration_status(&server, "no-client-cert").await;
        let wrong_error = wrong["last_error"].as_str().unwrap_or_default().to_owned();
        let no_cert_error = no_cert["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if good["last_error"].is_null()
            && good["applied"].as_u64().unwrap_or(0) >= 1
            && wrong_error.contains("UnknownIssuer")
            && !no_cert_error.is_empty()
        {
            assert_eq!(wrong["applied"], 0, "{wrong}");
            assert_eq!(no_cert["applied"], 0, "{no_cert}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "statuses: {good}\n{wrong}\n{no_cert}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    agent.stop().await;
    server.stop().await;
    drop(broker);
}
