"""Consuming through pika: qos, exclusive and no-ack consumers, cancel (from
the client and from the broker), basic.get, ack/nack/reject single and
multiple, requeue with the redelivered flag, and basic.recover."""

import pika
import pytest

from support import WAIT_TIMEOUT_S, collect, get_one, message_count, wait_until


def _fill(ch, conn, q, n):
    for i in range(n):
        ch.basic_publish(exchange="", routing_key=q, body=str(i).encode())
    wait_until(lambda: message_count(conn, q) == n, what=f"{n} ready in {q}")


def test_basic_get_and_get_empty(ch, conn, names):
    # Goal: basic.get returns messages in order with the remaining count, and get-empty once drained.
    q = names.queue()
    ch.queue_declare(q)
    _fill(ch, conn, q, 3)
    counts = []
    for expected in (b"0", b"1", b"2"):
        method, _, body = ch.basic_get(q, auto_ack=True)
        assert body == expected
        counts.append(method.message_count)
    assert counts == [2, 1, 0]
    assert ch.basic_get(q) == (None, None, None)


def test_qos_prefetch_limits_unacked(ch, conn, names):
    # Goal: basic.qos prefetch_count=2 keeps at most two unacked deliveries in flight; each ack lets exactly one more through.
    q = names.queue()
    ch.queue_declare(q)
    _fill(ch, conn, q, 5)
    ch.basic_qos(prefetch_count=2)
    got = []
    ch.basic_consume(q, lambda c, m, p, b: got.append(m))
    wait_until(lambda: conn.process_data_events(0.02) or len(got) >= 2, what="first two deliveries")
    wait_until(lambda: message_count(conn, q) == 3, what="3 still ready")
    conn.process_data_events(0.2)
    assert len(got) == 2
    ch.basic_ack(got[0].delivery_tag)
    wait_until(lambda: conn.process_data_events(0.02) or len(got) >= 3, what="third delivery")
    wait_until(lambda: message_count(conn, q) == 2, what="2 still ready")
    assert len(got) == 3
    ch.basic_ack(got[2].delivery_tag, multiple=True)
    wait_until(lambda: conn.process_data_events(0.02) or len(got) >= 5, what="last deliveries")
    assert [m.delivery_tag for m in got] == [1, 2, 3, 4, 5]


def test_no_ack_consumer_and_client_cancel(ch, conn, names):
    # Goal: a no-ack consumer gets messages settled on delivery (nothing returns on channel close), and after basic.cancel new messages stay in the queue.
    q = names.queue()
    ch.queue_declare(q)
    _fill(ch, conn, q, 3)
    got = []
    tag = ch.basic_consume(q, lambda c, m, p, b: got.append(b), auto_ack=True)
    wait_until(lambda: conn.process_data_events(0.02) or len(got) == 3, what="3 deliveries")
    assert got == [b"0", b"1", b"2"]
    ch.basic_cancel(tag)
    other = conn.channel()
    other.basic_publish(exchange="", routing_key=q, body=b"after cancel")
    ch.close()
    wait_until(lambda: message_count(conn, q) == 1, what="only the post-cancel message ready")
    assert len(got) == 3


def test_exclusive_consumer_blocks_others(connections, names):
    # Goal: while an exclusive consumer exists no other consumer may attach (403), and after it cancels another can.
    conn = connections.open()
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(q)
    tag = ch.basic_consume(q, lambda *a: None, exclusive=True)
    other_conn = connections.open()
    och = other_conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        och.basic_consume(q, lambda *a: None)
    assert err.value.reply_code == 403
    ch2 = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch2.basic_consume(q, lambda *a: None)
    assert err.value.reply_code == 403
    ch.basic_cancel(tag)
    other_conn.channel().basic_consume(q, lambda *a: None)


def test_consumer_cancel_notification_on_queue_delete(ch, conn, names):
    # Goal: deleting a queue sends basic.cancel to its consumers (consumer_cancel_notify), and the channel stays open.
    q = names.queue()
    ch.queue_declare(q)
    cancelled = []
    ch.add_on_cancel_callback(lambda method: cancelled.append(method.method.consumer_tag))
    tag = ch.basic_consume(q, lambda *a: None)
    conn.channel().queue_delete(q)
    wait_until(lambda: conn.process_data_events(0.02) or cancelled, what="basic.cancel from the broker")
    assert cancelled == [tag]
    assert ch.is_open
    ch.queue_declare(q)


def test_ack_multiple_and_single(ch, conn, names):
    # Goal: ack with multiple settles every earlier tag at once, a single ack settles one, and closing the channel requeues only the unsettled rest.
    q = names.queue()
    ch.queue_declare(q)
    _fill(ch, conn, q, 5)
    tags = [get_one(ch, q, auto_ack=False)[0].delivery_tag for _ in range(5)]
    assert tags == [1, 2, 3, 4, 5]
    ch.basic_ack(3, multiple=True)
    ch.basic_ack(5)
    ch.close()
    ch = conn.channel()
    method, _, body = get_one(ch, q)
    assert body == b"3"
    assert method.redelivered is True
    assert ch.basic_get(q) == (None, None, None)


def test_nack_multiple_requeue_sets_redelivered(ch, conn, names):
    # Goal: nack multiple with requeue puts every earlier unacked message back, in original order, flagged redelivered.
    q = names.queue()
    ch.queue_declare(q)
    _fill(ch, conn, q, 3)
    for _ in range(3):
        method, _, _ = get_one(ch, q, auto_ack=False)
        assert method.redelivered is False
    ch.basic_nack(method.delivery_tag, multiple=True, requeue=True)
    got = collect(ch, q, 3)
    assert [b for _, _, b in got] == [b"0", b"1", b"2"]
    assert all(m.redelivered for m, _, _ in got)


