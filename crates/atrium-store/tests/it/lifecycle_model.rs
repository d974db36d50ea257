//! Property: any sequence of lifecycle operations leaves the store where a pure model of the
//! state machine says it should be (SQLite; a handful of cases, each on a fresh database).

use std::collections::BTreeMap;

use atrium_store::{
    AuditQuery, DeviceQuery, DeviceStatus, DeviceUpdate, DeviceWrite, EnrollmentWrite, StoreError,
};
use proptest::prelude::*;

use crate::support::{T0, TestDb, cert, enrollment, fp, identity, op};

const DEVICES: u64 = 3;

#[derive(Clone, Debug)]
enum Op {
    /// An operator sets a status.
    SetStatus(u64, DeviceStatus),
    /// A certificate renewal.
    Renew(u64),
    /// The device enrolls again with its key, asking for a status.
    Reenroll(u64, DeviceStatus),
    /// A brand-new enrollment with the device's key.
    EnrollAgain(u64),
}

fn status() -> impl Strategy<Value = DeviceStatus> {
    prop::sample::select(DeviceStatus::ALL.to_vec())
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..DEVICES, status()).prop_map(|(d, s)| Op::SetStatus(d, s)),
        2 => (0..DEVICES).prop_map(Op::Renew),
        1 => (0..DEVICES, status()).prop_map(|(d, s)| Op::Reenroll(d, s)),
        1 => (0..DEVICES).prop_map(Op::EnrollAgain),
    ]
}

/// The pure model: per device its status and its certificates' revoked flags.
#[derive(Clone, Debug, Default)]
struct Model {
    status: BTreeMap<u64, DeviceStatus>,
    certs: BTreeMap<u64, Vec<bool>>,
    audited: usize,
}

impl Model {
    fn cut_off(&mut self, d: u64) {
        for revoked in self.certs.entry(d).or_default() {
            *revoked = true;
        }
    }

    /// Applies `op`; returns whether it should succeed.
    fn apply(&mut self, op: &Op) -> bool {
        match *op {
            Op::SetStatus(d, to) => {
                let from = self.status[&d];
                if !from.can_transition_to(to) {
                    return false;
                }
                self.status.insert(d, to);
                if to.cuts_off() {
                    self.cut_off(d);
                }
                self.audited += 1;
                true
            }
            Op::Renew(d) => {
                if self.status[&d] != DeviceStatus::Accepted {
                    return false;
                }
                self.certs.entry(d).or_default().push(false);
                self.audited += 1;
                true
            }
            Op::Reenroll(d, to) => {
                let from = self.status[&d];
                if from == DeviceStatus::Decommissioned
                    || (from != to && !from.can_transition_to(to))
                {
                    return false;
                }
                self.status.insert(d, to);
                if from != to && to.cuts_off() {
                    self.cut_off(d);
                }
                self.audited += 1;
                true
            }
            Op::EnrollAgain(_) => false,
        }
    }
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let db = TestDb::sqlite().await;
    let s = &db.store;
    let mut model = Model::default();
    let batch: Vec<EnrollmentWrite> = (0..DEVICES).map(|d| enrollment(d, false)).collect();
    for r in s.enroll_batch(&batch).await.expect("initial enrollments") {
        r.expect("initial enrollment");
    }
    for d in 0..DEVICES {
        model.status.insert(d, DeviceStatus::Pending);
        model.audited += 1;
    }
    let id = |d: u64| format!("dev-{d:06}");
    let mut serial = 0;
    for (step, op) in ops.iter().enumerate() {
        let t = T0 + 1_000 + step as i64;
        let expect_ok = model.apply(op);
        let result: Result<(), StoreError> = match *op {
            Op::SetStatus(d, to) => s
                .set_device_status(&id(d), to, "prop", op_entry("device.status", &id(d), t))
                .await
                .map(|_| ()),
            Op::Renew(d) => {
                serial += 1;
                s.record_certificate(
                    &cert(&format!("{serial:x}"), &id(d), t),
                    op_entry("certificate.issue", &id(d), t),
                )
                .await
            }
            Op::Reenroll(d, to) => {
                let w = EnrollmentWrite {
                    device: DeviceWrite::Update(DeviceUpdate {
                        key_fingerprint: fp(d),
                        identity: identity(d),
                        status: to,
                        status_reason: "re-enroll".into(),
                        enrollment: None,
                        add_tags: BTreeMap::new(),
                        now_ms: t,
                    }),
                    certificate: None,
                    consumed_preauthorization: None,
                    audit: vec![op_entry("device.enroll", &id(d), t)],
                };
                s.enroll_batch(&[w])
                    .await
                    .expect("batch")
                    .remove(0)
                    .map(|_| ())
            }
            Op::EnrollAgain(d) => {
                let mut w = enrollment(d, false);
                if let DeviceWrite::Insert(n) = &mut w.device {
                    n.id = format!("again-{step}");
                }
                s.enroll_batch(&[w])
                    .await
                    .expect("batch")
                    .remove(0)
                    .map(|_| ())
            }
        };
        match (&result, expect_ok) {
            (Ok(()), true) => {}
            (
                Err(
                    StoreError::InvalidTransition { .. }
                    | StoreError::KeyDecommissioned { .. }
                    | StoreError::Conflict(_),
                ),
                false,
            ) => {}
            _ => prop_assert!(
                false,
                "step {step} {op:?}: store said {result:?}, model expected ok={expect_ok}"
            ),
        }
    }
    // The whole store agrees with the model.
    let devices = s.list_devices(&DeviceQuery::default()).await.expect("list");
    prop_assert_eq!(devices.len() as u64, DEVICES);
    for d in 0..DEVICES {
        let dev = s.device(&id(d)).await.expect("device").expect("exists");
        prop_assert_eq!(dev.status, model.status[&d], "device {}", d);
        let certs: Vec<bool> = s
            .device_certificates(&id(d))
            .await
            .expect("certs")
            .iter()
            .map(|c| c.revoked)
            .collect();
        let expected = model.certs.get(&d).cloned().unwrap_or_default();
        prop_assert_eq!(&certs, &expected, "device {}", d);
        if dev.status != DeviceStatus::Accepted {
            prop_assert!(
                certs.iter().all(|r| *r),
                "device {} is {} with a valid certificate",
                d,
                dev.status
            );
        }
    }
    let audit = s
        .audit(&AuditQuery {
            limit: 10_000,
            ..AuditQuery::default()
        })
        .await
        .expect("audit");
    prop_assert_eq!(audit.len(), model.audited);
    Ok(())
}

fn op_entry(action: &str, target: &str, t: i64) -> atrium_store::NewAuditEntry {
    op(action, target, t)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn lifecycle_matches_the_model(ops in prop::collection::vec(op_strategy(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(run(ops))?;
    }
}
