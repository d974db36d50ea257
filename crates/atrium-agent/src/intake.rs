//! Sensor intake: SenML (JSON or CBOR) over MQTT in, filtered readings into the spool, rooms updated,
//! room state and events published back to the local broker.
//!
//! Messages come from either source (the embedded [`crate::broker`] or a client of an
//! existing broker, [`run_client`]) as [`Incoming`], each with an [`Acker`]. The worker takes
//! everything that has arrived, decodes and filters it, appends it to the spool in one call
//! (one fsync), and only then acknowledges: a QoS 1 PUBACK means the readings are durable.
//! A pack the decoder refuses is acknowledged too (resending it would not help) and counted.
//!
//! Topic layout (see `docs/SENSORS.md`): sensors publish to
//! `atrium/<gateway>/nodes/<node>/senml`; the agent publishes `atrium/<gateway>/rooms/<room>/state`
//! (retained) and `atrium/<gateway>/rooms/<room>/events`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use atrium_proto::Reading;
use atrium_proto::senml::{self, Limits};
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::filter::{Filter, FilterConfig, FilterStats};
use crate::rooms::{Assignment, RoomStats, RoomUpdate, Rooms};
use crate::spool::Spool;

/// The spool, shared by intake (appends) and the link (batches, acks); used on blocking threads.
pub type SharedSpool = Arc<Mutex<Spool>>;

/// Acknowledges one MQTT message: `true` once its readings are durable (or it was refused for
/// good), `false` when they could not be stored (the source makes the sensor resend).
pub type Acker = Box<dyn FnOnce(bool) + Send>;

/// Publishes to the local broker: topic, payload, retained.
pub type Publisher = Arc<dyn Fn(&str, Vec<u8>, bool) + Send + Sync>;

/// One MQTT message for the intake.
pub struct Incoming {
    /// The topic it was published to.
    pub topic: String,
    /// A SenML pack, JSON or CBOR.
    pub payload: Bytes,
    /// Called once the message is dealt with.
    pub ack: Acker,
}

/// Messages taken per spool append, at most.
const MAX_DRAIN: usize = 256;

/// What the intake has done so far (for the status command, tests and metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IntakeStatus {
    /// MQTT messages received on the intake topics.
    pub messages: u64,
    /// Readings appended to the spool.
    pub spooled: u64,
    /// Appends that failed (the sensor was not acknowledged and resends).
    pub spool_errors: u64,
    /// Filter counters, including decoder refusals (`senml_<kind>`) and topic problems.
    pub filter: FilterStats,
    /// Room engine counters, including nodes in no room.
    pub rooms: RoomStats,
}

/// The topic filter sensors publish under for this gateway.
pub fn sensor_filter(gateway: &str) -> String {
    format!("atrium/{gateway}/nodes/+/senml")
}

/// The retained room-state topic.
pub fn state_topic(gateway: &str, room: &str) -> String {
    format!("atrium/{gateway}/rooms/{room}/state")
}

/// The room-events topic.
pub fn events_topic(gateway: &str, room: &str) -> String {
    format!("atrium/{gateway}/rooms/{room}/events")
}

/// The node a sensor topic names, if the topic is one of this gateway's sensor topics.
pub fn topic_node<'a>(gateway: &str, topic: &'a str) -> Option<&'a str> {
    let mut parts = topic.split('/');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("atrium"), Some(g), Some("nodes"), Some(node), Some("senml"), None)
            if g == gateway && !node.is_empty() =>
        {
            Some(node)
        }
        _ => None,
    }
}

/// Longest node id accepted (leaves room for `:<quantity>` within SenML's 128-byte names).
pub const MAX_NODE_ID: usize = 100;

/// A node id: SenML name characters (alphanumeric first, then alphanumeric or `-:._`).
pub fn node_id_ok(node: &str) -> bool {
    node.len() <= MAX_NODE_ID
        && node
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | ':' | '.' | '_'))
}

