//! TCP forwarding over the device link: stream kind `"tcp"`, params `{"host": H, "port": P}`.
//!
//! The agent resolves the host, keeps only the addresses `[port_forward] allow` admits
//! (rules `ADDRESS[/PREFIX]:PORTS`, ports `*`, `N` or `N-M`, IPv6 in brackets; the default
//! admits only the loopback addresses), connects to the first that answers, and accepts the
//! stream with an input window. Then bytes flow both ways under credit: the socket is read
//! only while the server's window has room, and input credit goes back only once the bytes
//! are written to the socket, so a fast sender on either side waits instead of filling memory.
//! Either side's end (the target closing, or the server closing the stream) ends both
//! directions.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::streams::{Input, StreamIo};

/// The stream kind this module serves.
pub const KIND: &str = "tcp";
/// Bytes the server may send before the agent has written them to the socket.
pub const WINDOW: u32 = 256 * 1024;
/// Largest chunk read from the socket at once.
const CHUNK: usize = 64 * 1024;
/// How long resolving and connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The device owner's port forwarding settings (`[port_forward]` in the agent configuration).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PortForwardConfig {
    /// Whether operators may forward TCP connections through this gateway.
    pub enabled: bool,
    /// Targets allowed: `ADDRESS[/PREFIX]:PORTS`, e.g. `127.0.0.1:*`, `10.0.0.0/8:80`,
    /// `[::1]:8000-8099`.
    pub allow: Vec<String>,
    /// Most forwarded connections at the same time.
    pub max_connections: usize,
}

impl Default for PortForwardConfig {
    fn default() -> Self {
        PortForwardConfig {
            enabled: true,
            allow: vec!["127.0.0.1:*".into(), "[::1]:*".into()],
            max_connections: 64,
        }
    }
}

/// The parameters of a `tcp` stream.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TcpParams {
    /// Host name or address to connect to.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// One rule of the allow list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowRule {
    net: IpAddr,
    prefix: u8,
    ports: (u16, u16),
}

/// Parses a rule `ADDRESS[/PREFIX]:PORTS`.
pub fn parse_rule(rule: &str) -> Result<AllowRule, String> {
    let bad = |why: &str| format!("allow rule {rule:?}: {why}");
    let (addr, ports) = rule
        .rsplit_once(':')
        .ok_or_else(|| bad("expected ADDRESS[/PREFIX]:PORTS"))?;
    let addr = addr
        .strip_prefix('[')
        .and_then(|a| a.strip_suffix(']'))
        .unwrap_or(addr);
    let (ip, prefix) = match addr.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (addr, None),
    };
    let net: IpAddr = ip.parse().map_err(|_| bad("not an IP address"))?;
    let max = if net.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| bad("bad prefix length"))?,
        None => max,
    };
    let ports = if ports == "*" {
        (1, u16::MAX)
    } else if let Some((lo, hi)) = ports.split_once('-') {
        let lo = lo.parse::<u16>().map_err(|_| bad("bad port"))?;
        let hi = hi.parse::<u16>().map_err(|_| bad("bad port"))?;
        if lo > hi {
            return Err(bad("port range is reversed"));
        }
        (lo, hi)
    } else {
        let p = ports.parse::<u16>().map_err(|_| bad("bad port"))?;
        (p, p)
    };
    Ok(AllowRule { net, prefix, ports })
}

impl AllowRule {
    /// Whether the rule admits `addr`.
    pub fn allows(&self, addr: SocketAddr) -> bool {
        let port = addr.port();
        if port < self.ports.0 || port > self.ports.1 {
            return false;
        }
        match (self.net, addr.ip().to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Parses and checks the JSON parameters of a `tcp` stream.
pub fn parse_params(json: &str) -> Result<TcpParams, String> {
    let params: TcpParams = serde_json::from_str(json).map_err(|e| format!("bad-request: {e}"))?;
    if params.host.is_empty()
        || params.host.len() > 253
        || !params
            .host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'))
    {
        return Err("bad-request: host must be a name or an address of 1 to 253 characters".into());
    }
    if params.port == 0 {
        return Err("bad-request: port must be 1 to 65535".into());
    }
    Ok(params)
}

/// Resolves the target and connects to the first allowed address that answers.
async fn connect(
    config: &PortForwardConfig,
    params: &TcpParams,
) -> Result<tokio::net::TcpStream, String> {
    let rules = config
        .allow
        .iter()
        .map(|r| parse_rule(r))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not-allowed: [port_forward] {e}"))?;
    let target = format!("{}:{}", params.host, params.port);
    let addrs: Vec<SocketAddr> = match params.host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, params.port)],
        Err(_) => tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::lookup_host((params.host.as_str(), params.port)),
        )
        .await
        .map_err(|_| format!("connect: resolving {} timed out", params.host))?
        .map_err(|e| format!("connect: resolving {}: {e}", params.host))?
        .collect(),
    };
    let allowed: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| rules.iter().any(|r| r.allows(*a)))
        .collect();
    if allowed.is_empty() {
        return Err(format!(
            "not-allowed: {target} is not in this device's [port_forward] allow list"
        ));
    }
    let mut last = String::new();
    for addr in allowed {
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Ok(Err(e)) => last = format!("connect: {addr}: {e}"),
            Err(_) => last = format!("connect: {addr}: timed out"),
        }
    }
    Err(last)
}

