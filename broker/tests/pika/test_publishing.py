"""Publishing through pika: properties and header tables round-trip, publisher
confirms, transactions, mandatory returns, bodies larger than a frame, and
many channels on one connection."""

import datetime
import decimal
import os

import pika
import pytest

from support import WAIT_TIMEOUT_S, collect, get_one, message_count, wait_until


def test_properties_and_header_table_round_trip(ch, names):
    # Goal: every basic property and a header table of mixed field types arrive exactly as published.
    q = names.queue()
    ch.queue_declare(q)
    stamp = 1700000000
    headers = {
        "str": "text", "int": 42, "negative": -7, "big": 2 ** 40, "bool": True,
        "decimal": decimal.Decimal("1.5"), "nested": {"a": 1, "b": "two"}, "list": [1, "x", False],
        "bytes": b"\x00\x01raw", "none": None,
        "when": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc),
    }
    sent = pika.BasicProperties(
        content_type="application/json", content_encoding="utf-8", headers=headers,
        delivery_mode=2, priority=5, correlation_id="corr-1", reply_to="reply-q",
        message_id="msg-1", timestamp=stamp, type="order.created", user_id="guest",
        app_id="pika-suite", cluster_id=None)
    ch.basic_publish(exchange="", routing_key=q, body=b'{"a":1}', properties=sent)
    _, props, body = get_one(ch, q)
    assert body == b'{"a":1}'
    for field in ("content_type", "content_encoding", "delivery_mode", "priority",
                  "correlation_id", "reply_to", "message_id", "timestamp", "type",
                  "user_id", "app_id"):
        assert getattr(props, field) == getattr(sent, field), field
    got = props.headers
    assert got["str"] == "text"
    assert got["int"] == 42 and got["negative"] == -7 and got["big"] == 2 ** 40
    assert got["bool"] is True
    assert got["decimal"] == decimal.Decimal("1.5")
    assert got["nested"] == {"a": 1, "b": "two"}
    assert got["list"] == [1, "x", False]
    assert got["bytes"] in (b"\x00\x01raw", "\x00\x01raw")
    assert got["none"] is None
    assert got["when"] == datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)


def test_empty_body(ch, names):
    # Goal: a message with an empty body is delivered with an empty body (no content frames).
    q = names.queue()
    ch.queue_declare(q)
    ch.basic_publish(exchange="", routing_key=q, body=b"")
    assert get_one(ch, q)[2] == b""


def test_large_message_spans_many_frames(ch, conn, names):
    # Goal: a 1 MiB body, larger than the negotiated frame_max, arrives byte for byte through both basic.get and basic.consume.
    q = names.queue()
    ch.queue_declare(q)
    frame_max = conn._impl.params.frame_max
    body = os.urandom(1024 * 1024)
    assert len(body) > 4 * frame_max
    ch.basic_publish(exchange="", routing_key=q, body=body)
    ch.basic_publish(exchange="", routing_key=q, body=body[::-1])
    assert get_one(ch, q)[2] == body
    [(_, _, consumed)] = collect(ch, q, 1)
    assert consumed == body[::-1]


def test_publisher_confirms_ack(ch, conn, names):
    # Goal: after confirm.select, routed and unrouted (non-mandatory) publishes are acked and routed ones are enqueued.
    q = names.queue()
    ch.queue_declare(q)
    ch.confirm_delivery()
    for i in range(20):
        ch.basic_publish(exchange="", routing_key=q, body=str(i).encode())
    ch.basic_publish(exchange="amq.direct", routing_key="nobody-is-bound-here", body=b"dropped")
    assert message_count(conn, q) == 20
    assert [b for _, _, b in collect(ch, q, 20)] == [str(i).encode() for i in range(20)]


