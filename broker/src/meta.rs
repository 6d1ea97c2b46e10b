//! Cluster metadata: vhosts, users, permissions, exchanges, queues and
//! bindings. Changes happen ONLY through [`Command`]s applied by
//! [`Metadata::apply`], a deterministic function with no I/O, so that every
//! node applying the same decided log holds the same topology.
//!
//! Architecture invariant: nothing here reads a clock, a socket or a file.

use std::collections::{BTreeMap, BTreeSet};

use amq_protocol::types::FieldTable;
use serde::{Deserialize, Serialize};

use crate::exchange::{Binding, Destination, ExchangeKind, Router};

/// A change to the metadata. Serializable: it travels through the Paxos
/// log and is persisted by the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Creates a vhost with its standard exchanges (no-op if it exists).
    AddVhost {
        /// Vhost name.
        name: String,
    },
    /// Deletes a vhost and everything in it.
    DeleteVhost {
        /// Vhost name.
        name: String,
    },
    /// Creates or replaces a user.
    PutUser {
        /// User name.
        name: String,
        /// `rabbit_password_hashing_sha256` hash (see `auth`).
        password_hash: String,
        /// Tags such as `administrator`.
        tags: Vec<String>,
    },
    /// Deletes a user and its permissions.
    DeleteUser {
        /// User name.
        name: String,
    },
    /// Sets a user's permissions in a vhost.
    SetPermissions {
        /// Vhost name.
        vhost: String,
        /// User name.
        user: String,
        /// Regex of resources the user may declare/delete.
        configure: String,
        /// Regex of resources the user may publish to / bind to.
        write: String,
        /// Regex of resources the user may consume from / bind from.
        read: String,
    },
    /// Removes a user's permissions in a vhost.
    ClearPermissions {
        /// Vhost name.
        vhost: String,
        /// User name.
        user: String,
    },
    /// Declares an exchange (idempotent when equivalent).
    DeclareExchange {
        /// Vhost name.
        vhost: String,
        /// Exchange definition.
        exchange: ExchangeDef,
    },
    /// Deletes an exchange and its bindings.
    DeleteExchange {
        /// Vhost name.
        vhost: String,
        /// Exchange name.
        name: String,
        /// Refuse when the exchange has bindings as a source.
        if_unused: bool,
    },
    /// Declares a queue (idempotent when equivalent).
    DeclareQueue {
        /// Vhost name.
        vhost: String,
        /// Queue definition.
        queue: QueueDef,
    },
    /// Deletes a queue and its bindings.
    DeleteQueue {
        /// Vhost name.
        vhost: String,
        /// Queue name.
        name: String,
    },
    /// Binds a destination to a source exchange.
    Bind {
        /// Vhost name.
        vhost: String,
        /// Source exchange.
        source: String,
        /// The binding.
        binding: Binding,
    },
    /// Removes a binding.
    Unbind {
        /// Vhost name.
        vhost: String,
        /// Source exchange.
        source: String,
        /// The binding.
        binding: Binding,
    },
    /// Marks a node as draining (no new queue is homed there; it moves its
    /// queues away, then leaves the configuration) or clears the mark.
    SetDraining {
        /// Node name.
        node: String,
        /// True to start draining, false when the node is invited back.
        draining: bool,
    },
    /// Changes a queue's home node. The definition, bindings and arguments
    /// stay; only where the messages live changes (see `drain`).
    MoveQueue {
        /// Vhost name.
        vhost: String,
        /// Queue name.
        name: String,
        /// The new home node.
        home: String,
    },
    /// Sets (`Some`) or clears (`None`) one of a user's limits.
    SetUserLimit {
        /// User name.
        user: String,
        /// Which limit.
        limit: UserLimit,
        /// The bound; 0 allows nothing.
        value: Option<u64>,
    },
    /// Sets (`Some`) or clears (`None`) one of a vhost's limits.
    SetVhostLimit {
        /// Vhost name.
        vhost: String,
        /// Which limit.
        limit: VhostLimit,
        /// The bound; 0 allows nothing.
        value: Option<u64>,
    },
}

/// A per-user limit, as RabbitMQ's `set_user_limits` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UserLimit {
    /// Connections the user may have open on a node.
    MaxConnections,
    /// Channels the user may have open on a node, all connections together.
    MaxChannels,
}

/// A per-vhost limit, as RabbitMQ's `set_vhost_limits` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VhostLimit {
    /// Connections to the vhost open on a node.
    MaxConnections,
    /// Queues in the vhost (cluster-wide: the metadata's count).
    MaxQueues,
}

impl UserLimit {
    /// Every user limit.
    pub const ALL: [UserLimit; 2] = [UserLimit::MaxConnections, UserLimit::MaxChannels];

    /// The name in the management API (`max-connections`).
    pub fn name(self) -> &'static str {
        match self {
            UserLimit::MaxConnections => "max-connections",
            UserLimit::MaxChannels => "max-channels",
        }
    }

    /// The limit called `name` in the management API.
    pub fn parse(name: &str) -> Option<UserLimit> {
        UserLimit::ALL.into_iter().find(|l| l.name() == name)
    }
}

