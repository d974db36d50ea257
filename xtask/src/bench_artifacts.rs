//! `cargo xtask bench artifacts`: artifact downloads by many concurrent HTTPS clients, from the
//! server's device download path (a signed link) and from nginx serving the same file over TLS.
//!
//! The release `atrium` server runs as a child process; the bench writes an uncompressed
//! artifact of random bytes with `atrium artifact write`, uploads it, and mints a signed link.
//! nginx (Debian's, installed when missing) serves the same file over TLS 1.3 with a
//! certificate from the server's own CA (same key type, same chain), two workers (one per
//! core) and sendfile. One client program measures both: `clients` concurrent HTTP/1.1
//! connections each downloading the file again and again; the bytes received during a fixed
//! window after a warm-up, divided by the window, is the throughput. Rounds alternate between
//! the two servers and the medians are printed as `name: value unit` lines.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use rustls::pki_types::CertificateDer;

use crate::bench_identity::{Server, build_release, free_port};

/// What to measure.
pub struct Options {
    pub clients: usize,
    pub megabytes: usize,
    pub seconds: u64,
    pub warmup: u64,
    pub rounds: usize,
    pub server_bin: Option<PathBuf>,
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    let server_bin = match &opts.server_bin {
        Some(bin) => bin.clone(),
        None => build_release("atrium", "atrium")?,
    };
    ensure_nginx()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(bench(&server_bin, &opts))
}

fn ensure_nginx() -> anyhow::Result<()> {
    if Path::new("/usr/sbin/nginx").exists() {
        return Ok(());
    }
    eprintln!("# installing nginx-light from Debian");
    let status = std::process::Command::new("apt-get")
        .args(["install", "-y", "-q", "nginx-light"])
        .status()
        .context("running apt-get")?;
    ensure!(
        status.success() && Path::new("/usr/sbin/nginx").exists(),
        "installing nginx-light failed (run apt-get update first?)"
    );
    Ok(())
}

