"""Exchanges through pika: every type's routing, exchange-to-exchange bindings,
and the declare/delete flags (passive, durable, auto-delete, internal,
if-unused) with the reply codes RabbitMQ gives."""

import pika
import pytest

from support import collect, exchange_exists, message_count, wait_until


def _publish_all(ch, exchange, messages):
    for routing_key, headers, body in messages:
        ch.basic_publish(exchange=exchange, routing_key=routing_key, body=body,
                         properties=pika.BasicProperties(headers=headers))


def test_default_exchange_routes_by_queue_name_and_rejects_bind(ch, names):
    # Goal: the nameless default exchange routes to the queue named by the key, and binding to it is refused with 403.
    q = names.queue()
    ch.queue_declare(q)
    ch.basic_publish(exchange="", routing_key=q, body=b"x")
    assert [b for _, _, b in collect(ch, q, 1)] == [b"x"]
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.queue_bind(q, "", routing_key="anything")
    assert err.value.reply_code == 403


def test_predeclared_amq_exchanges_exist(ch):
    # Goal: the standard amq.* exchanges exist with their types (passive declare succeeds).
    for name, kind in (("amq.direct", "direct"), ("amq.fanout", "fanout"),
                       ("amq.topic", "topic"), ("amq.headers", "headers"),
                       ("amq.match", "headers")):
        ch.exchange_declare(name, exchange_type=kind, passive=True)


def test_direct_fanout_topic_routing(ch, names):
    # Goal: direct, fanout and topic exchanges each route the same five messages as their type defines.
    x_direct, x_fanout, x_topic = names.exchange("d"), names.exchange("f"), names.exchange("t")
    ch.exchange_declare(x_direct, "direct")
    ch.exchange_declare(x_fanout, "fanout")
    ch.exchange_declare(x_topic, "topic")
    q_direct, q_fanout, q_topic = names.queue("d"), names.queue("f"), names.queue("t")
    for q in (q_direct, q_fanout, q_topic):
        ch.queue_declare(q)
    ch.queue_bind(q_direct, x_direct, "a.b")
    ch.queue_bind(q_fanout, x_fanout, "ignored")
    ch.queue_bind(q_topic, x_topic, "a.*.#")
    keys = ["a.b", "a", "a.b.c", "b.a", "a.x"]
    for x in (x_direct, x_fanout, x_topic):
        for key in keys:
            ch.basic_publish(exchange=x, routing_key=key, body=key.encode())
    assert [b for _, _, b in collect(ch, q_direct, 1)] == [b"a.b"]
    assert [b for _, _, b in collect(ch, q_fanout, 5)] == [k.encode() for k in keys]
    assert [b for _, _, b in collect(ch, q_topic, 3)] == [b"a.b", b"a.b.c", b"a.x"]
    for q in (q_direct, q_fanout, q_topic):
        assert message_count(ch.connection, q) == 0


def test_headers_exchange_all_and_any(ch, names):
    # Goal: a headers exchange routes on x-match all (every bound header equal) and any (at least one), ignoring the routing key.
    x = names.exchange("h")
    ch.exchange_declare(x, "headers")
    q_all, q_any = names.queue("all"), names.queue("any")
    ch.queue_declare(q_all)
    ch.queue_declare(q_any)
    ch.queue_bind(q_all, x, arguments={"x-match": "all", "format": "pdf", "type": "report"})
    ch.queue_bind(q_any, x, arguments={"x-match": "any", "format": "pdf", "type": "log"})
    _publish_all(ch, x, [
        ("k1", {"format": "pdf", "type": "report"}, b"pdf-report"),  # all, any
        ("k2", {"format": "pdf", "type": "log"}, b"pdf-log"),        # any
        ("k3", {"format": "zip", "type": "log"}, b"zip-log"),        # any
        ("k4", {"format": "zip", "type": "report"}, b"zip-report"),  # none
        ("k5", {"format": "pdf", "type": "report", "extra": 1}, b"pdf-report-extra"),  # all, any
        ("k6", None, b"no-headers"),                                 # none
    ])
    assert [b for _, _, b in collect(ch, q_all, 2)] == [b"pdf-report", b"pdf-report-extra"]
    assert [b for _, _, b in collect(ch, q_any, 4)] == [
        b"pdf-report", b"pdf-log", b"zip-log", b"pdf-report-extra"]
    assert message_count(ch.connection, q_all) == 0
    assert message_count(ch.connection, q_any) == 0


