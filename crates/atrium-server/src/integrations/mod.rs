//! Keeping an external device registry in step with Atrium's device lifecycle and twins.
//!
//! An integration is one implementation of the small [`DeviceRegistry`] trait: it is told
//! the current state of a device ([`RegistryChange::Upsert`]: create or update it there,
//! enabled while the device is accepted, disabled while it is rejected, with its desired and
//! reported twin) or that the device is gone ([`RegistryChange::Delete`]: decommissioned).
//! Two implementations ship: [`http::HttpRegistry`] (signed HTTP calls to a registry behind a
//! webhook) and [`mqtt::MqttBridge`] (retained device topics on an external MQTT broker, which
//! also mirrors live events and room state).
//!
//! The [`drive`] loop feeds an integration from the audit log through a durable cursor kept
//! per integration in the store: for each batch of audited device and twin changes it reads
//! every touched device's *current* state and applies it, retrying with backoff while the
//! outside system is unreachable, and moves the cursor only after the whole batch was taken.
//! Changes are therefore delivered at least once and in order per device, survive restarts
//! and outages, and a new integration starts by replaying the whole log (a full sync). An
//! integration can also ask for a full resync at any time (the MQTT bridge does after its
//! broker lost state, i.e. on every new connection).
//!
//! Adding a cloud registry (Azure IoT Hub, AWS IoT) means one more implementation of
//! [`DeviceRegistry`] mapping `Upsert` to "create or update the device identity, set its status
//! and twin tags" and `Delete` to "delete the device identity", plus a variant in
//! [`crate::config::IntegrationConfig`]; see `docs/INTEGRATIONS.md`.

pub mod http;
pub mod mqtt;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use atrium_store::{Device, DeviceQuery, DeviceStatus, Store, StoreError};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::now_ms;

/// How often the driver looks for new audit entries when it is caught up.
const POLL: Duration = Duration::from_millis(250);
/// Audit entries read per step.
const BATCH: u32 = 500;
/// Longest wait between retries of a failing registry.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A device as an external registry sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegistryDevice {
    /// Atrium's device id (the registry's device id too).
    pub id: String,
    /// Atrium's lifecycle status: `accepted` or `rejected` (pending devices are not mirrored).
    pub status: String,
    /// Whether the device may connect: true while accepted.
    pub enabled: bool,
    /// Identity attributes.
    pub device_type: String,
    /// Factory serial number.
    pub serial: String,
    /// Primary MAC address.
    pub mac: String,
    /// Whether the device holds a link to the server.
    pub connected: bool,
    /// Operator tags.
    pub tags: BTreeMap<String, String>,
    /// Inventory attributes the agent reported.
    pub inventory: BTreeMap<String, String>,
    /// The desired twin.
    pub desired: TwinSection,
    /// The reported twin.
    pub reported: TwinSection,
    /// When this state was read (Unix ms).
    pub synced_ms: i64,
}

/// One twin section as mirrored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TwinSection {
    /// Version (0: never written).
    pub version: i64,
    /// The document.
    pub doc: serde_json::Value,
}

/// What an external registry must do for one device.
#[derive(Debug, Clone, PartialEq)]
pub enum RegistryChange {
    /// Create or update the device with this state.
    Upsert(Box<RegistryDevice>),
    /// The device was decommissioned: remove it (a registry that cannot delete disables it).
    Delete {
        /// The device.
        device_id: String,
    },
}

impl RegistryChange {
    /// The device the change is about.
    pub fn device_id(&self) -> &str {
        match self {
            RegistryChange::Upsert(d) => &d.id,
            RegistryChange::Delete { device_id } => device_id,
        }
    }
}

/// Why a registry did not take a change.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Worth retrying: unreachable, overloaded, timed out.
    #[error("{0} (will retry)")]
    Retry(String),
    /// Retrying will not help (the registry refuses this change); it is logged and skipped.
    #[error("{0}")]
    Refused(String),
}

/// An external device registry kept in step with Atrium.
pub trait DeviceRegistry: Send + Sync + 'static {
    /// A short name for logs, the status API and the cursor in the store.
    fn name(&self) -> &str;

    /// Applies one change. Must be idempotent: the same change may come more than once.
    fn apply(
        &self,
        change: &RegistryChange,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;
}

/// The state of a device, as the change a registry must apply, or `None` when the device is
/// not (yet) mirrored: pending devices and ids that are not devices.
pub async fn change_for(
    store: &Store,
    device_id: &str,
) -> Result<Option<RegistryChange>, StoreError> {
    let Some(device) = store.device(device_id).await? else {
        return Ok(None);
    };
    if device.status == DeviceStatus::Pending {
        return Ok(None);
    }
    if device.status == DeviceStatus::Decommissioned {
        return Ok(Some(RegistryChange::Delete {
            device_id: device.id,
        }));
    }
    let twin = store.twin(device_id).await?;
    Ok(Some(RegistryChange::Upsert(Box::new(registry_device(
        device,
        &twin.desired,
        &twin.reported,
    )))))
}

fn registry_device(
    device: Device,
    desired: &atrium_store::StoredSection,
    reported: &atrium_store::StoredSection,
) -> RegistryDevice {
    let section = |s: &atrium_store::StoredSection| TwinSection {
        version: s.version,
        doc: serde_json::from_str(&s.doc).unwrap_or_else(|_| serde_json::json!({})),
    };
    RegistryDevice {
        status: device.status.as_str().to_owned(),
        enabled: device.status == DeviceStatus::Accepted,
        device_type: device.identity.device_type,
        serial: device.identity.serial,
        mac: device.identity.mac,
        connected: device.connected,
        tags: device.tags,
        inventory: device.inventory,
        desired: section(desired),
        reported: section(reported),
        synced_ms: now_ms(),
        id: device.id,
    }
}

