//! `cargo xtask bench files`: `atrium cp` and `atrium port-forward` against OpenSSH's `scp`
//! and `ssh -L` on the same machine.
//!
//! The release `atrium` server and the `atrium-agent` of the `gateway` profile run as child
//! processes on loopback (as in `cargo xtask bench terminal`, whose throwaway `sshd` is reused).
//! Measured, each the median of `--runs` runs:
//!
//! - `cp_up_mb_s` / `cp_down_mb_s`: a file of random bytes copied to the device and back with
//!   the library behind `atrium cp` (hashing, transfer, checksum checks, rename), against
//!   `scp` the same way (`scp_up_mb_s`, `scp_down_mb_s`); `cp_throughput_mb_s` is the mean of
//!   both directions.
//! - `port_forward_throughput_mb_s`: one TCP connection through the forward, a local server
//!   on the device side sending the bytes, against `ssh -L` (`ssh_forward_throughput_mb_s`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use atrium::transfer::{Target, download, forward, upload};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::bench_identity::{Server, build_gateway_agent, build_release, free_port};
use crate::bench_terminal::{Sshd, start_agent, start_sshd, tempfile_dir};

/// What to measure.
pub struct Options {
    pub megabytes: usize,
    pub runs: usize,
    pub server_bin: Option<PathBuf>,
    pub agent_bin: Option<PathBuf>,
    pub skip_ssh: bool,
}

pub fn run(opts: Options) -> anyhow::Result<()> {
    let server_bin = match &opts.server_bin {
        Some(bin) => bin.clone(),
        None => build_release("atrium", "atrium")?,
    };
    let agent_bin = match &opts.agent_bin {
        Some(bin) => bin.clone(),
        None => build_gateway_agent()?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(bench(&server_bin, &agent_bin, &opts))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn write_random(path: &Path, bytes: usize) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..bytes.div_ceil(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.write_all(&x.to_le_bytes())?;
    }
    out.flush()?;
    Ok(())
}

struct Figures {
    up: f64,
    down: f64,
    forward: f64,
}

async fn bench(server_bin: &Path, agent_bin: &Path, opts: &Options) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let bytes = opts.megabytes * 1_000_000;
    let payload = dir.join("payload.bin");
    write_random(&payload, bytes)?;
    let bytes = std::fs::metadata(&payload)?.len();
    println!("# runs: {}, payload: {bytes} random bytes", opts.runs);
    let server_dir = dir.join("server");
    std::fs::create_dir_all(&server_dir)?;
    let server = Server::start(server_bin, &server_dir, None).await?;
    let result = async {
        let (mut agent, device) = start_agent(&server, agent_bin, &dir).await?;
        let atrium = measure_atrium(&server, &device, &dir, &payload, bytes, opts).await;
        let _ = agent.kill().await;
        let atrium = atrium?;
        report("cp", "port_forward", &atrium);
        if opts.skip_ssh {
            return Ok(());
        }
        let mut sshd = start_sshd(&dir).await?;
        let ssh = measure_ssh(&sshd, &dir, &payload, bytes, opts).await;
        let _ = sshd.child.kill().await;
        let ssh = ssh?;
        report("scp", "ssh_forward", &ssh);
        println!(
            "cp_vs_scp_throughput_ratio: {:.2} (higher is better)",
            (atrium.up + atrium.down) / (ssh.up + ssh.down)
        );
        println!(
            "port_forward_vs_ssh_throughput_ratio: {:.2} (higher is better)",
            atrium.forward / ssh.forward
        );
        anyhow::Ok(())
    }
    .await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn report(cp: &str, fwd: &str, f: &Figures) {
    println!("{cp}_up_mb_s: {:.1} MB/s", f.up);
    println!("{cp}_down_mb_s: {:.1} MB/s", f.down);
    println!("{cp}_throughput_mb_s: {:.1} MB/s", (f.up + f.down) / 2.0);
    println!("{fwd}_throughput_mb_s: {:.1} MB/s", f.forward);
}

/// A local server that sends `bytes` bytes to each connection, then closes it.
async fn source(bytes: u64) -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let chunk = vec![0x3c; 256 * 1024];
                let mut left = bytes;
                while left > 0 {
                    let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
                    if socket.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
                let _ = socket.shutdown().await;
            });
        }
    });
    Ok(port)
}

