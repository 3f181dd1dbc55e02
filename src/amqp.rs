//! RabbitMQ: connections (a cluster's nodes in turn, TLS; SPEC §6) and the topology of SPEC §3,
//! declared idempotently.

use crate::tls::{Identity, Roots, Verify};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::tcp::{AMQPUriTcpExt, RustlsConnector};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Names of everything the worker declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Topic exchange events are published to.
    pub exchange: String,
    /// Quorum queue bound to it with `#`.
    pub queue: String,
    /// Deliveries after which the broker dead-letters a message that keeps failing.
    pub delivery_limit: u32,
}

impl Topology {
    pub fn new(exchange: &str, queue: &str, delivery_limit: u32) -> Self {
        Self {
            exchange: exchange.to_string(),
            queue: queue.to_string(),
            delivery_limit,
        }
    }

    /// Fanout exchange that rejected messages are dead-lettered to.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.exchange)
    }

    /// Durable queue holding dead-lettered messages for an operator to inspect.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead", self.queue)
    }

    /// Declares exchanges, queues and bindings. Safe to call again at every (re)connect.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable_exchange = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let dlx = self.dead_letter_exchange();
        let dead = self.dead_letter_queue();
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                dlx.as_str().into(),
                ExchangeKind::Fanout,
                durable_exchange,
                FieldTable::default(),
            )
            .await?;

        let mut dead_args = FieldTable::default();
        dead_args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        channel
            .queue_declare(dead.as_str().into(), durable_queue, dead_args)
            .await?;
        channel
            .queue_bind(
                dead.as_str().into(),
                dlx.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;

        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(dlx.as_str())),
        );
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(self.delivery_limit.min(i32::MAX as u32) as i32),
        );
        channel
            .queue_declare(self.queue.as_str().into(), durable_queue, args)
            .await?;
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }
}

/// Errors opening a connection. None of them holds a password.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid AMQP_URL (node {node}): {reason}")]
    Url { node: usize, reason: String },
    #[error("TLS settings of {host}")]
    Tls {
        host: String,
        #[source]
        source: crate::tls::TlsError,
    },
    #[error("no RabbitMQ node answered: {0}")]
    AllNodes(String),
}

/// One node of `AMQP_URL`: what lapin parses, and the TLS settings it does not.
struct Node {
    uri: AMQPUri,
    /// `host:port`, for errors and logs.
    address: String,
    tls: Option<NodeTls>,
}

struct NodeTls {
    connector: Arc<RustlsConnector>,
    /// The name sent as SNI and checked in the certificate (`server_name_indication`, else
    /// the host).
    server_name: String,
}

/// Heartbeat proposed to the broker unless the URL sets `heartbeat=`: a broker that stops
/// answering without closing the socket is noticed within about twice this.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;
/// How long one node may take to accept a connection and finish the handshake, unless the URL
/// sets `connection_timeout=` (milliseconds).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The node each `AMQP_URL` connected to last, so a reconnection starts after it.
static LAST_GOOD: Mutex<Vec<(String, usize)>> = Mutex::new(Vec::new());

/// A channel on `connection` for publishing: the topology declared and publisher confirms on
/// (HTTP ingest's and the producer's).
pub async fn confirming_channel(
    connection: &Connection,
    topology: &Topology,
) -> anyhow::Result<Channel> {
    use anyhow::Context;
    let channel = connection
        .create_channel()
        .await
        .context("opening a channel")?;
    topology
        .declare(&channel)
        .await
        .context("declaring the topology")?;
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .context("enabling publisher confirms")?;
    Ok(channel)
}

/// The nodes of an `AMQP_URL`: one URL, or several of one cluster separated by commas (a comma
/// inside a password does not separate; see [`crate::config::split_urls`]).
pub fn split_nodes(urls: &str) -> Vec<&str> {
    crate::config::split_urls(urls)
        .into_iter()
        .map(str::trim)
        .collect()
}

