//! Broker configuration from flags, `SYNOD_<FLAG>` environment variables and
//! an optional TOML file with the same keys. Pure parsing: opens no sockets.
//!
//! Precedence, highest first: command-line flag, environment variable,
//! `--config` file, built-in default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;

/// Errors in configuration; each names the flag at fault. The binary exits 2.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag's value could not be used.
    #[error("--{flag}: {reason}")]
    Invalid {
        /// The flag's long name, without dashes.
        flag: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The `--config` file could not be read or parsed.
    #[error("--config {path}: {reason}")]
    File {
        /// The file named by `--config`.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Command-line flags. Every flag is also read from `SYNOD_<FLAG>`.
#[derive(Debug, Default, Parser)]
#[command(
    name = "synod-broker",
    version,
    about = "AMQP 0-9-1 broker whose replicas agree through Paxos"
)]
pub struct Args {
    /// Name of this node in the cluster (default: `synod@<hostname>`).
    #[arg(long, env = "SYNOD_NODE_NAME")]
    pub node_name: Option<String>,
    /// Name of the cluster, reported to clients (`cluster_name` server
    /// property), in `/api/overview` and in `synod_identity_info`
    /// (default: the node name, as RabbitMQ's first node names its cluster).
    #[arg(long, env = "SYNOD_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// Directory for durable state (default: `./synod-data`).
    #[arg(long, env = "SYNOD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// AMQP 0-9-1 listen address (default: `0.0.0.0:5672`).
    #[arg(long, env = "SYNOD_AMQP_LISTEN")]
    pub amqp_listen: Option<String>,
    /// Management HTTP API listen address (default: `0.0.0.0:15672`).
    #[arg(long, env = "SYNOD_MGMT_LISTEN")]
    pub mgmt_listen: Option<String>,
    /// Prometheus `/metrics` listen address (default: `0.0.0.0:15692`).
    #[arg(long, env = "SYNOD_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Cluster traffic listen address (default: `0.0.0.0:25672`).
    #[arg(long, env = "SYNOD_CLUSTER_LISTEN")]
    pub cluster_listen: Option<String>,
    /// Cluster seed list `NAME=HOST:PORT,...`; absent means a single node.
    #[arg(long, env = "SYNOD_PEERS")]
    pub peers: Option<String>,
    /// File holding the secret every peer must prove; required with `--peers`.
    #[arg(long, env = "SYNOD_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// PEM certificate chain for TLS.
    #[arg(long, env = "SYNOD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long, env = "SYNOD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle for verifying client and peer certificates.
    #[arg(long, env = "SYNOD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// AMQP over TLS listen address (default when TLS is configured: `0.0.0.0:5671`).
    #[arg(long, env = "SYNOD_AMQPS_LISTEN")]
    pub amqps_listen: Option<String>,
    /// Serve no plain AMQP (`--amqp-listen` is not bound): only AMQPS.
    /// Needs `--tls-cert` and `--tls-key`.
    #[arg(long, env = "SYNOD_NO_PLAIN_AMQP")]
    pub no_plain_amqp: bool,
    /// TLS on the cluster port: `auto` (default: on when `--tls-cert` is
    /// given), `on` or `off`. On needs `--tls-ca` when `--peers` is given.
    #[arg(long, env = "SYNOD_CLUSTER_TLS")]
    pub cluster_tls: Option<String>,
    /// Largest message body accepted, in bytes (default 134217728 = 128 MiB,
    /// at most 536870912); a larger publish closes its channel with 406.
    #[arg(long, env = "SYNOD_MAX_MESSAGE_SIZE")]
    pub max_message_size: Option<u64>,
    /// Export per-queue metric series (`{vhost,queue}` labels) on `/metrics`
    /// (default: true); turn off for clusters with very many queues.
    #[arg(long, env = "SYNOD_METRICS_PER_QUEUE", action = clap::ArgAction::Set)]
    pub metrics_per_queue: Option<bool>,
    /// Administrator created instead of `guest` when the data directory holds
    /// no metadata yet (first start); later starts keep the stored users.
    #[arg(long, env = "SYNOD_DEFAULT_USER")]
    pub default_user: Option<String>,
    /// Password of `--default-user`.
    #[arg(long, env = "SYNOD_DEFAULT_PASS", hide_env_values = true)]
    pub default_pass: Option<String>,
    /// File holding the password of `--default-user` (e.g. a mounted Secret);
    /// trailing line breaks are ignored. Excludes `--default-pass`.
    #[arg(long, env = "SYNOD_DEFAULT_PASS_FILE")]
    pub default_pass_file: Option<PathBuf>,
    /// Bytes of message bodies a durable queue keeps in memory before it pages
    /// persistent bodies out to its log (default: 64MiB); a number of bytes
    /// with an optional `KiB`, `MiB` or `GiB` suffix.
    #[arg(long, env = "SYNOD_QUEUE_MEMORY_MAX")]
    pub queue_memory_max: Option<String>,
    /// Open AMQP and AMQPS connections allowed on this node (default 10000);
    /// one more is refused with `connection.close 530 NOT_ALLOWED`.
    #[arg(long, env = "SYNOD_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Channels per connection offered in `connection.tune` (default 2047,
    /// RabbitMQ's `channel_max`); opening one above the negotiated value is
    /// `connection.close 504 CHANNEL_ERROR`.
    #[arg(long, env = "SYNOD_CHANNEL_MAX")]
    pub channel_max: Option<u16>,
    /// Queues this node's metadata may hold, all vhosts together (default:
    /// unlimited); a declaration beyond it closes its channel with 406.
    #[arg(long, env = "SYNOD_MAX_QUEUES")]
    pub max_queues: Option<u64>,
    /// Consumers one channel may hold (default: unlimited, RabbitMQ's
    /// `consumer_max_per_channel`); one more closes the channel with 406.
    #[arg(long, env = "SYNOD_MAX_CONSUMERS_PER_CHANNEL")]
    pub max_consumers_per_channel: Option<u32>,
    /// Message bytes held in memory above which publishers are blocked: a
    /// fraction of the memory available to the process (`0.4`, the
    /// default) or a size (`2GiB`, `1500MB`, `1073741824`).
    #[arg(long, env = "SYNOD_MEMORY_HIGH_WATERMARK")]
    pub memory_high_watermark: Option<String>,
    /// Free space on the data directory's file system below which
    /// publishers are blocked (default `50MB`); a size like `1GB` or `2GiB`.
    #[arg(long, env = "SYNOD_DISK_FREE_LIMIT")]
    pub disk_free_limit: Option<String>,
    /// TOML file with the same keys as the flags (`data-dir = "..."`).
    #[arg(long, env = "SYNOD_CONFIG")]
    pub config: Option<PathBuf>,
}

