"""The six classic RabbitMQ tutorials, written as pika users write them, each
asserting what the tutorial promises: which consumer gets which message, in
which order, with which properties."""

import threading
import uuid

import pika

from support import WAIT_TIMEOUT_S, collect, get_one, message_count, wait_until


def test_hello_world(ch, names):
    # Goal: a message published to the default exchange reaches the queue named by its routing key, body intact.
    q = names.queue("hello")
    ch.queue_declare(q)
    ch.basic_publish(exchange="", routing_key=q, body=b"Hello World!")
    [(method, _props, body)] = collect(ch, q, 1)
    assert body == b"Hello World!"
    assert method.routing_key == q
    assert method.exchange == ""
    assert method.redelivered is False


def test_work_queues_fair_dispatch(connections, names):
    # Goal: with a durable queue, persistent messages, prefetch 1 and manual acks, a busy worker gets no new task until it acks, and an unacked task is redelivered to the other worker when its worker dies.
    q = names.queue("task_queue")
    producer = connections.open().channel()
    producer.queue_declare(q, durable=True)
    for i in range(4):
        producer.basic_publish(
            exchange="", routing_key=q, body=f"task {i}".encode(),
            properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent))

    worker_a_conn = connections.open()
    worker_a = worker_a_conn.channel()
    worker_a.basic_qos(prefetch_count=1)
    worker_b = connections.open().channel()
    worker_b.basic_qos(prefetch_count=1)

    # Worker A takes one task and holds it unacked: the broker must not push it a second.
    got_a = []
    worker_a.basic_consume(q, lambda c, m, p, b: got_a.append((m, p, b)))
    wait_until(lambda: worker_a_conn.process_data_events(0.05) or got_a, what="worker A's first task")
    assert [b for _, _, b in got_a] == [b"task 0"]
    assert got_a[0][1].delivery_mode == 2
    wait_until(lambda: message_count(worker_a_conn, q) == 3, what="3 tasks left ready")
    worker_a_conn.process_data_events(0.2)
    assert len(got_a) == 1, "prefetch 1 was exceeded"

    # Worker B processes the rest one at a time, acking each.
    got_b = []
    for method, props, body in worker_b.consume(q, inactivity_timeout=WAIT_TIMEOUT_S):
        assert method is not None, "worker B starved"
        got_b.append(body)
        worker_b.basic_ack(method.delivery_tag)
        if len(got_b) == 3:
            break
    worker_b.cancel()
    assert got_b == [b"task 1", b"task 2", b"task 3"]

    # Worker A dies without acking: its task goes back and is redelivered.
    worker_a_conn.close()
    method, props, body = get_one(worker_b, q, auto_ack=False)
    assert body == b"task 0"
    assert method.redelivered is True
    assert props.delivery_mode == 2
    worker_b.basic_ack(method.delivery_tag)
    assert message_count(connections.open(), q) == 0


def test_publish_subscribe_fanout(connections, names):
    # Goal: every subscriber's server-named exclusive queue bound to the fanout `logs` exchange gets every log line, in order, whatever the routing key.
    logs = names.exchange("logs")
    publisher = connections.open().channel()
    publisher.exchange_declare(logs, exchange_type="fanout")
    subscribers = []
    for _ in range(3):
        sub = connections.open().channel()
        q = sub.queue_declare("", exclusive=True).method.queue
        assert q.startswith("amq.gen-"), q
        sub.queue_bind(q, logs)
        subscribers.append((sub, q))
    lines = [f"log line {i}".encode() for i in range(5)]
    for i, line in enumerate(lines):
        publisher.basic_publish(exchange=logs, routing_key=f"ignored.{i}", body=line)
    for sub, q in subscribers:
        assert [b for _, _, b in collect(sub, q, len(lines))] == lines


