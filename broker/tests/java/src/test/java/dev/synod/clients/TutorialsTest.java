package dev.synod.clients;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.BuiltinExchangeType;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.Delivery;
import com.rabbitmq.client.MessageProperties;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;

/** The six classic RabbitMQ tutorials, as Java client users write them. */
class TutorialsTest {
    private final List<Connection> connections = new ArrayList<>();
    private Broker.Names names;

    @BeforeEach
    void setUp() {
        names = new Broker.Names();
    }

    @AfterEach
    void tearDown() throws Exception {
        for (Connection c : connections) {
            if (c.isOpen()) {
                c.close();
            }
        }
        names.close();
    }

    private Connection connect() throws Exception {
        Connection c = Broker.factory().newConnection();
        connections.add(c);
        return c;
    }

    private static String str(byte[] body) {
        return new String(body, StandardCharsets.UTF_8);
    }

    private static byte[] bytes(String s) {
        return s.getBytes(StandardCharsets.UTF_8);
    }

    /** Consumes exactly n messages (auto-ack) and returns their bodies. */
    private static List<String> collect(Channel ch, String queue, int n) throws Exception {
        BlockingQueue<Delivery> got = new LinkedBlockingQueue<>();
        String tag = ch.basicConsume(queue, true, (t, d) -> got.add(d), t -> { });
        List<String> bodies = new ArrayList<>();
        for (int i = 0; i < n; i++) {
            Delivery d = got.poll(Broker.WAIT_TIMEOUT.toMillis(), TimeUnit.MILLISECONDS);
            assertNotNull(d, "expected " + n + " messages from " + queue + ", got " + bodies);
            bodies.add(str(d.getBody()));
        }
        ch.basicCancel(tag);
        return bodies;
    }

    @Test
    void helloWorld() throws Exception {
        // Goal: a message published to the default exchange reaches the queue named by its routing key.
        Channel ch = connect().createChannel();
        String q = names.queue("hello");
        ch.queueDeclare(q, false, false, false, null);
        ch.basicPublish("", q, null, bytes("Hello World!"));
        assertEquals(List.of("Hello World!"), collect(ch, q, 1));
    }

    @Test
    void workQueues() throws Exception {
        // Goal: durable queue, persistent messages, prefetch 1 and manual acks: a busy worker gets no second task, and its unacked task is redelivered when it dies.
        Channel producer = connect().createChannel();
        String q = names.queue("task_queue");
        producer.queueDeclare(q, true, false, false, null);
        for (int i = 0; i < 4; i++) {
            producer.basicPublish("", q, MessageProperties.PERSISTENT_TEXT_PLAIN, bytes("task " + i));
        }
        Connection connA = connect();
        Channel workerA = connA.createChannel();
        workerA.basicQos(1);
        BlockingQueue<Delivery> gotA = new LinkedBlockingQueue<>();
        workerA.basicConsume(q, false, (t, d) -> gotA.add(d), t -> { });
        Delivery first = gotA.poll(Broker.WAIT_TIMEOUT.toMillis(), TimeUnit.MILLISECONDS);
        assertNotNull(first);
        assertEquals("task 0", str(first.getBody()));
        assertEquals(2, first.getProperties().getDeliveryMode());

        Channel workerB = connect().createChannel();
        workerB.basicQos(1);
        BlockingQueue<Delivery> gotB = new LinkedBlockingQueue<>();
        workerB.basicConsume(q, false, (t, d) -> {
            gotB.add(d);
            workerB.basicAck(d.getEnvelope().getDeliveryTag(), false);
        }, t -> { });
        List<String> bodiesB = new ArrayList<>();
        for (int i = 0; i < 3; i++) {
            Delivery d = gotB.poll(Broker.WAIT_TIMEOUT.toMillis(), TimeUnit.MILLISECONDS);
            assertNotNull(d, "worker B starved after " + bodiesB);
            bodiesB.add(str(d.getBody()));
        }
        assertEquals(List.of("task 1", "task 2", "task 3"), bodiesB);
        assertTrue(gotA.isEmpty(), "prefetch 1 exceeded");
        connA.close();
        Delivery again = gotB.poll(Broker.WAIT_TIMEOUT.toMillis(), TimeUnit.MILLISECONDS);
        assertNotNull(again, "task 0 not redelivered");
        assertEquals("task 0", str(again.getBody()));
        assertTrue(again.getEnvelope().isRedeliver());
    }

    @Test
    void publishSubscribe() throws Exception {
        // Goal: each subscriber's server-named exclusive queue bound to a fanout `logs` exchange gets every line in order.
        Channel pub = connect().createChannel();
        String logs = names.exchange("logs");
        pub.exchangeDeclare(logs, BuiltinExchangeType.FANOUT);
        List<Channel> subs = new ArrayList<>();
        List<String> queues = new ArrayList<>();
        for (int i = 0; i < 3; i++) {
            Channel sub = connect().createChannel();
            String q = sub.queueDeclare().getQueue();
            assertTrue(q.startsWith("amq.gen-"), q);
            sub.queueBind(q, logs, "");
            subs.add(sub);
            queues.add(q);
        }
        List<String> lines = new ArrayList<>();
        for (int i = 0; i < 5; i++) {
            lines.add("log line " + i);
            pub.basicPublish(logs, "ignored." + i, null, bytes(lines.get(i)));
        }
        for (int i = 0; i < 3; i++) {
            assertEquals(lines, collect(subs.get(i), queues.get(i), 5));
        }
    }

