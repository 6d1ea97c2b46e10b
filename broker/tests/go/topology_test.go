package brokertests

// Exchanges and queues through amqp091-go: every exchange type, headers
// matching, exchange-to-exchange bindings, declare and delete flags, TTLs,
// length limits and dead-lettering with x-death.

import (
	"context"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

func TestHeadersExchangeAllAndAny(t *testing.T) {
	// Goal: a headers exchange routes on x-match all (every bound header equal) and any (at least one).
	_, ch := open(t)
	x := exchangeName(t, "h")
	must(t, ch.ExchangeDeclare(x, "headers", false, false, false, false, nil), "declare")
	qAll, qAny := queueName(t, "all"), queueName(t, "any")
	declareQueue(t, ch, qAll, nil)
	declareQueue(t, ch, qAny, nil)
	must(t, ch.QueueBind(qAll, "", x, false, amqp.Table{"x-match": "all", "format": "pdf", "type": "report"}), "bind all")
	must(t, ch.QueueBind(qAny, "", x, false, amqp.Table{"x-match": "any", "format": "pdf", "type": "log"}), "bind any")
	for _, m := range []struct {
		headers amqp.Table
		body    string
	}{
		{amqp.Table{"format": "pdf", "type": "report"}, "pdf-report"},
		{amqp.Table{"format": "pdf", "type": "log"}, "pdf-log"},
		{amqp.Table{"format": "zip", "type": "log"}, "zip-log"},
		{amqp.Table{"format": "zip", "type": "report"}, "zip-report"},
		{nil, "no-headers"},
	} {
		publish(t, ch, x, "any-key", amqp.Publishing{Headers: m.headers, Body: []byte(m.body)})
	}
	expectBodies(t, collect(t, ch, qAll, 1), "pdf-report")
	expectBodies(t, collect(t, ch, qAny, 3), "pdf-report", "pdf-log", "zip-log")
}

func TestExchangeToExchangeBinding(t *testing.T) {
	// Goal: messages flow through an exchange-to-exchange binding with each exchange's own routing, and unbinding stops them.
	_, ch := open(t)
	up, down := exchangeName(t, "up"), exchangeName(t, "down")
	must(t, ch.ExchangeDeclare(up, "topic", false, false, false, false, nil), "declare up")
	must(t, ch.ExchangeDeclare(down, "direct", false, false, false, false, nil), "declare down")
	must(t, ch.ExchangeBind(down, "orders.#", up, false, nil), "exchange.bind")
	q := queueName(t, "q")
	declareQueue(t, ch, q, nil)
	must(t, ch.QueueBind(q, "orders.eu", down, false, nil), "bind")
	for _, k := range []string{"orders.eu", "orders.us", "billing.eu"} {
		publishBody(t, ch, up, k, k)
	}
	got := collect(t, ch, q, 1)
	expectBodies(t, got, "orders.eu")
	if got[0].Exchange != up {
		t.Fatalf("delivery exchange %q, want %q", got[0].Exchange, up)
	}
	must(t, ch.ExchangeUnbind(down, "orders.#", up, false, nil), "exchange.unbind")
	publishBody(t, ch, up, "orders.eu", "after unbind")
	publishBody(t, ch, down, "orders.eu", "direct")
	expectBodies(t, collect(t, ch, q, 1), "direct")
}

func TestExchangeDeclareFlags(t *testing.T) {
	// Goal: passive declare finds an existing exchange, a durable/type mismatch is 406, an auto-delete exchange goes with its last binding, and an internal one refuses direct publishes with 403.
	conn, ch := open(t)
	x := exchangeName(t, "durable")
	must(t, ch.ExchangeDeclare(x, "direct", true, false, false, false, nil), "declare durable")
	must(t, ch.ExchangeDeclarePassive(x, "direct", true, false, false, false, nil), "passive")
	expectCode(t, ch.ExchangeDeclare(x, "direct", false, false, false, false, nil), 406)

	ch = channel(t, conn)
	auto := exchangeName(t, "auto")
	must(t, ch.ExchangeDeclare(auto, "fanout", false, true, false, false, nil), "declare auto-delete")
	q := queueName(t, "q")
	declareQueue(t, ch, q, nil)
	must(t, ch.QueueBind(q, "", auto, false, nil), "bind")
	if !exchangeExists(t, conn, auto) {
		t.Fatal("auto-delete exchange vanished while bound")
	}
	must(t, ch.QueueUnbind(q, "", auto, nil), "unbind")
	waitFor(t, "auto-delete exchange gone", func() bool { return !exchangeExists(t, conn, auto) })

	internal := exchangeName(t, "internal")
	must(t, ch.ExchangeDeclare(internal, "fanout", false, false, true, false, nil), "declare internal")
	public := exchangeName(t, "public")
	must(t, ch.ExchangeDeclare(public, "fanout", false, false, false, false, nil), "declare public")
	must(t, ch.ExchangeBind(internal, "", public, false, nil), "e2e bind")
	must(t, ch.QueueBind(q, "", internal, false, nil), "bind to internal")
	publishBody(t, ch, public, "", "via public")
	expectBodies(t, collect(t, ch, q, 1), "via public")
	bad := channel(t, conn)
	closed := bad.NotifyClose(make(chan *amqp.Error, 1))
	publishBody(t, bad, internal, "", "direct")
	expectChannelClosed(t, closed, 403)
}

func TestExchangeDeleteIfUnused(t *testing.T) {
	// Goal: exchange.delete if-unused fails with 406 while a binding exists, then succeeds once it is removed.
	conn, ch := open(t)
	x := exchangeName(t, "x")
	must(t, ch.ExchangeDeclare(x, "direct", false, false, false, false, nil), "declare")
	q := queueName(t, "q")
	declareQueue(t, ch, q, nil)
	must(t, ch.QueueBind(q, "k", x, false, nil), "bind")
	expectCode(t, ch.ExchangeDelete(x, true, false), 406)
	ch = channel(t, conn)
	must(t, ch.QueueUnbind(q, "k", x, nil), "unbind")
	must(t, ch.ExchangeDelete(x, true, false), "delete if-unused")
	if exchangeExists(t, conn, x) {
		t.Fatal("exchange still exists")
	}
}

func TestQueueFlagsAndServerNames(t *testing.T) {
	// Goal: server-named queues get unique amq.gen- names; exclusive queues are locked to their connection (405) and deleted with it; auto-delete queues go with their last consumer.
	conn, ch := open(t)
	q1, err := ch.QueueDeclare("", false, false, true, false, nil)
	must(t, err, "server-named")
	q2, err := ch.QueueDeclare("", false, false, true, false, nil)
	must(t, err, "server-named")
	if !strings.HasPrefix(q1.Name, "amq.gen-") || q1.Name == q2.Name {
		t.Fatalf("server names %q %q", q1.Name, q2.Name)
	}
	ownerConn, err := amqp.Dial(brokerURL)
	must(t, err, "dial owner")
	owner := channel(t, ownerConn)
	excl := queueName(t, "excl")
	_, err = owner.QueueDeclare(excl, false, false, true, false, nil)
	must(t, err, "declare exclusive")
	other := channel(t, conn)
	_, err = other.Consume(excl, "", false, false, false, false, nil)
	expectCode(t, err, 405)
	ownerConn.Close()
	waitFor(t, "exclusive queue deleted with its connection", func() bool { return queueGone(t, conn, excl) })

	ch = channel(t, conn)
	auto := queueName(t, "auto")
	_, err = ch.QueueDeclare(auto, false, true, false, false, nil)
	must(t, err, "declare auto-delete")
	_, err = ch.Consume(auto, "c1", false, false, false, false, nil)
	must(t, err, "consume")
	_, err = ch.Consume(auto, "c2", false, false, false, false, nil)
	must(t, err, "consume")
	must(t, ch.Cancel("c1", false), "cancel c1")
	if !queueExists(t, conn, auto) {
		t.Fatal("auto-delete queue vanished with consumers left")
	}
	must(t, ch.Cancel("c2", false), "cancel c2")
	waitFor(t, "auto-delete queue gone", func() bool { return !queueExists(t, conn, auto) })
}

func TestQueuePurgeAndConditionalDelete(t *testing.T) {
	// Goal: purge reports the removed count; delete if-empty fails 406 with messages, if-unused fails 406 with a consumer; a plain delete reports the dropped count.
	conn, ch := open(t)
	q := queueName(t, "q")
	declareQueue(t, ch, q, nil)
	for i := 0; i < 4; i++ {
		publishBody(t, ch, "", q, "m")
	}
	waitFor(t, "4 ready", func() bool { return messageCount(t, conn, q) == 4 })
	n, err := ch.QueuePurge(q, false)
	must(t, err, "purge")
	if n != 4 {
		t.Fatalf("purged %d, want 4", n)
	}
	expectEmpty(t, ch, q)
	publishBody(t, ch, "", q, "m")
	waitFor(t, "1 ready", func() bool { return messageCount(t, conn, q) == 1 })
	_, err = ch.QueueDelete(q, false, true, false)
	expectCode(t, err, 406)
	ch = channel(t, conn)
	consumer := channel(t, conn)
	_, err = consumer.Consume(q, "holder", false, false, false, false, nil)
	must(t, err, "consume")
	_, err = ch.QueueDelete(q, true, false, false)
	expectCode(t, err, 406)
	must(t, consumer.Close(), "close consumer channel")
	ch = channel(t, conn)
	waitFor(t, "message back in the queue", func() bool { return messageCount(t, conn, q) == 1 })
	n, err = ch.QueueDelete(q, false, false, false)
	must(t, err, "delete")
	if n != 1 {
		t.Fatalf("delete-ok count %d, want 1", n)
	}
}

// deadLetterSetup declares a fanout DLX with one bound queue and returns both names.
func deadLetterSetup(t *testing.T, ch *amqp.Channel, kind, key string) (string, string) {
	t.Helper()
	dlx, dlq := exchangeName(t, "dlx"), queueName(t, "dlq")
	must(t, ch.ExchangeDeclare(dlx, kind, false, false, false, false, nil), "declare dlx")
	declareQueue(t, ch, dlq, nil)
	must(t, ch.QueueBind(dlq, key, dlx, false, nil), "bind dlq")
	return dlx, dlq
}

func xDeath(t *testing.T, d amqp.Delivery) amqp.Table {
	t.Helper()
	deaths, ok := d.Headers["x-death"].([]interface{})
	if !ok || len(deaths) == 0 {
		t.Fatalf("no x-death header in %v", d.Headers)
	}
	death, ok := deaths[0].(amqp.Table)
	if !ok {
		t.Fatalf("x-death entry is %T", deaths[0])
	}
	return death
}

func TestMessageTTLDeadLetters(t *testing.T) {
	// Goal: x-message-ttl expires messages and dead-letters them with x-death reason expired, queue and count.
	conn, ch := open(t)
	dlx, dlq := deadLetterSetup(t, ch, "fanout", "")
	q := queueName(t, "ttl")
	declareQueue(t, ch, q, amqp.Table{"x-message-ttl": int32(100), "x-dead-letter-exchange": dlx})
	publish(t, ch, "", q, amqp.Publishing{Headers: amqp.Table{"k": "v"}, Body: []byte("short-lived")})
	d := getOne(t, ch, dlq, true)
	death := xDeath(t, d)
	if string(d.Body) != "short-lived" || d.Headers["k"] != "v" || death["reason"] != "expired" || death["queue"] != q || death["count"] != int64(1) {
		t.Fatalf("dead-lettered %q headers %v", d.Body, d.Headers)
	}
	if n := messageCount(t, conn, q); n != 0 {
		t.Fatalf("%d still in the TTL queue", n)
	}
}

func TestPerMessageExpiration(t *testing.T) {
	// Goal: a message with `expiration` is dead-lettered as expired while a message without one stays.
	_, ch := open(t)
	dlx, dlq := deadLetterSetup(t, ch, "fanout", "")
	q := queueName(t, "q")
	declareQueue(t, ch, q, amqp.Table{"x-dead-letter-exchange": dlx})
	publish(t, ch, "", q, amqp.Publishing{Expiration: "50", Body: []byte("expiring")})
	publish(t, ch, "", q, amqp.Publishing{Body: []byte("staying")})
	d := getOne(t, ch, dlq, true)
	if death := xDeath(t, d); string(d.Body) != "expiring" || death["reason"] != "expired" || d.Expiration != "" {
		t.Fatalf("dead-lettered %q expiration %q headers %v", d.Body, d.Expiration, d.Headers)
	}
	expectBodies(t, collect(t, ch, q, 1), "staying")
}

func TestQueueExpires(t *testing.T) {
	// Goal: a queue with x-expires and no use is deleted after that idle time (probed with mandatory publishes, which do not count as use).
	conn, ch := open(t)
	q := queueName(t, "q")
	declareQueue(t, ch, q, amqp.Table{"x-expires": int32(200)})
	must(t, ch.Confirm(false), "confirm.select")
	returns := ch.NotifyReturn(make(chan amqp.Return, 100))
	confirms := ch.NotifyPublish(make(chan amqp.Confirmation, 100))
	waitFor(t, "x-expires queue deleted", func() bool {
		must(t, ch.PublishWithContext(context.Background(), "", q, true, false, amqp.Publishing{Body: []byte("probe")}), "publish")
		<-confirms
		select {
		case <-returns:
			return true
		default:
			return false
		}
	})
	if queueExists(t, conn, q) {
		t.Fatal("queue still declared")
	}
}

func TestMaxLengthDropHead(t *testing.T) {
	// Goal: x-max-length with drop-head keeps the newest messages and dead-letters the oldest with reason maxlen.
	_, ch := open(t)
	dlx, dlq := deadLetterSetup(t, ch, "fanout", "")
	q := queueName(t, "q")
	declareQueue(t, ch, q, amqp.Table{"x-max-length": int32(3), "x-dead-letter-exchange": dlx})
	for _, b := range []string{"0", "1", "2", "3", "4"} {
		publishBody(t, ch, "", q, b)
	}
	expectBodies(t, collect(t, ch, q, 3), "2", "3", "4")
	dropped := collect(t, ch, dlq, 2)
	expectBodies(t, dropped, "0", "1")
	if r := xDeath(t, dropped[0])["reason"]; r != "maxlen" {
		t.Fatalf("reason %v", r)
	}
}

func TestMaxLengthRejectPublishNacks(t *testing.T) {
	// Goal: with x-overflow reject-publish, publishes over x-max-length get basic.nack under confirms and are not enqueued.
	conn, ch := open(t)
	q := queueName(t, "q")
	declareQueue(t, ch, q, amqp.Table{"x-max-length": int32(2), "x-overflow": "reject-publish"})
	must(t, ch.Confirm(false), "confirm.select")
	confirms := ch.NotifyPublish(make(chan amqp.Confirmation, 10))
	for _, b := range []string{"1", "2", "3"} {
		publishBody(t, ch, "", q, b)
	}
	want := []bool{true, true, false}
	for i, ack := range want {
		select {
		case c := <-confirms:
			if c.DeliveryTag != uint64(i+1) || c.Ack != ack {
				t.Fatalf("confirm %d: tag %d ack %v, want ack %v", i+1, c.DeliveryTag, c.Ack, ack)
			}
		case <-time.After(waitTimeout):
			t.Fatalf("no confirm %d", i+1)
		}
	}
	if n := messageCount(t, conn, q); n != 2 {
		t.Fatalf("%d enqueued, want 2", n)
	}
}

func TestDeadLetterOnRejectAndNack(t *testing.T) {
	// Goal: reject and nack without requeue dead-letter via x-dead-letter-exchange using x-dead-letter-routing-key, with x-death reason rejected.
	_, ch := open(t)
	dlx, dlq := deadLetterSetup(t, ch, "direct", "dead")
	q := queueName(t, "q")
	declareQueue(t, ch, q, amqp.Table{"x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": "dead"})
	publishBody(t, ch, "", q, "rejected")
	publishBody(t, ch, "", q, "nacked")
	d1 := getOne(t, ch, q, false)
	must(t, d1.Reject(false), "reject")
	d2 := getOne(t, ch, q, false)
	must(t, d2.Nack(false, false), "nack")
	got := collect(t, ch, dlq, 2)
	expectBodies(t, got, "rejected", "nacked")
	for _, d := range got {
		death := xDeath(t, d)
		keys, _ := death["routing-keys"].([]interface{})
		if d.RoutingKey != "dead" || d.Exchange != dlx || death["reason"] != "rejected" || death["queue"] != q || len(keys) != 1 || keys[0] != q {
			t.Fatalf("dead-lettered delivery %q rk %q headers %v", d.Body, d.RoutingKey, d.Headers)
		}
	}
}