/// The keys of a `--config` TOML file: the flags' long names.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileConfig {
    node_name: Option<String>,
    cluster_name: Option<String>,
    data_dir: Option<PathBuf>,
    amqp_listen: Option<String>,
    mgmt_listen: Option<String>,
    metrics_listen: Option<String>,
    cluster_listen: Option<String>,
    peers: Option<String>,
    cluster_secret_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    amqps_listen: Option<String>,
    no_plain_amqp: Option<FileBool>,
    cluster_tls: Option<String>,
    max_message_size: Option<u64>,
    metrics_per_queue: Option<bool>,
    default_user: Option<String>,
    default_pass: Option<String>,
    default_pass_file: Option<PathBuf>,
    queue_memory_max: Option<String>,
    max_connections: Option<usize>,
    channel_max: Option<u16>,
    max_queues: Option<u64>,
    max_consumers_per_channel: Option<u32>,
    memory_high_watermark: Option<String>,
    disk_free_limit: Option<String>,
}

/// `--memory-high-watermark`: relative to the memory available to the
/// process, or absolute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryWatermark {
    /// Millionths of the memory available to the process (cgroup limit,
    /// else physical RAM), resolved when the broker starts.
    Relative {
        /// The fraction, in millionths (400000 = 0.4).
        millionths: u32,
    },
    /// Bytes.
    Absolute {
        /// The bound in bytes.
        bytes: u64,
    },
}

/// A boolean in the `--config` file: `true`, or the string `"true"` (the
/// operator's `spec.config` carries strings and integers only).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(untagged)]
enum FileBool {
    Bool(bool),
    Text(TextBool),
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum TextBool {
    True,
    False,
}

impl From<FileBool> for bool {
    fn from(value: FileBool) -> bool {
        matches!(value, FileBool::Bool(true) | FileBool::Text(TextBool::True))
    }
}

/// The administrator a new broker creates instead of `guest`.
#[derive(Clone, PartialEq, Eq)]
pub struct DefaultUser {
    /// User name.
    pub name: String,
    /// Password in clear; hashed when the user is created.
    pub password: String,
}

// The password never reaches logs through `{:?}` of the configuration.
impl std::fmt::Debug for DefaultUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DefaultUser")
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// TLS files, all present or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// CA bundle (PEM) for client/peer verification.
    pub ca: Option<PathBuf>,
    /// AMQPS listen address.
    pub amqps_listen: SocketAddr,
    /// Whether connections on the cluster port are TLS (cluster TLS on and
    /// the node has peers); `ca` is then present.
    pub cluster: bool,
}