/// Reads one connection to `port` to its end; MB/s.
async fn drain(port: u16, bytes: u64) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), socket.read(&mut buf))
            .await
            .context("no data for 60 s")??;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    ensure!(got == bytes, "{got} of {bytes} bytes came through");
    Ok(bytes as f64 / start.elapsed().as_secs_f64() / 1e6)
}

async fn measure_atrium(
    server: &Server,
    device: &str,
    dir: &Path,
    payload: &Path,
    bytes: u64,
    opts: &Options,
) -> anyhow::Result<Figures> {
    let target = Target {
        server: server.api_url(),
        token: server.token.clone(),
        tls: atrium_pki::tls::client_config(&server.roots, None)?,
        device: device.to_owned(),
    };
    let remote = dir.join("remote.bin").display().to_string();
    let back = dir.join("back.bin");
    let (mut ups, mut downs, mut forwards) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..opts.runs {
        let start = Instant::now();
        upload(&target, payload, &remote, None, |_| {}).await?;
        ups.push(bytes as f64 / start.elapsed().as_secs_f64() / 1e6);
        let start = Instant::now();
        download(&target, &remote, &back, |_, _| {}).await?;
        downs.push(bytes as f64 / start.elapsed().as_secs_f64() / 1e6);
    }
    let port = source(bytes).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let local = listener.local_addr()?.port();
    let stop = CancellationToken::new();
    let forwarding = tokio::spawn(forward(
        target,
        listener,
        "127.0.0.1".into(),
        port,
        stop.clone(),
        |e| eprintln!("forward: {e:#}"),
    ));
    for _ in 0..opts.runs {
        forwards.push(drain(local, bytes).await?);
    }
    stop.cancel();
    let _ = forwarding.await;
    Ok(Figures {
        up: median(ups),
        down: median(downs),
        forward: median(forwards),
    })
}

fn ssh_options(sshd: &Sshd) -> Vec<String> {
    [
        "-q",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-i",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([sshd.key.display().to_string()])
    .collect()
}

async fn measure_ssh(
    sshd: &Sshd,
    dir: &Path,
    payload: &Path,
    bytes: u64,
    opts: &Options,
) -> anyhow::Result<Figures> {
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let remote = dir.join("scp-remote.bin");
    let back = dir.join("scp-back.bin");
    let scp = |from: String, to: String| {
        let mut command = Command::new("scp");
        // -O: the classic scp protocol (the throwaway sshd has no sftp subsystem).
        command
            .arg("-O")
            .args(ssh_options(sshd))
            .arg("-P")
            .arg(sshd.port.to_string())
            .arg(from)
            .arg(to)
            .stdin(Stdio::null());
        command
    };
    let at = |path: &Path| format!("{user}@127.0.0.1:{}", path.display());
    let (mut ups, mut downs, mut forwards) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..opts.runs {
        let start = Instant::now();
        let status = scp(payload.display().to_string(), at(&remote))
            .status()
            .await?;
        ensure!(status.success(), "scp up failed");
        ups.push(bytes as f64 / start.elapsed().as_secs_f64() / 1e6);
        let start = Instant::now();
        let status = scp(at(&remote), back.display().to_string())
            .status()
            .await?;
        ensure!(status.success(), "scp down failed");
        downs.push(bytes as f64 / start.elapsed().as_secs_f64() / 1e6);
    }
    let port = source(bytes).await?;
    let local = free_port()?.port();
    let mut tunnel = Command::new("ssh")
        .args(ssh_options(sshd))
        .args(["-N", "-L", &format!("{local}:127.0.0.1:{port}")])
        .arg("-p")
        .arg(sshd.port.to_string())
        .arg(format!("{user}@127.0.0.1"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting ssh -L")?;
    let start = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", local))
        .await
        .is_err()
    {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "ssh -L did not listen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The probe connection above also opened a channel; let it settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..opts.runs {
        forwards.push(drain(local, bytes).await?);
    }
    let _ = tunnel.kill().await;
    Ok(Figures {
        up: median(ups),
        down: median(downs),
        forward: median(forwards),
    })
}