/// Serves a `tcp` stream.
pub async fn serve(config: PortForwardConfig, params_json: String, mut io: StreamIo) {
    let params = match parse_params(&params_json) {
        Ok(params) => params,
        Err(reason) => return io.close(None, Some(reason)).await,
    };
    let tcp = match connect(&config, &params).await {
        Ok(tcp) => tcp,
        Err(reason) => {
            tracing::info!(stream = io.stream, %reason, "forward refused");
            return io.close(None, Some(reason)).await;
        }
    };
    if io.accept(WINDOW).await.is_err() {
        return;
    }
    tracing::info!(stream = io.stream, port = params.port, "forward opened");
    let (mut reader, mut writer) = tcp.into_split();
    let mut buf = vec![0u8; CHUNK];
    let mut pending: Option<(Vec<u8>, usize)> = None;
    let reason: Option<String> = loop {
        let want = usize::try_from(io.credit.min(CHUNK as u64)).unwrap_or(CHUNK);
        tokio::select! {
            read = reader.read(&mut buf[..want.max(1)]), if io.credit > 0 => match read {
                Ok(0) => break None,
                Ok(n) => {
                    if io.send_now(buf[..n].to_vec()).await.is_err() {
                        return;
                    }
                }
                Err(e) => break Some(format!("reading from the target: {e}")),
            },
            written = async {
                match pending.as_ref() {
                    Some((bytes, offset)) => writer.write(&bytes[*offset..]).await,
                    None => std::future::pending().await,
                }
            }, if pending.is_some() => match written {
                Ok(0) => break Some("the target stopped reading".into()),
                Ok(n) => {
                    if let Some((bytes, offset)) = pending.as_mut() {
                        *offset += n;
                        if *offset >= bytes.len() {
                            let len = bytes.len();
                            pending = None;
                            if io.grant(len).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                Err(e) => break Some(format!("writing to the target: {e}")),
            },
            input = io.input.recv(), if pending.is_none() => match input {
                Some(Input::Data(data)) => {
                    if !data.is_empty() {
                        pending = Some((data, 0));
                    }
                }
                Some(Input::Window(more)) => io.credit = io.credit.saturating_add(u64::from(more)),
                // Closed by the server or the link.
                None => return,
            },
        }
    };
    tracing::info!(stream = io.stream, "forward closed");
    match reason {
        None => io.close(Some(0), None).await,
        Some(reason) => io.close(None, Some(reason)).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn rules_match_addresses_and_ports() {
        let local = parse_rule("127.0.0.1:*").expect("rule");
        assert!(local.allows(addr("127.0.0.1:80")));
        assert!(!local.allows(addr("127.0.0.2:80")));
        assert!(
            local.allows(addr("[::ffff:127.0.0.1]:80")),
            "IPv4-mapped addresses are their IPv4 address"
        );
        let lan = parse_rule("10.0.0.0/8:80").expect("rule");
        assert!(lan.allows(addr("10.20.30.40:80")));
        assert!(!lan.allows(addr("10.20.30.40:81")));
        assert!(!lan.allows(addr("11.0.0.1:80")));
        let v6 = parse_rule("[fd00::/8]:8000-8099").expect("rule");
        assert!(v6.allows(addr("[fd12::1]:8050")));
        assert!(!v6.allows(addr("[fd12::1]:8100")));
        assert!(!v6.allows(addr("127.0.0.1:8050")));
        let any = parse_rule("0.0.0.0/0:443").expect("rule");
        assert!(any.allows(addr("8.8.8.8:443")));
        for bad in [
            "",
            "127.0.0.1",
            "host:80",
            "1.2.3.4/33:80",
            "1.2.3.4:9-1",
            "1.2.3.4:x",
        ] {
            assert!(parse_rule(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn params_are_checked() {
        assert!(parse_params(r#"{"host":"localhost","port":80}"#).is_ok());
        assert!(parse_params(r#"{"host":"a b","port":80}"#).is_err());
        assert!(parse_params(r#"{"host":"x","port":0}"#).is_err());
        assert!(parse_params(r#"{"host":"x","port":80,"y":1}"#).is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(text in ".{0,80}") {
            let _ = parse_rule(&text);
            let _ = parse_params(&text);
        }

        #[test]
        fn exact_rules_admit_exactly_their_address(a in any::<[u8; 4]>(), b in any::<[u8; 4]>(), port in 1u16..) {
            let rule = parse_rule(&format!("{}:{port}", std::net::Ipv4Addr::from(a))).expect("rule");
            let other = SocketAddr::new(IpAddr::from(b), port);
            prop_assert!(rule.allows(SocketAddr::new(IpAddr::from(a), port)));
            prop_assert_eq!(rule.allows(other), a == b);
        }
    }
}