def test_routing_direct_by_severity(connections, names):
    # Goal: a direct exchange delivers each log only to the queues bound with its severity, and a queue bound twice gets each matching message once.
    direct_logs = names.exchange("direct_logs")
    conn = connections.open()
    ch = conn.channel()
    ch.exchange_declare(direct_logs, exchange_type="direct")
    errors_only = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(errors_only, direct_logs, routing_key="error")
    everything = ch.queue_declare("", exclusive=True).method.queue
    for severity in ("info", "warning", "error"):
        ch.queue_bind(everything, direct_logs, routing_key=severity)
    ch.queue_bind(everything, direct_logs, routing_key="error")  # duplicate binding is a no-op
    sent = [("info", b"i1"), ("error", b"e1"), ("warning", b"w1"), ("debug", b"d1"), ("error", b"e2")]
    for severity, body in sent:
        ch.basic_publish(exchange=direct_logs, routing_key=severity, body=body)
    errors = collect(ch, errors_only, 2)
    assert [(m.routing_key, b) for m, _, b in errors] == [("error", b"e1"), ("error", b"e2")]
    all_msgs = collect(ch, everything, 4)
    assert [b for _, _, b in all_msgs] == [b"i1", b"e1", b"w1", b"e2"]
    assert message_count(conn, everything) == 0


def test_topics(connections, names):
    # Goal: topic bindings `*.orange.*` and `*.*.rabbit`/`lazy.#` route exactly as the tutorial's table says.
    topic_logs = names.exchange("topic_logs")
    conn = connections.open()
    ch = conn.channel()
    ch.exchange_declare(topic_logs, exchange_type="topic")
    q1 = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q1, topic_logs, routing_key="*.orange.*")
    q2 = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q2, topic_logs, routing_key="*.*.rabbit")
    ch.queue_bind(q2, topic_logs, routing_key="lazy.#")
    keys = ["quick.orange.rabbit", "lazy.orange.elephant", "quick.orange.fox", "lazy.brown.fox",
            "lazy.pink.rabbit", "quick.brown.fox", "orange", "quick.orange.male.rabbit",
            "lazy.orange.male.rabbit", "lazy"]
    for key in keys:
        ch.basic_publish(exchange=topic_logs, routing_key=key, body=key.encode())
    got1 = [b.decode() for _, _, b in collect(ch, q1, 3)]
    assert got1 == ["quick.orange.rabbit", "lazy.orange.elephant", "quick.orange.fox"]
    # `lazy` alone matches `lazy.#` too: `#` matches zero or more words.
    got2 = [b.decode() for _, _, b in collect(ch, q2, 6)]
    assert got2 == ["quick.orange.rabbit", "lazy.orange.elephant", "lazy.brown.fox",
                    "lazy.pink.rabbit", "lazy.orange.male.rabbit", "lazy"]
    assert message_count(conn, q1) == 0
    assert message_count(conn, q2) == 0


def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def test_rpc(connections, names, params):
    # Goal: an RPC client with a server-named exclusive callback queue gets each reply matched by correlation_id from a server that answers on reply_to.
    rpc_queue = names.queue("rpc_queue")
    server_conn = pika.BlockingConnection(params)
    server = server_conn.channel()
    server.queue_declare(rpc_queue)
    server.basic_qos(prefetch_count=1)

    def on_request(ch, method, props, body):
        n = int(body)
        ch.basic_publish(exchange="", routing_key=props.reply_to,
                         properties=pika.BasicProperties(correlation_id=props.correlation_id),
                         body=str(fib(n)).encode())
        ch.basic_ack(delivery_tag=method.delivery_tag)

    server.basic_consume(rpc_queue, on_request)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            server_conn.process_data_events(0.05)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_conn = connections.open()
        client = client_conn.channel()
        callback_queue = client.queue_declare("", exclusive=True).method.queue
        assert callback_queue.startswith("amq.gen-")
        responses = {}

        def on_response(ch, method, props, body):
            responses[props.correlation_id] = int(body)

        client.basic_consume(callback_queue, on_response, auto_ack=True)
        expected = {}
        for n in (1, 10, 30):
            corr_id = str(uuid.uuid4())
            expected[corr_id] = fib(n)
            client.basic_publish(exchange="", routing_key=rpc_queue, body=str(n).encode(),
                                 properties=pika.BasicProperties(reply_to=callback_queue,
                                                                 correlation_id=corr_id))
        wait_until(lambda: client_conn.process_data_events(0.05) or len(responses) == 3,
                   what="three RPC replies")
        assert responses == expected
    finally:
        stop.set()
        thread.join(timeout=WAIT_TIMEOUT_S)
        server_conn.close()
