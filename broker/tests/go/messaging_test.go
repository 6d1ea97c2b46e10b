package brokertests

// Consuming and publishing through amqp091-go: qos, exclusive and no-ack
// consumers, cancel notifications, get/get-empty, ack/nack/reject, recover,
// confirms, transactions, mandatory returns, large bodies, many channels.

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

func fill(t *testing.T, conn *amqp.Connection, ch *amqp.Channel, q string, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		publishBody(t, ch, "", q, fmt.Sprint(i))
	}
	waitFor(t, fmt.Sprintf("%d ready in %s", n, q), func() bool { return messageCount(t, conn, q) == n })
}

func receive(t *testing.T, deliveries <-chan amqp.Delivery) amqp.Delivery {
	t.Helper()
	select {
	case d, ok := <-deliveries:
		if !ok {
			t.Fatal("delivery channel closed")
		}
		return d
	case <-time.After(waitTimeout):
		t.Fatal("no delivery")
	}
	panic("unreachable")
}

func TestGetAndGetEmpty(t *testing.T) {
	// Goal: basic.get returns messages in order with the remaining count, then get-empty.
	conn, ch := open(t)
	q := queueName(t, "q")
	declareQueue(t, ch, q, nil)
	fill(t, conn, ch, q, 3)
	for i, remaining := range []uint32{2, 1, 0} {
		m, ok, err := ch.Get(q, true)
		must(t, err, "get")
		if !ok || string(m.Body) != fmt.Sprint(i) || m.MessageCount != remaining {
			t.Fatalf("get %d: ok=%v body=%q count=%d", i, ok, m.Body, m.MessageCount)
		}
	}
	expectEmpty(t, ch, q)
}

func TestQosPrefetch(t *testing.T) {
	// Goal: prefetch 2 keeps at most two unacked deliveries in flight; each ack releases exactly one more.
	conn, ch := open(t)
	q := queueName(t, "q")
	declareQueue(t, ch, q, nil)
	fill(t, conn, ch, q, 5)
	must(t, ch.Qos(2, 0, false), "qos")
	deliveries, err := ch.Consume(q, "", false, false, false, false, nil)
	must(t, err, "consume")
	d1, d2 := receive(t, deliveries), receive(t, deliveries)
	waitFor(t, "3 still ready", func() bool { return messageCount(t, conn, q) == 3 })
	select {
	case d := <-deliveries:
		t.Fatalf("prefetch exceeded: got %q", d.Body)
	default:
	}
	must(t, d1.Ack(false), "ack")
	d3 := receive(t, deliveries)
	waitFor(t, "2 still ready", func() bool { return messageCount(t, conn, q) == 2 })
	must(t, d3.Ack(true), "ack multiple")
	d4, d5 := receive(t, deliveries), receive(t, deliveries)
	tags := []uint64{d1.DeliveryTag, d2.DeliveryTag, d3.DeliveryTag, d4.DeliveryTag, d5.DeliveryTag}
	if fmt.Sprint(tags) != "[1 2 3 4 5]" {
		t.Fatalf("delivery tags %v", tags)
	}
}

func TestNoAckConsumerAndCancel(t *testing.T) {
	// Goal: a no-ack consumer's deliveries are settled at once, and after basic.cancel the delivery channel closes and new messages stay queued.
	conn, ch := open(t)
	q := queueName(t, "q")
	declareQueue(t, ch, q, nil)
	fill(t, conn, ch, q, 3)
	deliveries, err := ch.Consume(q, "noack", true, false, false, false, nil)
	must(t, err, "consume")
	for i := 0; i < 3; i++ {
		if d := receive(t, deliveries); string(d.Body) != fmt.Sprint(i) {
			t.Fatalf("got %q", d.Body)
		}
	}
	must(t, ch.Cancel("noack", false), "cancel")
	waitFor(t, "delivery channel closed after cancel", func() bool {
		select {
		case _, ok := <-deliveries:
			return !ok
		default:
			return false
		}
	})
	publishBody(t, ch, "", q, "after cancel")
	must(t, ch.Close(), "close")
	waitFor(t, "one ready", func() bool { return messageCount(t, conn, q) == 1 })
}

func TestExclusiveConsumer(t *testing.T) {
	// Goal: an exclusive consumer keeps every other consumer off the queue (403 ACCESS_REFUSED).
	_, ch := open(t)
	q := queueName(t, "q")
	declareQueue(t, ch, q, nil)
	_, err := ch.Consume(q, "only", false, true, false, false, nil)
	must(t, err, "exclusive consume")
	_, other := open(t)
	_, err = other.Consume(q, "", false, false, false, false, nil)
	expectCode(t, err, 403)
}

