"""Fixtures for the pika suite: a broker to talk to, connections, and unique,
cleaned-up names. Starts synod-broker itself unless AMQP_URL names a running
broker (that is how the suite is checked against RabbitMQ); never sleeps to
wait, always polls a condition against a deadline."""

import os
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pika
import pytest

from helpers import WAIT_TIMEOUT_S

# How long the broker may take to accept AMQP connections after it starts.
BROKER_START_TIMEOUT_S = 30.0
REPO_ROOT = Path(__file__).resolve().parents[3]


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_accepts(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def amqp_url():
    """The URL of the broker under test: AMQP_URL, or a synod-broker we start."""
    url = os.environ.get("AMQP_URL")
    if url:
        yield url
        return
    binary = Path(os.environ.get("SYNOD_BROKER_BIN", REPO_ROOT / "target/debug/synod-broker"))
    if not binary.is_file():
        pytest.exit(f"broker binary {binary} is missing: build it (cargo build -p synod-broker) "
                    "or set SYNOD_BROKER_BIN", returncode=2)
    data_dir = tempfile.mkdtemp(prefix="synod-pika-")
    amqp_port, mgmt_port, metrics_port, cluster_port = (_free_port() for _ in range(4))
    log_path = Path(data_dir) / "broker.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [str(binary),
         "--amqp-listen", f"127.0.0.1:{amqp_port}",
         "--mgmt-listen", f"127.0.0.1:{mgmt_port}",
         "--metrics-listen", f"127.0.0.1:{metrics_port}",
         "--cluster-listen", f"127.0.0.1:{cluster_port}",
         "--data-dir", str(Path(data_dir) / "data")],
        stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + BROKER_START_TIMEOUT_S
    while not _port_accepts(amqp_port):
        if proc.poll() is not None:
            log.close()
            pytest.exit(f"synod-broker exited with {proc.returncode} before accepting "
                        f"connections:\n{log_path.read_text(errors='replace')[-4000:]}", returncode=3)
        if time.monotonic() > deadline:
            proc.kill()
            pytest.exit(f"synod-broker did not accept AMQP connections on port {amqp_port} "
                        f"within {BROKER_START_TIMEOUT_S}s", returncode=3)
        time.sleep(0.05)
    yield f"amqp://guest:guest@127.0.0.1:{amqp_port}/"
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture
def params(amqp_url):
    """Connection parameters for the broker under test."""
    p = pika.URLParameters(amqp_url)
    p.blocked_connection_timeout = WAIT_TIMEOUT_S
    p.socket_timeout = WAIT_TIMEOUT_S
    p.connection_attempts = 1
    return p


class Connections:
    """Opens blocking connections for a test and closes them all at the end."""

    def __init__(self, params):
        self.params = params
        self.opened = []

    def open(self):
        conn = pika.BlockingConnection(self.params)
        self.opened.append(conn)
        return conn

    def close_all(self):
        for conn in self.opened:
            if conn.is_open:
                try:
                    conn.close()
                except Exception:
                    pass


@pytest.fixture
def connections(params):
    c = Connections(params)
    yield c
    c.close_all()


@pytest.fixture
def conn(connections):
    """One open connection for the test."""
    return connections.open()


@pytest.fixture
def ch(conn):
    """One open channel on `conn`."""
    return conn.channel()


class Names:
    """Unique queue and exchange names for one test; deletes them afterwards so
    tests can share a broker."""

    def __init__(self, test_name):
        self.prefix = f"pika.{test_name[:40]}.{uuid.uuid4().hex[:8]}"
        self.queues = []
        self.exchanges = []

    def queue(self, label="q"):
        name = f"{self.prefix}.{label}"
        self.queues.append(name)
        return name

    def exchange(self, label="x"):
        name = f"{self.prefix}.{label}"
        self.exchanges.append(name)
        return name

    def track_queue(self, name):
        self.queues.append(name)
        return name

    def cleanup(self, params):
        if not self.queues and not self.exchanges:
            return
        conn = pika.BlockingConnection(params)
        try:
            for kind, names in (("queue", self.queues), ("exchange", self.exchanges)):
                for name in names:
                    ch = conn.channel()
                    try:
                        if kind == "queue":
                            ch.queue_delete(name)
                        else:
                            ch.exchange_delete(name)
                        ch.close()
                    except pika.exceptions.AMQPChannelError:
                        pass
        finally:
            conn.close()


@pytest.fixture
def names(request, params):
    n = Names(request.node.name)
    yield n
    n.cleanup(params)
