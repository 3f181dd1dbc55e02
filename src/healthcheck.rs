//! `catchall healthcheck`: asks the local worker's HTTP server whether it is healthy, for a
//! container's HEALTHCHECK (the image has no curl). Exit 0 on a 2xx answer, 1 otherwise.

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// Why a health check failed.
#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid request path {0:?} (it starts with /, e.g. /healthz)")]
    Path(String),
    #[error("HTTP exchange with {addr} failed")]
    Http {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("{path} answered {status}")]
    Status {
        path: String,
        status: hyper::StatusCode,
    },
}

/// The address to probe for a server listening on `listen`: a wildcard (`0.0.0.0`, `::`)
/// becomes the loopback address of the same family.
pub fn probe_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// GETs `path` from the server listening on `listen`, within `timeout` in all.
pub async fn check(
    listen: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(), HealthcheckError> {
    if !path.starts_with('/') {
        return Err(HealthcheckError::Path(path.to_string()));
    }
    let addr = probe_addr(listen);
    tokio::time::timeout(timeout, get(addr, path))
        .await
        .map_err(|_| HealthcheckError::Timeout { addr, timeout })?
}

async fn get(addr: SocketAddr, path: &str) -> Result<(), HealthcheckError> {
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "catchall-healthcheck")
        .body(Empty::<Bytes>::new())
        .map_err(|_| HealthcheckError::Path(path.to_string()))?;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| HealthcheckError::Connect { addr, source })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| HealthcheckError::Http { addr, source })?;
    tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|source| HealthcheckError::Http { addr, source })?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(HealthcheckError::Status {
            path: path.to_string(),
            status: response.status(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_are_probed_on_loopback() {
        let probe = |s: &str| probe_addr(s.parse().unwrap()).to_string();
        assert_eq!(probe("0.0.0.0:8080"), "127.0.0.1:8080");
        assert_eq!(probe("[::]:9000"), "[::1]:9000");
        assert_eq!(probe("10.1.2.3:8080"), "10.1.2.3:8080");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_failure() {
        // Bound and not listening (connects are refused), and held: no other test takes it.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = socket.local_addr().unwrap();
        let error = check(addr, "/healthz", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(error, HealthcheckError::Connect { .. }), "{error}");
        let error = check(addr, "healthz", Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(error, HealthcheckError::Path(_)), "{error}");
    }
}
