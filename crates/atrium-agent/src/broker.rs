//! The embedded MQTT 3.1.1 broker for the sensor LAN: small, one task per connection.
//!
//! What it does: CONNECT (no authentication: the sensor LAN is the trust boundary), PUBLISH at
//! QoS 0 and 1, SUBSCRIBE/UNSUBSCRIBE with `+` and `#` wildcards, retained messages, PINGREQ,
//! keep-alive. Messages on this gateway's sensor topics go to the intake, and their PUBACK is
//! sent **only once the readings are durable in the spool** (in order, as MQTT requires);
//! when the spool fails the connection is closed so the sensor resends. Other topics are
//! acknowledged at once. Subscribers (room displays, tools) receive at QoS 0.
//!
//! Acknowledgements of other topics go out at once, so they may overtake a pending intake
//! PUBACK (MQTT 3.1.1 asks for PUBACKs in order; sensors publish on intake topics only).
//!
//! What it does not: QoS 2 (the connection is closed), persistent sessions (a reconnecting
//! client subscribes again), wills, MQTT 5. The packet codec and topic matching are
//! `rumqttc`'s.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self, QoS};
use rumqttc::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::intake::{Acker, Incoming};

/// Largest packet accepted from a client (a SenML pack is at most 64 KiB).
const MAX_INCOMING: usize = atrium_proto::senml::DEFAULT_MAX_PAYLOAD_BYTES + 1024;
/// Largest packet sent to a client.
const MAX_OUTGOING: usize = 256 * 1024;
/// Most retained topics kept.
const MAX_RETAINED: usize = 10_000;
/// Most connections at once.
const MAX_CONNECTIONS: usize = 1024;
/// Packets queued for one subscriber before its QoS 0 messages are dropped.
const OUT_QUEUE: usize = 64;

/// What the intake said about one message, for its connection.
enum Ack {
    /// Durable: send this PUBACK.
    Send(u16),
    /// Durable, QoS 0: nothing to send.
    Nothing,
    /// Not stored: close the connection so the sensor resends.
    Failed,
}

struct Subscription {
    conn: u64,
    filter: String,
    out: mpsc::Sender<Packet>,
}

#[derive(Default)]
struct Shared {
    subscriptions: Vec<Subscription>,
    retained: BTreeMap<String, Bytes>,
    connections: usize,
    next_conn: u64,
}

/// The broker's shared state; cheap to clone.
#[derive(Clone, Default)]
pub struct Broker {
    shared: Arc<Mutex<Shared>>,
}

impl Broker {
    /// Publishes from inside the agent (room state and events): retained store and delivery.
    pub fn publish(&self, topic: &str, payload: Bytes, retain: bool) {
        let Ok(mut shared) = self.shared.lock() else {
            return;
        };
        if retain {
            if payload.is_empty() {
                shared.retained.remove(topic);
            } else if shared.retained.len() < MAX_RETAINED || shared.retained.contains_key(topic) {
                shared.retained.insert(topic.to_owned(), payload.clone());
            }
        }
        shared.subscriptions.retain(|s| !s.out.is_closed());
        for sub in &shared.subscriptions {
            if mqttbytes::matches(topic, &sub.filter) {
                let message = Publish::from_bytes(topic, QoS::AtMostOnce, payload.clone());
                // QoS 0: a subscriber that does not keep up loses messages, not the broker memory.
                let _ = sub.out.try_send(Packet::Publish(message));
            }
        }
    }

    fn subscribe(&self, conn: u64, filter: &str, out: &mpsc::Sender<Packet>) {
        let Ok(mut shared) = self.shared.lock() else {
            return;
        };
        shared
            .subscriptions
            .retain(|s| !(s.conn == conn && s.filter == filter));
        shared.subscriptions.push(Subscription {
            conn,
            filter: filter.to_owned(),
            out: out.clone(),
        });
        for (topic, payload) in &shared.retained {
            if mqttbytes::matches(topic, filter) {
                let mut message = Publish::from_bytes(topic, QoS::AtMostOnce, payload.clone());
                message.retain = true;
                let _ = out.try_send(Packet::Publish(message));
            }
        }
    }

    fn unsubscribe(&self, conn: u64, filter: Option<&str>) {
        if let Ok(mut shared) = self.shared.lock() {
            shared
                .subscriptions
                .retain(|s| !(s.conn == conn && filter.is_none_or(|f| f == s.filter)));
        }
    }

