//! Measures how many CSR verify + device certificate issue operations one core does per second.
//!
//! `cargo run --release -p atrium-pki --example csr_throughput`

use std::time::{Duration, Instant};

use atrium_pki::{CertificateAuthority, DeviceKey, FileKey, verify_csr};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("atrium-pki-bench-{}", std::process::id()));
    let ca = CertificateAuthority::load_or_create(&dir, "Bench")?;
    let csrs = (0..256)
        .map(|i| FileKey::generate()?.csr_der(&format!("gw-{i}")))
        .collect::<Result<Vec<_>, _>>()?;

    let run = |budget: Duration| -> Result<(u64, Duration, u64, Duration), atrium_pki::PkiError> {
        let (mut n, mut verify_only) = (0u64, Duration::ZERO);
        let start = Instant::now();
        while start.elapsed() < budget {
            let csr_der = &csrs[n as usize % csrs.len()];
            let t = Instant::now();
            let csr = verify_csr(std::hint::black_box(csr_der))?;
            verify_only += t.elapsed();
            let issued = ca.issue_device_cert(&csr, "gw-bench", Duration::from_secs(7 * 86400))?;
            std::hint::black_box(issued);
            n += 1;
        }
        Ok((n, start.elapsed(), n, verify_only))
    };
    run(Duration::from_millis(300))?; // warm-up
    let (n, total, nv, verify) = run(Duration::from_secs(3))?;
    println!(
        "verify_csr + issue_device_cert: {:.0} ops/s on one core ({} ops in {:.2?}); verify_csr alone: {:.0} ops/s",
        n as f64 / total.as_secs_f64(),
        n,
        total,
        nv as f64 / verify.as_secs_f64(),
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