/// The pure part of intake: decode, check, filter, then feed rooms.
pub struct Pipeline {
    gateway: String,
    limits: Limits,
    filter: Filter,
    rooms: Rooms,
    status: IntakeStatus,
}

impl Pipeline {
    /// A pipeline for `gateway` with these filter settings and rooms.
    pub fn new(gateway: &str, filter: FilterConfig, assignment: &Assignment) -> Pipeline {
        Pipeline {
            gateway: gateway.to_owned(),
            limits: Limits::default(),
            filter: Filter::new(filter),
            rooms: Rooms::new(assignment),
            status: IntakeStatus::default(),
        }
    }

    /// The readings of one message worth spooling; refusals are counted, never fatal.
    ///
    /// Records without a node (`[{"n":"co2","v":612}]`) belong to the topic's node; a record
    /// naming another node than the topic is refused (`node_mismatch`).
    pub fn decode(&mut self, topic: &str, payload: &[u8], now_ms: i64) -> Vec<Reading> {
        self.status.messages += 1;
        let Some(topic_node) = topic_node(&self.gateway, topic) else {
            self.filter.count_refusal("bad_topic");
            return Vec::new();
        };
        // The node id becomes a record name prefix and the server's node key: SenML's
        // name rules apply to it too.
        if !node_id_ok(topic_node) {
            self.filter.count_refusal("bad_node_id");
            return Vec::new();
        }
        // JSON or CBOR, told apart by the first byte (`senml::Format::of`).
        let records = match senml::decode(payload, now_ms as f64 / 1000.0, &self.limits) {
            Ok(records) => records,
            Err(e) => {
                tracing::debug!(%topic, error = %e, "refused a SenML pack");
                self.filter.count_refusal(&format!("senml_{}", e.kind()));
                return Vec::new();
            }
        };
        let mut out = Vec::with_capacity(records.len());
        for mut record in records {
            if !record.name.contains([':', '/']) {
                record.name = format!("{topic_node}:{}", record.name);
            }
            let measurement = match senml::to_measurement(&record) {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(%topic, error = %e, "refused a SenML record");
                    self.filter.count_refusal(&format!("senml_{}", e.kind()));
                    continue;
                }
            };
            if measurement.node != topic_node {
                self.filter.count_refusal("node_mismatch");
                continue;
            }
            let reading = Reading::from(measurement);
            if self.filter.check(&reading).is_ok() {
                out.push(reading);
            }
        }
        out
    }

    /// Feeds spooled readings to the rooms.
    pub fn to_rooms(&mut self, readings: &[Reading]) -> Vec<RoomUpdate> {
        self.status.spooled += readings.len() as u64;
        readings
            .iter()
            .filter_map(|r| self.rooms.ingest(r))
            .collect()
    }

    /// Replaces the filter settings.
    pub fn set_filter(&mut self, config: FilterConfig) {
        self.filter.set_config(config);
    }

    /// Replaces the room assignment.
    pub fn set_rooms(&mut self, assignment: &Assignment) {
        self.rooms.replace(assignment);
    }

    /// The current state of every room.
    pub fn room_states(&self) -> Vec<(String, crate::rooms::PublishedState)> {
        self.rooms.states()
    }

    /// Counters so far.
    pub fn status(&self) -> IntakeStatus {
        let mut status = self.status.clone();
        status.filter = self.filter.stats().clone();
        status.rooms = self.rooms.stats().clone();
        status
    }

    fn spool_failed(&mut self) {
        self.status.spool_errors += 1;
    }
}

/// Everything the intake worker needs.
pub struct Worker {
    /// The pure pipeline.
    pub pipeline: Pipeline,
    /// Where readings go.
    pub spool: SharedSpool,
    /// Messages from the MQTT source.
    pub incoming: mpsc::Receiver<Incoming>,
    /// Room assignments from the server's desired twin.
    pub assignments: watch::Receiver<Assignment>,
    /// Filter settings (the configuration file's, or the desired twin's `filter`).
    pub filters: watch::Receiver<FilterConfig>,
    /// Room state and events go out here.
    pub publisher: Publisher,
    /// Tells the link how far the spool reaches (its appended position).
    pub appended: watch::Sender<u64>,
    /// Where the counters are shown.
    pub status: watch::Sender<IntakeStatus>,
}