/// The validated configuration the broker runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Name of this node.
    pub node_name: String,
    /// Name of the cluster this node belongs to.
    pub cluster_name: String,
    /// Directory for durable state.
    pub data_dir: PathBuf,
    /// AMQP listen address (not bound when `amqp_plain` is false).
    pub amqp_listen: SocketAddr,
    /// Whether plain AMQP is served on `amqp_listen` (`--no-plain-amqp`
    /// turns it off; AMQPS is then the only AMQP listener).
    pub amqp_plain: bool,
    /// Management API listen address.
    pub mgmt_listen: SocketAddr,
    /// Metrics listen address.
    pub metrics_listen: SocketAddr,
    /// Cluster listen address.
    pub cluster_listen: SocketAddr,
    /// Cluster seed list, node name to `host:port`; empty for a single node.
    pub peers: BTreeMap<String, String>,
    /// File with the cluster secret; `Some` whenever `peers` is non-empty.
    pub cluster_secret_file: Option<PathBuf>,
    /// TLS settings, when configured: AMQPS on `amqps_listen`, HTTPS on
    /// the management and metrics listeners.
    pub tls: Option<TlsConfig>,
    /// Largest message body accepted, in bytes.
    pub max_message_size: u64,
    /// Whether `/metrics` includes the per-queue series.
    pub metrics_per_queue: bool,
    /// The administrator bootstrapped instead of `guest` on an empty store.
    pub default_user: Option<DefaultUser>,
    /// Body bytes a durable queue keeps in memory before paging out.
    pub queue_memory_max_bytes: u64,
    /// Open AMQP and AMQPS connections allowed at once.
    pub max_connections: usize,
    /// Channels per connection offered in `connection.tune`.
    pub channel_max: u16,
    /// Queues the metadata may hold (all vhosts); `None` is unlimited.
    pub max_queues: Option<u64>,
    /// Consumers per channel; `None` is unlimited.
    pub max_consumers_per_channel: Option<u32>,
    /// Message bytes in memory above which publishers are blocked.
    pub memory_high_watermark: MemoryWatermark,
    /// Free bytes on the data directory's file system below which
    /// publishers are blocked.
    pub disk_free_limit_bytes: u64,
}

