"""Queues through pika: exclusive, auto-delete and server-named queues, purge,
conditional delete, TTLs, length limits and dead-lettering with the x-death
header, as RabbitMQ documents them."""

import pika
import pytest

from support import collect, get_one, message_count, queue_exists, queue_gone, wait_until


def test_server_named_queue_and_declare_ok_counts(ch, conn, names):
    # Goal: queue.declare with an empty name returns a unique amq.gen- name, and declare-ok reports ready messages and consumers.
    q1 = ch.queue_declare("", exclusive=True).method.queue
    q2 = ch.queue_declare("", exclusive=True).method.queue
    assert q1.startswith("amq.gen-") and q2.startswith("amq.gen-") and q1 != q2
    for i in range(3):
        ch.basic_publish(exchange="", routing_key=q1, body=str(i).encode())
    wait_until(lambda: message_count(conn, q1) == 3, what="3 ready")
    other = conn.channel()
    other.basic_consume(q2, lambda *a: None)
    ok = ch.queue_declare(q2, passive=True).method
    assert (ok.queue, ok.message_count, ok.consumer_count) == (q2, 0, 1)


def test_exclusive_queue_locked_then_deleted_with_owner(connections, names):
    # Goal: an exclusive queue is usable only by its connection (405 for others) and disappears when that connection closes.
    owner = connections.open()
    q = owner.channel().queue_declare(names.queue(), exclusive=True).method.queue
    other = connections.open()
    och = other.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        och.basic_consume(q, lambda *a: None)
    assert err.value.reply_code == 405
    assert other.is_open
    owner.close()
    wait_until(lambda: queue_gone(other, q), what="exclusive queue deleted with its owner")


def test_auto_delete_queue_goes_with_last_consumer(ch, conn, names):
    # Goal: an auto-delete queue lives while it has consumers and is deleted when the last one cancels.
    q = names.queue()
    ch.queue_declare(q, auto_delete=True)
    tag1 = ch.basic_consume(q, lambda *a: None)
    tag2 = ch.basic_consume(q, lambda *a: None)
    ch.basic_cancel(tag1)
    assert queue_exists(conn, q)
    ch.basic_cancel(tag2)
    wait_until(lambda: not queue_exists(conn, q), what="auto-delete queue gone")


def test_purge_returns_count_and_empties(ch, conn, names):
    # Goal: queue.purge reports how many ready messages it removed and leaves the queue empty but usable.
    q = names.queue()
    ch.queue_declare(q)
    for i in range(7):
        ch.basic_publish(exchange="", routing_key=q, body=b"m")
    wait_until(lambda: message_count(conn, q) == 7, what="7 ready")
    assert ch.queue_purge(q).method.message_count == 7
    assert message_count(conn, q) == 0
    assert ch.basic_get(q) == (None, None, None)
    ch.basic_publish(exchange="", routing_key=q, body=b"after")
    assert get_one(ch, q)[2] == b"after"


def test_delete_if_unused_and_if_empty(ch, conn, names):
    # Goal: queue.delete if-unused fails 406 while a consumer exists, if-empty fails 406 while messages wait, and a plain delete reports the dropped count.
    q = names.queue()
    ch.queue_declare(q)
    ch.basic_publish(exchange="", routing_key=q, body=b"m1")
    ch.basic_publish(exchange="", routing_key=q, body=b"m2")
    wait_until(lambda: message_count(conn, q) == 2, what="2 ready")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.queue_delete(q, if_empty=True)
    assert err.value.reply_code == 406
    consumer_ch = conn.channel()
    consumer_ch.basic_qos(prefetch_count=1)
    consumer_ch.basic_consume(q, lambda *a: None)
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.queue_delete(q, if_unused=True)
    assert err.value.reply_code == 406
    consumer_ch.close()  # its unacked message goes back to the queue
    ch = conn.channel()
    wait_until(lambda: message_count(conn, q) == 2, what="unacked message requeued")
    assert ch.queue_delete(q, if_unused=True).method.message_count == 2
    assert not queue_exists(conn, q)


