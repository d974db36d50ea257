//! `cargo xtask bench terminal`: the remote terminal against OpenSSH on the same machine.
//!
//! The release `atrium` server and the `atrium-agent` of the `gateway` profile run as child
//! processes on loopback; the agent enrolls, is accepted, and the bench opens terminals through
//! the server like `atrium terminal` does. Beside it, a throwaway OpenSSH `sshd` (installed from Debian when
//! missing) runs on a spare port with a fresh host key and client key, and the same two
//! measurements go through `ssh -tt`:
//!
//! - `terminal_rtt_*_ms`: one keystroke sent, its echo from the remote PTY received (the
//!   remote runs `cat > /dev/null`, so the echo is the line discipline's, as when typing).
//! - `terminal_throughput_mb_s`: `cat` of a large text file in the remote shell, bytes counted
//!   from the command's start until the shell has exited.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use atrium::terminal::{TerminalClient, TerminalEvent, TerminalTarget};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};

use crate::bench_identity::{Server, build_gateway_agent, build_release, free_port};

/// What to measure.
pub struct Options {
    pub samples: usize,
    pub megabytes: usize,
    pub server_bin: Option<PathBuf>,
    pub agent_bin: Option<PathBuf>,
    pub skip_ssh: bool,
}

/// A marker printed after each phase so the reader knows the remote side is ready.
const READY: &str = "ready-for-bench";

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
    // Measured on a worker thread, beside the runtime's I/O driver (as `atrium terminal` runs
    // its session), so neither path pays for waking the main thread on every echo.
    runtime.block_on(async move {
        tokio::spawn(async move { bench(&server_bin, &agent_bin, &opts).await })
            .await
            .context("the bench task failed")?
    })
}

async fn bench(server_bin: &Path, agent_bin: &Path, opts: &Options) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let payload = dir.join("payload.txt");
    write_payload(&payload, opts.megabytes)?;
    let payload_bytes = std::fs::metadata(&payload)?.len();
    println!(
        "# samples: {}, payload: {} bytes of base64 text",
        opts.samples, payload_bytes
    );

    let server_dir = dir.join("server");
    std::fs::create_dir_all(&server_dir)?;
    let server = Server::start(server_bin, &server_dir, None).await?;
    let result = async {
        let (mut agent, device) = start_agent(&server, agent_bin, &dir).await?;
        let atrium = measure_atrium(&server, &device, &payload, opts).await;
        let _ = agent.kill().await;
        let atrium = atrium?;
        report("terminal", &atrium);
        if opts.skip_ssh {
            return Ok(());
        }
        let mut sshd = start_sshd(&dir).await?;
        let direct = measure_ssh(&sshd, false, &payload, opts).await;
        let jump = measure_ssh(&sshd, true, &payload, opts).await;
        let _ = sshd.child.kill().await;
        for (name, ssh) in [("ssh", direct?), ("ssh_jump", jump?)] {
            report(name, &ssh);
            println!(
                "terminal_vs_{name}_rtt_p50_ratio: {:.2} (lower is better)",
                atrium.rtt_p50_ms / ssh.rtt_p50_ms
            );
            println!(
                "terminal_vs_{name}_rtt_p99_ratio: {:.2} (lower is better)",
                atrium.rtt_p99_ms / ssh.rtt_p99_ms
            );
            println!(
                "terminal_vs_{name}_throughput_ratio: {:.2} (higher is better)",
                atrium.throughput_mb_s / ssh.throughput_mb_s
            );
        }
        anyhow::Ok(())
    }
    .await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

struct Figures {
    rtt_p50_ms: f64,
    rtt_p99_ms: f64,
    throughput_mb_s: f64,
}

fn report(name: &str, f: &Figures) {
    println!("{name}_rtt_p50_ms: {:.3} ms", f.rtt_p50_ms);
    println!("{name}_rtt_p99_ms: {:.3} ms", f.rtt_p99_ms);
    println!("{name}_throughput_mb_s: {:.1} MB/s", f.throughput_mb_s);
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(crate) fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("atrium-bench-terminal-{}", std::process::id()));
    std::fs::create_dir_all(&dir).context("bench directory")?;
    Ok(dir)
}