impl VhostLimit {
    /// Every vhost limit.
    pub const ALL: [VhostLimit; 2] = [VhostLimit::MaxConnections, VhostLimit::MaxQueues];

    /// The name in the management API (`max-queues`).
    pub fn name(self) -> &'static str {
        match self {
            VhostLimit::MaxConnections => "max-connections",
            VhostLimit::MaxQueues => "max-queues",
        }
    }

    /// The limit called `name` in the management API.
    pub fn parse(name: &str) -> Option<VhostLimit> {
        VhostLimit::ALL.into_iter().find(|l| l.name() == name)
    }
}

/// An exchange's definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExchangeDef {
    /// Exchange name.
    pub name: String,
    /// Routing algorithm.
    pub kind: ExchangeKind,
    /// Survives a restart.
    pub durable: bool,
    /// Deleted when its last binding (as a source) goes.
    pub auto_delete: bool,
    /// Clients may not publish to it directly.
    pub internal: bool,
    /// Declare arguments (e.g. `alternate-exchange`).
    pub arguments: FieldTable,
}

/// A queue's definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueDef {
    /// Queue name.
    pub name: String,
    /// Survives a restart.
    pub durable: bool,
    /// The connection (by name) that owns an exclusive queue.
    pub exclusive_owner: Option<String>,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Declare arguments (`x-message-ttl`, `x-dead-letter-exchange`, ...).
    pub arguments: FieldTable,
    /// Node that holds the queue's messages.
    pub home_node: String,
}

/// A user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// User name.
    pub name: String,
    /// Password hash.
    pub password_hash: String,
    /// Tags.
    pub tags: Vec<String>,
}

/// A user's permissions in one vhost (regular expressions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permissions {
    /// Configure regex.
    pub configure: String,
    /// Write regex.
    pub write: String,
    /// Read regex.
    pub read: String,
}

/// An exchange with its bindings.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// Definition.
    pub def: ExchangeDef,
    /// Bindings with this exchange as the source.
    pub router: Router,
}

/// One vhost's topology.
#[derive(Debug, Clone, Default)]
pub struct Vhost {
    /// Exchanges by name.
    pub exchanges: BTreeMap<String, Exchange>,
    /// Queues by name.
    pub queues: BTreeMap<String, QueueDef>,
    /// Limits set on the vhost.
    pub limits: BTreeMap<VhostLimit, u64>,
}

/// The whole metadata.
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    /// Vhosts by name.
    pub vhosts: BTreeMap<String, Vhost>,
    /// Users by name.
    pub users: BTreeMap<String, User>,
    /// Permissions by (vhost, user).
    pub permissions: BTreeMap<(String, String), Permissions>,
    /// Nodes being drained (or drained and removed): never a new home.
    pub draining: BTreeSet<String>,
    /// Limits set on users, by user name.
    pub user_limits: BTreeMap<String, BTreeMap<UserLimit, u64>>,
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    /// The entity was created (false: it existed and was equivalent).
    pub created: bool,
    /// Queues deleted as a consequence, as (vhost, name).
    pub deleted_queues: Vec<(String, String)>,
    /// Exchanges deleted, as (vhost, name).
    pub deleted_exchanges: Vec<(String, String)>,
}

/// Why a command was refused. Each maps to an AMQP reply code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// A named entity does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// Redeclaration with different properties, or a failed if-unused (406).
    #[error("{0}")]
    PreconditionFailed(String),
    /// A reserved name or forbidden operation (403).
    #[error("{0}")]
    AccessRefused(String),
    /// Malformed input such as an unknown exchange type (503 or 400).
    #[error("{0}")]
    Invalid(String),
    /// The cluster could not decide the change: this node cannot reach a
    /// majority, or the decision took too long (405 RESOURCE_LOCKED, a
    /// channel error, so the connection and its consumers survive; HTTP 503).
    #[error("{0}")]
    Unavailable(String),
}

impl MetaError {
    /// The AMQP reply code for this error.
    pub fn reply_code(&self) -> u16 {
        use crate::protocol::reply;
        match self {
            MetaError::NotFound(_) => reply::NOT_FOUND,
            MetaError::PreconditionFailed(_) => reply::PRECONDITION_FAILED,
            MetaError::AccessRefused(_) => reply::ACCESS_REFUSED,
            MetaError::Invalid(_) => reply::COMMAND_INVALID,
            MetaError::Unavailable(_) => reply::RESOURCE_LOCKED,
        }
    }
}

/// The exchanges every vhost starts with (the default exchange is "").
const STANDARD_EXCHANGES: &[(&str, ExchangeKind)] = &[
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
];

/// Bound on exchange-to-exchange hops while routing; with the visited set
/// cycles are already safe, this also caps pathological chains.
pub const EXCHANGE_HOPS_MAX: usize = 64;