impl Worker {
    /// Runs until shutdown or until every source is gone.
    pub async fn run(mut self, shutdown: CancellationToken) {
        self.publish_all();
        let mut batch: Vec<Incoming> = Vec::new();
        let mut assignments_open = true;
        let mut filters_open = true;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = self.filters.changed(), if filters_open => {
                    if changed.is_err() {
                        filters_open = false;
                        continue;
                    }
                    let config = self.filters.borrow_and_update().clone();
                    tracing::info!(?config, "filter settings applied");
                    self.pipeline.set_filter(config);
                }
                changed = self.assignments.changed(), if assignments_open => {
                    if changed.is_err() {
                        // The agent dropped its side: no more assignments; readings go on.
                        assignments_open = false;
                        continue;
                    }
                    let assignment = self.assignments.borrow_and_update().clone();
                    self.pipeline.set_rooms(&assignment);
                    tracing::info!(rooms = assignment.rooms.len(), "room assignment applied");
                    self.publish_all();
                }
                n = self.incoming.recv_many(&mut batch, MAX_DRAIN) => {
                    if n == 0 {
                        return;
                    }
                    self.handle(std::mem::take(&mut batch)).await;
                }
            }
            let _ = self.status.send(self.pipeline.status());
        }
    }

    async fn handle(&mut self, batch: Vec<Incoming>) {
        let now = crate::now_ms();
        let mut readings = Vec::new();
        let mut ackers = Vec::with_capacity(batch.len());
        for message in batch {
            readings.extend(self.pipeline.decode(&message.topic, &message.payload, now));
            ackers.push(message.ack);
        }
        let stored = if readings.is_empty() {
            Ok(None)
        } else {
            let spool = Arc::clone(&self.spool);
            let to_store = readings.clone();
            tokio::task::spawn_blocking(move || {
                let mut spool = spool.lock().map_err(|_| "spool lock poisoned".to_owned())?;
                let result = spool.append(&to_store).map_err(|e| e.to_string());
                for incident in spool.take_incidents() {
                    tracing::warn!(error = %incident, "spool incident");
                }
                result.map(|()| Some(spool.stats().appended_seq))
            })
            .await
            .unwrap_or_else(|e| Err(format!("spool task failed: {e}")))
        };
        match stored {
            Ok(appended) => {
                for ack in ackers {
                    ack(true);
                }
                if let Some(appended) = appended {
                    let _ = self.appended.send(appended);
                }
                let updates = self.pipeline.to_rooms(&readings);
                self.publish_batch(updates);
            }
            Err(e) => {
                tracing::error!(error = %e, readings = readings.len(), "cannot spool readings; sensors will resend");
                self.pipeline.spool_failed();
                for ack in ackers {
                    ack(false);
                }
            }
        }
    }

    fn publish(&self, update: &RoomUpdate) {
        let gateway = &self.pipeline.gateway;
        if let Ok(json) = serde_json::to_vec(&update.state) {
            (self.publisher)(&state_topic(gateway, &update.room), json, true);
        }
        for event in &update.events {
            if let Ok(json) = serde_json::to_vec(event) {
                (self.publisher)(&events_topic(gateway, &update.room), json, false);
            }
        }
    }

    /// Publishes a batch's room updates: every event, in order, and each room's latest state
    /// once (a display only shows the latest; one state per reading would flood the broker
    /// when a backlog is worked off).
    fn publish_batch(&self, updates: Vec<RoomUpdate>) {
        let gateway = &self.pipeline.gateway;
        let mut latest: Vec<(String, crate::rooms::PublishedState)> = Vec::new();
        for update in updates {
            for event in &update.events {
                if let Ok(json) = serde_json::to_vec(event) {
                    (self.publisher)(&events_topic(gateway, &update.room), json, false);
                }
            }
            match latest.iter_mut().find(|(room, _)| *room == update.room) {
                Some(slot) => slot.1 = update.state,
                None => latest.push((update.room, update.state)),
            }
        }
        for (room, state) in latest {
            if let Ok(json) = serde_json::to_vec(&state) {
                (self.publisher)(&state_topic(gateway, &room), json, true);
            }
        }
    }

    fn publish_all(&self) {
        for (room, state) in self.pipeline.room_states() {
            self.publish(&RoomUpdate {
                room,
                state,
                events: Vec::new(),
            });
        }
    }
}