def test_reject_requeue_and_discard(ch, conn, names):
    # Goal: reject with requeue redelivers the same message flagged redelivered; reject without requeue (no DLX) discards it.
    q = names.queue()
    ch.queue_declare(q)
    ch.basic_publish(exchange="", routing_key=q, body=b"r",
                     properties=pika.BasicProperties(message_id="id-1", content_type="text/plain"))
    method, _, _ = get_one(ch, q, auto_ack=False)
    ch.basic_reject(method.delivery_tag, requeue=True)
    method, props, body = get_one(ch, q, auto_ack=False)
    assert (body, method.redelivered, props.message_id, props.content_type) == (
        b"r", True, "id-1", "text/plain")
    ch.basic_reject(method.delivery_tag, requeue=False)
    assert ch.basic_get(q) == (None, None, None)
    assert message_count(conn, q) == 0


def test_nack_single_without_requeue_discards(ch, conn, names):
    # Goal: nack of one delivery without requeue drops only that message.
    q = names.queue()
    ch.queue_declare(q)
    _fill(ch, conn, q, 2)
    first, _, _ = get_one(ch, q, auto_ack=False)
    second, _, _ = get_one(ch, q, auto_ack=False)
    ch.basic_nack(first.delivery_tag, multiple=False, requeue=False)
    ch.basic_nack(second.delivery_tag, multiple=False, requeue=True)
    method, _, body = get_one(ch, q)
    assert (body, method.redelivered) == (b"1", True)
    assert ch.basic_get(q) == (None, None, None)


def test_basic_recover_requeues_unacked(ch, conn, names):
    # Goal: basic.recover(requeue=True) returns every unacked delivery of the channel to the queue, redelivered.
    q = names.queue()
    ch.queue_declare(q)
    _fill(ch, conn, q, 2)
    get_one(ch, q, auto_ack=False)
    get_one(ch, q, auto_ack=False)
    assert message_count(conn, q) == 0
    ch.basic_recover(requeue=True)
    got = collect(ch, q, 2)
    assert sorted(b for _, _, b in got) == [b"0", b"1"]
    assert all(m.redelivered for m, _, _ in got)


def test_messages_round_robin_between_consumers(connections, names):
    # Goal: two consumers on one queue share its messages round-robin, none duplicated or lost.
    conn = connections.open()
    ch = conn.channel()
    q = names.queue()
    ch.queue_declare(q)
    got = {"a": [], "b": []}
    ch.basic_consume(q, lambda c, m, p, b: got["a"].append(b), auto_ack=True)
    ch.basic_consume(q, lambda c, m, p, b: got["b"].append(b), auto_ack=True)
    for i in range(10):
        ch.basic_publish(exchange="", routing_key=q, body=str(i).encode())
    wait_until(lambda: conn.process_data_events(0.02) or len(got["a"]) + len(got["b"]) == 10,
               timeout=WAIT_TIMEOUT_S, what="10 deliveries")
    assert sorted(got["a"] + got["b"], key=int) == [str(i).encode() for i in range(10)]
    assert len(got["a"]) == 5 and len(got["b"]) == 5


def test_qos_per_consumer_and_global(ch, conn, names):
    # Goal: as RabbitMQ defines it, basic.qos with global=false limits each new consumer on its own, and global=true shares one limit across the channel's consumers.
    q = names.queue()
    ch.queue_declare(q)
    _fill(ch, conn, q, 6)
    got = {"a": [], "b": []}
    ch.basic_qos(prefetch_count=1, global_qos=False)
    ch.basic_consume(q, lambda c, m, p, b: got["a"].append(m))
    ch.basic_consume(q, lambda c, m, p, b: got["b"].append(m))
    wait_until(lambda: conn.process_data_events(0.02) or (got["a"] and got["b"]),
               what="one delivery per consumer")
    wait_until(lambda: message_count(conn, q) == 4, what="4 still ready")
    assert (len(got["a"]), len(got["b"])) == (1, 1)

    q2 = names.queue("global")
    ch2 = conn.channel()
    ch2.queue_declare(q2)
    _fill(ch2, conn, q2, 6)
    got2 = []
    ch2.basic_qos(prefetch_count=1, global_qos=True)
    ch2.basic_consume(q2, lambda c, m, p, b: got2.append(m))
    ch2.basic_consume(q2, lambda c, m, p, b: got2.append(m))
    wait_until(lambda: conn.process_data_events(0.02) or got2, what="first delivery")
    wait_until(lambda: message_count(conn, q2) == 5, what="5 still ready")
    conn.process_data_events(0.2)
    assert len(got2) == 1, "the channel-wide limit of 1 was exceeded"
    ch2.basic_ack(got2[0].delivery_tag)
    wait_until(lambda: conn.process_data_events(0.02) or len(got2) == 2, what="second delivery")
    assert message_count(conn, q2) == 4


def test_requeued_message_returns_to_its_place(ch, conn, names):
    # Goal: a message rejected with requeue goes back to its original position, ahead of messages published after it.
    q = names.queue()
    ch.queue_declare(q)
    _fill(ch, conn, q, 4)
    first, _, _ = get_one(ch, q, auto_ack=False)
    second, _, _ = get_one(ch, q, auto_ack=False)
    ch.basic_reject(second.delivery_tag, requeue=True)
    method, _, body = get_one(ch, q, auto_ack=False)
    assert (body, method.redelivered) == (b"1", True)
    method, _, body = get_one(ch, q)
    assert (body, method.redelivered) == (b"2", False)
