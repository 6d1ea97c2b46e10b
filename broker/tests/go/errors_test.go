package brokertests

// Error handling seen through amqp091-go: soft errors close only the channel
// with the spec's code; login and vhost failures are reported as RabbitMQ
// reports them.

import (
	"errors"
	"strings"
	"testing"

	amqp "github.com/rabbitmq/amqp091-go"
)

func TestPassiveDeclareMissing404ConnectionSurvives(t *testing.T) {
	// Goal: passive declares of a missing queue and exchange close the channel with 404 while the connection and other channels keep working.
	conn, bystander := open(t)
	q := queueName(t, "q")
	declareQueue(t, bystander, q, nil)
	ch := channel(t, conn)
	_, err := ch.QueueDeclarePassive(queueName(t, "missing"), false, false, false, false, nil)
	expectCode(t, err, 404)
	ch = channel(t, conn)
	expectCode(t, ch.ExchangeDeclarePassive(exchangeName(t, "missing"), "direct", false, false, false, false, nil), 404)
	if conn.IsClosed() {
		t.Fatal("connection closed by a channel error")
	}
	publishBody(t, bystander, "", q, "still here")
	if d := getOne(t, channel(t, conn), q, true); string(d.Body) != "still here" {
		t.Fatalf("got %q", d.Body)
	}
}

func TestRedeclareWithOtherArguments406(t *testing.T) {
	// Goal: redeclaring a queue with another x-message-ttl closes the channel with 406 PRECONDITION_FAILED.
	conn, ch := open(t)
	q := queueName(t, "q")
	declareQueue(t, ch, q, amqp.Table{"x-message-ttl": int32(1000)})
	_, err := channel(t, conn).QueueDeclare(q, false, false, false, false, amqp.Table{"x-message-ttl": int32(2000)})
	if e := expectCode(t, err, 406); !strings.Contains(e.Reason, "PRECONDITION_FAILED") {
		t.Fatalf("reason %q", e.Reason)
	}
}

func TestExclusiveQueueFromOtherConnection405(t *testing.T) {
	// Goal: using another connection's exclusive queue (declare, get, delete) closes the channel with 405 RESOURCE_LOCKED.
	_, owner := open(t)
	q := queueName(t, "q")
	_, err := owner.QueueDeclare(q, false, false, true, false, nil)
	must(t, err, "declare exclusive")
	intruder := dial(t)
	_, err = channel(t, intruder).QueueDeclarePassive(q, false, false, false, false, nil)
	expectCode(t, err, 405)
	_, _, err = channel(t, intruder).Get(q, true)
	expectCode(t, err, 405)
	_, err = channel(t, intruder).QueueDelete(q, false, false, false)
	expectCode(t, err, 405)
}

func TestPublishToMissingExchange404(t *testing.T) {
	// Goal: publishing to a missing exchange closes the channel with 404, not the connection.
	conn, ch := open(t)
	closed := ch.NotifyClose(make(chan *amqp.Error, 1))
	publishBody(t, ch, exchangeName(t, "missing"), "k", "x")
	expectChannelClosed(t, closed, 404)
	if conn.IsClosed() {
		t.Fatal("connection closed")
	}
	_, err := channel(t, conn).QueueDeclare("", false, false, true, false, nil)
	must(t, err, "declare on a new channel")
}

func TestAckUnknownDeliveryTag406(t *testing.T) {
	// Goal: acking a delivery tag the channel never issued closes the channel with 406 PRECONDITION_FAILED.
	conn, ch := open(t)
	closed := ch.NotifyClose(make(chan *amqp.Error, 1))
	must(t, ch.Ack(999, false), "send ack")
	expectChannelClosed(t, closed, 406)
	if conn.IsClosed() {
		t.Fatal("connection closed")
	}
}

func TestWrongPasswordAccessRefused(t *testing.T) {
	// Goal: a wrong password is refused during the handshake (amqp091-go maps the broker's close to ErrCredentials, code 403) and a later good login works.
	_, err := amqp.Dial(urlWith("guest", "not-the-password", ""))
	if !errors.Is(err, amqp.ErrCredentials) {
		t.Fatalf("dial with a wrong password: %v, want %v", err, amqp.ErrCredentials)
	}
	dial(t)
}

func TestUnknownVhostNotAllowed(t *testing.T) {
	// Goal: opening a missing vhost passes login but fails connection.open (amqp091-go reports ErrVhost), while the default vhost works.
	_, err := amqp.Dial(urlWith("guest", "guest", "no-such-vhost"))
	if !errors.Is(err, amqp.ErrVhost) {
		t.Fatalf("dial to a missing vhost: %v, want %v", err, amqp.ErrVhost)
	}
	dial(t)
}
