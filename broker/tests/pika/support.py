"""Functions shared by the pika tests: waiting on broker-side conditions with
deadlines (never a blind sleep) and small queries through passive declares."""

import time

import pika

# Default deadline for waiting on a broker-side effect (a delivery, an expiry).
WAIT_TIMEOUT_S = 10.0


def wait_until(predicate, timeout=WAIT_TIMEOUT_S, interval=0.02, what="condition"):
    """Polls `predicate` until it returns a truthy value, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def get_one(ch, queue, auto_ack=True, timeout=WAIT_TIMEOUT_S):
    """basic.get until a message arrives; returns (method, properties, body)."""
    result = {}

    def poll():
        method, props, body = ch.basic_get(queue, auto_ack=auto_ack)
        if method is not None:
            result["m"] = (method, props, body)
            return True
        return False

    wait_until(poll, timeout, what=f"a message on {queue}")
    return result["m"]


def collect(ch, queue, count, auto_ack=True, timeout=WAIT_TIMEOUT_S):
    """Consumes exactly `count` messages from `queue` with basic.consume;
    returns a list of (method, properties, body)."""
    got = []
    deadline = time.monotonic() + timeout
    for method, props, body in ch.consume(queue, auto_ack=auto_ack, inactivity_timeout=0.1):
        if method is not None:
            got.append((method, props, body))
            if len(got) == count:
                break
        if time.monotonic() > deadline:
            break
    ch.cancel()
    assert len(got) == count, f"expected {count} messages from {queue}, got {len(got)}"
    return got


def message_count(conn, queue):
    """Ready messages in `queue`, via a passive declare on a fresh channel."""
    c = conn.channel()
    try:
        return c.queue_declare(queue, passive=True).method.message_count
    finally:
        if c.is_open:
            c.close()


def queue_exists(conn, queue):
    """Whether a passive declare of `queue` succeeds (404 means it does not)."""
    c = conn.channel()
    try:
        c.queue_declare(queue, passive=True)
        c.close()
        return True
    except pika.exceptions.ChannelClosedByBroker as err:
        assert err.reply_code == 404, err
        return False


def queue_gone(conn, queue):
    """Whether a passive declare of `queue` answers 404. An exclusive queue
    whose owner just closed may still answer 405 (locked) until the broker has
    finished deleting it; that counts as not gone yet."""
    c = conn.channel()
    try:
        c.queue_declare(queue, passive=True)
        c.close()
        return False
    except pika.exceptions.ChannelClosedByBroker as err:
        if err.reply_code == 405:
            return False
        assert err.reply_code == 404, err
        return True


def exchange_exists(conn, exchange):
    """Whether a passive declare of `exchange` succeeds (404 means it does not)."""
    c = conn.channel()
    try:
        c.exchange_declare(exchange, passive=True)
        c.close()
        return True
    except pika.exceptions.ChannelClosedByBroker as err:
        assert err.reply_code == 404, err
        return False
