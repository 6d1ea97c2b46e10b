"""What survives a broker restart, seen through pika: durable exchanges,
queues and bindings and the persistent messages in durable queues; not
transient queues or transient messages."""

import pika

from support import WAIT_TIMEOUT_S, collect, exchange_exists, queue_exists

PERSISTENT = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
TRANSIENT = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Transient)


def _connect(url):
    params = pika.URLParameters(url)
    params.socket_timeout = WAIT_TIMEOUT_S
    params.connection_attempts = 1
    return pika.BlockingConnection(params)


def test_durable_topology_and_persistent_messages_survive_restart(restartable_broker, names):
    # Goal: after a restart the durable exchange, queue and binding exist and the confirmed persistent messages (including one delivered but unacked at shutdown) are back in order; the transient queue and transient message are gone.
    conn = _connect(restartable_broker.url)
    ch = conn.channel()
    ch.confirm_delivery()
    x = names.exchange("durable")
    ch.exchange_declare(x, "direct", durable=True)
    durable_q, transient_q = names.queue("durable"), names.queue("transient")
    ch.queue_declare(durable_q, durable=True)
    ch.queue_bind(durable_q, x, "k")
    ch.queue_declare(transient_q, durable=False)
    ch.basic_publish(exchange=x, routing_key="k", body=b"p1", properties=PERSISTENT)
    ch.basic_publish(exchange=x, routing_key="k", body=b"t1", properties=TRANSIENT)
    ch.basic_publish(exchange=x, routing_key="k", body=b"p2", properties=PERSISTENT)
    ch.basic_publish(exchange="", routing_key=transient_q, body=b"lost", properties=PERSISTENT)
    method, _, body = ch.basic_get(durable_q, auto_ack=False)
    assert body == b"p1" and method is not None  # held unacked across the restart

    restart_began = conn  # the old connection dies with the broker
    restartable_broker.restart()
    try:
        restart_began.close()
    except pika.exceptions.AMQPError:
        pass

    conn = _connect(restartable_broker.url)
    try:
        assert exchange_exists(conn, x)
        assert queue_exists(conn, durable_q)
        assert not queue_exists(conn, transient_q)
        ch = conn.channel()
        got = collect(ch, durable_q, 2)
        assert [b for _, _, b in got] == [b"p1", b"p2"]
        assert got[0][1].delivery_mode == 2
        # p1 had been delivered before the restart; p2 never was.
        assert [m.redelivered for m, _, _ in got] == [True, False]
        assert ch.basic_get(durable_q) == (None, None, None)
        # The binding came back too.
        ch.basic_publish(exchange=x, routing_key="k", body=b"after", properties=PERSISTENT)
        assert [b for _, _, b in collect(ch, durable_q, 1)] == [b"after"]
    finally:
        conn.close()