impl Metadata {
    /// Applies one command. Deterministic: the same commands in the same
    /// order give the same metadata on every node.
    pub fn apply(&mut self, command: Command) -> Result<Outcome, MetaError> {
        match command {
            Command::AddVhost { name } => {
                if self.vhosts.contains_key(&name) {
                    return Ok(Outcome::default());
                }
                let mut vhost = Vhost::default();
                for (ex_name, kind) in STANDARD_EXCHANGES {
                    vhost.exchanges.insert(
                        (*ex_name).to_string(),
                        Exchange {
                            def: ExchangeDef {
                                name: (*ex_name).to_string(),
                                kind: *kind,
                                durable: true,
                                auto_delete: false,
                                internal: false,
                                arguments: FieldTable::default(),
                            },
                            router: Router::new(*kind),
                        },
                    );
                }
                self.vhosts.insert(name, vhost);
                Ok(created())
            }
            Command::DeleteVhost { name } => {
                let vhost = self
                    .vhosts
                    .remove(&name)
                    .ok_or_else(|| MetaError::NotFound(format!("no vhost '{name}'")))?;
                self.permissions.retain(|(v, _), _| v != &name);
                Ok(Outcome {
                    created: false,
                    deleted_queues: vhost
                        .queues
                        .into_keys()
                        .map(|q| (name.clone(), q))
                        .collect(),
                    deleted_exchanges: vhost
                        .exchanges
                        .into_keys()
                        .map(|e| (name.clone(), e))
                        .collect(),
                })
            }
            Command::PutUser {
                name,
                password_hash,
                tags,
            } => {
                let created = !self.users.contains_key(&name);
                self.users.insert(
                    name.clone(),
                    User {
                        name,
                        password_hash,
                        tags,
                    },
                );
                Ok(Outcome {
                    created,
                    ..Outcome::default()
                })
            }
            Command::DeleteUser { name } => {
                self.users
                    .remove(&name)
                    .ok_or_else(|| MetaError::NotFound(format!("no user '{name}'")))?;
                self.permissions.retain(|(_, u), _| u != &name);
                self.user_limits.remove(&name);
                Ok(Outcome::default())
            }
            Command::SetPermissions {
                vhost,
                user,
                configure,
                write,
                read,
            } => {
                self.vhost(&vhost)?;
                if !self.users.contains_key(&user) {
                    return Err(MetaError::NotFound(format!("no user '{user}'")));
                }
                for regex in [&configure, &write, &read] {
                    if regex::Regex::new(regex).is_err() {
                        return Err(MetaError::Invalid(format!("invalid regex '{regex}'")));
                    }
                }
                self.permissions.insert(
                    (vhost, user),
                    Permissions {
                        configure,
                        write,
                        read,
                    },
                );
                Ok(created())
            }
            Command::ClearPermissions { vhost, user } => {
                self.permissions.remove(&(vhost, user));
                Ok(Outcome::default())
            }
            Command::DeclareExchange { vhost, exchange } => {
                check_name_len("exchange", &exchange.name)?;
                let vhost_name = vhost;
                let vhost = self.vhost_mut(&vhost_name)?;
                if let Some(existing) = vhost.exchanges.get(&exchange.name) {
                    check_exchange_equivalent(&existing.def, &exchange, &vhost_name)?;
                    return Ok(Outcome::default());
                }
                let router = Router::new(exchange.kind);
                vhost.exchanges.insert(
                    exchange.name.clone(),
                    Exchange {
                        def: exchange,
                        router,
                    },
                );
                Ok(created())
            }
            Command::DeleteExchange {
                vhost,
                name,
                if_unused,
            } => {
                let vhost_name = vhost;
                let vhost = self.vhost_mut(&vhost_name)?;
                let Some(exchange) = vhost.exchanges.get(&name) else {
                    return Err(MetaError::NotFound(format!(
                        "no exchange '{name}' in vhost '{vhost_name}'"
                    )));
                };
                if if_unused && !exchange.router.bindings().is_empty() {
                    return Err(MetaError::PreconditionFailed(format!(
                        "exchange '{name}' in vhost '{vhost_name}' in use"
                    )));
                }
                vhost.exchanges.remove(&name);
                let mut outcome = Outcome {
                    deleted_exchanges: vec![(vhost_name.clone(), name.clone())],
                    ..Outcome::default()
                };
                remove_destination(
                    vhost,
                    &vhost_name,
                    &Destination::Exchange(name),
                    &mut outcome,
                );
                Ok(outcome)
            }
            Command::DeclareQueue { vhost, queue } => {
                check_name_len("queue", &queue.name)?;
                let vhost_name = vhost;
                let vhost = self.vhost_mut(&vhost_name)?;
                if let Some(existing) = vhost.queues.get(&queue.name) {
                    check_queue_equivalent(existing, &queue, &vhost_name)?;
                    return Ok(Outcome::default());
                }
                // Checked here, in the decided order, so that a cluster
                // never holds more than the limit whichever node declares.
                if let Some(&max) = vhost.limits.get(&VhostLimit::MaxQueues)
                    && vhost.queues.len() as u64 >= max
                {
                    return Err(MetaError::PreconditionFailed(format!(
                        "cannot declare queue '{}' in vhost '{vhost_name}': vhost queue limit ({max}) is reached",
                        queue.name
                    )));
                }
                vhost.queues.insert(queue.name.clone(), queue);
                Ok(created())
            }
            Command::DeleteQueue { vhost, name } => {
                let vhost_name = vhost;
                let vhost = self.vhost_mut(&vhost_name)?;
                if vhost.queues.remove(&name).is_none() {
                    return Err(MetaError::NotFound(format!(
                        "no queue '{name}' in vhost '{vhost_name}'"
                    )));
                }
                let mut outcome = Outcome {
                    deleted_queues: vec![(vhost_name.clone(), name.clone())],
                    ..Outcome::default()
                };
                remove_destination(vhost, &vhost_name, &Destination::Queue(name), &mut outcome);
                Ok(outcome)
            }
            Command::Bind {
                vhost,
                source,
                binding,
            } => {
                let vhost_name = vhost;
                let vhost = self.vhost_mut(&vhost_name)?;
                check_destination_exists(vhost, &vhost_name, &binding.destination)?;
                let exchange = vhost.exchanges.get_mut(&source).ok_or_else(|| {
                    MetaError::NotFound(format!("no exchange '{source}' in vhost '{vhost_name}'"))
                })?;
                if source.is_empty() {
                    return Err(MetaError::AccessRefused(format!(
                        "operation not permitted on the default exchange in vhost '{vhost_name}'"
                    )));
                }
                let created = exchange.router.bind(binding);
                Ok(Outcome {
                    created,
                    ..Outcome::default()
                })
            }
            Command::Unbind {
                vhost,
                source,
                binding,
            } => {
                let vhost_name = vhost;
                let vhost = self.vhost_mut(&vhost_name)?;
                check_destination_exists(vhost, &vhost_name, &binding.destination)?;
                let exchange = vhost.exchanges.get_mut(&source).ok_or_else(|| {
                    MetaError::NotFound(format!("no exchange '{source}' in vhost '{vhost_name}'"))
                })?;
                if source.is_empty() {
                    return Err(MetaError::AccessRefused(format!(
                        "operation not permitted on the default exchange in vhost '{vhost_name}'"
                    )));
                }
                exchange.router.unbind(&binding);
                let mut outcome = Outcome::default();
                auto_delete_exchange(vhost, &vhost_name, &source, &mut outcome);
                Ok(outcome)
            }
            Command::SetDraining { node, draining } => {
                let changed = if draining {
                    self.draining.insert(node)
                } else {
                    self.draining.remove(&node)
                };
                Ok(Outcome {
                    created: changed,
                    ..Outcome::default()
                })
            }
            Command::MoveQueue { vhost, name, home } => {
                let vhost_name = vhost;
                let vhost = self.vhost_mut(&vhost_name)?;
                let queue = vhost.queues.get_mut(&name).ok_or_else(|| {
                    MetaError::NotFound(format!("no queue '{name}' in vhost '{vhost_name}'"))
                })?;
                // An exclusive queue lives and dies with its connection.
                if queue.exclusive_owner.is_some() {
                    return Err(MetaError::PreconditionFailed(format!(
                        "exclusive queue '{name}' in vhost '{vhost_name}' cannot move"
                    )));
                }
                let created = queue.home_node != home;
                queue.home_node = home;
                Ok(Outcome {
                    created,
                    ..Outcome::default()
                })
            }
            Command::SetUserLimit { user, limit, value } => {
                if !self.users.contains_key(&user) {
                    return Err(MetaError::NotFound(format!("no user '{user}'")));
                }
                let limits = self.user_limits.entry(user.clone()).or_default();
                let created = match value {
                    Some(value) => limits.insert(limit, value).is_none(),
                    None => {
                        limits.remove(&limit);
                        false
                    }
                };
                if limits.is_empty() {
                    self.user_limits.remove(&user);
                }
                Ok(Outcome {
                    created,
                    ..Outcome::default()
                })
            }
            Command::SetVhostLimit {
                vhost,
                limit,
                value,
            } => {
                let vhost = self.vhost_mut(&vhost)?;
                let created = match value {
                    Some(value) => vhost.limits.insert(limit, value).is_none(),
                    None => {
                        vhost.limits.remove(&limit);
                        false
                    }
                };
                Ok(Outcome {
                    created,
                    ..Outcome::default()
                })
            }
        }
    }