func TestConsumerCancelNotification(t *testing.T) {
	// Goal: deleting a queue sends basic.cancel to its consumer, and the channel stays open.
	conn, ch := open(t)
	q := queueName(t, "q")
	declareQueue(t, ch, q, nil)
	cancels := ch.NotifyCancel(make(chan string, 1))
	_, err := ch.Consume(q, "watched", false, false, false, false, nil)
	must(t, err, "consume")
	_, err = channel(t, conn).QueueDelete(q, false, false, false)
	must(t, err, "delete")
	select {
	case tag := <-cancels:
		if tag != "watched" {
			t.Fatalf("cancelled %q", tag)
		}
	case <-time.After(waitTimeout):
		t.Fatal("no basic.cancel from the broker")
	}
	declareQueue(t, ch, q, nil) // the channel still works
}

func TestAckNackRejectRequeue(t *testing.T) {
	// Goal: ack multiple, nack multiple with requeue and reject with/without requeue settle the right deliveries; requeued ones come back redelivered in order.
	conn, ch := open(t)
	q := queueName(t, "q")
	declareQueue(t, ch, q, nil)
	fill(t, conn, ch, q, 6)
	var ds []amqp.Delivery
	for i := 0; i < 6; i++ {
		ds = append(ds, getOne(t, ch, q, false))
	}
	must(t, ds[1].Ack(true), "ack multiple up to 2")         // settles 0,1
	must(t, ds[2].Reject(false), "reject without requeue")   // drops 2
	must(t, ds[4].Nack(true, true), "nack multiple requeue") // requeues 3,4
	must(t, ds[5].Reject(true), "reject with requeue")       // requeues 5
	got := collect(t, ch, q, 3)
	expectBodies(t, got, "3", "4", "5")
	for _, d := range got {
		if !d.Redelivered {
			t.Fatalf("%q not flagged redelivered", d.Body)
		}
	}
	expectEmpty(t, ch, q)
}

func TestRecoverRequeues(t *testing.T) {
	// Goal: basic.recover(requeue) returns the channel's unacked deliveries, redelivered.
	conn, ch := open(t)
	q := queueName(t, "q")
	declareQueue(t, ch, q, nil)
	fill(t, conn, ch, q, 2)
	getOne(t, ch, q, false)
	getOne(t, ch, q, false)
	must(t, ch.Recover(true), "recover")
	got := collect(t, ch, q, 2)
	for _, d := range got {
		if !d.Redelivered {
			t.Fatalf("%q not redelivered", d.Body)
		}
	}
}

func TestUnackedRequeuedOnChannelClose(t *testing.T) {
	// Goal: closing a channel requeues its unacked deliveries, flagged redelivered, keeping queue order.
	conn, ch := open(t)
	q := queueName(t, "q")
	declareQueue(t, ch, q, nil)
	fill(t, conn, ch, q, 3)
	getOne(t, ch, q, false)
	getOne(t, ch, q, false)
	must(t, ch.Close(), "close")
	ch = channel(t, conn)
	got := collect(t, ch, q, 3)
	expectBodies(t, got, "0", "1", "2")
	if !got[0].Redelivered || !got[1].Redelivered || got[2].Redelivered {
		t.Fatalf("redelivered flags %v %v %v", got[0].Redelivered, got[1].Redelivered, got[2].Redelivered)
	}
}

func TestPropertiesRoundTrip(t *testing.T) {
	// Goal: every basic property and a header table of mixed field types (as amqp091-go encodes them) arrive unchanged.
	_, ch := open(t)
	q := queueName(t, "q")
	declareQueue(t, ch, q, nil)
	stamp := time.Unix(1700000000, 0)
	headers := amqp.Table{
		"str": "text", "int32": int32(-7), "int64": int64(1) << 40, "bool": true,
		"float64": 1.5, "nested": amqp.Table{"a": int32(1)}, "list": []interface{}{int32(1), "x"},
		"bytes": []byte{0, 1, 2}, "time": stamp, "decimal": amqp.Decimal{Scale: 2, Value: 150},
	}
	sent := amqp.Publishing{
		Headers: headers, ContentType: "application/json", ContentEncoding: "utf-8",
		DeliveryMode: amqp.Persistent, Priority: 5, CorrelationId: "corr", ReplyTo: "reply",
		MessageId: "id-1", Timestamp: stamp, Type: "kind", UserId: "guest", AppId: "go-suite",
		Body: []byte("{}"),
	}
	publish(t, ch, "", q, sent)
	d := getOne(t, ch, q, true)
	if d.ContentType != sent.ContentType || d.ContentEncoding != sent.ContentEncoding || d.DeliveryMode != 2 ||
		d.Priority != 5 || d.CorrelationId != "corr" || d.ReplyTo != "reply" || d.MessageId != "id-1" ||
		!d.Timestamp.Equal(stamp) || d.Type != "kind" || d.UserId != "guest" || d.AppId != "go-suite" || string(d.Body) != "{}" {
		t.Fatalf("properties differ: %+v", d)
	}
	h := d.Headers
	nested, _ := h["nested"].(amqp.Table)
	list, _ := h["list"].([]interface{})
	tm, _ := h["time"].(time.Time)
	if h["str"] != "text" || h["int32"] != int32(-7) || h["int64"] != int64(1)<<40 || h["bool"] != true ||
		h["float64"] != 1.5 || nested["a"] != int32(1) || len(list) != 2 || list[0] != int32(1) || list[1] != "x" ||
		!bytes.Equal(h["bytes"].([]byte), []byte{0, 1, 2}) || !tm.Equal(stamp) || h["decimal"] != (amqp.Decimal{Scale: 2, Value: 150}) {
		t.Fatalf("headers differ: %#v", h)
	}
}