/// The user names and vhosts `urls` names (those of its nodes that parse), for keeping them out
/// of what `/readyz` says (see `consumer::broker_reason`).
pub fn users_and_vhosts(urls: &str) -> Vec<String> {
    split_nodes(urls)
        .into_iter()
        .filter_map(|raw| raw.parse::<AMQPUri>().ok())
        .flat_map(|uri| [uri.authority.userinfo.username, uri.vhost])
        .collect()
}

/// Checks `AMQP_URL` as a connection would read it (every node, its TLS files included), so
/// that a URL no connection can use stops the start with a usage error instead of being retried
/// as if the broker were down.
pub fn check_urls(urls: &str) -> Result<(), ConnectError> {
    nodes(urls).map(|_| ())
}

/// Every node of `urls`, parsed; at least one.
fn nodes(urls: &str) -> Result<Vec<Node>, ConnectError> {
    let nodes = split_nodes(urls)
        .into_iter()
        .enumerate()
        .map(|(index, raw)| parse_node(index, raw))
        .collect::<Result<Vec<_>, _>>()?;
    if nodes.is_empty() {
        return Err(ConnectError::Url {
            node: 0,
            reason: "no node".into(),
        });
    }
    Ok(nodes)
}

fn parse_node(index: usize, raw: &str) -> Result<Node, ConnectError> {
    let bad = |reason: String| ConnectError::Url {
        node: index + 1,
        reason,
    };
    let url = url::Url::parse(raw).map_err(|error| bad(error.to_string()))?;
    // lapin's parse errors may quote the URL: never with its password.
    let mut uri: AMQPUri = raw
        .parse()
        .map_err(|reason: String| bad(reason.replace(raw, &crate::config::redact_url(raw))))?;
    // lapin takes only a domain as host; an IP address must stay what it is, since the
    // certificate is checked against it.
    let host = url
        .host_str()
        .ok_or_else(|| bad("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    uri.authority.host = host.clone();
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(DEFAULT_HEARTBEAT_SECS);
    }
    let address = format!("{host}:{}", uri.authority.port);
    let param = |key: &str| {
        url.query_pairs()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    };
    // EXTERNAL logs in with the client certificate: without one it could never log in, and
    // was retried for ever as if the broker were down.
    let external = uri.query.auth_mechanism == Some(lapin::uri::SASLMechanism::External);
    if external
        && (!matches!(uri.scheme, AMQPScheme::AMQPS)
            || param("certfile").is_none()
            || param("keyfile").is_none())
    {
        return Err(bad(
            "auth_mechanism=external logs in with the client certificate: it needs an amqps:// \
             URL with certfile and keyfile"
                .into(),
        ));
    }
    if let Some(verify) = param("verify")
        && verify != "verify_peer"
    {
        return Err(bad(format!(
            "verify={verify}: the server certificate is always verified"
        )));
    }
    let tls = match uri.scheme {
        AMQPScheme::AMQP => {
            for key in ["cacertfile", "certfile", "keyfile"] {
                if param(key).is_some() {
                    return Err(bad(format!("{key} needs an amqps:// URL")));
                }
            }
            None
        }
        AMQPScheme::AMQPS => {
            let roots = param("cacertfile").map_or(Roots::System, |path| Roots::File(path.into()));
            let identity = match (param("certfile"), param("keyfile")) {
                (Some(cert), Some(key)) => Some(
                    Identity::from_files(cert.as_ref(), key.as_ref()).map_err(|source| {
                        ConnectError::Tls {
                            host: address.clone(),
                            source,
                        }
                    })?,
                ),
                (None, None) => None,
                _ => return Err(bad("certfile and keyfile go together".into())),
            };
            let sni = param("server_name_indication");
            // Without the host-name check only a private CA keeps the server to who it says it
            // is: with the system roots any publicly trusted certificate, for any name, passed
            // (Postgres refuses the same: `sslrootcert=system` needs `verify-full`).
            if sni.as_deref() == Some("disable") && param("cacertfile").is_none() {
                return Err(bad(
                    "server_name_indication=disable needs cacertfile (the CA that signed the \
                     broker's certificate): with the system roots any publicly trusted \
                     certificate, for any name, would pass"
                        .into(),
                ));
            }
            // `disable`, as in RabbitMQ's Erlang client: no SNI and no host-name check.
            let (verify, server_name) = match sni.as_deref() {
                Some("disable") => (Verify::ChainOnly, host.clone()),
                Some(name) => (Verify::Full, name.to_string()),
                None => (Verify::Full, host.clone()),
            };
            let mut config =
                crate::tls::client_config(&roots, verify, identity).map_err(|source| {
                    ConnectError::Tls {
                        host: address.clone(),
                        source,
                    }
                })?;
            config.enable_sni = sni.as_deref() != Some("disable");
            Some(NodeTls {
                connector: Arc::new(RustlsConnector::from(config)),
                server_name,
            })
        }
    };
    Ok(Node { uri, address, tls })
}

/// Opens a connection with a name, so operators (and `rabbitmqctl list_connections`) can tell
/// clients apart. `urls` may list several nodes of one cluster, separated by commas: they are
/// tried in turn, starting after the node this process connected to last with the same
/// `urls`, so losing a node costs one reconnection. `amqps://` nodes use TLS with RabbitMQ's
/// URI parameters (`cacertfile`, `certfile`, `keyfile`, `server_name_indication`,
/// `auth_mechanism=external`); the server certificate is always verified.
pub async fn connect(urls: &str, name: &str) -> Result<Connection, ConnectError> {
    connect_from(urls, name, None, Start::AfterLast).await
}

/// [`connect`] for a connection beside one that is open (HTTP ingest's, beside the
/// consumer's): it starts *at* the node this process connected to last, which answers. Started
/// after it, every attempt went first through the nodes the consumer had found silent: with
/// two before a live one, their connect timeouts used up ingest's 10 s and every request got
/// 503 for as long as the consumer's connection lasted.
pub async fn connect_beside(urls: &str, name: &str) -> Result<Connection, ConnectError> {
    connect_from(urls, name, None, Start::AtLast).await
}

/// Where an attempt starts in a cluster's node list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// After the node connected to last: its connection was lost, so it may be down.
    AfterLast,
    /// At the node connected to last: another connection to it is open.
    AtLast,
}

