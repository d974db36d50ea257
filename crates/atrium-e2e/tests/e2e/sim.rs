//! The rooms engine scored over the real sensor path: simulated rooms publish SenML to the
//! Mosquitto at 127.0.0.1:1883 (or `ATRIUM_TEST_MQTT`), a real gateway agent subscribed to
//! it runs the rooms engine, and the room states and events a display receives are compared
//! with the simulator's ground truth. A shorter run of `atrium rooms simulate --score`; the
//! targets are the product's.

use atrium::simscore::{ScoreOptions, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_rooms_meet_the_latency_and_prediction_targets() {
    let broker = std::env::var("ATRIUM_TEST_MQTT").unwrap_or_else(|_| "127.0.0.1:1883".into());
    let opts = ScoreOptions {
        broker: broker.clone(),
        rooms: 6,
        days: 1,
        seed: 7,
        ..ScoreOptions::default()
    };
    let score = match run(&opts).await {
        Ok(score) => score,
        Err(e) => panic!(
            "the simulation needs the Mosquitto at {broker} (set ATRIUM_TEST_MQTT to use \
             another): {e:#}"
        ),
    };
    for line in score.lines() {
        eprintln!("{line}");
    }
    let arrivals = score
        .meetings
        .iter()
        .filter(|m| m.arrival_s.is_some())
        .count();
    let departures = score
        .meetings
        .iter()
        .filter(|m| m.departure_s.is_some())
        .count();
    assert!(
        arrivals >= 20 && departures >= 20,
        "too few meetings scored"
    );
    assert!(
        score.prediction_errors_min.len() >= 100,
        "too few predictions scored"
    );

    let arrival = score.arrival_latency_median_s();
    assert!(arrival < 30.0, "median arrival latency {arrival} s");
    let departure = score.departure_latency_median_s();
    assert!(
        departure <= score.hold_s + 60.0,
        "median departure latency {departure} s, hold {} s",
        score.hold_s
    );
    let prediction = score.time_to_1000ppm_error_median_min();
    assert!(
        prediction < 5.0,
        "median time-to-1000-ppm error {prediction} min"
    );
}
