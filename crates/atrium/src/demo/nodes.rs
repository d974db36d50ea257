//! Simulated sensor nodes: each room's node steps its room simulation along the demo clock
//! and publishes every reporting period as a SenML pack over MQTT (QoS 1) to its gateway's
//! broker, on `atrium/<gateway>/nodes/<node>/senml`, as real firmware does (docs/SENSORS.md).

use std::net::SocketAddr;
use std::time::Duration;

use atrium_proto::senml::{self, Record, Value};
use atrium_rooms::sim::RoomSim;
use atrium_rooms::{Reading, SensorKind};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

use super::DemoClock;

/// The SenML quantity name and unit of a simulated reading.
fn quantity(kind: SensorKind) -> (&'static str, Option<&'static str>) {
    match kind {
        SensorKind::Co2 => ("co2", Some("ppm")),
        SensorKind::Temperature => ("temperature", Some("Cel")),
        SensorKind::Humidity => ("humidity", Some("%RH")),
        SensorKind::Light => ("light", Some("lx")),
        SensorKind::Motion => ("motion", None),
        SensorKind::Door => ("door", None),
        SensorKind::PeopleCount => ("people", Some("count")),
        SensorKind::Sound => ("sound", Some("dB")),
    }
}

/// One SenML pack of a node's readings, with absolute times.
pub fn senml_pack(node: &str, readings: &[Reading]) -> Vec<u8> {
    let records: Vec<Record> = readings
        .iter()
        .map(|r| {
            let (name, unit) = quantity(r.sensor);
            Record {
                name: format!("{node}:{name}"),
                unit: unit.map(str::to_owned),
                value: Some(Value::Number(r.value)),
                sum: None,
                time_s: r.time_ms as f64 / 1000.0,
                update_time_s: None,
            }
        })
        .collect();
    senml::encode_json(&records)
}

/// The MQTT topic a node publishes to.
pub fn topic(gateway: &str, node: &str) -> String {
    format!("atrium/{gateway}/nodes/{node}/senml")
}

/// Runs one node until `shutdown`: connects to `broker` (and reconnects), publishes each
/// simulated period once it has passed on the demo clock.
pub async fn run(
    node: String,
    gateway: String,
    broker: SocketAddr,
    mut sim: RoomSim,
    clock: DemoClock,
    shutdown: CancellationToken,
) {
    let mut options = MqttOptions::new(node.clone(), broker.ip().to_string(), broker.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let stop = shutdown.clone();
    let name = node.clone();
    // The event loop carries the publishes out and resends unacknowledged ones after a
    // reconnect; it has to be polled for anything to happen.
    let driver = tokio::spawn(async move {
        let mut down = false;
        loop {
            let event = tokio::select! {
                event = eventloop.poll() => event,
                _ = stop.cancelled() => return,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => down = false,
                Ok(_) => {}
                // The gateways stop with the demo: not worth a warning.
                Err(_) if stop.is_cancelled() => return,
                Err(e) => {
                    if !down {
                        tracing::warn!(node = %name, error = %e, "sensor node lost its broker; retrying");
                        down = true;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
    });
    let topic = topic(&gateway, &node);
    'periods: loop {
        let period_end = sim.next_time_ms() + sim.period_ms();
        let wait = clock.wall_until(period_end);
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => break,
            }
            continue;
        }
        for step in sim.step_until(clock.now_ms()) {
            let payload = senml_pack(&node, &step.readings);
            let sent = tokio::select! {
                sent = client.publish(topic.clone(), QoS::AtLeastOnce, false, payload) => sent,
                _ = shutdown.cancelled() => break 'periods,
            };
            if sent.is_err() {
                // The event loop is gone: only at shutdown.
                break 'periods;
            }
        }
    }
    let _ = client.try_disconnect();
    let _ = driver.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_decode_back_to_the_readings() {
        let readings = [
            Reading::new(1_764_000_000_123, SensorKind::Motion, 1.0),
            Reading::new(1_764_000_001_000, SensorKind::Door, 1.0),
            Reading::new(1_764_000_027_000, SensorKind::Co2, 815.0),
            Reading::new(1_764_000_027_000, SensorKind::Temperature, 21.43),
            Reading::new(1_764_000_027_000, SensorKind::Humidity, 47.2),
            Reading::new(1_764_000_027_000, SensorKind::Light, 412.0),
            Reading::new(1_764_000_027_000, SensorKind::PeopleCount, 3.0),
        ];
        let pack = senml_pack("hq-1-blue", &readings);
        let records =
            senml::decode_json(&pack, 0.0, &senml::Limits::default()).expect("valid SenML");
        assert_eq!(records.len(), readings.len());
        for (record, reading) in records.iter().zip(&readings) {
            let m = senml::to_measurement(record).expect("a known quantity and unit");
            assert_eq!(m.node, "hq-1-blue");
            assert_eq!(m.time_ms, reading.time_ms);
            assert!((m.value - reading.value).abs() < 1e-9);
            assert_eq!(quantity(reading.sensor).0, m.quantity.as_str());
        }
        assert_eq!(
            topic("hq-floor-1", "hq-1-blue"),
            "atrium/hq-floor-1/nodes/hq-1-blue/senml"
        );
    }
}