def test_queue_redeclare_with_other_arguments_406(ch, conn, names):
    # Goal: redeclaring a queue with different arguments or flags closes the channel with 406 and leaves the queue as it was.
    q = names.queue()
    ch.queue_declare(q, arguments={"x-max-length": 10})
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.queue_declare(q, arguments={"x-max-length": 20})
    assert err.value.reply_code == 406
    ch = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.queue_declare(q, durable=True, arguments={"x-max-length": 10})
    assert err.value.reply_code == 406
    conn.channel().queue_declare(q, arguments={"x-max-length": 10})


def test_x_message_ttl_dead_letters_expired(ch, conn, names):
    # Goal: messages older than x-message-ttl are dropped from the queue and dead-lettered with x-death reason `expired`.
    dlx, dlq, q = names.exchange("dlx"), names.queue("dlq"), names.queue("ttl")
    ch.exchange_declare(dlx, "fanout")
    ch.queue_declare(dlq)
    ch.queue_bind(dlq, dlx)
    ch.queue_declare(q, arguments={"x-message-ttl": 100, "x-dead-letter-exchange": dlx})
    ch.basic_publish(exchange="", routing_key=q, body=b"short-lived",
                     properties=pika.BasicProperties(headers={"k": "v"}))
    method, props, body = get_one(ch, dlq)
    assert body == b"short-lived"
    assert props.headers["k"] == "v"
    death = props.headers["x-death"][0]
    assert death["reason"] == "expired"
    assert death["queue"] == q
    assert death["exchange"] == ""
    assert death["routing-keys"] == [q]
    assert death["count"] == 1
    assert message_count(conn, q) == 0


def test_ttl_zero_drops_unless_consumer_ready(ch, conn, names):
    # Goal: with x-message-ttl 0 a message with no waiting consumer is dropped at once rather than queued.
    q = names.queue()
    ch.queue_declare(q, arguments={"x-message-ttl": 0})
    ch.basic_publish(exchange="", routing_key=q, body=b"gone")
    ch.basic_publish(exchange="", routing_key=q, body=b"gone too")
    assert message_count(conn, q) == 0
    assert ch.basic_get(q) == (None, None, None)


def test_per_message_expiration(ch, conn, names):
    # Goal: a message with `expiration` expires on its own (dead-lettered as expired, with the expiration property removed) while an unexpiring one stays.
    dlx, dlq, q = names.exchange("dlx"), names.queue("dlq"), names.queue()
    ch.exchange_declare(dlx, "fanout")
    ch.queue_declare(dlq)
    ch.queue_bind(dlq, dlx)
    ch.queue_declare(q, arguments={"x-dead-letter-exchange": dlx})
    ch.basic_publish(exchange="", routing_key=q, body=b"expiring",
                     properties=pika.BasicProperties(expiration="50"))
    ch.basic_publish(exchange="", routing_key=q, body=b"staying")
    _, props, body = get_one(ch, dlq)
    assert body == b"expiring"
    assert props.expiration is None
    death = props.headers["x-death"][0]
    assert death["reason"] == "expired"
    assert death["original-expiration"] == "50"
    assert [b for _, _, b in collect(ch, q, 1)] == [b"staying"]


def test_x_expires_deletes_unused_queue(ch, conn, names):
    # Goal: a queue with x-expires and no consumers is deleted after that idle time.
    q = names.queue()
    ch.queue_declare(q, arguments={"x-expires": 200})
    # A declare or basic.get would count as use and renew the lease; a
    # mandatory publish does not, and comes back once the queue is gone.
    ch.confirm_delivery()

    def gone():
        try:
            ch.basic_publish(exchange="", routing_key=q, body=b"probe", mandatory=True)
            return False
        except pika.exceptions.UnroutableError:
            return True

    wait_until(gone, interval=0.05, what="x-expires queue deleted")
    assert not queue_exists(conn, q)


