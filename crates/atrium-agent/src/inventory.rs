//! What the agent reports about its gateway: identity attributes and inventory.

use std::collections::BTreeMap;

use sysinfo::{Disks, Networks, System};

/// Inventory attributes: OS, kernel, agent version, addresses, memory, disk, uptime.
pub fn collect() -> BTreeMap<String, String> {
    let mut attrs = BTreeMap::new();
    attrs.insert("agent_version".into(), env!("CARGO_PKG_VERSION").into());
    if let Some(os) = System::long_os_version() {
        attrs.insert("os".into(), os);
    }
    if let Some(kernel) = System::kernel_version() {
        attrs.insert("kernel".into(), kernel);
    }
    attrs.insert("arch".into(), std::env::consts::ARCH.into());
    if let Some(host) = System::host_name() {
        attrs.insert("hostname".into(), host);
    }
    attrs.insert("uptime_s".into(), System::uptime().to_string());

    let mut system = System::new();
    system.refresh_memory();
    attrs.insert(
        "memory_total_kb".into(),
        (system.total_memory() / 1024).to_string(),
    );
    attrs.insert(
        "memory_available_kb".into(),
        (system.available_memory() / 1024).to_string(),
    );

    let disks = Disks::new_with_refreshed_list();
    if let Some(root) = disks
        .list()
        .iter()
        .find(|d| d.mount_point() == std::path::Path::new("/"))
    {
        attrs.insert(
            "disk_root_total_kb".into(),
            (root.total_space() / 1024).to_string(),
        );
        attrs.insert(
            "disk_root_available_kb".into(),
            (root.available_space() / 1024).to_string(),
        );
    }

    let networks = Networks::new_with_refreshed_list();
    let mut addresses: Vec<String> = networks
        .iter()
        .filter(|(name, _)| name.as_str() != "lo")
        .flat_map(|(name, data)| {
            data.ip_networks()
                .iter()
                .map(move |ip| format!("{name}:{}/{}", ip.addr, ip.prefix))
        })
        .collect();
    addresses.sort();
    attrs.insert("addresses".into(), addresses.join(" "));
    attrs
}

/// Everything the agent reports: [`collect`] and [`software`].
pub fn report(settings: &crate::update::Settings) -> BTreeMap<String, String> {
    let mut attrs = collect();
    attrs.extend(software(settings));
    attrs
}

/// The software attributes the server picks artifacts by: `device_type`, the installed
/// `artifact_name` (and `artifact_group`), and the installed artifact's provides
/// (`rootfs-image.version`, ...), as Mender's inventory has them.
pub fn software(settings: &crate::update::Settings) -> BTreeMap<String, String> {
    let mut attrs = BTreeMap::new();
    attrs.insert("device_type".into(), settings.device_type.clone());
    match settings.installed() {
        Ok(installed) => {
            attrs.extend(installed.provides);
            attrs.insert("artifact_name".into(), installed.artifact_name);
            if let Some(group) = installed.artifact_group {
                attrs.insert("artifact_group".into(), group);
            }
        }
        Err(e) => tracing::warn!("inventory without the installed artifact: {e}"),
    }
    attrs
}

/// Attributes that change by themselves all the time and so do not make inventory "changed".
pub const VOLATILE: &[&str] = &["uptime_s", "memory_available_kb", "disk_root_available_kb"];

/// Whether two inventories differ in anything but volatile attributes.
pub fn changed(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> bool {
    let stable = |m: &BTreeMap<String, String>| {
        m.iter()
            .filter(|(k, _)| !VOLATILE.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    stable(old) != stable(new)
}

/// The first non-loopback MAC address, lowercase with colons.
pub fn primary_mac() -> Option<String> {
    let networks = Networks::new_with_refreshed_list();
    let mut macs: Vec<(String, String)> = networks
        .iter()
        .filter(|(name, _)| name.as_str() != "lo")
        .map(|(name, data)| {
            (
                name.clone(),
                data.mac_address().to_string().to_ascii_lowercase(),
            )
        })
        .filter(|(_, mac)| mac != "00:00:00:00:00:00")
        .collect();
    macs.sort();
    macs.into_iter().next().map(|(_, mac)| mac)
}

/// The hardware serial from DMI, else the machine id.
pub fn hardware_serial() -> Option<String> {
    ["/sys/class/dmi/id/product_serial", "/etc/machine-id"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .find(|s| !s.is_empty() && s != "None" && !s.contains("O.E.M"))
}

/// The hardware model from DMI or the device tree.
pub fn hardware_model() -> Option<String> {
    ["/sys/class/dmi/id/product_name", "/proc/device-tree/model"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| {
            s.trim_matches(|c: char| c.is_whitespace() || c == '\0')
                .to_owned()
        })
        .find(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_has_the_documented_attributes() {
        let inv = collect();
        for key in [
            "agent_version",
            "os",
            "kernel",
            "uptime_s",
            "memory_total_kb",
            "addresses",
        ] {
            assert!(inv.contains_key(key), "missing {key}: {inv:?}");
        }
    }

    #[test]
    fn software_is_the_device_type_and_the_installed_artifact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let info = dir.path().join("artifact_info");
        std::fs::write(&info, "artifact_name=factory-1\n").expect("info");
        let settings = crate::update::Settings {
            data_dir: dir.path().join("data"),
            device_type: "gw-x".into(),
            update: crate::update::UpdateConfig {
                artifact_info: info,
                ..Default::default()
            },
        };
        let soft = software(&settings);
        assert_eq!(soft.get("device_type").map(String::as_str), Some("gw-x"));
        assert_eq!(
            soft.get("artifact_name").map(String::as_str),
            Some("factory-1")
        );
        let installed = crate::update::state::Provides {
            artifact_name: "release-2".into(),
            artifact_group: Some("beta".into()),
            provides: [("rootfs-image.version".into(), "release-2".into())].into(),
        };
        crate::update::state::write_json(&dir.path().join("data/update/provides.json"), &installed)
            .expect("provides");
        let all = report(&settings);
        for (key, value) in [
            ("artifact_name", "release-2"),
            ("artifact_group", "beta"),
            ("rootfs-image.version", "release-2"),
            ("device_type", "gw-x"),
        ] {
            assert_eq!(all.get(key).map(String::as_str), Some(value), "{key}");
        }
        assert!(all.contains_key("agent_version"));
    }

    #[test]
    fn volatile_attributes_do_not_count_as_change() {
        let mut a = BTreeMap::from([
            ("os".to_owned(), "x".to_owned()),
            ("uptime_s".into(), "1".into()),
        ]);
        let mut b = a.clone();
        b.insert("uptime_s".into(), "2".into());
        assert!(!changed(&a, &b));
        a.insert("os".into(), "y".into());
        assert!(changed(&a, &b));
    }
}