/// Where an existing broker is and how to log in.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// MQTT client id; the session is persistent (clean session off), so it must be stable.
    pub client_id: String,
    /// Optional user name and password.
    pub credentials: Option<(String, String)>,
    /// The topic filter to subscribe to.
    pub filter: String,
}

/// A client of an existing broker and the publisher that goes through it.
pub fn client(settings: &ClientSettings) -> (rumqttc::AsyncClient, rumqttc::EventLoop, Publisher) {
    let mut options = rumqttc::MqttOptions::new(
        settings.client_id.clone(),
        settings.host.clone(),
        settings.port,
    );
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(senml::DEFAULT_MAX_PAYLOAD_BYTES + 1024, 256 * 1024);
    if let Some((user, password)) = &settings.credentials {
        options.set_credentials(user.clone(), password.clone());
    }
    // Room of the client's request queue: a worked-off backlog means one PUBACK per message
    // of a batch plus the batch's room states and events.
    let (client, eventloop) = rumqttc::AsyncClient::new(options, 4 * MAX_DRAIN);
    let publish_client = client.clone();
    let publisher: Publisher = Arc::new(move |topic, payload, retain| {
        match publish_client.try_publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload) {
            Ok(()) => {}
            // Still full: wait for room rather than lose a room event or state.
            Err(rumqttc::ClientError::TryRequest(rumqttc::Request::Publish(publish))) => {
                let client = publish_client.clone();
                tokio::spawn(async move {
                    let sent = client.publish(
                        publish.topic,
                        rumqttc::QoS::AtLeastOnce,
                        publish.retain,
                        publish.payload,
                    );
                    // Bounded: with the broker gone for good the message is dropped.
                    match tokio::time::timeout(Duration::from_secs(30), sent).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::debug!(error = %e, "room publish dropped"),
                        Err(_) => tracing::debug!(
                            "room publish dropped: the broker is not taking messages"
                        ),
                    }
                });
            }
            Err(e) => tracing::debug!(%topic, error = %e, "room publish dropped"),
        }
    });
    (client, eventloop, publisher)
}