impl Config {
    /// Builds the configuration from parsed flags (and the file they name).
    pub fn from_args(args: Args) -> Result<Config, Error> {
        let file = match &args.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        let node_name = args
            .node_name
            .or(file.node_name)
            .unwrap_or_else(default_node_name);
        if node_name.is_empty() {
            return Err(invalid("node-name", "must not be empty"));
        }
        let cluster_name = args
            .cluster_name
            .or(file.cluster_name)
            .unwrap_or_else(|| node_name.clone());
        if cluster_name.is_empty() {
            return Err(invalid("cluster-name", "must not be empty"));
        }
        let data_dir = args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("./synod-data"));
        let amqp_listen = parse_addr("amqp-listen", args.amqp_listen.or(file.amqp_listen), 5672)?;
        let mgmt_listen = parse_addr("mgmt-listen", args.mgmt_listen.or(file.mgmt_listen), 15672)?;
        let metrics_listen = parse_addr(
            "metrics-listen",
            args.metrics_listen.or(file.metrics_listen),
            15692,
        )?;
        let cluster_listen = parse_addr(
            "cluster-listen",
            args.cluster_listen.or(file.cluster_listen),
            25672,
        )?;
        let peers = parse_peers(args.peers.or(file.peers).as_deref().unwrap_or(""))?;
        let cluster_secret_file = args.cluster_secret_file.or(file.cluster_secret_file);
        if !peers.is_empty() && cluster_secret_file.is_none() {
            return Err(invalid(
                "cluster-secret-file",
                "is required when --peers is given",
            ));
        }
        let cluster_tls = parse_cluster_tls(args.cluster_tls.or(file.cluster_tls).as_deref())?;
        let tls = match (
            args.tls_cert.or(file.tls_cert),
            args.tls_key.or(file.tls_key),
        ) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(TlsConfig {
                cert,
                key,
                ca: args.tls_ca.or(file.tls_ca),
                amqps_listen: parse_addr(
                    "amqps-listen",
                    args.amqps_listen.or(file.amqps_listen),
                    5671,
                )?,
                // Without peers there is no cluster traffic to protect.
                cluster: cluster_tls != Some(false) && !peers.is_empty(),
            }),
            (Some(_), None) => return Err(invalid("tls-key", "is required with --tls-cert")),
            (None, Some(_)) => return Err(invalid("tls-cert", "is required with --tls-key")),
        };
        if cluster_tls == Some(true) && tls.is_none() {
            return Err(invalid(
                "cluster-tls",
                "on needs --tls-cert and --tls-key (and --tls-ca)",
            ));
        }
        if let Some(tls) = &tls
            && tls.cluster
            && tls.ca.is_none()
        {
            return Err(invalid(
                "tls-ca",
                "is required for TLS between cluster nodes (--peers with --tls-cert); \
                 or turn cluster TLS off with --cluster-tls off",
            ));
        }
        let amqp_plain = !(args.no_plain_amqp || file.no_plain_amqp.is_some_and(bool::from));
        if !amqp_plain && tls.is_none() {
            return Err(invalid(
                "no-plain-amqp",
                "leaves no AMQP listener: AMQPS needs --tls-cert and --tls-key",
            ));
        }
        let max_message_size = args
            .max_message_size
            .or(file.max_message_size)
            .unwrap_or(crate::limits::MESSAGE_SIZE_MAX);
        if max_message_size == 0 || max_message_size > crate::limits::MESSAGE_SIZE_CONFIGURABLE_MAX
        {
            return Err(invalid(
                "max-message-size",
                format!(
                    "{max_message_size} is not between 1 and {} bytes",
                    crate::limits::MESSAGE_SIZE_CONFIGURABLE_MAX
                ),
            ));
        }
        let default_user = default_user(
            args.default_user.or(file.default_user),
            args.default_pass.or(file.default_pass),
            args.default_pass_file.or(file.default_pass_file),
        )?;
        let queue_memory_max_bytes = match args.queue_memory_max.or(file.queue_memory_max) {
            Some(text) => parse_bytes("queue-memory-max", &text)?,
            None => crate::limits::QUEUE_MEMORY_MAX_BYTES_DEFAULT,
        };
        let max_connections = args
            .max_connections
            .or(file.max_connections)
            .unwrap_or(crate::limits::CONNECTIONS_MAX);
        let channel_max = args
            .channel_max
            .or(file.channel_max)
            .unwrap_or(crate::limits::CHANNELS_PER_CONNECTION_MAX);
        if channel_max == 0 {
            return Err(invalid("channel-max", "must be between 1 and 65535"));
        }
        let memory_high_watermark = match args.memory_high_watermark.or(file.memory_high_watermark)
        {
            Some(text) => parse_watermark(&text)?,
            None => MemoryWatermark::Relative {
                millionths: (crate::limits::MEMORY_HIGH_WATERMARK_FRACTION_DEFAULT * 1_000_000.0)
                    as u32,
            },
        };
        let disk_free_limit_bytes = match args.disk_free_limit.or(file.disk_free_limit) {
            Some(text) => parse_size("disk-free-limit", &text)?,
            None => crate::limits::DISK_FREE_LIMIT_BYTES_DEFAULT,
        };
        Ok(Config {
            max_connections,
            channel_max,
            max_queues: args.max_queues.or(file.max_queues),
            max_consumers_per_channel: args
                .max_consumers_per_channel
                .or(file.max_consumers_per_channel),
            memory_high_watermark,
            disk_free_limit_bytes,
            node_name,
            cluster_name,
            data_dir,
            amqp_listen,
            amqp_plain,
            mgmt_listen,
            metrics_listen,
            cluster_listen,
            peers,
            cluster_secret_file,
            tls,
            max_message_size,
            metrics_per_queue: args
                .metrics_per_queue
                .or(file.metrics_per_queue)
                .unwrap_or(true),
            default_user,
            queue_memory_max_bytes,
        })
    }
}

/// Validates `--default-user` with its password, given inline or in a file.
fn default_user(
    name: Option<String>,
    password: Option<String>,
    password_file: Option<PathBuf>,
) -> Result<Option<DefaultUser>, Error> {
    let password = match (password, password_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "default-pass-file",
                "cannot be combined with --default-pass",
            ));
        }
        (Some(password), None) => Some(password),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path).map_err(|err| {
                invalid(
                    "default-pass-file",
                    format!("cannot read {}: {err}", path.display()),
                )
            })?;
            // `echo secret > file` leaves a newline that is not part of the password.
            Some(text.trim_end_matches(['\n', '\r']).to_string())
        }
        (None, None) => None,
    };
    match (name, password) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(invalid(
            "default-user",
            "is required with --default-pass or --default-pass-file",
        )),
        (Some(_), None) => Err(invalid(
            "default-pass",
            "(or --default-pass-file) is required with --default-user",
        )),
        (Some(name), Some(_)) if name.is_empty() => {
            Err(invalid("default-user", "must not be empty"))
        }
        (Some(_), Some(password)) if password.is_empty() => {
            Err(invalid("default-pass", "must not be empty"))
        }
        (Some(name), Some(password)) => Ok(Some(DefaultUser { name, password })),
    }
}