/// Lines of base64-like text, `megabytes` MB in all.
fn write_payload(path: &Path, megabytes: usize) -> anyhow::Result<()> {
    use std::io::Write as _;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut line = [0u8; 77];
    line[76] = b'\n';
    for _ in 0..(megabytes * 1_000_000).div_ceil(77) {
        for b in line.iter_mut().take(76) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = ALPHABET[(state % 64) as usize];
        }
        out.write_all(&line)?;
    }
    out.flush()?;
    Ok(())
}

pub(crate) async fn start_agent(
    server: &Server,
    bin: &Path,
    dir: &Path,
) -> anyhow::Result<(Child, String)> {
    let home = dir.join("agent");
    std::fs::create_dir_all(&home)?;
    let serial = "BENCH-TERMINAL-1";
    let config = format!(
        "data_dir = {data:?}\nserver_url = {api:?}\nlink_url = {link:?}\nca_file = {ca:?}\n\
         serial = {serial:?}\nmac = \"02:be:00:00:00:07\"\ndevice_type = \"atrium-bench\"\n\
         hardware_model = \"bench\"\nmqtt_mode = \"off\"\nenroll_retry_s = 1\n\
         [terminal]\nshell = [\"/bin/sh\"]\n",
        data = home.join("data").display().to_string(),
        api = server.api_url(),
        link = format!("wss://{}", server.link_addr),
        ca = server.dir.join("ca.pem").display().to_string(),
    );
    std::fs::write(home.join("agent.toml"), config)?;
    let log = std::fs::File::create(home.join("agent.log"))?;
    let child = Command::new(bin)
        .arg("--config")
        .arg(home.join("agent.toml"))
        .arg("run")
        .env("ATRIUM_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let start = Instant::now();
    let mut accepted = None;
    loop {
        ensure!(
            start.elapsed() < Duration::from_secs(60),
            "the agent did not enroll and connect within 60 s; its log:\n{}",
            std::fs::read_to_string(home.join("agent.log")).unwrap_or_default()
        );
        let devices: serde_json::Value = server
            .http
            .get(format!("{}/api/v1/devices?limit=10000", server.api_url()))
            .bearer_auth(&server.token)
            .send()
            .await?
            .json()
            .await?;
        let found = devices
            .as_array()
            .and_then(|l| l.iter().find(|d| d["identity"]["serial"] == serial))
            .cloned();
        if let Some(d) = found {
            let id = d["id"].as_str().unwrap_or_default().to_owned();
            if d["status"] == "pending" && accepted.is_none() {
                server
                    .http
                    .post(format!("{}/api/v1/devices/{id}/accept", server.api_url()))
                    .bearer_auth(&server.token)
                    .json(&serde_json::json!({"reason": "bench"}))
                    .send()
                    .await?
                    .error_for_status()?;
                accepted = Some(id.clone());
            }
            if d["connected"] == true {
                return Ok((child, id));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads terminal output until `needle` has appeared; returns the bytes read.
async fn atrium_until(client: &mut TerminalClient, needle: &[u8]) -> anyhow::Result<u64> {
    let mut tail: Vec<u8> = Vec::new();
    let mut total = 0u64;
    loop {
        match tokio::time::timeout(Duration::from_secs(120), client.next_event())
            .await
            .context("no terminal output for 120 s")??
        {
            TerminalEvent::Output(bytes) => {
                total += bytes.len() as u64;
                tail.extend_from_slice(&bytes);
                if tail.windows(needle.len()).any(|w| w == needle) {
                    return Ok(total);
                }
                let keep = needle.len().min(tail.len());
                tail.drain(..tail.len() - keep);
            }
            TerminalEvent::Exit { code, reason } => {
                bail!("the terminal ended ({code:?}, {reason:?}) while waiting")
            }
        }
    }
}

async fn measure_atrium(
    server: &Server,
    device: &str,
    payload: &Path,
    opts: &Options,
) -> anyhow::Result<Figures> {
    let tls = atrium_pki::tls::client_config(&server.roots, None)?;
    let target = TerminalTarget {
        server: server.api_url(),
        token: server.token.clone(),
        tls,
        device: device.to_owned(),
        cols: 200,
        rows: 50,
        term: Some("xterm".into()),
    };

    // Keystroke to echo.
    let mut client = TerminalClient::open(&target).await?;
    client
        .send(format!("echo {}; exec cat > /dev/null\n", split(READY)).as_bytes())
        .await?;
    atrium_until(&mut client, READY.as_bytes()).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut rtts = Vec::with_capacity(opts.samples);
    for i in 0..opts.samples {
        let key = [b'a' + (i % 26) as u8];
        let start = Instant::now();
        client.send(&key).await?;
        atrium_until(&mut client, &key).await?;
        rtts.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    client.close().await;

    // Bulk output.
    let mut client = TerminalClient::open(&target).await?;
    client
        .send(format!("echo {}\n", split(READY)).as_bytes())
        .await?;
    atrium_until(&mut client, READY.as_bytes()).await?;
    let start = Instant::now();
    client
        .send(format!("cat {}; exit\n", payload.display()).as_bytes())
        .await?;
    let mut bytes = 0u64;
    let (code, reason) = loop {
        match client.next_event().await? {
            TerminalEvent::Output(chunk) => bytes += chunk.len() as u64,
            TerminalEvent::Exit { code, reason } => break (code, reason),
        }
    };
    ensure!(
        code == Some(0),
        "the terminal ended with {code:?} ({reason:?}) after {bytes} bytes"
    );
    let secs = start.elapsed().as_secs_f64();
    let expected = std::fs::metadata(payload)?.len();
    ensure!(
        bytes >= expected,
        "only {bytes} of {expected} bytes arrived through the terminal"
    );
    rtts.sort_by(f64::total_cmp);
    Ok(Figures {
        rtt_p50_ms: percentile(&rtts, 50.0),
        rtt_p99_ms: percentile(&rtts, 99.0),
        throughput_mb_s: bytes as f64 / secs / 1e6,
    })
}

/// `ready-for-bench` written so its echoed command line does not contain it.
fn split(word: &str) -> String {
    let (a, b) = word.split_at(word.len() / 2);
    format!("{a}''{b}")
}

// ---------------------------------------------------------------------------------------------
// OpenSSH on the same machine.

const SSHD: &str = "/usr/sbin/sshd";

fn ensure_sshd() -> anyhow::Result<()> {
    if Path::new(SSHD).exists() {
        return Ok(());
    }
    println!("# installing openssh-server from Debian");
    for args in [
        &["update", "-qq"][..],
        &["install", "-y", "-qq", "openssh-server"][..],
    ] {
        let status = std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        ensure!(status.success(), "apt-get {} failed", args.join(" "));
    }
    ensure!(Path::new(SSHD).exists(), "{SSHD} is still missing");
    Ok(())
}

fn keygen(path: &Path) -> anyhow::Result<()> {
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .context("running ssh-keygen")?;
    ensure!(status.success(), "ssh-keygen failed");
    Ok(())
}

pub(crate) struct Sshd {
    pub(crate) child: Child,
    pub(crate) port: u16,
    pub(crate) key: PathBuf,
}

pub(crate) async fn start_sshd(dir: &Path) -> anyhow::Result<Sshd> {
    ensure_sshd()?;
    let dir = dir.join("ssh");
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all("/run/sshd").context("sshd's privilege separation directory")?;
    let host_key = dir.join("host_key");
    let client_key = dir.join("client_key");
    keygen(&host_key)?;
    keygen(&client_key)?;
    std::fs::copy(
        client_key.with_extension("pub"),
        dir.join("authorized_keys"),
    )?;
    let port = free_port()?.port();
    let config = format!(
        "ListenAddress 127.0.0.1\nPort {port}\nHostKey {host}\nAuthorizedKeysFile {auth}\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
         PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nPidFile none\n\
         PrintMotd no\nPrintLastLog no\nUseDNS no\n",
        host = host_key.display(),
        auth = dir.join("authorized_keys").display(),
    );
    std::fs::write(dir.join("sshd_config"), config)?;
    let log = std::fs::File::create(dir.join("sshd.log"))?;
    let child = Command::new(SSHD)
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(dir.join("sshd_config"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting sshd")?;
    let start = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "sshd did not listen within 10 s: {}",
            std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Sshd {
        child,
        port,
        key: client_key,
    })
}

impl Sshd {
    /// `ssh -tt` to this server running a shell; with `jump`, through the same server as a
    /// jump host (`ssh -W`, as `ProxyJump` does): operator, relay, device, as with Atrium.
    fn ssh(&self, jump: bool) -> anyhow::Result<Child> {
        let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
        let options = |key: &Path| -> Vec<String> {
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
            .chain([key.display().to_string()])
            .collect()
        };
        let mut command = Command::new("ssh");
        command.arg("-tt").args(options(&self.key));
        if jump {
            let proxy = format!(
                "ProxyCommand=ssh {} -p {} -W %h:%p {user}@127.0.0.1",
                options(&self.key).join(" "),
                self.port
            );
            command.arg("-o").arg(proxy);
        }
        command
            .arg("-p")
            .arg(self.port.to_string())
            .arg(format!("{user}@127.0.0.1"))
            .arg("/bin/sh")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting ssh")
    }
}

async fn pipe_until(out: &mut tokio::process::ChildStdout, needle: &[u8]) -> anyhow::Result<u64> {
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(120), out.read(&mut buf))
            .await
            .context("no ssh output for 120 s")??;
        if n == 0 {
            bail!("ssh ended while waiting");
        }
        total += n as u64;
        tail.extend_from_slice(&buf[..n]);
        if tail.windows(needle.len()).any(|w| w == needle) {
            return Ok(total);
        }
        let keep = needle.len().min(tail.len());
        tail.drain(..tail.len() - keep);
    }
}

async fn measure_ssh(
    sshd: &Sshd,
    jump: bool,
    payload: &Path,
    opts: &Options,
) -> anyhow::Result<Figures> {
    async {
        // Keystroke to echo.
        let mut ssh = sshd.ssh(jump)?;
        let mut stdin = ssh.stdin.take().ok_or_else(|| anyhow!("ssh stdin"))?;
        let mut stdout = ssh.stdout.take().ok_or_else(|| anyhow!("ssh stdout"))?;
        stdin
            .write_all(format!("echo {}; exec cat > /dev/null\n", split(READY)).as_bytes())
            .await?;
        pipe_until(&mut stdout, READY.as_bytes()).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut rtts = Vec::with_capacity(opts.samples);
        for i in 0..opts.samples {
            let key = [b'a' + (i % 26) as u8];
            let start = Instant::now();
            stdin.write_all(&key).await?;
            stdin.flush().await?;
            pipe_until(&mut stdout, &key).await?;
            rtts.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        let _ = ssh.kill().await;

        // Bulk output.
        let mut ssh = sshd.ssh(jump)?;
        let mut stdin = ssh.stdin.take().ok_or_else(|| anyhow!("ssh stdin"))?;
        let mut stdout = ssh.stdout.take().ok_or_else(|| anyhow!("ssh stdout"))?;
        stdin
            .write_all(format!("echo {}\n", split(READY)).as_bytes())
            .await?;
        pipe_until(&mut stdout, READY.as_bytes()).await?;
        let start = Instant::now();
        stdin
            .write_all(format!("cat {}; exit\n", payload.display()).as_bytes())
            .await?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut bytes = 0u64;
        loop {
            let n = stdout.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
        }
        let secs = start.elapsed().as_secs_f64();
        let _ = ssh.wait().await;
        let expected = std::fs::metadata(payload)?.len();
        ensure!(
            bytes >= expected,
            "only {bytes} of {expected} bytes arrived through ssh"
        );
        rtts.sort_by(f64::total_cmp);
        anyhow::Ok(Figures {
            rtt_p50_ms: percentile(&rtts, 50.0),
            rtt_p99_ms: percentile(&rtts, 99.0),
            throughput_mb_s: bytes as f64 / secs / 1e6,
        })
    }
    .await
}
