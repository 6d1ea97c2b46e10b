package brokertests

// The six classic RabbitMQ tutorials as amqp091-go users write them, each
// asserting what the tutorial promises.

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

func TestTutorialHelloWorld(t *testing.T) {
	// Goal: a message published to the default exchange reaches the queue named by its routing key, body intact.
	_, ch := open(t)
	q := queueName(t, "hello")
	declareQueue(t, ch, q, nil)
	publish(t, ch, "", q, amqp.Publishing{ContentType: "text/plain", Body: []byte("Hello World!")})
	got := collect(t, ch, q, 1)
	expectBodies(t, got, "Hello World!")
	if got[0].RoutingKey != q || got[0].Exchange != "" || got[0].Redelivered || got[0].ContentType != "text/plain" {
		t.Fatalf("unexpected delivery %+v", got[0])
	}
}

func TestTutorialWorkQueues(t *testing.T) {
	// Goal: with a durable queue, persistent messages, prefetch 1 and manual acks, a busy worker gets no second task, and its unacked task is redelivered to another worker when it dies.
	producerConn, producer := open(t)
	q := queueName(t, "task_queue")
	_, err := producer.QueueDeclare(q, true, false, false, false, nil)
	must(t, err, "declare durable queue")
	for i := 0; i < 4; i++ {
		publish(t, producer, "", q, amqp.Publishing{DeliveryMode: amqp.Persistent, Body: []byte(fmt.Sprintf("task %d", i))})
	}

	connA, err := amqp.Dial(brokerURL)
	must(t, err, "dial worker A")
	defer connA.Close()
	workerA := channel(t, connA)
	must(t, workerA.Qos(1, 0, false), "qos A")
	deliveriesA, err := workerA.Consume(q, "", false, false, false, false, nil)
	must(t, err, "consume A")
	select {
	case d := <-deliveriesA:
		if string(d.Body) != "task 0" || d.DeliveryMode != amqp.Persistent {
			t.Fatalf("worker A got %q mode %d", d.Body, d.DeliveryMode)
		}
	case <-time.After(waitTimeout):
		t.Fatal("worker A got nothing")
	}
	waitFor(t, "3 tasks still ready", func() bool { return messageCount(t, producerConn, q) == 3 })

	_, workerB := open(t)
	must(t, workerB.Qos(1, 0, false), "qos B")
	deliveriesB, err := workerB.Consume(q, "worker-b", false, false, false, false, nil)
	must(t, err, "consume B")
	var gotB []string
	for len(gotB) < 3 {
		select {
		case d := <-deliveriesB:
			gotB = append(gotB, string(d.Body))
			must(t, d.Ack(false), "ack")
		case <-time.After(waitTimeout):
			t.Fatalf("worker B starved after %q", gotB)
		}
	}
	if !equalStrings(gotB, []string{"task 1", "task 2", "task 3"}) {
		t.Fatalf("worker B got %q", gotB)
	}
	select {
	case d := <-deliveriesA:
		t.Fatalf("prefetch 1 exceeded: worker A also got %q", d.Body)
	default:
	}
	connA.Close() // dies without acking task 0
	select {
	case d := <-deliveriesB:
		if string(d.Body) != "task 0" || !d.Redelivered {
			t.Fatalf("redelivery %q redelivered=%v", d.Body, d.Redelivered)
		}
		must(t, d.Ack(false), "ack")
	case <-time.After(waitTimeout):
		t.Fatal("task 0 was not redelivered to worker B")
	}
	waitFor(t, "queue drained", func() bool { return messageCount(t, producerConn, q) == 0 })
}

func TestTutorialPublishSubscribe(t *testing.T) {
	// Goal: every subscriber's server-named exclusive queue bound to the fanout `logs` exchange gets every line, in order.
	_, pub := open(t)
	logs := exchangeName(t, "logs")
	must(t, pub.ExchangeDeclare(logs, "fanout", false, false, false, false, nil), "declare logs")
	type sub struct {
		ch *amqp.Channel
		q  string
	}
	var subs []sub
	for i := 0; i < 3; i++ {
		_, ch := open(t)
		q, err := ch.QueueDeclare("", false, false, true, false, nil)
		must(t, err, "declare server-named")
		if !strings.HasPrefix(q.Name, "amq.gen-") {
			t.Fatalf("server-named queue %q", q.Name)
		}
		must(t, ch.QueueBind(q.Name, "", logs, false, nil), "bind")
		subs = append(subs, sub{ch, q.Name})
	}
	var lines []string
	for i := 0; i < 5; i++ {
		lines = append(lines, fmt.Sprintf("log line %d", i))
		publishBody(t, pub, logs, fmt.Sprintf("ignored.%d", i), lines[i])
	}
	for _, s := range subs {
		expectBodies(t, collect(t, s.ch, s.q, 5), lines...)
	}
}