/// Parses a byte count: digits with an optional `B`, `KiB`, `MiB` or `GiB`.
fn parse_bytes(flag: &'static str, text: &str) -> Result<u64, Error> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => {
            return Err(invalid(
                flag,
                format!("{text:?} is not a size like 67108864 or 64MiB"),
            ));
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .ok_or_else(|| {
            invalid(
                flag,
                format!("{text:?} is not a size like 67108864 or 64MiB"),
            )
        })
}

/// Parses `--cluster-tls`: `None` for `auto` (on when TLS is configured).
fn parse_cluster_tls(value: Option<&str>) -> Result<Option<bool>, Error> {
    match value.map(str::trim) {
        None | Some("auto") => Ok(None),
        Some("on") => Ok(Some(true)),
        Some("off") => Ok(Some(false)),
        Some(other) => Err(invalid(
            "cluster-tls",
            format!("{other:?} is not auto, on or off"),
        )),
    }
}

/// Parses a size as RabbitMQ writes them: digits with an optional decimal
/// (`kB`, `MB`, `GB`) or binary (`KiB`, `MiB`, `GiB`) unit.
fn parse_size(flag: &'static str, text: &str) -> Result<u64, Error> {
    let trimmed = text.trim();
    let decimal = [
        ("kB", 1_000u64),
        ("KB", 1_000),
        ("MB", 1_000_000),
        ("GB", 1_000_000_000),
    ];
    for (unit, multiplier) in decimal {
        if let Some(digits) = trimmed.strip_suffix(unit) {
            return digits
                .trim()
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(multiplier))
                .ok_or_else(|| invalid(flag, format!("{text:?} is not a size like 50MB or 2GiB")));
        }
    }
    parse_bytes(flag, trimmed)
        .map_err(|_| invalid(flag, format!("{text:?} is not a size like 50MB or 2GiB")))
}

/// Parses `--memory-high-watermark`: a fraction in (0, 1] written with a
/// decimal point (`0.4`), or a size.
fn parse_watermark(text: &str) -> Result<MemoryWatermark, Error> {
    let trimmed = text.trim();
    if trimmed.contains('.') {
        return match trimmed.parse::<f64>() {
            Ok(fraction) if fraction > 0.0 && fraction <= 1.0 => Ok(MemoryWatermark::Relative {
                millionths: (fraction * 1_000_000.0).round() as u32,
            }),
            _ => Err(invalid(
                "memory-high-watermark",
                format!("{text:?} is neither a fraction in (0, 1] like 0.4 nor a size like 2GiB"),
            )),
        };
    }
    parse_size("memory-high-watermark", trimmed).map(|bytes| MemoryWatermark::Absolute { bytes })
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        flag,
        reason: reason.into(),
    }
}

fn read_file_config(path: &PathBuf) -> Result<FileConfig, Error> {
    let text = std::fs::read_to_string(path).map_err(|err| Error::File {
        path: path.clone(),
        reason: err.to_string(),
    })?;
    toml::from_str(&text).map_err(|err| Error::File {
        path: path.clone(),
        reason: err.to_string(),
    })
}

fn default_node_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string());
    format!("synod@{host}")
}

/// Parses `HOST:PORT`, `:PORT` or `PORT`; a missing host means all interfaces.
fn parse_addr(
    flag: &'static str,
    value: Option<String>,
    default_port: u16,
) -> Result<SocketAddr, Error> {
    let Some(value) = value else {
        return Ok(SocketAddr::from(([0, 0, 0, 0], default_port)));
    };
    let text = if let Ok(port) = value.parse::<u16>() {
        format!("0.0.0.0:{port}")
    } else if let Some(port) = value.strip_prefix(':') {
        format!("0.0.0.0:{port}")
    } else {
        value.clone()
    };
    text.parse().map_err(|_| {
        invalid(
            flag,
            format!("{value:?} is not an address like 127.0.0.1:5672"),
        )
    })
}