    /// Whether `node` is draining (or was drained).
    pub fn is_draining(&self, node: &str) -> bool {
        self.draining.contains(node)
    }

    /// The vhost named `name`.
    pub fn vhost(&self, name: &str) -> Result<&Vhost, MetaError> {
        self.vhosts
            .get(name)
            .ok_or_else(|| MetaError::NotFound(format!("no vhost '{name}'")))
    }

    fn vhost_mut(&mut self, name: &str) -> Result<&mut Vhost, MetaError> {
        self.vhosts
            .get_mut(name)
            .ok_or_else(|| MetaError::NotFound(format!("no vhost '{name}'")))
    }

    /// Routes a message published to `exchange`: calls `found` once per
    /// destination queue, following exchange-to-exchange bindings without
    /// looping. Returns false when the exchange does not exist.
    pub fn route(
        &self,
        vhost: &str,
        exchange: &str,
        routing_key: &str,
        headers: Option<&FieldTable>,
        found: &mut dyn FnMut(&str),
    ) -> bool {
        let Some(vhost) = self.vhosts.get(vhost) else {
            return false;
        };
        if exchange.is_empty() {
            // The default exchange binds every queue under its own name.
            if vhost.queues.contains_key(routing_key) {
                found(routing_key);
            }
            return true;
        }
        let Some(start) = vhost.exchanges.get(exchange) else {
            return false;
        };
        let mut visited_exchanges: Vec<&str> = vec![exchange];
        let mut queues: BTreeSet<&str> = BTreeSet::new();
        let mut pending: Vec<&Exchange> = vec![start];
        while let Some(current) = pending.pop() {
            current
                .router
                .route(routing_key, headers, &mut |destination| match destination {
                    Destination::Queue(name) => {
                        if let Some((key, _)) = vhost.queues.get_key_value(name) {
                            queues.insert(key.as_str());
                        }
                    }
                    Destination::Exchange(name) => {
                        if visited_exchanges.len() < EXCHANGE_HOPS_MAX
                            && !visited_exchanges.contains(&name.as_str())
                            && let Some((key, next)) = vhost.exchanges.get_key_value(name)
                        {
                            visited_exchanges.push(key.as_str());
                            pending.push(next);
                        }
                    }
                });
        }
        queues.into_iter().for_each(found);
        true
    }