func TestTutorialRouting(t *testing.T) {
	// Goal: a direct exchange delivers each log only to queues bound with its severity.
	conn, ch := open(t)
	x := exchangeName(t, "direct_logs")
	must(t, ch.ExchangeDeclare(x, "direct", false, false, false, false, nil), "declare")
	errorsOnly, _ := ch.QueueDeclare("", false, false, true, false, nil)
	must(t, ch.QueueBind(errorsOnly.Name, "error", x, false, nil), "bind")
	all, _ := ch.QueueDeclare("", false, false, true, false, nil)
	for _, sev := range []string{"info", "warning", "error"} {
		must(t, ch.QueueBind(all.Name, sev, x, false, nil), "bind")
	}
	for _, m := range [][2]string{{"info", "i1"}, {"error", "e1"}, {"warning", "w1"}, {"debug", "d1"}, {"error", "e2"}} {
		publishBody(t, ch, x, m[0], m[1])
	}
	got := collect(t, ch, errorsOnly.Name, 2)
	expectBodies(t, got, "e1", "e2")
	if got[0].RoutingKey != "error" {
		t.Fatalf("routing key %q", got[0].RoutingKey)
	}
	expectBodies(t, collect(t, ch, all.Name, 4), "i1", "e1", "w1", "e2")
	if n := messageCount(t, conn, all.Name); n != 0 {
		t.Fatalf("%d left", n)
	}
}

func TestTutorialTopics(t *testing.T) {
	// Goal: topic bindings `*.orange.*` and `*.*.rabbit`/`lazy.#` route exactly as the tutorial's table says.
	conn, ch := open(t)
	x := exchangeName(t, "topic_logs")
	must(t, ch.ExchangeDeclare(x, "topic", false, false, false, false, nil), "declare")
	q1, _ := ch.QueueDeclare("", false, false, true, false, nil)
	must(t, ch.QueueBind(q1.Name, "*.orange.*", x, false, nil), "bind")
	q2, _ := ch.QueueDeclare("", false, false, true, false, nil)
	must(t, ch.QueueBind(q2.Name, "*.*.rabbit", x, false, nil), "bind")
	must(t, ch.QueueBind(q2.Name, "lazy.#", x, false, nil), "bind")
	keys := []string{"quick.orange.rabbit", "lazy.orange.elephant", "quick.orange.fox", "lazy.brown.fox",
		"lazy.pink.rabbit", "quick.brown.fox", "orange", "quick.orange.male.rabbit",
		"lazy.orange.male.rabbit", "lazy"}
	for _, k := range keys {
		publishBody(t, ch, x, k, k)
	}
	expectBodies(t, collect(t, ch, q1.Name, 3), "quick.orange.rabbit", "lazy.orange.elephant", "quick.orange.fox")
	expectBodies(t, collect(t, ch, q2.Name, 6), "quick.orange.rabbit", "lazy.orange.elephant", "lazy.brown.fox",
		"lazy.pink.rabbit", "lazy.orange.male.rabbit", "lazy")
	if messageCount(t, conn, q1.Name) != 0 || messageCount(t, conn, q2.Name) != 0 {
		t.Fatal("unexpected extra messages")
	}
}

func fib(n int) int {
	a, b := 0, 1
	for i := 0; i < n; i++ {
		a, b = b, a+b
	}
	return a
}

func TestTutorialRPC(t *testing.T) {
	// Goal: an RPC client with a server-named exclusive callback queue gets each reply matched by correlation_id from a server answering on reply_to.
	_, server := open(t)
	rpcQueue := queueName(t, "rpc_queue")
	declareQueue(t, server, rpcQueue, nil)
	must(t, server.Qos(1, 0, false), "qos")
	requests, err := server.Consume(rpcQueue, "", false, false, false, false, nil)
	must(t, err, "server consume")
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			select {
			case d, ok := <-requests:
				if !ok {
					return
				}
				n, _ := strconv.Atoi(string(d.Body))
				_ = server.PublishWithContext(context.Background(), "", d.ReplyTo, false, false, amqp.Publishing{
					CorrelationId: d.CorrelationId, Body: []byte(strconv.Itoa(fib(n)))})
				_ = d.Ack(false)
			case <-done:
				return
			}
		}
	}()

	_, client := open(t)
	callback, err := client.QueueDeclare("", false, false, true, false, nil)
	must(t, err, "callback queue")
	replies, err := client.Consume(callback.Name, "", true, false, false, false, nil)
	must(t, err, "client consume")
	want := map[string]int{}
	for _, n := range []int{1, 10, 30} {
		corr := fmt.Sprintf("corr-%d-%d", n, time.Now().UnixNano())
		want[corr] = fib(n)
		publish(t, client, "", rpcQueue, amqp.Publishing{ReplyTo: callback.Name, CorrelationId: corr, Body: []byte(strconv.Itoa(n))})
	}
	got := map[string]int{}
	for len(got) < len(want) {
		select {
		case d := <-replies:
			v, _ := strconv.Atoi(string(d.Body))
			got[d.CorrelationId] = v
		case <-time.After(waitTimeout):
			t.Fatalf("only %d of %d replies", len(got), len(want))
		}
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("reply for %s = %d, want %d", k, got[k], v)
		}
	}
}
