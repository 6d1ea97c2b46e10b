"""Celery's messaging layer, kombu (over py-amqp), against the broker: one
round trip with its own declare, publish and consume path."""

import kombu

from support import WAIT_TIMEOUT_S


def test_kombu_publish_and_consume(amqp_url, names):
    # Goal: kombu declares a direct exchange and queue, publishes a JSON message and consumes it back with headers and content type intact.
    exchange = kombu.Exchange(names.exchange("kombu"), type="direct", durable=False)
    queue = kombu.Queue(names.queue("kombu"), exchange=exchange, routing_key="task",
                        durable=False)
    received = []
    with kombu.Connection(amqp_url, connect_timeout=WAIT_TIMEOUT_S) as conn:
        producer = conn.Producer(serializer="json")
        producer.publish({"task": "add", "args": [2, 3]}, exchange=exchange, routing_key="task",
                         declare=[queue], headers={"origin": "kombu-suite"}, retry=False)

        def on_message(body, message):
            received.append((body, message.headers, message.content_type))
            message.ack()

        with conn.Consumer(queue, callbacks=[on_message], accept=["json"]):
            conn.drain_events(timeout=WAIT_TIMEOUT_S)
    assert received == [({"task": "add", "args": [2, 3]}, {"origin": "kombu-suite"},
                         "application/json")]