    /// Whether applying `command` would change nothing and succeed: an
    /// equivalent redeclaration or an existing binding. A cluster member
    /// answers these from its own copy instead of deciding them again.
    pub fn is_noop(&self, command: &Command) -> bool {
        match command {
            Command::AddVhost { name } => self.vhosts.contains_key(name),
            Command::DeclareExchange { vhost, exchange } => self
                .vhosts
                .get(vhost)
                .and_then(|v| v.exchanges.get(&exchange.name))
                .is_some_and(|e| check_exchange_equivalent(&e.def, exchange, vhost).is_ok()),
            Command::DeclareQueue { vhost, queue } => self
                .vhosts
                .get(vhost)
                .and_then(|v| v.queues.get(&queue.name))
                .is_some_and(|q| check_queue_equivalent(q, queue, vhost).is_ok()),
            Command::Bind {
                vhost,
                source,
                binding,
            } => self
                .vhosts
                .get(vhost)
                .and_then(|v| v.exchanges.get(source))
                .is_some_and(|e| e.router.bindings().contains(binding)),
            Command::SetDraining { node, draining } => self.draining.contains(node) == *draining,
            Command::MoveQueue { vhost, name, home } => self
                .vhosts
                .get(vhost)
                .and_then(|v| v.queues.get(name))
                .is_some_and(|q| q.home_node == *home),
            _ => false,
        }
    }

    /// Commands that rebuild the part of the metadata that `keep_exchange`
    /// and `keep_queue` select (plus every vhost, user and permission), in
    /// an order that applies cleanly to fresh metadata: vhosts, users,
    /// permissions, then per vhost exchanges, queues and the bindings whose
    /// source and destination are both kept. Standard exchanges come back
    /// with their vhost and are not listed.
    pub fn commands_where(
        &self,
        keep_exchange: impl Fn(&ExchangeDef) -> bool,
        keep_queue: impl Fn(&QueueDef) -> bool,
    ) -> Vec<Command> {
        let mut commands = Vec::new();
        for name in self.vhosts.keys() {
            commands.push(Command::AddVhost { name: name.clone() });
        }
        for user in self.users.values() {
            commands.push(Command::PutUser {
                name: user.name.clone(),
                password_hash: user.password_hash.clone(),
                tags: user.tags.clone(),
            });
        }
        for ((vhost, user), p) in &self.permissions {
            commands.push(Command::SetPermissions {
                vhost: vhost.clone(),
                user: user.clone(),
                configure: p.configure.clone(),
                write: p.write.clone(),
                read: p.read.clone(),
            });
        }
        for node in &self.draining {
            commands.push(Command::SetDraining {
                node: node.clone(),
                draining: true,
            });
        }
        for (vhost_name, vhost) in &self.vhosts {
            let kept_exchange = |name: &str| {
                vhost
                    .exchanges
                    .get(name)
                    .is_some_and(|e| is_standard_exchange(name) || keep_exchange(&e.def))
            };
            for exchange in vhost.exchanges.values() {
                if !is_standard_exchange(&exchange.def.name) && keep_exchange(&exchange.def) {
                    commands.push(Command::DeclareExchange {
                        vhost: vhost_name.clone(),
                        exchange: exchange.def.clone(),
                    });
                }
            }
            for queue in vhost.queues.values() {
                if keep_queue(queue) {
                    commands.push(Command::DeclareQueue {
                        vhost: vhost_name.clone(),
                        queue: queue.clone(),
                    });
                }
            }
            for (source, binding) in self.bindings(vhost_name) {
                let destination_kept = match &binding.destination {
                    Destination::Queue(name) => vhost.queues.get(name).is_some_and(&keep_queue),
                    Destination::Exchange(name) => kept_exchange(name),
                };
                if kept_exchange(&source) && destination_kept {
                    commands.push(Command::Bind {
                        vhost: vhost_name.clone(),
                        source,
                        binding,
                    });
                }
            }
        }
        // Limits come last: a queue limit set below the queues that exist
        // must not keep them from being rebuilt.
        for (vhost_name, vhost) in &self.vhosts {
            for (limit, value) in &vhost.limits {
                commands.push(Command::SetVhostLimit {
                    vhost: vhost_name.clone(),
                    limit: *limit,
                    value: Some(*value),
                });
            }
        }
        for (user, limits) in &self.user_limits {
            for (limit, value) in limits {
                commands.push(Command::SetUserLimit {
                    user: user.clone(),
                    limit: *limit,
                    value: Some(*value),
                });
            }
        }
        commands
    }

