package brokertests

// Many clients at once through amqp091-go: concurrent confirmed publishers
// and competing consumers lose, duplicate and reorder nothing; the server
// announces the capabilities these tests rely on.

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

func TestServerCapabilities(t *testing.T) {
	// Goal: connection.start announces the RabbitMQ extensions that clients switch on by capability.
	conn := dial(t)
	caps, ok := conn.Properties["capabilities"].(amqp.Table)
	if !ok {
		t.Fatalf("no capabilities table in server properties %v", conn.Properties)
	}
	for _, name := range []string{"publisher_confirms", "exchange_exchange_bindings", "basic.nack",
		"consumer_cancel_notify", "authentication_failure_close", "per_consumer_qos", "connection.blocked"} {
		if caps[name] != true {
			t.Errorf("capability %s = %v, want true", name, caps[name])
		}
	}
}

func TestConcurrentPublishersAndConsumers(t *testing.T) {
	// Goal: 8 publishers on their own connections (2000 confirmed messages in all) and 3 competing consumers with prefetch 50 see every message exactly once, each publisher's messages in order.
	const publishers, perPublisher, consumers = 8, 250, 3
	_, admin := open(t)
	q := queueName(t, "q")
	declareQueue(t, admin, q, nil)

	type seen struct {
		publisher, seq int
	}
	var mu sync.Mutex
	got := map[seen]int{}
	lastSeq := map[[2]int]int{} // (consumer, publisher) -> last sequence number seen
	orderErrors := 0
	total := publishers * perPublisher
	done := make(chan struct{})
	for c := 0; c < consumers; c++ {
		_, ch := open(t)
		must(t, ch.Qos(50, 0, false), "qos")
		deliveries, err := ch.Consume(q, fmt.Sprintf("consumer-%d", c), false, false, false, false, nil)
		must(t, err, "consume")
		go func(c int) {
			for d := range deliveries {
				var p, s int
				fmt.Sscanf(string(d.Body), "%d/%d", &p, &s)
				mu.Lock()
				got[seen{p, s}]++
				// A consumer sees one publisher's messages in publish order (no requeues happen here).
				if last, ok := lastSeq[[2]int{c, p}]; ok && s <= last {
					orderErrors++
				}
				lastSeq[[2]int{c, p}] = s
				if len(got) == total {
					select {
					case <-done:
					default:
						close(done)
					}
				}
				mu.Unlock()
				_ = d.Ack(false)
			}
		}(c)
	}

	var wg sync.WaitGroup
	errs := make(chan error, publishers)
	for p := 0; p < publishers; p++ {
		_, ch := open(t)
		wg.Add(1)
		go func(p int, ch *amqp.Channel) {
			defer wg.Done()
			if err := ch.Confirm(false); err != nil {
				errs <- err
				return
			}
			confirms := ch.NotifyPublish(make(chan amqp.Confirmation, perPublisher))
			for s := 0; s < perPublisher; s++ {
				err := ch.PublishWithContext(context.Background(), "", q, false, false,
					amqp.Publishing{Body: []byte(fmt.Sprintf("%d/%d", p, s))})
				if err != nil {
					errs <- err
					return
				}
			}
			for s := 0; s < perPublisher; s++ {
				select {
				case c := <-confirms:
					if !c.Ack {
						errs <- fmt.Errorf("publisher %d: nack for %d", p, c.DeliveryTag)
						return
					}
				case <-time.After(waitTimeout):
					errs <- fmt.Errorf("publisher %d: only %d of %d confirms", p, s, perPublisher)
					return
				}
			}
		}(p, ch)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(3 * waitTimeout):
		mu.Lock()
		defer mu.Unlock()
		t.Fatalf("consumers saw %d distinct of %d messages", len(got), total)
	}
	mu.Lock()
	defer mu.Unlock()
	for k, n := range got {
		if n != 1 {
			t.Errorf("message %d/%d delivered %d times", k.publisher, k.seq, n)
		}
	}
	if orderErrors != 0 {
		t.Errorf("%d out-of-order deliveries", orderErrors)
	}
	conn := dial(t)
	waitFor(t, "queue drained", func() bool { return messageCount(t, conn, q) == 0 })
}
