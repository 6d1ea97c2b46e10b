package brokertests

// The older, archived github.com/streadway/amqp client still runs in many
// services: one smoke test that it can declare, publish with confirms,
// consume and ack.

import (
	"testing"
	"time"

	streadway "github.com/streadway/amqp"
)

func TestStreadwaySmoke(t *testing.T) {
	// Goal: streadway/amqp connects, declares a queue, publishes under confirms, and consumes with a manual ack.
	conn, err := streadway.Dial(brokerURL)
	must(t, err, "dial")
	defer conn.Close()
	ch, err := conn.Channel()
	must(t, err, "channel")
	q := queueName(t, "streadway")
	_, err = ch.QueueDeclare(q, false, false, false, false, nil)
	must(t, err, "declare")
	must(t, ch.Confirm(false), "confirm.select")
	confirms := ch.NotifyPublish(make(chan streadway.Confirmation, 1))
	must(t, ch.Publish("", q, false, false, streadway.Publishing{
		ContentType: "text/plain", Headers: streadway.Table{"n": int32(7)}, Body: []byte("legacy")}), "publish")
	select {
	case c := <-confirms:
		if !c.Ack || c.DeliveryTag != 1 {
			t.Fatalf("confirm %+v", c)
		}
	case <-time.After(waitTimeout):
		t.Fatal("no confirm")
	}
	deliveries, err := ch.Consume(q, "", false, false, false, false, nil)
	must(t, err, "consume")
	select {
	case d := <-deliveries:
		if string(d.Body) != "legacy" || d.ContentType != "text/plain" || d.Headers["n"] != int32(7) {
			t.Fatalf("delivery %+v", d)
		}
		must(t, d.Ack(false), "ack")
	case <-time.After(waitTimeout):
		t.Fatal("no delivery")
	}
}