    /// Every binding in a vhost as (source, binding), default exchange
    /// bindings excluded.
    pub fn bindings(&self, vhost: &str) -> Vec<(String, Binding)> {
        let Some(vhost) = self.vhosts.get(vhost) else {
            return Vec::new();
        };
        vhost
            .exchanges
            .iter()
            .flat_map(|(name, ex)| {
                ex.router
                    .bindings()
                    .iter()
                    .map(move |b| (name.clone(), b.clone()))
            })
            .collect()
    }
}

/// The default exchange and `amq.*` exist in every vhost from its creation.
pub fn is_standard_exchange(name: &str) -> bool {
    name.is_empty() || name.starts_with("amq.")
}

/// Names travel as AMQP short strings (the management API could otherwise
/// create names no client can use).
fn check_name_len(what: &str, name: &str) -> Result<(), MetaError> {
    if name.len() > crate::queue::args::NAME_LEN_MAX {
        return Err(MetaError::Invalid(format!(
            "{what} name longer than {} bytes",
            crate::queue::args::NAME_LEN_MAX
        )));
    }
    Ok(())
}

fn created() -> Outcome {
    Outcome {
        created: true,
        ..Outcome::default()
    }
}

fn check_destination_exists(
    vhost: &Vhost,
    vhost_name: &str,
    destination: &Destination,
) -> Result<(), MetaError> {
    let exists = match destination {
        Destination::Queue(name) => vhost.queues.contains_key(name),
        Destination::Exchange(name) => vhost.exchanges.contains_key(name),
    };
    if exists {
        return Ok(());
    }
    let what = match destination {
        Destination::Queue(_) => "queue",
        Destination::Exchange(_) => "exchange",
    };
    Err(MetaError::NotFound(format!(
        "no {what} '{}' in vhost '{vhost_name}'",
        destination.name()
    )))
}

/// Removes every binding to `destination`; auto-delete exchanges left
/// without bindings go too (recursively, as RabbitMQ does).
fn remove_destination(
    vhost: &mut Vhost,
    vhost_name: &str,
    destination: &Destination,
    outcome: &mut Outcome,
) {
    let mut emptied = Vec::new();
    for (name, exchange) in vhost.exchanges.iter_mut() {
        if exchange.router.unbind_destination(destination) > 0 {
            emptied.push(name.clone());
        }
    }
    for name in emptied {
        auto_delete_exchange(vhost, vhost_name, &name, outcome);
    }
}

fn auto_delete_exchange(vhost: &mut Vhost, vhost_name: &str, name: &str, outcome: &mut Outcome) {
    let unused = vhost
        .exchanges
        .get(name)
        .is_some_and(|e| e.def.auto_delete && e.router.bindings().is_empty());
    if unused {
        vhost.exchanges.remove(name);
        outcome
            .deleted_exchanges
            .push((vhost_name.to_string(), name.to_string()));
        remove_destination(
            vhost,
            vhost_name,
            &Destination::Exchange(name.to_string()),
            outcome,
        );
    }
}

fn inequivalent(
    what: &str,
    arg: &str,
    name: &str,
    vhost: &str,
    got: String,
    have: String,
) -> MetaError {
    MetaError::PreconditionFailed(format!(
        "inequivalent arg '{arg}' for {what} '{name}' in vhost '{vhost}': received '{got}' but current is '{have}'"
    ))
}

fn check_exchange_equivalent(
    have: &ExchangeDef,
    got: &ExchangeDef,
    vhost: &str,
) -> Result<(), MetaError> {
    let name = &have.name;
    if have.kind != got.kind {
        return Err(inequivalent(
            "exchange",
            "type",
            name,
            vhost,
            got.kind.as_str().into(),
            have.kind.as_str().into(),
        ));
    }
    for (arg, a, b) in [
        ("durable", got.durable, have.durable),
        ("auto_delete", got.auto_delete, have.auto_delete),
        ("internal", got.internal, have.internal),
    ] {
        if a != b {
            return Err(inequivalent(
                "exchange",
                arg,
                name,
                vhost,
                a.to_string(),
                b.to_string(),
            ));
        }
    }
    Ok(())
}

/// Arguments RabbitMQ compares on redeclaration.
const EQUIVALENT_QUEUE_ARGS: &[&str] = &[
    "x-message-ttl",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-queue-type",
];