/// [`connect`], with a read gate: the connection stops reading while `gate` holds its limit of
/// message bodies (the consumer's `PREFETCH_BYTES`; see `vendor/README.md`).
pub async fn connect_gated(
    urls: &str,
    name: &str,
    gate: Option<&lapin::ReadGate>,
) -> Result<Connection, ConnectError> {
    connect_from(urls, name, gate, Start::AfterLast).await
}

async fn connect_from(
    urls: &str,
    name: &str,
    gate: Option<&lapin::ReadGate>,
    from: Start,
) -> Result<Connection, ConnectError> {
    let nodes = nodes(urls)?;
    let start = match (last_good(urls), from) {
        (None, _) => 0,
        (Some(last), Start::AfterLast) => last + 1,
        (Some(last), Start::AtLast) => last,
    };
    let mut failures = Vec::new();
    for offset in 0..nodes.len() {
        let index = (start + offset) % nodes.len();
        let node = &nodes[index];
        match connect_node(node, name, gate).await {
            Ok(connection) => {
                // The consumer's node decides: a connection beside it that had to move on
                // must not make the consumer's next reconnect skip the node it found.
                if from == Start::AfterLast {
                    set_last_good(urls, index);
                }
                if offset > 0 || start > 0 {
                    tracing::info!(node = %node.address, "Connected to RabbitMQ node.");
                }
                return Ok(connection);
            }
            Err(error) => {
                tracing::debug!(node = %node.address, %error, "RabbitMQ node did not answer.");
                failures.push(format!("{}: {error}", node.address));
            }
        }
    }
    Err(ConnectError::AllNodes(failures.join("; ")))
}