/// Parses `NAME=HOST:PORT,...`.
fn parse_peers(text: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut peers = BTreeMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((name, addr)) = entry.split_once('=') else {
            return Err(invalid("peers", format!("{entry:?} is not NAME=HOST:PORT")));
        };
        let (name, addr) = (name.trim(), addr.trim());
        let port_ok = addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if name.is_empty() || !port_ok {
            return Err(invalid("peers", format!("{entry:?} is not NAME=HOST:PORT")));
        }
        if peers.insert(name.to_string(), addr.to_string()).is_some() {
            return Err(invalid("peers", format!("node {name:?} is listed twice")));
        }
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(argv: &[&str]) -> Result<Config, Error> {
        let mut full = vec!["synod-broker"];
        full.extend_from_slice(argv);
        Config::from_args(Args::try_parse_from(full).expect("flags parse"))
    }

    #[test]
    fn defaults_are_a_single_node_on_the_standard_ports() {
        // Goal: no flags means one node on 5672/15672/15692/25672 in ./synod-data.
        let config = config(&[]).expect("defaults are valid");
        assert_eq!(config.amqp_listen.port(), 5672);
        assert_eq!(config.mgmt_listen.port(), 15672);
        assert_eq!(config.metrics_listen.port(), 15692);
        assert_eq!(config.cluster_listen.port(), 25672);
        assert_eq!(config.data_dir, PathBuf::from("./synod-data"));
        assert!(config.peers.is_empty());
        assert!(config.tls.is_none());
        assert!(config.metrics_per_queue);
        assert_eq!(config.max_message_size, 128 * 1024 * 1024);
        assert_eq!(
            config.queue_memory_max_bytes,
            crate::limits::QUEUE_MEMORY_MAX_BYTES_DEFAULT
        );
    }

    #[test]
    fn queue_memory_max_takes_bytes_with_binary_units() {
        // Goal: plain bytes and KiB/MiB/GiB parse; anything else names the flag.
        for (text, bytes) in [
            ("4096", 4096),
            ("64MiB", 64 << 20),
            ("1 GiB", 1 << 30),
            ("0", 0),
        ] {
            let config = config(&["--queue-memory-max", text]).expect("valid");
            assert_eq!(config.queue_memory_max_bytes, bytes, "{text}");
        }
        for text in ["", "64MB", "1.5GiB", "MiB"] {
            let err = config(&["--queue-memory-max", text]).expect_err("must fail");
            assert!(
                err.to_string().contains("--queue-memory-max"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn limits_have_rabbitmq_defaults_and_take_sizes_and_fractions() {
        // Goal: defaults are 10000 connections, 2047 channels, no queue or consumer bound, 0.4 of memory, 50MB free disk; values parse, junk names its flag.
        let defaults = config(&[]).expect("valid");
        assert_eq!(defaults.max_connections, 10_000);
        assert_eq!(defaults.channel_max, 2_047);
        assert_eq!(defaults.max_queues, None);
        assert_eq!(defaults.max_consumers_per_channel, None);
        assert_eq!(
            defaults.memory_high_watermark,
            MemoryWatermark::Relative {
                millionths: 400_000
            }
        );
        assert_eq!(defaults.disk_free_limit_bytes, 50_000_000);
        let set = config(&[
            "--max-connections",
            "5",
            "--channel-max",
            "16",
            "--max-queues",
            "100",
            "--max-consumers-per-channel",
            "3",
            "--memory-high-watermark",
            "2GiB",
            "--disk-free-limit",
            "1GB",
        ])
        .expect("valid");
        assert_eq!(set.max_connections, 5);
        assert_eq!(set.channel_max, 16);
        assert_eq!(set.max_queues, Some(100));
        assert_eq!(set.max_consumers_per_channel, Some(3));
        assert_eq!(
            set.memory_high_watermark,
            MemoryWatermark::Absolute { bytes: 2 << 30 }
        );
        assert_eq!(set.disk_free_limit_bytes, 1_000_000_000);
        let dir = std::env::temp_dir().join(format!("synod-limits-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("synod.toml");
        std::fs::write(
            &path,
            "max-queues = 7\nmax-connections = 9\ndisk-free-limit = \"2GB\"\nmemory-high-watermark = \"0.5\"\n",
        )
        .expect("write config");
        let from_file = config(&["--config", path.to_str().expect("utf-8 path")]).expect("valid");
        assert_eq!(from_file.max_queues, Some(7));
        assert_eq!(from_file.max_connections, 9);
        assert_eq!(from_file.disk_free_limit_bytes, 2_000_000_000);
        assert_eq!(
            from_file.memory_high_watermark,
            MemoryWatermark::Relative {
                millionths: 500_000
            }
        );
        std::fs::remove_dir_all(&dir).ok();
        let relative = config(&["--memory-high-watermark", "0.25"]).expect("valid");
        assert_eq!(
            relative.memory_high_watermark,
            MemoryWatermark::Relative {
                millionths: 250_000
            }
        );
        for (argv, flag) in [
            (
                ["--memory-high-watermark", "1.5"],
                "--memory-high-watermark",
            ),
            (
                ["--memory-high-watermark", "lots"],
                "--memory-high-watermark",
            ),
            (["--disk-free-limit", "50 parsecs"], "--disk-free-limit"),
            (["--channel-max", "0"], "--channel-max"),
        ] {
            let err = config(&argv).expect_err("must fail");
            assert!(err.to_string().contains(flag), "{argv:?}: {err}");
        }
    }

    #[test]
    fn the_cluster_name_defaults_to_the_node_name() {
        // Goal: without --cluster-name the node names its cluster; the flag overrides; empty is refused.
        let default = config(&["--node-name", "n1"]).expect("valid");
        assert_eq!(default.cluster_name, "n1");
        let named = config(&["--node-name", "n1", "--cluster-name", "orders"]).expect("valid");
        assert_eq!(named.cluster_name, "orders");
        assert_eq!(named.node_name, "n1");
        let err = config(&["--cluster-name", ""]).expect_err("empty name");
        assert!(err.to_string().contains("cluster-name"), "{err}");
    }

    #[test]
    fn per_queue_metrics_can_be_switched_off() {
        // Goal: `--metrics-per-queue false` turns the per-queue series off; junk is refused.
        let off = config(&["--metrics-per-queue", "false"]).expect("valid");
        assert!(!off.metrics_per_queue);
        let on = config(&["--metrics-per-queue", "true"]).expect("valid");
        assert!(on.metrics_per_queue);
        let junk = Args::try_parse_from(["synod-broker", "--metrics-per-queue", "maybe"]);
        assert!(junk.is_err());
    }

    #[test]
    fn peers_without_a_secret_file_name_the_flag() {
        // Goal: --peers alone is a configuration error naming --cluster-secret-file.
        let err = config(&["--peers", "a=127.0.0.1:25672"]).expect_err("must fail");
        assert!(err.to_string().contains("--cluster-secret-file"), "{err}");
    }

    #[test]
    fn cluster_tls_follows_tls_and_peers_and_needs_a_ca() {
        // Goal: auto turns cluster TLS on only with TLS and peers; without --tls-ca that is an error naming it; off and on are obeyed.
        let tls = ["--tls-cert", "c.pem", "--tls-key", "k.pem"];
        let peers = ["--peers", "a=127.0.0.1:1", "--cluster-secret-file", "s"];
        let ca = ["--tls-ca", "ca.pem"];
        let with = |parts: &[&[&str]]| config(&parts.concat());
        let single = with(&[&tls]).expect("TLS without peers");
        assert!(!single.tls.expect("tls").cluster);
        let clustered = with(&[&tls, &peers, &ca]).expect("valid");
        assert!(clustered.tls.expect("tls").cluster);
        let err = with(&[&tls, &peers]).expect_err("no CA");
        assert!(err.to_string().contains("--tls-ca"), "{err}");
        let off = with(&[&tls, &peers, &["--cluster-tls", "off"]]).expect("off needs no CA");
        assert!(!off.tls.expect("tls").cluster);
        let err = with(&[&peers, &["--cluster-tls", "on"]]).expect_err("on without TLS");
        assert!(err.to_string().contains("--cluster-tls"), "{err}");
        let err = with(&[&tls, &["--cluster-tls", "yes"]]).expect_err("junk");
        assert!(err.to_string().contains("--cluster-tls"), "{err}");
        assert!(with(&[&[]]).expect("defaults").tls.is_none());
    }

    #[test]
    fn plain_amqp_can_be_switched_off_only_when_amqps_remains() {
        // Goal: --no-plain-amqp with TLS leaves AMQPS alone; without TLS it is an error naming the flag.
        assert!(config(&[]).expect("defaults").amqp_plain);
        let only_tls = config(&["--no-plain-amqp", "--tls-cert", "c", "--tls-key", "k"])
            .expect("AMQPS remains");
        assert!(!only_tls.amqp_plain);
        let err = config(&["--no-plain-amqp"]).expect_err("no listener left");
        assert!(err.to_string().contains("--no-plain-amqp"), "{err}");
        // In a --config file, as a TOML boolean or as the string the operator writes.
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("synod.toml");
        let path_str = path.to_str().expect("utf-8 path");
        for (line, plain) in [
            ("no-plain-amqp = true", false),
            ("no-plain-amqp = \"true\"", false),
            ("no-plain-amqp = \"false\"", true),
            ("no-plain-amqp = false", true),
        ] {
            std::fs::write(
                &path,
                format!("{line}\ntls-cert = \"c\"\ntls-key = \"k\"\n"),
            )
            .expect("write config");
            let config = config(&["--config", path_str]).expect(line);
            assert_eq!(config.amqp_plain, plain, "{line}");
        }
        std::fs::write(&path, "no-plain-amqp = \"maybe\"\n").expect("write config");
        assert!(config(&["--config", path_str]).is_err());
    }

    #[test]
    fn malformed_inputs_are_rejected_with_their_flag() {
        // Goal: each malformed value is refused and the message names its flag.
        let cases: &[(&[&str], &str)] = &[
            (&["--amqp-listen", "nowhere"], "--amqp-listen"),
            (&["--peers", "a", "--cluster-secret-file", "s"], "--peers"),
            (
                &["--peers", "a=h:1,a=h:2", "--cluster-secret-file", "s"],
                "--peers",
            ),
            (
                &["--peers", "a=h:notaport", "--cluster-secret-file", "s"],
                "--peers",
            ),
            (&["--tls-cert", "c.pem"], "--tls-key"),
            (&["--node-name", ""], "--node-name"),
            (&["--max-message-size", "0"], "--max-message-size"),
            (&["--max-message-size", "536870913"], "--max-message-size"),
        ];
        for (argv, flag) in cases {
            let err = config(argv).expect_err("must fail");
            assert!(err.to_string().contains(flag), "{argv:?}: {err}");
        }
    }

    #[test]
    fn the_config_file_fills_what_flags_leave_out() {
        // Goal: TOML keys apply, flags override them, unknown keys are refused.
        let dir = std::env::temp_dir().join(format!("synod-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("synod.toml");
        std::fs::write(
            &path,
            "data-dir = \"/var/lib/x\"\namqp-listen = \"127.0.0.1:6000\"\n",
        )
        .expect("write config");
        let path_str = path.to_str().expect("utf-8 path");
        let config = config(&["--config", path_str, "--amqp-listen", "7000"]).expect("valid");
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/x"));
        assert_eq!(config.amqp_listen.port(), 7000);
        std::fs::write(&path, "no-such-key = 1\n").expect("write config");
        let err = config_err(path_str);
        assert!(err.contains("no-such-key"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_default_user_needs_a_password_from_exactly_one_place() {
        // Goal: user+pass or user+pass-file is accepted; every incomplete or conflicting mix names its flag.
        let inline =
            config(&["--default-user", "admin", "--default-pass", "s3cret"]).expect("valid");
        assert_eq!(
            inline.default_user,
            Some(DefaultUser {
                name: "admin".into(),
                password: "s3cret".into()
            })
        );
        assert!(
            !format!("{inline:?}").contains("s3cret"),
            "Debug hides the password"
        );
        assert_eq!(config(&[]).expect("valid").default_user, None);

        let dir = std::env::temp_dir().join(format!("synod-default-user-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("password");
        std::fs::write(&file, "from-file\n").expect("write password");
        let file = file.to_str().expect("utf-8 path");
        let from_file =
            config(&["--default-user", "admin", "--default-pass-file", file]).expect("valid");
        assert_eq!(
            from_file.default_user.map(|u| u.password).as_deref(),
            Some("from-file")
        );

        let cases: &[(&[&str], &str)] = &[
            (&["--default-user", "admin"], "--default-pass"),
            (&["--default-pass", "x"], "--default-user"),
            (
                &["--default-user", "", "--default-pass", "x"],
                "--default-user",
            ),
            (
                &["--default-user", "admin", "--default-pass", ""],
                "--default-pass",
            ),
            (
                &[
                    "--default-user",
                    "a",
                    "--default-pass",
                    "x",
                    "--default-pass-file",
                    file,
                ],
                "--default-pass-file",
            ),
            (
                &[
                    "--default-user",
                    "a",
                    "--default-pass-file",
                    "/nonexistent/synod/pw",
                ],
                "--default-pass-file",
            ),
        ];
        for (argv, flag) in cases {
            let err = config(argv).expect_err("must fail");
            assert!(err.to_string().contains(flag), "{argv:?}: {err}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    fn config_err(path: &str) -> String {
        config(&["--config", path])
            .expect_err("must fail")
            .to_string()
    }
}
