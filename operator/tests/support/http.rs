//! A minimal HTTP/1.1 GET over loopback TCP, for readiness checks of etcd and
//! of simulated pods. It reads only the status line and must not be used for
//! anything that needs a body. HTTPS probes skip certificate verification,
//! as kubelet's do.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Bytes read while looking for the status line.
const STATUS_LINE_MAX: usize = 1024;

/// The status code of `GET path` at `address`, or `None` when the connection,
/// the request or the response fails within `timeout`.
pub async fn get_status(address: SocketAddr, path: &str, timeout: Duration) -> Option<u16> {
    tokio::time::timeout(timeout, get_status_inner(address, path))
        .await
        .ok()
        .flatten()
}

async fn get_status_inner(address: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(address).await.ok()?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: synod-envtest\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    let mut buffer = [0u8; 256];
    while !response.contains(&b'\n') && response.len() < STATUS_LINE_MAX {
        let read = stream.read(&mut buffer).await.ok()?;
        if read == 0 {
            break;
        }
        response.extend_from_slice(&buffer[..read]);
    }
    // "HTTP/1.1 200 OK"
    let line = String::from_utf8_lossy(&response);
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The status code of `GET https://address/path` without verifying the
/// server's certificate (kubelet does not verify probe targets either), or
/// `None` when the connection, the handshake or the request fails within `timeout`.
pub async fn get_status_tls(address: SocketAddr, path: &str, timeout: Duration) -> Option<u16> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .tls_danger_accept_invalid_certs(true)
        .build()
        .ok()?;
    let response = client
        .get(format!("https://{address}{path}"))
        .send()
        .await
        .ok()?;
    Some(response.status().as_u16())
}
