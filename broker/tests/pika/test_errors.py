"""Error handling seen through pika: soft errors close only the channel with
the spec's code and leave the connection usable; login and vhost failures are
reported as RabbitMQ reports them."""

import socket

import pika
import pytest

from support import WAIT_TIMEOUT_S, get_one


def _closed_with(exc_info, code):
    assert exc_info.value.reply_code == code, exc_info.value


def test_passive_declare_missing_queue_404_connection_survives(conn, names):
    # Goal: a passive declare of a missing queue closes that channel with 404 NOT_FOUND while the connection and its other channels keep working.
    bystander = conn.channel()
    q = names.queue()
    bystander.queue_declare(q)
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.queue_declare(names.queue("missing"), passive=True)
    _closed_with(err, 404)
    assert "NOT_FOUND" in err.value.reply_text
    assert ch.is_closed and conn.is_open and bystander.is_open
    bystander.basic_publish(exchange="", routing_key=q, body=b"still here")
    assert get_one(conn.channel(), q)[2] == b"still here"


def test_passive_declare_missing_exchange_404(conn, names):
    # Goal: a passive declare of a missing exchange closes the channel with 404 and a new channel works.
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.exchange_declare(names.exchange("missing"), passive=True)
    _closed_with(err, 404)
    conn.channel().exchange_declare("amq.direct", passive=True)


def test_publish_to_missing_exchange_404(conn, names):
    # Goal: publishing to a missing exchange closes the channel with 404 (reported on the next synchronous call), not the connection.
    ch = conn.channel()
    ch.basic_publish(exchange=names.exchange("missing"), routing_key="k", body=b"x")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.queue_declare("", exclusive=True)
    _closed_with(err, 404)
    assert conn.is_open
    conn.channel().queue_declare("", exclusive=True)


def test_redeclare_queue_with_other_arguments_406(conn, names):
    # Goal: redeclaring an existing queue with a different x-message-ttl closes the channel with 406 PRECONDITION_FAILED.
    q = names.queue()
    conn.channel().queue_declare(q, arguments={"x-message-ttl": 1000})
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.queue_declare(q, arguments={"x-message-ttl": 2000})
    _closed_with(err, 406)
    assert "PRECONDITION_FAILED" in err.value.reply_text


def test_exclusive_queue_from_other_connection_405(connections, names):
    # Goal: declaring, getting from or deleting another connection's exclusive queue closes the channel with 405 RESOURCE_LOCKED.
    owner = connections.open()
    q = names.queue()
    owner.channel().queue_declare(q, exclusive=True)
    intruder = connections.open()
    for attempt in (lambda c: c.queue_declare(q, passive=True),
                    lambda c: c.basic_get(q),
                    lambda c: c.queue_delete(q)):
        ch = intruder.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
            attempt(ch)
        _closed_with(err, 405)
    assert intruder.is_open and owner.is_open


def test_ack_unknown_delivery_tag_406(conn, names):
    # Goal: acking a delivery tag the channel never issued closes the channel with 406 PRECONDITION_FAILED.
    ch = conn.channel()
    ch.basic_ack(delivery_tag=999)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.queue_declare("", exclusive=True)
    _closed_with(err, 406)
    assert "PRECONDITION_FAILED" in err.value.reply_text
    assert conn.is_open


def test_double_ack_406(conn, names):
    # Goal: acking the same delivery twice closes the channel with 406 (the tag is unknown the second time).
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    ch.basic_publish(exchange="", routing_key=q, body=b"x")
    method, _, _ = get_one(ch, q, auto_ack=False)
    ch.basic_ack(method.delivery_tag)
    ch.basic_ack(method.delivery_tag)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.queue_declare(q, passive=True)
    _closed_with(err, 406)