/// Runs the client of an existing broker: subscribes (QoS 1, persistent session) and hands
/// every message to the intake; the PUBACK goes out only when the readings are spooled, so the
/// broker keeps (and redelivers after a reconnect) whatever the agent has not stored.
pub async fn run_client(
    settings: ClientSettings,
    client: rumqttc::AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    intake: mpsc::Sender<Incoming>,
    shutdown: CancellationToken,
) {
    use rumqttc::{Event, Packet};
    let mut logged_down = false;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = client.try_disconnect();
                return;
            }
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                tracing::info!(host = %settings.host, port = settings.port, "connected to the MQTT broker");
                logged_down = false;
                if let Err(e) =
                    client.try_subscribe(settings.filter.clone(), rumqttc::QoS::AtLeastOnce)
                {
                    tracing::warn!(error = %e, "cannot subscribe to the sensor topics");
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let acker_client = client.clone();
                let topic = publish.topic.clone();
                let payload = publish.payload.clone();
                let ack: Acker = Box::new(move |ok| {
                    // Not acknowledged: the broker redelivers after the next reconnect.
                    if ok && acker_client.try_ack(&publish).is_err() {
                        // The client's request queue is full: wait for room rather than lose it.
                        tokio::spawn(async move {
                            if let Err(e) = acker_client.ack(&publish).await {
                                tracing::debug!(error = %e, "PUBACK not sent");
                            }
                        });
                    }
                });
                if intake
                    .send(Incoming {
                        topic,
                        payload,
                        ack,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if !logged_down {
                    tracing::warn!(host = %settings.host, port = settings.port, error = %e, "MQTT broker unreachable; retrying");
                    logged_down = true;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
    }
}

/// The intake's running parts, as the agent holds them.
pub struct Running {
    /// The link's side of the spool.
    pub forwarder: crate::forward::Forwarder,
    /// The tasks, to wait for at shutdown (the spool is locked until they end).
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Where the agent shows what intake is doing.
pub struct Channels {
    /// Room assignments from the twin.
    pub assignments: watch::Receiver<Assignment>,
    /// Filter settings.
    pub filters: watch::Receiver<FilterConfig>,
    /// The counters.
    pub status: watch::Sender<IntakeStatus>,
    /// The embedded broker's bound address, once it is listening.
    pub broker_addr: watch::Sender<Option<std::net::SocketAddr>>,
}

#[cfg(test)]
impl Running {
    async fn forwarder_stats(&self) -> crate::spool::SpoolStats {
        self.forwarder.spool_stats().await
    }
}

/// Opens the spool and starts the MQTT source and the worker.
pub async fn start(
    config: &crate::AgentConfig,
    channels: Channels,
    shutdown: &CancellationToken,
) -> Result<Running, String> {
    use crate::config::MqttMode;
    let dir = config.data_dir.join("spool");
    let limits = crate::spool::SpoolLimits {
        max_bytes: config.spool_max_mb.max(2).saturating_mul(1024 * 1024),
        ..crate::spool::SpoolLimits::default()
    };
    let spool = tokio::task::spawn_blocking(move || Spool::open(&dir, limits))
        .await
        .map_err(|e| format!("opening the spool: {e}"))?
        .map_err(|e| format!("opening the spool: {e}"))?;
    let appended_now = spool.stats().appended_seq;
    let spool: SharedSpool = Arc::new(Mutex::new(spool));
    let (appended_tx, appended_rx) = watch::channel(appended_now);
    let (tx, rx) = mpsc::channel::<Incoming>(256);
    let gateway = config.gateway();
    let filter = sensor_filter(&gateway);
    let mut tasks = Vec::new();
    let publisher: Publisher = match config.mqtt_mode {
        MqttMode::Embedded => {
            let broker = crate::broker::Broker::default();
            let publisher_broker = broker.clone();
            let listen = config.mqtt_listen.clone();
            let stop = shutdown.clone();
            let addr_tx = channels.broker_addr;
            tasks.push(tokio::spawn(async move {
                let mut logged = false;
                loop {
                    match crate::broker::bind(&listen).await {
                        Ok((listener, addr)) => {
                            tracing::info!(%addr, topics = %filter, "embedded MQTT broker listening");
                            let _ = addr_tx.send(Some(addr));
                            broker.serve(listener, filter, tx, stop).await;
                            return;
                        }
                        Err(e) => {
                            if !logged {
                                tracing::error!(%listen, error = %e, "embedded MQTT broker cannot listen; retrying every 30 s");
                                logged = true;
                            }
                            tokio::select! {
                                _ = stop.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                            }
                        }
                    }
                }
            }));
            Arc::new(move |topic, payload, retain| {
                publisher_broker.publish(topic, Bytes::from(payload), retain)
            })
        }
        MqttMode::External => {
            let (host, port) = match config.mqtt_broker.rsplit_once(':') {
                Some((host, port)) => (
                    host.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned(),
                    port.parse::<u16>()
                        .map_err(|_| format!("mqtt_broker `{}`: bad port", config.mqtt_broker))?,
                ),
                None => (config.mqtt_broker.clone(), 1883),
            };
            let settings = ClientSettings {
                host,
                port,
                client_id: if config.mqtt_client_id.is_empty() {
                    format!("atrium-agent-{gateway}")
                } else {
                    config.mqtt_client_id.clone()
                },
                credentials: config
                    .mqtt_username
                    .clone()
                    .map(|u| (u, config.mqtt_password.clone().unwrap_or_default())),
                filter,
            };
            let (client, eventloop, publisher) = client(&settings);
            tasks.push(tokio::spawn(run_client(
                settings,
                client,
                eventloop,
                tx,
                shutdown.clone(),
            )));
            publisher
        }
        MqttMode::Off => {
            drop(tx);
            Arc::new(|_: &str, _: Vec<u8>, _: bool| {})
        }
    };
    let assignment = channels.assignments.borrow().clone();
    let filter = channels.filters.borrow().clone();
    let worker = Worker {
        pipeline: Pipeline::new(&gateway, filter, &assignment),
        spool: Arc::clone(&spool),
        incoming: rx,
        assignments: channels.assignments,
        filters: channels.filters,
        publisher,
        appended: appended_tx,
        status: channels.status,
    };
    tasks.push(tokio::spawn(worker.run(shutdown.clone())));
    Ok(Running {
        forwarder: crate::forward::Forwarder::new(spool, appended_rx, config.telemetry_batch),
        tasks,
    })
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod pure_tests {
    use super::*;

    #[test]
    fn topics() {
        assert_eq!(
            topic_node("gw", "atrium/gw/nodes/desk-1/senml"),
            Some("desk-1")
        );
        for bad in [
            "atrium/other/nodes/desk-1/senml",
            "atrium/gw/nodes//senml",
            "atrium/gw/nodes/a/b/senml",
            "atrium/gw/nodes/a/senml/x",
            "atrium/gw/rooms/a/state",
        ] {
            assert_eq!(topic_node("gw", bad), None, "{bad}");
        }
        assert_eq!(sensor_filter("gw"), "atrium/gw/nodes/+/senml");
        assert_eq!(state_topic("gw", "r1"), "atrium/gw/rooms/r1/state");
    }

    #[test]
    fn decode_counts_every_refusal() {
        let mut p = Pipeline::new("gw", FilterConfig::default(), &Assignment::default());
        let now = 1_700_000_000_000;
        let topic = "atrium/gw/nodes/n1/senml";
        // Bare names belong to the topic's node; full names must match it.
        let ok =
            br#"[{"bn":"n1:","n":"co2","u":"ppm","v":600},{"n":"temperature","u":"Cel","v":21.5}]"#;
        let got = p.decode(topic, ok, now);
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|r| r.node == "n1"));
        let cases: &[(&str, &[u8], &str)] = &[
            ("atrium/gw/nodes/n1/x", b"[]", "bad_topic"),
            (topic, b"not json", "senml_json"),
            (topic, &[0x81, 0xa1, 0x00], "senml_cbor"),
            (
                "atrium/gw/nodes/bad node/senml",
                br#"[{"n":"co2","u":"ppm","v":600}]"#,
                "bad_node_id",
            ),
            (
                topic,
                br#"[{"n":"n1:co2","u":"ppm","v":-5}]"#,
                "senml_out_of_range",
            ),
            (
                topic,
                br#"[{"n":"n1:co2","u":"K","v":5}]"#,
                "senml_unsupported_unit",
            ),
            (
                topic,
                br#"[{"n":"n1:smell","v":5}]"#,
                "senml_unknown_quantity",
            ),
            (
                topic,
                br#"[{"n":"n2:co2","u":"ppm","v":700}]"#,
                "node_mismatch",
            ),
            (
                topic,
                br#"[{"n":"n1:co2","u":"ppm","v":601,"t":1700000010}]"#,
                "deadband",
            ),
        ];
        for (topic, payload, reason) in cases {
            let before = p.status().filter.refused.get(*reason).copied().unwrap_or(0);
            assert!(p.decode(topic, payload, now + 1).is_empty(), "{reason}");
            let after = p.status().filter.refused.get(*reason).copied().unwrap_or(0);
            assert_eq!(after, before + 1, "{reason}: {:?}", p.status().filter);
        }
    }
}