    /// Accepts connections until shutdown; `intake_filter` names the topics that go to `intake`.
    pub async fn serve(
        self,
        listener: TcpListener,
        intake_filter: String,
        intake: mpsc::Sender<Incoming>,
        shutdown: CancellationToken,
    ) {
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "MQTT accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let conn = {
                let Ok(mut shared) = self.shared.lock() else {
                    return;
                };
                if shared.connections >= MAX_CONNECTIONS {
                    tracing::warn!(%peer, "MQTT connection refused: too many connections");
                    continue;
                }
                shared.connections += 1;
                shared.next_conn += 1;
                shared.next_conn
            };
            let broker = self.clone();
            let filter = intake_filter.clone();
            let intake = intake.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                if let Err(e) = broker
                    .connection(conn, stream, &filter, intake, shutdown)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "MQTT connection closed");
                }
                broker.unsubscribe(conn, None);
                if let Ok(mut shared) = broker.shared.lock() {
                    shared.connections = shared.connections.saturating_sub(1);
                }
            });
        }
    }

    async fn connection(
        &self,
        conn: u64,
        mut stream: TcpStream,
        intake_filter: &str,
        intake: mpsc::Sender<Incoming>,
        shutdown: CancellationToken,
    ) -> Result<(), String> {
        let mut buf = BytesMut::with_capacity(1024);
        let mut wbuf = BytesMut::new();
        let first =
            tokio::time::timeout(Duration::from_secs(10), read_packet(&mut stream, &mut buf))
                .await
                .map_err(|_| "no CONNECT within 10 s".to_owned())??;
        let Packet::Connect(connect) = first else {
            return Err("first packet is not CONNECT".into());
        };
        let keep_alive = Duration::from_secs(u64::from(connect.keep_alive));
        write_packet(
            &mut stream,
            &mut wbuf,
            Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
        )
        .await?;
        // Subscribers' messages, bounded; acks after spooling, bounded by the intake's queue.
        let (out_tx, mut out_rx) = mpsc::channel::<Packet>(OUT_QUEUE);
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Ack>();
        let idle = if keep_alive.is_zero() {
            Duration::from_secs(24 * 3600)
        } else {
            keep_alive + keep_alive / 2
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                packet = tokio::time::timeout(idle, read_packet(&mut stream, &mut buf)) => {
                    let packet = packet.map_err(|_| "keep-alive expired".to_owned())??;
                    match packet {
                        Packet::Publish(publish) => {
                            if publish.qos == QoS::ExactlyOnce {
                                return Err("QoS 2 is not supported".into());
                            }
                            if publish.topic.is_empty() || !mqttbytes::valid_topic(&publish.topic) {
                                return Err(format!("invalid topic `{}`", publish.topic));
                            }
                            self.publish(&publish.topic, publish.payload.clone(), publish.retain);
                            let pkid = (publish.qos == QoS::AtLeastOnce).then_some(publish.pkid);
                            if mqttbytes::matches(&publish.topic, intake_filter) {
                                let acks = ack_tx.clone();
                                let ack: Acker = Box::new(move |ok| {
                                    let _ = acks.send(match (ok, pkid) {
                                        (false, _) => Ack::Failed,
                                        (true, Some(pkid)) => Ack::Send(pkid),
                                        (true, None) => Ack::Nothing,
                                    });
                                });
                                let message = Incoming { topic: publish.topic, payload: publish.payload, ack };
                                if intake.send(message).await.is_err() {
                                    return Err("intake stopped".into());
                                }
                            } else if let Some(pkid) = pkid {
                                write_packet(&mut stream, &mut wbuf, Packet::PubAck(PubAck::new(pkid))).await?;
                            }
                        }
                        Packet::Subscribe(subscribe) => {
                            let mut codes = Vec::with_capacity(subscribe.filters.len());
                            let mut granted = Vec::new();
                            for f in &subscribe.filters {
                                if mqttbytes::valid_filter(&f.path) {
                                    codes.push(SubscribeReasonCode::Success(QoS::AtMostOnce));
                                    granted.push(f.path.clone());
                                } else {
                                    codes.push(SubscribeReasonCode::Failure);
                                }
                            }
                            write_packet(&mut stream, &mut wbuf, Packet::SubAck(SubAck::new(subscribe.pkid, codes))).await?;
                            for filter in granted {
                                self.subscribe(conn, &filter, &out_tx);
                            }
                        }
                        Packet::Unsubscribe(unsubscribe) => {
                            for filter in &unsubscribe.topics {
                                self.unsubscribe(conn, Some(filter));
                            }
                            write_packet(&mut stream, &mut wbuf, Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid))).await?;
                        }
                        Packet::PingReq => write_packet(&mut stream, &mut wbuf, Packet::PingResp).await?,
                        Packet::Disconnect => return Ok(()),
                        Packet::PubAck(_) => {}
                        _ => return Err("unexpected packet from a client".into()),
                    }
                }
                Some(packet) = out_rx.recv() => write_packet(&mut stream, &mut wbuf, packet).await?,
                Some(ack) = ack_rx.recv() => match ack {
                    Ack::Failed => return Err("readings could not be spooled; closing so the sensor resends".into()),
                    Ack::Send(pkid) => write_packet(&mut stream, &mut wbuf, Packet::PubAck(PubAck::new(pkid))).await?,
                    Ack::Nothing => {}
                },
            }
        }
    }
}

/// Binds the broker's listener.
pub async fn bind(addr: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

async fn read_packet(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Packet, String> {
    loop {
        match Packet::read(buf, MAX_INCOMING) {
            Ok(packet) => return Ok(packet),
            Err(mqttbytes::Error::InsufficientBytes(n)) => {
                buf.reserve(n);
                let read = stream
                    .read_buf(buf)
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                if read == 0 {
                    return Err("client closed the connection".into());
                }
            }
            Err(e) => return Err(format!("bad packet: {e}")),
        }
    }
}

async fn write_packet(
    stream: &mut TcpStream,
    wbuf: &mut BytesMut,
    packet: Packet,
) -> Result<(), String> {
    wbuf.clear();
    packet
        .write(wbuf, MAX_OUTGOING)
        .map_err(|e| format!("encode: {e}"))?;
    stream
        .write_all(wbuf)
        .await
        .map_err(|e| format!("write: {e}"))
}