func TestLargeMessage(t *testing.T) {
	// Goal: a 1 MiB body, split over many frames of the negotiated frame_max, arrives byte for byte.
	conn, ch := open(t)
	q := queueName(t, "q")
	declareQueue(t, ch, q, nil)
	body := make([]byte, 1<<20)
	_, _ = rand.Read(body)
	if fm := conn.Config.FrameSize; fm <= 0 || fm*4 > len(body) {
		t.Fatalf("negotiated frame_max %d does not force a split", fm)
	}
	publish(t, ch, "", q, amqp.Publishing{Body: body})
	if d := collect(t, ch, q, 1)[0]; !bytes.Equal(d.Body, body) {
		t.Fatalf("body differs: %d bytes received", len(d.Body))
	}
}

func TestPublisherConfirms(t *testing.T) {
	// Goal: after confirm.select every publish, routed or not, is acked with sequential delivery tags.
	conn, ch := open(t)
	q := queueName(t, "q")
	declareQueue(t, ch, q, nil)
	must(t, ch.Confirm(false), "confirm.select")
	confirms := ch.NotifyPublish(make(chan amqp.Confirmation, 50))
	for i := 0; i < 20; i++ {
		publishBody(t, ch, "", q, fmt.Sprint(i))
	}
	publishBody(t, ch, "amq.direct", "nobody-bound", "dropped")
	for tag := uint64(1); tag <= 21; tag++ {
		select {
		case c := <-confirms:
			if !c.Ack || c.DeliveryTag != tag {
				t.Fatalf("confirm %+v, want ack of %d", c, tag)
			}
		case <-time.After(waitTimeout):
			t.Fatalf("no confirm for %d", tag)
		}
	}
	if n := messageCount(t, conn, q); n != 20 {
		t.Fatalf("%d enqueued", n)
	}
}

func TestMandatoryReturn(t *testing.T) {
	// Goal: an unroutable mandatory publish comes back as basic.return 312 NO_ROUTE with its body and properties.
	_, ch := open(t)
	x := exchangeName(t, "x")
	must(t, ch.ExchangeDeclare(x, "direct", false, false, false, false, nil), "declare")
	returns := ch.NotifyReturn(make(chan amqp.Return, 1))
	must(t, ch.PublishWithContext(context.Background(), x, "nowhere", true, false,
		amqp.Publishing{MessageId: "m-42", Body: []byte("boomerang")}), "publish")
	select {
	case r := <-returns:
		if r.ReplyCode != 312 || r.ReplyText != "NO_ROUTE" || r.Exchange != x || r.RoutingKey != "nowhere" ||
			string(r.Body) != "boomerang" || r.MessageId != "m-42" {
			t.Fatalf("return %+v", r)
		}
	case <-time.After(waitTimeout):
		t.Fatal("no basic.return")
	}
}

func TestTransactions(t *testing.T) {
	// Goal: publishes inside tx.select appear only on tx.commit and vanish on tx.rollback.
	conn, ch := open(t)
	q := queueName(t, "q")
	declareQueue(t, ch, q, nil)
	must(t, ch.Tx(), "tx.select")
	publishBody(t, ch, "", q, "rolled back")
	must(t, ch.TxRollback(), "rollback")
	publishBody(t, ch, "", q, "committed")
	if n := messageCount(t, conn, q); n != 0 {
		t.Fatalf("%d visible before commit", n)
	}
	must(t, ch.TxCommit(), "commit")
	if n := messageCount(t, conn, q); n != 1 {
		t.Fatalf("%d visible after commit", n)
	}
	expectBodies(t, collect(t, ch, q, 1), "committed")
}

func TestManyChannels(t *testing.T) {
	// Goal: 100 channels on one connection work independently, and closing half leaves the rest working.
	conn := dial(t)
	var chans []*amqp.Channel
	var queues []string
	for i := 0; i < 100; i++ {
		ch := channel(t, conn)
		q := queueName(t, fmt.Sprintf("c%d", i))
		declareQueue(t, ch, q, nil)
		publishBody(t, ch, "", q, fmt.Sprintf("from %d", i))
		chans, queues = append(chans, ch), append(queues, q)
	}
	for i := 0; i < 100; i += 2 {
		must(t, chans[i].Close(), "close")
	}
	for i := 1; i < 100; i += 2 {
		if d := getOne(t, chans[i], queues[i], true); string(d.Body) != fmt.Sprintf("from %d", i) {
			t.Fatalf("channel %d got %q", i, d.Body)
		}
	}
}