    /** A server-named exclusive queue that, unlike queueDeclare(), is not auto-delete, so it outlives a cancelled consumer. */
    private static String serverNamedExclusive(Channel ch) throws Exception {
        return ch.queueDeclare("", false, true, false, null).getQueue();
    }

    @Test
    void routing() throws Exception {
        // Goal: a direct exchange delivers each log only to queues bound with its severity.
        Channel ch = connect().createChannel();
        String x = names.exchange("direct_logs");
        ch.exchangeDeclare(x, BuiltinExchangeType.DIRECT);
        String errorsOnly = serverNamedExclusive(ch);
        ch.queueBind(errorsOnly, x, "error");
        String all = serverNamedExclusive(ch);
        for (String sev : List.of("info", "warning", "error")) {
            ch.queueBind(all, x, sev);
        }
        String[][] sent = {{"info", "i1"}, {"error", "e1"}, {"warning", "w1"}, {"debug", "d1"}, {"error", "e2"}};
        for (String[] m : sent) {
            ch.basicPublish(x, m[0], null, bytes(m[1]));
        }
        assertEquals(List.of("e1", "e2"), collect(ch, errorsOnly, 2));
        assertEquals(List.of("i1", "e1", "w1", "e2"), collect(ch, all, 4));
        assertNull(ch.basicGet(all, true));
    }

    @Test
    void topics() throws Exception {
        // Goal: topic bindings `*.orange.*`, `*.*.rabbit` and `lazy.#` route as the tutorial's table says.
        Channel ch = connect().createChannel();
        String x = names.exchange("topic_logs");
        ch.exchangeDeclare(x, BuiltinExchangeType.TOPIC);
        String q1 = serverNamedExclusive(ch);
        ch.queueBind(q1, x, "*.orange.*");
        String q2 = serverNamedExclusive(ch);
        ch.queueBind(q2, x, "*.*.rabbit");
        ch.queueBind(q2, x, "lazy.#");
        for (String k : List.of("quick.orange.rabbit", "lazy.orange.elephant", "quick.orange.fox", "lazy.brown.fox",
                "lazy.pink.rabbit", "quick.brown.fox", "orange", "quick.orange.male.rabbit",
                "lazy.orange.male.rabbit", "lazy")) {
            ch.basicPublish(x, k, null, bytes(k));
        }
        assertEquals(List.of("quick.orange.rabbit", "lazy.orange.elephant", "quick.orange.fox"), collect(ch, q1, 3));
        assertEquals(List.of("quick.orange.rabbit", "lazy.orange.elephant", "lazy.brown.fox", "lazy.pink.rabbit",
                "lazy.orange.male.rabbit", "lazy"), collect(ch, q2, 6));
        assertNull(ch.basicGet(q1, true));
        assertNull(ch.basicGet(q2, true));
    }

    private static int fib(int n) {
        int a = 0;
        int b = 1;
        for (int i = 0; i < n; i++) {
            int t = a + b;
            a = b;
            b = t;
        }
        return a;
    }

    @Test
    void rpc() throws Exception {
        // Goal: an RPC client with a server-named exclusive callback queue gets replies matched by correlation id from a server answering on reply_to.
        Channel server = connect().createChannel();
        String rpcQueue = names.queue("rpc_queue");
        server.queueDeclare(rpcQueue, false, false, false, null);
        server.basicQos(1);
        server.basicConsume(rpcQueue, false, (t, d) -> {
            AMQP.BasicProperties reply = new AMQP.BasicProperties.Builder()
                    .correlationId(d.getProperties().getCorrelationId()).build();
            int n = Integer.parseInt(str(d.getBody()));
            server.basicPublish("", d.getProperties().getReplyTo(), reply, bytes(Integer.toString(fib(n))));
            server.basicAck(d.getEnvelope().getDeliveryTag(), false);
        }, t -> { });

        Channel client = connect().createChannel();
        String callback = client.queueDeclare().getQueue();
        assertTrue(callback.startsWith("amq.gen-"));
        Map<String, Integer> want = new HashMap<>();
        BlockingQueue<Delivery> replies = new LinkedBlockingQueue<>();
        client.basicConsume(callback, true, (t, d) -> replies.add(d), t -> { });
        for (int n : new int[] {1, 10, 30}) {
            String corr = UUID.randomUUID().toString();
            want.put(corr, fib(n));
            AMQP.BasicProperties props = new AMQP.BasicProperties.Builder()
                    .correlationId(corr).replyTo(callback).build();
            client.basicPublish("", rpcQueue, props, bytes(Integer.toString(n)));
        }
        Map<String, Integer> got = new HashMap<>();
        while (got.size() < want.size()) {
            Delivery d = replies.poll(Broker.WAIT_TIMEOUT.toMillis(), TimeUnit.MILLISECONDS);
            assertNotNull(d, "only " + got.size() + " replies");
            got.put(d.getProperties().getCorrelationId(), Integer.parseInt(str(d.getBody())));
        }
        assertEquals(want, got);
        assertFalse(got.isEmpty());
    }
}