def test_wrong_password_access_refused(params):
    # Goal: a wrong password is refused with connection.close 403 ACCESS_REFUSED (authentication_failure_close), not a bare disconnect.
    bad = pika.ConnectionParameters(host=params.host, port=params.port,
                                    credentials=pika.PlainCredentials("guest", "not-the-password"),
                                    connection_attempts=1)
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as err:
        pika.BlockingConnection(bad)
    assert "403" in str(err.value) and "ACCESS_REFUSED" in str(err.value)


def test_unknown_user_access_refused(params):
    # Goal: an unknown user is refused exactly like a wrong password (403 ACCESS_REFUSED).
    bad = pika.ConnectionParameters(host=params.host, port=params.port,
                                    credentials=pika.PlainCredentials("no-such-user", "x"),
                                    connection_attempts=1)
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as err:
        pika.BlockingConnection(bad)
    assert "403" in str(err.value) and "ACCESS_REFUSED" in str(err.value)


def test_unknown_vhost_not_allowed(params):
    # Goal: opening a vhost that does not exist is refused with connection.close 530 NOT_ALLOWED, as RabbitMQ does.
    bad = pika.ConnectionParameters(host=params.host, port=params.port,
                                    virtual_host="no-such-vhost",
                                    credentials=params.credentials, connection_attempts=1)
    with pytest.raises(pika.exceptions.ProbableAccessDeniedError) as err:
        pika.BlockingConnection(bad)
    assert "530" in str(err.value) and "NOT_ALLOWED" in str(err.value)


def test_reserved_amq_prefix_403(conn):
    # Goal: declaring a queue or exchange named amq.* (not passive) is refused with 403 ACCESS_REFUSED.
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.queue_declare("amq.synod-test-queue")
    _closed_with(err, 403)
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.exchange_declare("amq.synod-test-exchange", "direct")
    _closed_with(err, 403)


def test_user_id_mismatch_406(conn, names):
    # Goal: publishing with a user_id property that is not the connection's user closes the channel with 406.
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    ch.basic_publish(exchange="", routing_key=q, body=b"x",
                     properties=pika.BasicProperties(user_id="somebody-else"))
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.queue_declare(q, passive=True)
    _closed_with(err, 406)


def _raw_socket(amqp_url):
    params = pika.URLParameters(amqp_url)
    sock = socket.create_connection((params.host, params.port), timeout=WAIT_TIMEOUT_S)
    sock.settimeout(WAIT_TIMEOUT_S)
    return sock


def _read_until_closed(sock):
    """Everything the broker sends until it closes the socket (FIN or RST);
    a socket still open after WAIT_TIMEOUT_S fails the test."""
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return data
        except socket.timeout:
            raise AssertionError(f"broker kept the socket open; got {data!r}")
        if not chunk:
            return data
        data += chunk


def test_unknown_protocol_header_gets_amqp_0_9_1_header(amqp_url):
    # Goal: a client speaking another protocol version gets the AMQP 0-9-1 protocol header back and the socket is closed.
    for header in (b"AMQP\x00\x01\x00\x00", b"GET / HTTP/1.1\r\n\r\n"):
        with _raw_socket(amqp_url) as sock:
            sock.sendall(header)
            assert _read_until_closed(sock) == b"AMQP\x00\x00\x09\x01"


def test_garbage_frame_closes_only_that_connection(amqp_url, conn, names):
    # Goal: a malformed frame during the handshake makes the broker drop that socket, while other connections keep working.
    q = names.queue()
    ch = conn.channel()
    ch.queue_declare(q)
    with _raw_socket(amqp_url) as sock:
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        # connection.start arrives first: a method frame (type 1) on channel 0.
        start = sock.recv(7)
        assert start[:3] == b"\x01\x00\x00"
        # A frame of unknown type 9 with a bad end marker.
        sock.sendall(b"\x09\x00\x00\x00\x00\x00\x04junk\x00")
        _read_until_closed(sock)
    ch.basic_publish(exchange="", routing_key=q, body=b"unaffected")
    assert get_one(ch, q)[2] == b"unaffected"
