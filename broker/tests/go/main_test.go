package brokertests

// The broker under test and the functions every test uses: a synod-broker
// process started once for the package (or the broker named by AMQP_URL),
// unique names that are deleted afterwards, and waits on conditions with
// deadlines instead of sleeps.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

const (
	// brokerStartTimeout bounds how long synod-broker may take to accept AMQP connections.
	brokerStartTimeout = 30 * time.Second
	// waitTimeout is the default deadline for a broker-side effect (a delivery, an expiry).
	waitTimeout = 10 * time.Second
)

// brokerURL is the AMQP URL of the broker under test.
var brokerURL string

func TestMain(m *testing.M) {
	os.Exit(runWithBroker(m))
}

func runWithBroker(m *testing.M) int {
	if url := os.Getenv("AMQP_URL"); url != "" {
		brokerURL = url
		return m.Run()
	}
	broker, err := newSynodProcess()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	defer broker.remove()
	if err := broker.start(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 3
	}
	brokerURL = broker.url()
	return m.Run()
}

// synodProcess is one synod-broker on free loopback ports with its own data
// directory; restart stops it (SIGTERM) and starts it on the same ports and data.
type synodProcess struct {
	bin    string
	dir    string
	ports  [4]int
	cmd    *exec.Cmd
	exited chan error
}

func newSynodProcess() (*synodProcess, error) {
	bin := os.Getenv("SYNOD_BROKER_BIN")
	if bin == "" {
		bin = filepath.Join("..", "..", "..", "target", "debug", "synod-broker")
	}
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("broker binary %s is missing (%v): build it with cargo build -p synod-broker or set SYNOD_BROKER_BIN", bin, err)
	}
	dir, err := os.MkdirTemp("", "synod-go-")
	if err != nil {
		return nil, err
	}
	p := &synodProcess{bin: bin, dir: dir}
	for i := range p.ports {
		if p.ports[i], err = freePort(); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
	}
	return p, nil
}

func (p *synodProcess) addr() string { return fmt.Sprintf("127.0.0.1:%d", p.ports[0]) }

func (p *synodProcess) url() string { return "amqp://guest:guest@" + p.addr() + "/" }

func (p *synodProcess) start() error {
	logPath := filepath.Join(p.dir, "broker.log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer logFile.Close()
	p.cmd = exec.Command(p.bin,
		"--amqp-listen", p.addr(),
		"--mgmt-listen", fmt.Sprintf("127.0.0.1:%d", p.ports[1]),
		"--metrics-listen", fmt.Sprintf("127.0.0.1:%d", p.ports[2]),
		"--cluster-listen", fmt.Sprintf("127.0.0.1:%d", p.ports[3]),
		"--data-dir", filepath.Join(p.dir, "data"))
	p.cmd.Stdout = logFile
	p.cmd.Stderr = logFile
	if err := p.cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %v", p.bin, err)
	}
	p.exited = make(chan error, 1)
	go func(cmd *exec.Cmd, exited chan<- error) { exited <- cmd.Wait() }(p.cmd, p.exited)
	return waitListening(p.addr(), func() error {
		select {
		case err := <-p.exited:
			p.exited <- err
			out, _ := os.ReadFile(logPath)
			return fmt.Errorf("synod-broker exited (%v) before accepting connections:\n%s", err, tail(string(out), 4000))
		default:
			return nil
		}
	})
}