def test_max_length_drop_head(ch, conn, names):
    # Goal: x-max-length with the default drop-head overflow keeps the newest messages and dead-letters the dropped oldest with reason maxlen.
    dlx, dlq, q = names.exchange("dlx"), names.queue("dlq"), names.queue()
    ch.exchange_declare(dlx, "fanout")
    ch.queue_declare(dlq)
    ch.queue_bind(dlq, dlx)
    ch.queue_declare(q, arguments={"x-max-length": 3, "x-dead-letter-exchange": dlx})
    for i in range(5):
        ch.basic_publish(exchange="", routing_key=q, body=str(i).encode())
    assert [b for _, _, b in collect(ch, q, 3)] == [b"2", b"3", b"4"]
    dropped = collect(ch, dlq, 2)
    assert [b for _, _, b in dropped] == [b"0", b"1"]
    assert dropped[0][1].headers["x-death"][0]["reason"] == "maxlen"


def test_max_length_reject_publish_nacks_with_confirms(ch, conn, names):
    # Goal: with x-overflow reject-publish, publishes beyond x-max-length are nacked under confirms and not enqueued.
    q = names.queue()
    ch.queue_declare(q, arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
    ch.confirm_delivery()
    ch.basic_publish(exchange="", routing_key=q, body=b"1")
    ch.basic_publish(exchange="", routing_key=q, body=b"2")
    with pytest.raises(pika.exceptions.NackError):
        ch.basic_publish(exchange="", routing_key=q, body=b"3")
    assert message_count(conn, q) == 2
    assert [b for _, _, b in collect(ch, q, 2)] == [b"1", b"2"]
    ch.basic_publish(exchange="", routing_key=q, body=b"4")  # room again: acked
    assert get_one(ch, q)[2] == b"4"


def test_dead_letter_on_reject_and_nack_with_routing_key(ch, conn, names):
    # Goal: basic.reject and basic.nack without requeue dead-letter through x-dead-letter-exchange with x-dead-letter-routing-key, and x-death counts repeated deaths.
    dlx, dlq, q = names.exchange("dlx"), names.queue("dlq"), names.queue()
    ch.exchange_declare(dlx, "direct")
    ch.queue_declare(dlq)
    ch.queue_bind(dlq, dlx, "dead")
    ch.queue_declare(q, arguments={"x-dead-letter-exchange": dlx,
                                   "x-dead-letter-routing-key": "dead"})
    ch.basic_publish(exchange="", routing_key=q, body=b"rejected")
    ch.basic_publish(exchange="", routing_key=q, body=b"nacked")
    m1, _, b1 = get_one(ch, q, auto_ack=False)
    ch.basic_reject(m1.delivery_tag, requeue=False)
    m2, _, b2 = get_one(ch, q, auto_ack=False)
    ch.basic_nack(m2.delivery_tag, requeue=False)
    assert (b1, b2) == (b"rejected", b"nacked")
    got = collect(ch, dlq, 2)
    assert [b for _, _, b in got] == [b"rejected", b"nacked"]
    for method, props, _ in got:
        assert method.routing_key == "dead"
        assert method.exchange == dlx
        death = props.headers["x-death"][0]
        assert death["reason"] == "rejected"
        assert death["queue"] == q
        assert death["routing-keys"] == [q]
        assert death["count"] == 1
    # The same message dying again in the same queue for the same reason bumps count.
    ch.basic_publish(exchange="", routing_key=q, body=b"again", properties=got[0][1])
    m3, _, _ = get_one(ch, q, auto_ack=False)
    ch.basic_reject(m3.delivery_tag, requeue=False)
    _, props, body = get_one(ch, dlq)
    assert body == b"again"
    assert props.headers["x-death"][0]["count"] == 2
    assert len(props.headers["x-death"]) == 1
