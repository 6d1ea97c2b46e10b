"""Limits as pika reports them: a connection over the node's limit is
refused with connection.close 530 after connection.open, which pika raises
with the broker's code and text, while the connection already open keeps
working. Needs its own broker started with the limit, so it is skipped
against AMQP_URL."""

import os
import time

import pika
import pytest

from conftest import SynodProcess, _broker_binary
from support import WAIT_TIMEOUT_S


@pytest.fixture
def limited_broker():
    if os.environ.get("AMQP_URL"):
        pytest.skip("needs a synod-broker started with --max-connections 1")
    broker = SynodProcess(_broker_binary(), ["--max-connections", "1"])
    broker.start()
    yield broker
    broker.remove()


def _connect_when_the_slot_is_free(params):
    # The start-up probe held the one slot for a moment: retry until free.
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while True:
        try:
            return pika.BlockingConnection(params)
        except pika.exceptions.AMQPConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_connection_over_the_node_limit_is_refused_with_530(limited_broker):
    # Goal: the second connection fails with 530 and the limit in its text; the first still publishes and gets.
    params = pika.URLParameters(limited_broker.url)
    params.socket_timeout = WAIT_TIMEOUT_S
    params.connection_attempts = 1
    first = _connect_when_the_slot_is_free(params)
    try:
        with pytest.raises(pika.exceptions.AMQPConnectionError) as refused:
            pika.BlockingConnection(params)
        text = str(refused.value)
        assert "530" in text, text
        assert "node connection limit (1) is reached" in text, text
        channel = first.channel()
        channel.queue_declare("limits-still-served", auto_delete=True)
        channel.basic_publish("", "limits-still-served", b"ok")
        method, _, body = channel.basic_get("limits-still-served", auto_ack=True)
        assert method is not None and body == b"ok"
    finally:
        first.close()