def test_mandatory_unroutable_returned(ch, conn, names):
    # Goal: a mandatory publish that no queue takes comes back as basic.return 312 NO_ROUTE with its body and properties.
    returned = []
    ch.add_on_return_callback(lambda c, method, props, body: returned.append((method, props, body)))
    x = names.exchange()
    ch.exchange_declare(x, "direct")
    ch.basic_publish(exchange=x, routing_key="nowhere", body=b"boomerang", mandatory=True,
                     properties=pika.BasicProperties(message_id="m-42"))
    wait_until(lambda: conn.process_data_events(0.02) or returned, what="basic.return")
    [(method, props, body)] = returned
    assert (method.reply_code, method.reply_text) == (312, "NO_ROUTE")
    assert (method.exchange, method.routing_key) == (x, "nowhere")
    assert (body, props.message_id) == (b"boomerang", "m-42")


def test_mandatory_unroutable_with_confirms(ch, names):
    # Goal: under confirms an unroutable mandatory publish is returned before its ack, which pika reports as UnroutableError.
    ch.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError) as err:
        ch.basic_publish(exchange="", routing_key=names.queue("absent"), body=b"x", mandatory=True)
    [returned] = err.value.messages
    assert returned.method.reply_code == 312
    assert returned.body == b"x"


def test_tx_commit_and_rollback(ch, conn, names):
    # Goal: inside tx.select, publishes and acks take effect only on tx.commit and are discarded by tx.rollback.
    q = names.queue()
    ch.queue_declare(q)
    ch.tx_select()
    ch.basic_publish(exchange="", routing_key=q, body=b"rolled back")
    ch.tx_rollback()
    ch.basic_publish(exchange="", routing_key=q, body=b"committed-1")
    ch.basic_publish(exchange="", routing_key=q, body=b"committed-2")
    assert message_count(conn, q) == 0
    ch.tx_commit()
    assert message_count(conn, q) == 2
    # An ack rolled back leaves the message unacked: it comes back when the channel closes.
    method, _, body = ch.basic_get(q, auto_ack=False)
    assert body == b"committed-1"
    ch.basic_ack(method.delivery_tag)
    ch.tx_rollback()
    method2, _, body2 = ch.basic_get(q, auto_ack=False)
    assert body2 == b"committed-2"
    ch.basic_ack(method2.delivery_tag)
    ch.tx_commit()
    ch.close()
    ch = conn.channel()
    method, _, body = get_one(ch, q)
    assert (body, method.redelivered) == (b"committed-1", True)
    assert ch.basic_get(q) == (None, None, None)


def test_many_channels_on_one_connection(conn, names):
    # Goal: 100 channels on one connection each declare, publish and receive independently, and closing some leaves the others working.
    channels = [conn.channel() for _ in range(100)]
    assert len({c.channel_number for c in channels}) == 100
    queues = []
    for i, c in enumerate(channels):
        q = names.queue(f"c{i}")
        c.queue_declare(q)
        c.basic_publish(exchange="", routing_key=q, body=f"from {i}".encode())
        queues.append(q)
    for c in channels[::2]:
        c.close()
    for i in range(1, 100, 2):
        assert get_one(channels[i], queues[i])[2] == f"from {i}".encode()
    again = conn.channel()
    for i in range(0, 100, 2):
        assert get_one(again, queues[i])[2] == f"from {i}".encode()


def test_heartbeat_negotiated_broker_sends_heartbeats(params, names):
    # Goal: with a 1 s heartbeat negotiated, the broker sends heartbeat frames on an idle connection and keeps it open across several intervals.
    p = pika.ConnectionParameters(host=params.host, port=params.port,
                                  virtual_host=params.virtual_host,
                                  credentials=params.credentials, heartbeat=1)
    conn = pika.BlockingConnection(p)
    try:
        assert conn._impl.params.heartbeat == 1
        ch = conn.channel()
        q = names.queue()
        ch.queue_declare(q)
        checker = conn._impl._heartbeat_checker
        wait_until(lambda: conn.process_data_events(0.1) or checker._heartbeat_frames_received >= 3,
                   what="three heartbeat frames from the broker")
        assert conn.is_open
        ch.basic_publish(exchange="", routing_key=q, body=b"alive")
        assert get_one(ch, q, timeout=WAIT_TIMEOUT_S)[2] == b"alive"
    finally:
        if conn.is_open:
            conn.close()