async fn connect_node(
    node: &Node,
    name: &str,
    gate: Option<&lapin::ReadGate>,
) -> Result<Connection, lapin::Error> {
    let mut properties = ConnectionProperties::default().with_connection_name(name.into());
    if let Some(gate) = gate {
        properties = properties.with_read_gate(gate.clone());
    }
    let runtime = lapin::runtime::default_runtime()?;
    let timeout = node
        .uri
        .query
        .connection_timeout
        .map_or(DEFAULT_CONNECT_TIMEOUT, Duration::from_millis);
    let tls = node
        .tls
        .as_ref()
        .map(|tls| (tls.connector.clone(), tls.server_name.clone()));
    let connecting = Connection::connector(
        node.uri.clone(),
        runtime,
        async move |mut uri: AMQPUri, runtime| {
            // The TCP connection is plain; TLS goes on top with our own verifier.
            uri.scheme = AMQPScheme::AMQP;
            let stream = AMQPUriTcpExt::connect_async(&uri, &runtime).await?;
            match &tls {
                None => Ok(stream),
                Some((connector, server_name)) => stream
                    .into_rustls(connector, server_name)
                    .await
                    .map_err(|error| lapin::Error::from(tls_reason(error))),
            }
        },
        properties,
    );
    match tokio::time::timeout(timeout, connecting).await {
        Ok(result) => result,
        Err(_) => Err(lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        ))),
    }
}

/// A handshake failure as the rustls error it carries, without io wrapping.
fn tls_reason(error: std::io::Error) -> std::io::Error {
    let kind = error.kind();
    match error.into_inner() {
        Some(inner) => std::io::Error::new(kind, format!("TLS handshake failed: {inner}")),
        None => std::io::Error::new(kind, "TLS handshake failed"),
    }
}

fn last_good(urls: &str) -> Option<usize> {
    let last = LAST_GOOD.lock().unwrap_or_else(|p| p.into_inner());
    last.iter().find(|(u, _)| u == urls).map(|(_, i)| *i)
}

fn set_last_good(urls: &str, index: usize) {
    let mut last = LAST_GOOD.lock().unwrap_or_else(|p| p.into_inner());
    match last.iter_mut().find(|(u, _)| u == urls) {
        Some(entry) => entry.1 = index,
        None => last.push((urls.to_string(), index)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_cluster_and_keeps_ip_hosts() {
        let nodes = split_nodes("amqp://u:p@127.0.0.1:5701/%2f, amqp://u:p@localhost:5702/%2f,");
        assert_eq!(nodes.len(), 2);
        let node = parse_node(0, nodes[0]).unwrap();
        assert_eq!(node.uri.authority.host, "127.0.0.1");
        assert_eq!(node.address, "127.0.0.1:5701");
        assert_eq!(node.uri.query.heartbeat, Some(DEFAULT_HEARTBEAT_SECS));
        let node = parse_node(1, "amqp://h/%2f?heartbeat=3").unwrap();
        assert_eq!(node.uri.query.heartbeat, Some(3));
        // A comma is allowed unescaped in a password (RFC 3986): it does not start a node.
        let nodes = split_nodes("amqp://u:a,b@h1/%2f,amqp://u:c,,d@h2/%2f");
        assert_eq!(nodes, ["amqp://u:a,b@h1/%2f", "amqp://u:c,,d@h2/%2f"]);
        let node = parse_node(0, nodes[0]).unwrap();
        assert_eq!(node.uri.authority.userinfo.password, "a,b");
    }

    #[test]
    fn bad_tls_settings_are_clear() {
        let error = parse_node(0, "amqp://h/%2f?cacertfile=/ca.pem")
            .err()
            .unwrap();
        assert!(error.to_string().contains("amqps://"), "{error}");
        let error = parse_node(0, "amqps://h/%2f?verify=verify_none")
            .err()
            .unwrap();
        assert!(error.to_string().contains("always verified"), "{error}");
        // No host-name check and the system roots: any public certificate would pass.
        let error = parse_node(0, "amqps://h/%2f?server_name_indication=disable")
            .err()
            .unwrap();
        assert!(error.to_string().contains("needs cacertfile"), "{error}");
        let error = parse_node(2, "amqps://u:secret@h/%2f?cacertfile=/nonexistent/ca.pem")
            .err()
            .unwrap();
        let text = format!("{:#}", anyhow::Error::new(error));
        assert!(
            text.contains("/nonexistent/ca.pem") && !text.contains("secret"),
            "{text}"
        );
    }
}
