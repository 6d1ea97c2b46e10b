"""Fixtures for the pika suite: a broker to talk to, connections, and unique,
cleaned-up names. Starts synod-broker itself unless AMQP_URL names a running
broker (that is how the suite is checked against RabbitMQ); never sleeps to
wait, always polls a condition against a deadline."""

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pika
import pytest

from support import WAIT_TIMEOUT_S

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


class BrokerStartError(Exception):
    """synod-broker exited or did not listen in time; the message says which."""


class SynodProcess:
    """One synod-broker process on free loopback ports with its own data
    directory and any extra flags; restart() stops it (SIGTERM) and starts
    it again on the same ports and data."""

    def __init__(self, binary, extra_args=()):
        self.binary = binary
        self.extra_args = list(extra_args)
        self.dir = Path(tempfile.mkdtemp(prefix="synod-pika-"))
        self.ports = [_free_port() for _ in range(4)]
        self.log_path = self.dir / "broker.log"
        self.proc = None

    @property
    def url(self):
        return f"amqp://guest:guest@127.0.0.1:{self.ports[0]}/"

    def start(self):
        amqp, mgmt, metrics, cluster = self.ports
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(self.binary),
             "--amqp-listen", f"127.0.0.1:{amqp}",
             "--mgmt-listen", f"127.0.0.1:{mgmt}",
             "--metrics-listen", f"127.0.0.1:{metrics}",
             "--cluster-listen", f"127.0.0.1:{cluster}",
             "--data-dir", str(self.dir / "data"), *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while not _port_accepts(amqp):
            if self.proc.poll() is not None:
                raise BrokerStartError(
                    f"synod-broker exited with {self.proc.returncode} before accepting "
                    f"connections:\n{self.log_path.read_text(errors='replace')[-4000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise BrokerStartError(f"synod-broker did not accept AMQP connections on port "
                                       f"{amqp} within {BROKER_START_TIMEOUT_S}s")
            time.sleep(0.05)

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self):
        self.stop()
        self.start()

    def remove(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _broker_binary():
    binary = Path(os.environ.get("SYNOD_BROKER_BIN", REPO_ROOT / "target/debug/synod-broker"))
    if not binary.is_file():
        pytest.exit(f"broker binary {binary} is missing: build it (cargo build -p synod-broker) "
                    "or set SYNOD_BROKER_BIN", returncode=2)
    return binary


@pytest.fixture(scope="session")
def amqp_url():
    """The URL of the broker under test: AMQP_URL, or a synod-broker we start."""
    url = os.environ.get("AMQP_URL")
    if url:
        yield url
        return
    broker = SynodProcess(_broker_binary())
    try:
        broker.start()
    except BrokerStartError as err:
        broker.remove()
        pytest.exit(str(err), returncode=3)
    yield broker.url
    broker.remove()


class ExternalBroker:
    """The AMQP_URL broker, restarted by the shell command AMQP_RESTART_CMD
    (e.g. `scripts/rabbitmq-for-tests.sh restart`)."""

    def __init__(self, url, restart_cmd):
        self.url = url
        self.restart_cmd = restart_cmd

    def restart(self):
        subprocess.run(self.restart_cmd, shell=True, check=True, cwd=REPO_ROOT,
                       stdout=subprocess.DEVNULL)
        port = pika.URLParameters(self.url).port
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while not _port_accepts(port):
            if time.monotonic() > deadline:
                raise BrokerStartError(f"broker not back on port {port} after restart")
            time.sleep(0.05)


@pytest.fixture
def restartable_broker(amqp_url):
    """A broker the test may restart: a dedicated synod-broker, or the
    AMQP_URL broker when AMQP_RESTART_CMD says how to restart it."""
    if os.environ.get("AMQP_URL"):
        cmd = os.environ.get("AMQP_RESTART_CMD")
        if not cmd:
            pytest.skip("AMQP_URL is set without AMQP_RESTART_CMD: cannot restart that broker")
        yield ExternalBroker(amqp_url, cmd)
        return
    broker = SynodProcess(_broker_binary())
    broker.start()
    yield broker
    broker.remove()


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
