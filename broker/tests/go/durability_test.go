package brokertests

// What survives a broker restart, seen through amqp091-go: durable topology
// and confirmed persistent messages, not transient queues or messages.

import (
	"os"
	"os/exec"
	"strconv"
	"testing"

	amqp "github.com/rabbitmq/amqp091-go"
)

// restartableBroker is a broker this test may restart: its own synod-broker,
// or the AMQP_URL broker when AMQP_RESTART_CMD says how to restart it.
func restartableBroker(t *testing.T) (string, func()) {
	t.Helper()
	if url := os.Getenv("AMQP_URL"); url != "" {
		cmdline := os.Getenv("AMQP_RESTART_CMD")
		if cmdline == "" {
			t.Skip("AMQP_URL is set without AMQP_RESTART_CMD: cannot restart that broker")
		}
		u, err := amqp.ParseURI(url)
		must(t, err, "parse AMQP_URL")
		return url, func() {
			cmd := exec.Command("sh", "-c", cmdline)
			cmd.Dir = "../../.."
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("%s: %v\n%s", cmdline, err, out)
			}
			must(t, waitListening(u.Host+":"+strconv.Itoa(u.Port), func() error { return nil }), "broker back after restart")
		}
	}
	p, err := newSynodProcess()
	must(t, err, "prepare synod-broker")
	t.Cleanup(p.remove)
	must(t, p.start(), "start synod-broker")
	return p.url(), func() { must(t, p.restart(), "restart synod-broker") }
}

func TestDurableTopologyAndPersistentMessagesSurviveRestart(t *testing.T) {
	// Goal: after a restart the durable exchange, queue and binding exist and the confirmed persistent messages are back in order, the one delivered before the restart flagged redelivered; the transient queue and message are gone.
	url, restart := restartableBroker(t)
	conn, err := amqp.Dial(url)
	must(t, err, "dial")
	ch := channel(t, conn)
	must(t, ch.Confirm(false), "confirm.select")
	confirms := ch.NotifyPublish(make(chan amqp.Confirmation, 10))
	x := exchangeName(t, "durable")
	must(t, ch.ExchangeDeclare(x, "direct", true, false, false, false, nil), "declare exchange")
	durableQ, transientQ := queueName(t, "durable"), queueName(t, "transient")
	_, err = ch.QueueDeclare(durableQ, true, false, false, false, nil)
	must(t, err, "declare durable queue")
	must(t, ch.QueueBind(durableQ, "k", x, false, nil), "bind")
	declareQueue(t, ch, transientQ, nil)
	publish(t, ch, x, "k", amqp.Publishing{DeliveryMode: amqp.Persistent, Body: []byte("p1")})
	publish(t, ch, x, "k", amqp.Publishing{DeliveryMode: amqp.Transient, Body: []byte("t1")})
	publish(t, ch, x, "k", amqp.Publishing{DeliveryMode: amqp.Persistent, Body: []byte("p2")})
	publish(t, ch, "", transientQ, amqp.Publishing{DeliveryMode: amqp.Persistent, Body: []byte("lost")})
	for i := 0; i < 4; i++ {
		if c := <-confirms; !c.Ack {
			t.Fatalf("publish %d nacked", c.DeliveryTag)
		}
	}
	if d := getOne(t, ch, durableQ, false); string(d.Body) != "p1" {
		t.Fatalf("got %q before the restart", d.Body)
	}

	restart()
	conn.Close()
	conn, err = amqp.Dial(url)
	must(t, err, "dial after restart")
	defer conn.Close()
	if !exchangeExists(t, conn, x) {
		t.Error("durable exchange lost across the restart")
	}
	if queueExists(t, conn, transientQ) {
		t.Error("transient queue kept across the restart")
	}
	if !queueExists(t, conn, durableQ) {
		t.Fatal("durable queue lost across the restart")
	}
	ch = channel(t, conn)
	got := collect(t, ch, durableQ, 2)
	expectBodies(t, got, "p1", "p2")
	if !got[0].Redelivered || got[1].Redelivered || got[0].DeliveryMode != amqp.Persistent {
		t.Fatalf("redelivered %v %v, mode %d", got[0].Redelivered, got[1].Redelivered, got[0].DeliveryMode)
	}
	expectEmpty(t, ch, durableQ)
	publishBody(t, ch, x, "k", "after")
	expectBodies(t, collect(t, ch, durableQ, 1), "after")
}