/// What operators see of an integration (`GET /api/v1/integrations`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct IntegrationStatus {
    /// Its name.
    pub name: String,
    /// `http` or `mqtt`.
    pub kind: String,
    /// The audit sequence number it has taken every change up to.
    pub cursor: i64,
    /// Changes applied since this node started.
    pub applied: u64,
    /// Changes the registry refused (logged and skipped) since this node started.
    pub refused: u64,
    /// The last failure, until the next success.
    pub last_error: Option<String>,
    /// When a change was last applied (Unix ms).
    pub last_success_ms: Option<i64>,
}

/// Shared between an integration's driver, its implementation and the API.
pub struct Handle {
    status: Mutex<IntegrationStatus>,
    resync: AtomicBool,
}

impl Handle {
    /// A handle for an integration that has not run yet.
    pub fn new(name: &str, kind: &str) -> Arc<Self> {
        Arc::new(Handle {
            status: Mutex::new(IntegrationStatus {
                name: name.to_owned(),
                kind: kind.to_owned(),
                ..IntegrationStatus::default()
            }),
            resync: AtomicBool::new(false),
        })
    }

    /// A snapshot of the status.
    pub fn status(&self) -> IntegrationStatus {
        self.lock().clone()
    }

    /// Asks the driver to apply every device's current state once more.
    pub fn request_resync(&self) {
        self.resync.store(true, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, IntegrationStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, outcome: &Result<(), RegistryError>) {
        let mut s = self.lock();
        match outcome {
            Ok(()) => {
                s.applied += 1;
                s.last_error = None;
                s.last_success_ms = Some(now_ms());
            }
            Err(RegistryError::Refused(e)) => {
                s.refused += 1;
                s.last_error = Some(e.clone());
            }
            Err(RegistryError::Retry(e)) => s.last_error = Some(e.clone()),
        }
    }
}

/// Feeds `registry` from the audit log until `shutdown`.
pub async fn drive<R: DeviceRegistry>(
    store: Store,
    registry: Arc<R>,
    handle: Arc<Handle>,
    shutdown: CancellationToken,
) {
    loop {
        let progressed = if handle.resync.swap(false, Ordering::SeqCst) {
            resync(&store, &*registry, &handle, &shutdown).await
        } else {
            step(&store, &*registry, &handle, &shutdown).await
        };
        match progressed {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(integration = registry.name(), error = %e, "integration step failed");
                handle.lock().last_error = Some(e.to_string());
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// One batch of the audit log; `Ok(true)` when it moved (more may be waiting).
async fn step<R: DeviceRegistry>(
    store: &Store,
    registry: &R,
    handle: &Handle,
    shutdown: &CancellationToken,
) -> Result<bool, StoreError> {
    let from = store.integration_cursor(registry.name()).await?;
    let (events, last) = crate::events::audited_since(store, from, BATCH).await?;
    if last == from {
        return Ok(false);
    }
    // Each touched device once, in the order of its latest change in the batch.
    let mut touched: Vec<&str> = Vec::new();
    for id in events.iter().filter_map(|e| e.device_id()) {
        touched.retain(|t| *t != id);
        touched.push(id);
    }
    for device_id in touched {
        if let Some(change) = change_for(store, device_id).await?
            && !apply_until_taken(registry, handle, &change, shutdown).await
        {
            return Ok(false);
        }
    }
    let moved = store
        .move_integration_cursor(registry.name(), from, last)
        .await?;
    handle.lock().cursor = if moved { last } else { from };
    Ok(moved)
}

/// Applies every device's current state (pages of the device list).
async fn resync<R: DeviceRegistry>(
    store: &Store,
    registry: &R,
    handle: &Handle,
    shutdown: &CancellationToken,
) -> Result<bool, StoreError> {
    tracing::info!(
        integration = registry.name(),
        "resynchronising every device"
    );
    let mut offset = 0;
    loop {
        let page = store
            .list_devices(&DeviceQuery {
                status: None,
                limit: 1000,
                offset,
            })
            .await?;
        for device in &page {
            if let Some(change) = change_for(store, &device.id).await?
                && !apply_until_taken(registry, handle, &change, shutdown).await
            {
                // Shutting down: the next start resyncs through the cursor anyway.
                return Ok(false);
            }
        }
        if page.len() < 1000 {
            return Ok(true);
        }
        offset += 1000;
    }
}

/// Applies `change`, retrying with backoff while the registry asks for it; false when the
/// node shuts down first. A refused change is logged and counts as taken.
async fn apply_until_taken<R: DeviceRegistry>(
    registry: &R,
    handle: &Handle,
    change: &RegistryChange,
    shutdown: &CancellationToken,
) -> bool {
    let mut backoff = Duration::from_millis(500);
    loop {
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return false,
            r = registry.apply(change) => r,
        };
        handle.record(&outcome);
        match outcome {
            Ok(()) => return true,
            Err(RegistryError::Refused(e)) => {
                tracing::error!(integration = registry.name(), device = change.device_id(), error = %e, "registry refused a change; skipped");
                return true;
            }
            Err(RegistryError::Retry(e)) => {
                tracing::warn!(integration = registry.name(), device = change.device_id(), error = %e, retry_in_ms = backoff.as_millis() as u64, "registry change not taken");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