async fn bench(server_bin: &Path, opts: &Options) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("atrium-bench-artifacts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).context("bench directory")?;
    let result = async {
        let payload = dir.join("rootfs.img");
        write_random(&payload, opts.megabytes)?;
        let artifact = dir.join("bench.mender");
        let status = std::process::Command::new(server_bin)
            .args(["artifact", "write", "rootfs-image", "-f"])
            .arg(&payload)
            .args(["-n", "bench-1", "-t", "bench", "--compression", "none", "-o"])
            .arg(&artifact)
            .status()
            .context("atrium artifact write")?;
        ensure!(status.success(), "atrium artifact write failed");
        let size = std::fs::metadata(&artifact)?.len();
        println!(
            "# machine: {} cores; artifact: {size} bytes; clients: {}; window: {} s after {} s warm-up; rounds: {}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            opts.clients,
            opts.seconds,
            opts.warmup,
            opts.rounds
        );

        let server_dir = dir.join("server");
        std::fs::create_dir_all(&server_dir)?;
        let server = Server::start(server_bin, &server_dir, None).await?;
        let measured = async {
            let path = upload_and_link(&server, &artifact).await?;
            let atrium_url = format!("{}{path}", server.api_url());
            let nginx = Nginx::start(&dir, &server_dir, &artifact).await?;
            let nginx_url = format!("https://{}/bench.mender", nginx.addr);
            let mut atrium = Vec::new();
            let mut theirs = Vec::new();
            let figures = async {
                for round in 0..opts.rounds {
                    let a = measure(&atrium_url, &server.roots, size, opts).await?;
                    println!("# round {round}: atrium {a:.1} MB/s");
                    atrium.push(a);
                    let n = measure(&nginx_url, &server.roots, size, opts).await?;
                    println!("# round {round}: nginx {n:.1} MB/s");
                    theirs.push(n);
                }
                anyhow::Ok(())
            }
            .await;
            nginx.stop();
            figures?;
            anyhow::Ok((median(&mut atrium), median(&mut theirs)))
        }
        .await;
        server.stop().await;
        let (atrium, nginx) = measured?;
        println!("artifact_serve_mb_s: {atrium:.1} MB/s");
        println!("nginx_serve_mb_s: {nginx:.1} MB/s");
        println!(
            "artifact_serve_ratio_nginx: {:.2} (higher is better; target >= 0.9)",
            atrium / nginx
        );
        anyhow::Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `megabytes` MB of pseudo-random (incompressible) bytes.
fn write_random(path: &Path, megabytes: usize) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..megabytes {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        out.write_all(&block)?;
    }
    out.flush()?;
    Ok(())
}

/// Uploads the artifact and returns the path of a signed download link.
async fn upload_and_link(server: &Server, artifact: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(artifact)?;
    let response = server
        .http
        .post(format!("{}/api/v1/artifacts", server.api_url()))
        .bearer_auth(&server.token)
        .header("content-type", "application/vnd.mender-artifact")
        .timeout(Duration::from_secs(600))
        .body(bytes)
        .send()
        .await
        .context("uploading")?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    ensure!(status.is_success(), "upload refused ({status}): {body}");
    let id = body["id"].as_str().context("upload answer without id")?;
    let response = server
        .http
        .post(format!("{}/api/v1/artifacts/{id}/link", server.api_url()))
        .bearer_auth(&server.token)
        .json(&serde_json::json!({"ttl_s": 86400}))
        .send()
        .await
        .context("minting a link")?;
    let link: serde_json::Value = response.json().await.context("link answer")?;
    Ok(link["path"]
        .as_str()
        .context("link answer without path")?
        .to_owned())
}

/// Throughput in MB/s of `clients` connections downloading `url` again and again.
async fn measure(
    url: &str,
    roots: &[CertificateDer<'static>],
    size: u64,
    opts: &Options,
) -> anyhow::Result<f64> {
    let tls = atrium_pki::tls::client_config(roots, None)?;
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(rustls::ClientConfig::clone(&tls))
        .http1_only()
        .pool_max_idle_per_host(opts.clients)
        .timeout(Duration::from_secs(opts.warmup + opts.seconds + 120))
        .build()?;
    // Every client checks it got a whole, correct-sized file once: a server that answered
    // errors quickly must not look fast.
    let probe = client.get(url).send().await?.error_for_status()?;
    ensure!(
        probe.content_length() == Some(size),
        "{url}: unexpected length {:?}",
        probe.content_length()
    );
    drop(probe);
    let bytes = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(opts.clients);
    for _ in 0..opts.clients {
        let (client, url, bytes, failures, stop) = (
            client.clone(),
            url.to_owned(),
            bytes.clone(),
            failures.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let response = match client.get(&url).send().await {
                    Ok(r) if r.status().is_success() => r,
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let mut response = response;
                loop {
                    match response.chunk().await {
                        Ok(Some(chunk)) => {
                            bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                            if stop.load(Ordering::Relaxed) {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(_) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(opts.warmup)).await;
    let start_bytes = bytes.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(opts.seconds)).await;
    let got = bytes.load(Ordering::Relaxed) - start_bytes;
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.abort();
    }
    let failed = failures.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{url}: {failed} downloads failed during the measurement");
    }
    Ok(got as f64 / 1e6 / elapsed)
}

/// A throwaway nginx serving one file over TLS.
struct Nginx {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl Nginx {
    async fn start(dir: &Path, server_dir: &Path, artifact: &Path) -> anyhow::Result<Nginx> {
        let ca = atrium_pki::CertificateAuthority::load_or_create(&server_dir.join("ca"), "Atrium")
            .context("loading the server's CA")?;
        let identity = ca
            .issue_server_cert(
                &["localhost".into(), "127.0.0.1".into()],
                Duration::from_secs(24 * 3600),
            )
            .context("issuing nginx's certificate")?;
        let root = dir.join("nginx");
        let www = root.join("www");
        std::fs::create_dir_all(&www)?;
        std::fs::copy(artifact, www.join("bench.mender"))?;
        // nginx's workers run as an unprivileged user: the copy must be world-readable.
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(
                www.join("bench.mender"),
                std::fs::Permissions::from_mode(0o644),
            )?;
        }
        std::fs::write(root.join("cert.pem"), &identity.chain_pem)?;
        atrium_pki::write_secret_file(&root.join("key.pem"), identity.key_pem.as_bytes())?;
        let addr = free_port()?;
        let conf = format!(
            "worker_processes 2;\n\
             error_log {root}/error.log warn;\n\
             pid {root}/nginx.pid;\n\
             daemon off;\n\
             worker_rlimit_nofile 65536;\n\
             events {{ worker_connections 8192; }}\n\
             http {{\n\
               access_log off;\n\
               sendfile on;\n\
               tcp_nopush on;\n\
               keepalive_requests 100000;\n\
               client_body_temp_path {root}/tmp;\n\
               proxy_temp_path {root}/tmp;\n\
               fastcgi_temp_path {root}/tmp;\n\
               uwsgi_temp_path {root}/tmp;\n\
               scgi_temp_path {root}/tmp;\n\
               types {{ application/vnd.mender-artifact mender; }}\n\
               server {{\n\
                 listen {addr} ssl;\n\
                 ssl_certificate {root}/cert.pem;\n\
                 ssl_certificate_key {root}/key.pem;\n\
                 ssl_protocols TLSv1.2 TLSv1.3;\n\
                 root {www};\n\
               }}\n\
             }}\n",
            root = root.display(),
            www = www.display(),
        );
        std::fs::create_dir_all(root.join("tmp"))?;
        let conf_path = root.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = std::process::Command::new("/usr/sbin/nginx")
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(&root)
            .stdin(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        let nginx = Nginx { child, addr };
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(root.join("error.log")).unwrap_or_default();
                nginx.stop();
                bail!("nginx did not start: {log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(nginx)
    }

    /// Stops the master, which stops its workers (SIGKILL would leave them running).
    fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-QUIT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}