// waitListening polls addr until it accepts a TCP connection; alive reports a dead process early.
func waitListening(addr string, alive func() error) error {
	deadline := time.Now().Add(brokerStartTimeout)
	for {
		conn, err := net.DialTimeout("tcp", addr, 500*time.Millisecond)
		if err == nil {
			conn.Close()
			return nil
		}
		if err := alive(); err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no AMQP listener on %s within %v", addr, brokerStartTimeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (p *synodProcess) stop() {
	if p.cmd == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
	p.cmd = nil
}

func (p *synodProcess) restart() error {
	p.stop()
	return p.start()
}

func (p *synodProcess) remove() {
	p.stop()
	os.RemoveAll(p.dir)
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// withVhost returns brokerURL with its credentials or vhost replaced.
func urlWith(user, password, vhost string) string {
	u, err := amqp.ParseURI(brokerURL)
	if err != nil {
		panic(err)
	}
	return fmt.Sprintf("amqp://%s:%s@%s:%d/%s", user, password, u.Host, u.Port, vhost)
}

// dial opens a connection that is closed when the test ends.
func dial(t *testing.T) *amqp.Connection {
	t.Helper()
	conn, err := amqp.Dial(brokerURL)
	if err != nil {
		t.Fatalf("dial %s: %v", brokerURL, err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// channel opens a channel on conn.
func channel(t *testing.T, conn *amqp.Connection) *amqp.Channel {
	t.Helper()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatalf("open channel: %v", err)
	}
	return ch
}

// open dials and opens one channel.
func open(t *testing.T) (*amqp.Connection, *amqp.Channel) {
	conn := dial(t)
	return conn, channel(t, conn)
}

var nameSeq atomic.Int64

func uniqueName(t *testing.T, label string) string {
	test := strings.NewReplacer("/", ".", " ", "_").Replace(t.Name())
	if len(test) > 40 {
		test = test[:40]
	}
	return fmt.Sprintf("go.%s.%d.%d.%s", test, os.Getpid(), nameSeq.Add(1), label)
}

// queueName returns a unique queue name, deleted when the test ends.
func queueName(t *testing.T, label string) string {
	name := uniqueName(t, label)
	t.Cleanup(func() {
		cleanup(func(ch *amqp.Channel) error { _, err := ch.QueueDelete(name, false, false, false); return err })
	})
	return name
}

// exchangeName returns a unique exchange name, deleted when the test ends.
func exchangeName(t *testing.T, label string) string {
	name := uniqueName(t, label)
	t.Cleanup(func() { cleanup(func(ch *amqp.Channel) error { return ch.ExchangeDelete(name, false, false) }) })
	return name
}

func cleanup(del func(*amqp.Channel) error) {
	conn, err := amqp.Dial(brokerURL)
	if err != nil {
		return
	}
	defer conn.Close()
	if ch, err := conn.Channel(); err == nil {
		_ = del(ch)
	}
}

func must(t *testing.T, err error, what string) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func declareQueue(t *testing.T, ch *amqp.Channel, name string, args amqp.Table) {
	t.Helper()
	_, err := ch.QueueDeclare(name, false, false, false, false, args)
	must(t, err, "declare queue "+name)
}

func publish(t *testing.T, ch *amqp.Channel, exchange, key string, msg amqp.Publishing) {
	t.Helper()
	must(t, ch.PublishWithContext(context.Background(), exchange, key, false, false, msg), "publish")
}

func publishBody(t *testing.T, ch *amqp.Channel, exchange, key, body string) {
	t.Helper()
	publish(t, ch, exchange, key, amqp.Publishing{Body: []byte(body)})
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", waitTimeout, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// getOne polls basic.get until a message arrives.
func getOne(t *testing.T, ch *amqp.Channel, queue string, autoAck bool) amqp.Delivery {
	t.Helper()
	var msg amqp.Delivery
	waitFor(t, "a message on "+queue, func() bool {
		m, ok, err := ch.Get(queue, autoAck)
		must(t, err, "basic.get "+queue)
		msg = m
		return ok
	})
	return msg
}

// expectEmpty asserts that basic.get answers get-empty.
func expectEmpty(t *testing.T, ch *amqp.Channel, queue string) {
	t.Helper()
	m, ok, err := ch.Get(queue, true)
	must(t, err, "basic.get "+queue)
	if ok {
		t.Fatalf("expected %s empty, got %q", queue, m.Body)
	}
}

// collect consumes exactly n messages from queue with basic.consume (auto-ack).
func collect(t *testing.T, ch *amqp.Channel, queue string, n int) []amqp.Delivery {
	t.Helper()
	tag := uniqueName(t, "ctag")
	deliveries, err := ch.Consume(queue, tag, true, false, false, false, nil)
	must(t, err, "consume "+queue)
	var got []amqp.Delivery
	timer := time.NewTimer(waitTimeout)
	defer timer.Stop()
	for len(got) < n {
		select {
		case d, ok := <-deliveries:
			if !ok {
				t.Fatalf("consumer on %s closed after %d of %d messages", queue, len(got), n)
			}
			got = append(got, d)
		case <-timer.C:
			t.Fatalf("expected %d messages from %s, got %d", n, queue, len(got))
		}
	}
	must(t, ch.Cancel(tag, false), "cancel")
	return got
}

func bodies(ds []amqp.Delivery) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = string(d.Body)
	}
	return out
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func expectBodies(t *testing.T, got []amqp.Delivery, want ...string) {
	t.Helper()
	if b := bodies(got); !equalStrings(b, want) {
		t.Fatalf("bodies %q, want %q", b, want)
	}
}

// messageCount is the number of ready messages, from a passive declare on a fresh channel.
func messageCount(t *testing.T, conn *amqp.Connection, queue string) int {
	t.Helper()
	ch := channel(t, conn)
	defer ch.Close()
	q, err := ch.QueueDeclarePassive(queue, false, false, false, false, nil)
	must(t, err, "passive declare "+queue)
	return q.Messages
}

// queueExists tells whether a passive declare succeeds; any error but 404 fails the test.
func queueExists(t *testing.T, conn *amqp.Connection, queue string) bool {
	t.Helper()
	ch := channel(t, conn)
	_, err := ch.QueueDeclarePassive(queue, false, false, false, false, nil)
	if err == nil {
		ch.Close()
		return true
	}
	expectCode(t, err, 404)
	return false
}

// queueGone tells whether a passive declare answers 404. An exclusive queue
// whose owner just closed may still answer 405 (locked) until the broker has
// finished deleting it; that counts as not gone yet.
func queueGone(t *testing.T, conn *amqp.Connection, queue string) bool {
	t.Helper()
	ch := channel(t, conn)
	_, err := ch.QueueDeclarePassive(queue, false, false, false, false, nil)
	if err == nil {
		ch.Close()
		return false
	}
	var amqpErr *amqp.Error
	if errors.As(err, &amqpErr) && amqpErr.Code == 405 {
		return false
	}
	expectCode(t, err, 404)
	return true
}

// exchangeExists tells whether a passive declare succeeds; any error but 404 fails the test.
func exchangeExists(t *testing.T, conn *amqp.Connection, exchange string) bool {
	t.Helper()
	ch := channel(t, conn)
	err := ch.ExchangeDeclarePassive(exchange, "direct", false, false, false, false, nil)
	if err == nil {
		ch.Close()
		return true
	}
	expectCode(t, err, 404)
	return false
}

// expectCode asserts err is an AMQP error with the given reply code.
func expectCode(t *testing.T, err error, code int) *amqp.Error {
	t.Helper()
	var amqpErr *amqp.Error
	if !errors.As(err, &amqpErr) {
		t.Fatalf("expected AMQP error %d, got %v", code, err)
	}
	if amqpErr.Code != code {
		t.Fatalf("expected reply code %d, got %d (%s)", code, amqpErr.Code, amqpErr.Reason)
	}
	return amqpErr
}

// expectChannelClosed waits for the broker to close ch with the given code.
func expectChannelClosed(t *testing.T, closed <-chan *amqp.Error, code int) {
	t.Helper()
	select {
	case err, ok := <-closed:
		if !ok || err == nil {
			t.Fatalf("channel closed without an error, want %d", code)
		}
		expectCode(t, err, code)
	case <-time.After(waitTimeout):
		t.Fatalf("channel not closed within %v, want %d", waitTimeout, code)
	}
}