fn check_queue_equivalent(have: &QueueDef, got: &QueueDef, vhost: &str) -> Result<(), MetaError> {
    let name = &have.name;
    for (arg, a, b) in [
        ("durable", got.durable, have.durable),
        ("auto_delete", got.auto_delete, have.auto_delete),
    ] {
        if a != b {
            return Err(inequivalent(
                "queue",
                arg,
                name,
                vhost,
                a.to_string(),
                b.to_string(),
            ));
        }
    }
    for arg in EQUIVALENT_QUEUE_ARGS {
        let a = got.arguments.inner().get(*arg);
        let b = have.arguments.inner().get(*arg);
        let same = match (a, b) {
            (Some(a), Some(b)) => crate::queue::args::same_value(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            let show = |v: Option<&amq_protocol::types::AMQPValue>| {
                v.map(|v| format!("{v:?}")).unwrap_or_else(|| "none".into())
            };
            return Err(inequivalent("queue", arg, name, vhost, show(a), show(b)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(name: &str) -> QueueDef {
        QueueDef {
            name: name.into(),
            durable: false,
            exclusive_owner: None,
            auto_delete: false,
            arguments: FieldTable::default(),
            home_node: "n".into(),
        }
    }

    fn exchange(name: &str, kind: ExchangeKind, auto_delete: bool) -> ExchangeDef {
        ExchangeDef {
            name: name.into(),
            kind,
            durable: false,
            auto_delete,
            internal: false,
            arguments: FieldTable::default(),
        }
    }

    fn bind(source: &str, destination: Destination, key: &str) -> Command {
        Command::Bind {
            vhost: "/".into(),
            source: source.into(),
            binding: Binding {
                destination,
                routing_key: key.into(),
                arguments: FieldTable::default(),
            },
        }
    }

    fn routed(meta: &Metadata, exchange: &str, key: &str) -> Vec<String> {
        let mut out = Vec::new();
        meta.route("/", exchange, key, None, &mut |q| out.push(q.to_string()));
        out
    }

    fn setup() -> Metadata {
        let mut meta = Metadata::default();
        meta.apply(Command::AddVhost { name: "/".into() })
            .expect("add vhost");
        meta
    }

    #[test]
    fn exchange_to_exchange_cycles_route_each_queue_once() {
        // Goal: e1 -> e2 -> e1 cycles terminate and a queue reached twice gets one copy.
        let mut meta = setup();
        for name in ["e1", "e2"] {
            meta.apply(Command::DeclareExchange {
                vhost: "/".into(),
                exchange: exchange(name, ExchangeKind::Fanout, false),
            })
            .expect("declare");
        }
        meta.apply(Command::DeclareQueue {
            vhost: "/".into(),
            queue: queue("q"),
        })
        .expect("declare q");
        for cmd in [
            bind("e1", Destination::Exchange("e2".into()), ""),
            bind("e2", Destination::Exchange("e1".into()), ""),
            bind("e1", Destination::Queue("q".into()), ""),
            bind("e2", Destination::Queue("q".into()), ""),
        ] {
            meta.apply(cmd).expect("bind");
        }
        assert_eq!(routed(&meta, "e1", "k"), ["q"]);
        assert_eq!(routed(&meta, "", "q"), ["q"]);
        assert!(routed(&meta, "", "missing").is_empty());
    }

    #[test]
    fn deleting_a_queue_removes_bindings_and_auto_delete_exchanges() {
        // Goal: queue deletion unbinds it; an auto-delete exchange left empty goes too.
        let mut meta = setup();
        meta.apply(Command::DeclareExchange {
            vhost: "/".into(),
            exchange: exchange("auto", ExchangeKind::Direct, true),
        })
        .expect("declare");
        meta.apply(Command::DeclareQueue {
            vhost: "/".into(),
            queue: queue("q"),
        })
        .expect("declare q");
        meta.apply(bind("auto", Destination::Queue("q".into()), "k"))
            .expect("bind");
        let outcome = meta
            .apply(Command::DeleteQueue {
                vhost: "/".into(),
                name: "q".into(),
            })
            .expect("delete");
        assert_eq!(
            outcome.deleted_exchanges,
            [("/".to_string(), "auto".to_string())]
        );
        assert!(!meta.vhosts["/"].exchanges.contains_key("auto"));
    }

    #[test]
    fn vhost_queue_limit_refuses_new_queues_and_limits_rebuild_last() {
        // Goal: max-queues refuses the queue beyond it with RabbitMQ's text, not a redeclaration; a snapshot lists limits after queues so a lowered limit still rebuilds; deleting a user drops its limits.
        let mut meta = setup();
        meta.apply(Command::SetVhostLimit {
            vhost: "/".into(),
            limit: VhostLimit::MaxQueues,
            value: Some(1),
        })
        .expect("limit");
        meta.apply(Command::DeclareQueue {
            vhost: "/".into(),
            queue: queue("q1"),
        })
        .expect("first queue");
        meta.apply(Command::DeclareQueue {
            vhost: "/".into(),
            queue: queue("q1"),
        })
        .expect("a redeclaration is not a new queue");
        let err = meta
            .apply(Command::DeclareQueue {
                vhost: "/".into(),
                queue: queue("q2"),
            })
            .expect_err("over the limit");
        assert_eq!(
            err,
            MetaError::PreconditionFailed(
                "cannot declare queue 'q2' in vhost '/': vhost queue limit (1) is reached".into()
            )
        );
        meta.apply(Command::SetVhostLimit {
            vhost: "/".into(),
            limit: VhostLimit::MaxQueues,
            value: Some(0),
        })
        .expect("lower the limit below the count");
        meta.apply(Command::PutUser {
            name: "u".into(),
            password_hash: String::new(),
            tags: Vec::new(),
        })
        .expect("user");
        meta.apply(Command::SetUserLimit {
            user: "u".into(),
            limit: UserLimit::MaxChannels,
            value: Some(3),
        })
        .expect("user limit");
        let mut rebuilt = Metadata::default();
        for command in meta.commands_where(|_| true, |_| true) {
            rebuilt.apply(command).expect("snapshot applies in order");
        }
        assert!(rebuilt.vhosts["/"].queues.contains_key("q1"));
        assert_eq!(rebuilt.vhosts["/"].limits[&VhostLimit::MaxQueues], 0);
        assert_eq!(rebuilt.user_limits["u"][&UserLimit::MaxChannels], 3);
        meta.apply(Command::DeleteUser { name: "u".into() })
            .expect("delete user");
        assert!(meta.user_limits.is_empty());
        assert!(matches!(
            meta.apply(Command::SetUserLimit {
                user: "nobody".into(),
                limit: UserLimit::MaxConnections,
                value: Some(1),
            }),
            Err(MetaError::NotFound(_))
        ));
    }

    #[test]
    fn redeclaration_must_be_equivalent() {
        // Goal: same properties are idempotent; different ones are a 406 naming the arg.
        let mut meta = setup();
        let def = exchange("x", ExchangeKind::Topic, false);
        assert!(
            meta.apply(Command::DeclareExchange {
                vhost: "/".into(),
                exchange: def.clone()
            })
            .expect("first")
            .created
        );
        assert!(
            !meta
                .apply(Command::DeclareExchange {
                    vhost: "/".into(),
                    exchange: def
                })
                .expect("again")
                .created
        );
        let err = meta
            .apply(Command::DeclareExchange {
                vhost: "/".into(),
                exchange: exchange("x", ExchangeKind::Direct, false),
            })
            .expect_err("inequivalent");
        assert_eq!(err.reply_code(), 406);
        assert!(err.to_string().contains("'type'"), "{err}");
        let err = meta
            .apply(bind("missing", Destination::Queue("nope".into()), ""))
            .expect_err("missing");
        assert_eq!(err.reply_code(), 404);
    }

    #[test]
    fn moving_a_queue_keeps_its_definition_and_bindings_and_draining_survives_snapshots() {
        // Goal: MoveQueue changes only the home (bindings, arguments stay),
        // refuses exclusive and missing queues; SetDraining is listed in the
        // commands that rebuild the metadata, and both are no-ops when repeated.
        let mut meta = setup();
        meta.apply(Command::DeclareQueue {
            vhost: "/".into(),
            queue: queue("q"),
        })
        .expect("declare q");
        let mut exclusive = queue("mine");
        exclusive.exclusive_owner = Some("conn".into());
        meta.apply(Command::DeclareQueue {
            vhost: "/".into(),
            queue: exclusive,
        })
        .expect("declare mine");
        meta.apply(bind("amq.direct", Destination::Queue("q".into()), "k"))
            .expect("bind");
        let move_q = Command::MoveQueue {
            vhost: "/".into(),
            name: "q".into(),
            home: "other".into(),
        };
        assert!(!meta.is_noop(&move_q));
        assert!(meta.apply(move_q.clone()).expect("move").created);
        assert!(meta.is_noop(&move_q));
        assert_eq!(meta.vhosts["/"].queues["q"].home_node, "other");
        assert_eq!(routed(&meta, "amq.direct", "k"), ["q"]);
        let err = meta
            .apply(Command::MoveQueue {
                vhost: "/".into(),
                name: "mine".into(),
                home: "other".into(),
            })
            .expect_err("exclusive");
        assert_eq!(err.reply_code(), 406);
        let err = meta
            .apply(Command::MoveQueue {
                vhost: "/".into(),
                name: "missing".into(),
                home: "other".into(),
            })
            .expect_err("missing");
        assert_eq!(err.reply_code(), 404);

        let drain = Command::SetDraining {
            node: "n".into(),
            draining: true,
        };
        assert!(meta.apply(drain.clone()).expect("drain").created);
        assert!(meta.is_noop(&drain) && meta.is_draining("n"));
        let mut rebuilt = Metadata::default();
        for command in meta.commands_where(|_| true, |_| true) {
            rebuilt.apply(command).expect("rebuilds");
        }
        assert!(rebuilt.is_draining("n"));
        assert_eq!(rebuilt.vhosts["/"].queues["q"].home_node, "other");
        meta.apply(Command::SetDraining {
            node: "n".into(),
            draining: false,
        })
        .expect("undrain");
        assert!(!meta.is_draining("n"));
    }

    #[test]
    fn commands_serialize_for_the_log() {
        // Goal: a command survives a JSON round trip unchanged.
        let command = bind("amq.topic", Destination::Queue("q".into()), "a.#");
        let json = serde_json::to_string(&command).expect("serialize");
        let back: Command = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, command);
    }
}
