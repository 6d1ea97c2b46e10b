"""AMQPS and HTTPS through pika and Python's ssl module: a synod-broker
started with --tls-cert/--tls-key/--tls-ca (mutual TLS) on free loopback
ports, certificates made per run with the openssl command line. Skipped
when AMQP_URL names an external broker (its TLS setup is not ours to know)."""

import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from base64 import b64encode
from pathlib import Path

import pika
import pytest

from conftest import BROKER_START_TIMEOUT_S, _broker_binary, _free_port, _port_accepts
from support import WAIT_TIMEOUT_S, get_one


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _make_pki(directory):
    """A CA, a server certificate for localhost/127.0.0.1 and client
    certificates whose common names are `guest` and `nobody-here`."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=synod-pika-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    leaves = {
        "server": ("/CN=localhost",
                   "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        "guest": ("/CN=guest", "extendedKeyUsage=clientAuth\n"),
        "stranger": ("/CN=nobody-here", "extendedKeyUsage=clientAuth\n"),
    }
    for name, (subject, extensions) in leaves.items():
        (directory / f"{name}.ext").write_text(extensions)
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
                 cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=directory)


class TlsBroker:
    """A synod-broker with AMQPS (mutual TLS) and HTTPS management."""

    def __init__(self, binary, pki):
        self.dir = Path(tempfile.mkdtemp(prefix="synod-pika-tls-"))
        self.pki = pki
        self.amqp, self.amqps, self.mgmt, self.metrics, self.cluster = (
            _free_port() for _ in range(5))
        log = open(self.dir / "broker.log", "ab")
        self.proc = subprocess.Popen(
            [str(binary),
             "--amqp-listen", f"127.0.0.1:{self.amqp}",
             "--amqps-listen", f"127.0.0.1:{self.amqps}",
             "--mgmt-listen", f"127.0.0.1:{self.mgmt}",
             "--metrics-listen", f"127.0.0.1:{self.metrics}",
             "--cluster-listen", f"127.0.0.1:{self.cluster}",
             "--tls-cert", str(pki / "server.pem"),
             "--tls-key", str(pki / "server.key"),
             "--tls-ca", str(pki / "ca.pem"),
             "--data-dir", str(self.dir / "data")],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while not (_port_accepts(self.amqps) and _port_accepts(self.mgmt)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail("synod-broker with TLS did not start:\n"
                            + (self.dir / "broker.log").read_text(errors="replace")[-4000:])
            time.sleep(0.05)

    def context(self, client=None):
        """A client TLS context trusting our CA, presenting `client`'s certificate."""
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.pem"))
        if client:
            ctx.load_cert_chain(str(self.pki / f"{client}.pem"), str(self.pki / f"{client}.key"))
        return ctx

    def params(self, client, credentials):
        return pika.ConnectionParameters(
            host="127.0.0.1", port=self.amqps,
            ssl_options=pika.SSLOptions(self.context(client), "localhost"),
            credentials=credentials, connection_attempts=1,
            socket_timeout=WAIT_TIMEOUT_S, blocked_connection_timeout=WAIT_TIMEOUT_S)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_broker():
    if os.environ.get("AMQP_URL"):
        pytest.skip("AMQP_URL names an external broker; TLS is tested against synod-broker only")
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    pki = Path(tempfile.mkdtemp(prefix="synod-pika-pki-"))
    _make_pki(pki)
    broker = TlsBroker(_broker_binary(), pki)
    yield broker
    broker.stop()
    shutil.rmtree(pki, ignore_errors=True)


def _round_trip(conn, queue, body):
    ch = conn.channel()
    ch.queue_declare(queue, auto_delete=True)
    ch.confirm_delivery()
    ch.basic_publish("", queue, body)
    _, _, got = get_one(ch, queue)
    assert got == body


def test_external_login_with_a_client_certificate(tls_broker):
    # Goal: pika with a CA-signed certificate (CN=guest) logs in by SASL EXTERNAL over AMQPS and round-trips a message.
    conn = pika.BlockingConnection(
        tls_broker.params("guest", pika.credentials.ExternalCredentials()))
    try:
        _round_trip(conn, "pika-tls-external", b"by certificate")
    finally:
        conn.close()


def test_plain_login_over_mutual_tls(tls_broker):
    # Goal: PLAIN credentials still work over AMQPS when a client certificate is presented.
    conn = pika.BlockingConnection(
        tls_broker.params("guest", pika.PlainCredentials("guest", "guest")))
    try:
        _round_trip(conn, "pika-tls-plain", b"by password")
    finally:
        conn.close()


def test_a_client_without_certificate_is_refused(tls_broker):
    # Goal: with --tls-ca, the TLS handshake fails for a client that presents no certificate.
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(tls_broker.params(None, pika.PlainCredentials("guest", "guest")))


def test_external_with_an_unknown_common_name_is_access_refused(tls_broker):
    # Goal: a verified certificate whose CN names no user is refused with 403 ACCESS_REFUSED.
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as err:
        pika.BlockingConnection(
            tls_broker.params("stranger", pika.credentials.ExternalCredentials()))
    assert "403" in str(err.value)


def test_management_api_over_https(tls_broker):
    # Goal: the management API answers /api/overview over HTTPS with the broker's certificate.
    request = urllib.request.Request(
        f"https://localhost:{tls_broker.mgmt}/api/overview",
        headers={"Authorization": "Basic " + b64encode(b"guest:guest").decode()})
    with urllib.request.urlopen(request, context=tls_broker.context(),
                                timeout=WAIT_TIMEOUT_S) as response:
        assert response.status == 200
        assert "node" in json.loads(response.read())