def test_exchange_to_exchange_binding(ch, names):
    # Goal: a message reaches a queue through a chain of exchange-to-exchange bindings, each applying its own routing, and exchange.unbind breaks the chain.
    upstream, downstream = names.exchange("up"), names.exchange("down")
    ch.exchange_declare(upstream, "topic")
    ch.exchange_declare(downstream, "direct")
    ch.exchange_bind(destination=downstream, source=upstream, routing_key="orders.#")
    q = names.queue()
    ch.queue_declare(q)
    ch.queue_bind(q, downstream, "orders.eu")
    for key in ("orders.eu", "orders.us", "billing.eu"):
        ch.basic_publish(exchange=upstream, routing_key=key, body=key.encode())
    [(method, _, body)] = collect(ch, q, 1)
    assert body == b"orders.eu"
    assert method.exchange == upstream
    ch.exchange_unbind(destination=downstream, source=upstream, routing_key="orders.#")
    ch.basic_publish(exchange=upstream, routing_key="orders.eu", body=b"after unbind")
    ch.basic_publish(exchange=downstream, routing_key="orders.eu", body=b"direct")
    [(_, _, body)] = collect(ch, q, 1)
    assert body == b"direct"
    assert message_count(ch.connection, q) == 0


def test_passive_declare_existing_and_durable_mismatch(ch, conn, names):
    # Goal: passive declare of an existing exchange succeeds, and redeclaring it with another durability or type closes the channel with 406.
    x = names.exchange()
    ch.exchange_declare(x, "direct", durable=True)
    ch.exchange_declare(x, "direct", durable=True)  # identical redeclare is fine
    ch.exchange_declare(x, passive=True)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.exchange_declare(x, "direct", durable=False)
    assert err.value.reply_code == 406
    ch2 = conn.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch2.exchange_declare(x, "fanout", durable=True)
    assert err.value.reply_code == 406
    assert conn.is_open


def test_auto_delete_exchange_goes_with_last_binding(ch, names):
    # Goal: an auto-delete exchange survives until its last binding is removed, then disappears.
    x = names.exchange()
    ch.exchange_declare(x, "fanout", auto_delete=True)
    q1, q2 = names.queue("1"), names.queue("2")
    ch.queue_declare(q1)
    ch.queue_declare(q2)
    ch.queue_bind(q1, x)
    ch.queue_bind(q2, x)
    ch.queue_unbind(q1, x)
    assert exchange_exists(ch.connection, x)
    ch.queue_unbind(q2, x)
    wait_until(lambda: not exchange_exists(ch.connection, x), what="auto-delete exchange gone")


def test_internal_exchange_refuses_publish_but_routes_from_exchange(ch, conn, names):
    # Goal: publishing directly to an internal exchange closes the channel with 403, while messages routed into it from another exchange get through.
    public, internal = names.exchange("public"), names.exchange("internal")
    ch.exchange_declare(public, "fanout")
    ch.exchange_declare(internal, "fanout", internal=True)
    ch.exchange_bind(destination=internal, source=public)
    q = names.queue()
    ch.queue_declare(q)
    ch.queue_bind(q, internal)
    ch.basic_publish(exchange=public, routing_key="", body=b"via public")
    assert [b for _, _, b in collect(ch, q, 1)] == [b"via public"]
    bad = conn.channel()
    bad.basic_publish(exchange=internal, routing_key="", body=b"direct")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        bad.queue_declare(q, passive=True)
    assert err.value.reply_code == 403
    assert message_count(conn, q) == 0


def test_exchange_delete_if_unused(ch, conn, names):
    # Goal: exchange.delete if-unused fails with 406 while a binding exists and succeeds once it is gone; deleting a missing exchange is fine (RabbitMQ is idempotent here).
    x = names.exchange()
    ch.exchange_declare(x, "direct")
    q = names.queue()
    ch.queue_declare(q)
    ch.queue_bind(q, x, "k")
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as err:
        ch.exchange_delete(x, if_unused=True)
    assert err.value.reply_code == 406
    ch = conn.channel()
    assert exchange_exists(conn, x)
    ch.queue_unbind(q, x, "k")
    ch.exchange_delete(x, if_unused=True)
    assert not exchange_exists(conn, x)
    ch.exchange_delete(x)


def test_deleting_exchange_removes_its_bindings(ch, conn, names):
    # Goal: after an exchange is deleted and declared again, its old bindings are gone.
    x = names.exchange()
    ch.exchange_declare(x, "fanout")
    q = names.queue()
    ch.queue_declare(q)
    ch.queue_bind(q, x)
    ch.exchange_delete(x)
    ch.exchange_declare(x, "fanout")
    ch.basic_publish(exchange=x, routing_key="", body=b"lost")
    ch.basic_publish(exchange="", routing_key=q, body=b"marker")
    assert [b for _, _, b in collect(ch, q, 1)] == [b"marker"]
