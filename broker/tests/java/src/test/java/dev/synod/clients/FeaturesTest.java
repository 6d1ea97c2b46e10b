package dev.synod.clients;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.AuthenticationFailureException;
import com.rabbitmq.client.BuiltinExchangeType;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.GetResponse;
import com.rabbitmq.client.Return;
import com.rabbitmq.client.ShutdownSignalException;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.Random;
import java.util.TreeMap;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;

/** RabbitMQ features and error codes as the Java client sees them. */
class FeaturesTest {
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

    private static byte[] bytes(String s) {
        return s.getBytes(StandardCharsets.UTF_8);
    }

    private static String str(byte[] b) {
        return new String(b, StandardCharsets.UTF_8);
    }

    private static void settle(Map<Long, String> outcomes, long tag, boolean multiple, String outcome) {
        synchronized (outcomes) {
            long from = multiple ? 1 : tag;
            for (long t = from; t <= tag; t++) {
                if (outcomes.putIfAbsent(t, outcome) != null && t == tag) {
                    throw new AssertionError("tag " + tag + " settled twice");
                }
            }
        }
    }

    @Test
    void publisherConfirmsAckAndNackOnRejectPublish() throws Exception {
        // Goal: confirms ack accepted publishes and nack those refused by x-overflow reject-publish; only accepted ones are enqueued.
        Channel ch = connect().createChannel();
        String q = names.queue("q");
        ch.queueDeclare(q, false, false, false, Map.of("x-max-length", 2, "x-overflow", "reject-publish"));
        ch.confirmSelect();
        // The broker may settle several tags at once (multiple=true); record each tag's outcome.
        Map<Long, String> outcomes = new TreeMap<>();
        ch.addConfirmListener((tag, multiple) -> settle(outcomes, tag, multiple, "ack"),
                (tag, multiple) -> settle(outcomes, tag, multiple, "nack"));
        for (String b : List.of("1", "2", "3")) {
            ch.basicPublish("", q, null, bytes(b));
        }
        assertFalse(ch.waitForConfirms(Broker.WAIT_TIMEOUT.toMillis()), "a nack was expected");
        synchronized (outcomes) {
            assertEquals(Map.of(1L, "ack", 2L, "ack", 3L, "nack"), outcomes);
        }
        assertEquals(2, ch.queueDeclarePassive(q).getMessageCount());
    }

    @Test
    void mandatoryReturn() throws Exception {
        // Goal: an unroutable mandatory publish comes back as basic.return 312 NO_ROUTE.
        Channel ch = connect().createChannel();
        BlockingQueue<Return> returns = new LinkedBlockingQueue<>();
        ch.addReturnListener(returns::add);
        String x = names.exchange("x");
        ch.exchangeDeclare(x, BuiltinExchangeType.DIRECT);
        ch.basicPublish(x, "nowhere", true, new AMQP.BasicProperties.Builder().messageId("m-42").build(), bytes("boomerang"));
        Return r = returns.poll(Broker.WAIT_TIMEOUT.toMillis(), TimeUnit.MILLISECONDS);
        assertNotNull(r, "no basic.return");
        assertEquals(312, r.getReplyCode());
        assertEquals("NO_ROUTE", r.getReplyText());
        assertEquals("m-42", r.getProperties().getMessageId());
        assertEquals("boomerang", str(r.getBody()));
    }

    @Test
    void headersExchange() throws Exception {
        // Goal: a headers exchange routes on x-match all and any.
        Channel ch = connect().createChannel();
        String x = names.exchange("h");
        ch.exchangeDeclare(x, BuiltinExchangeType.HEADERS);
        String qAll = names.queue("all");
        String qAny = names.queue("any");
        ch.queueDeclare(qAll, false, false, false, null);
        ch.queueDeclare(qAny, false, false, false, null);
        ch.queueBind(qAll, x, "", Map.of("x-match", "all", "format", "pdf", "type", "report"));
        ch.queueBind(qAny, x, "", Map.of("x-match", "any", "format", "pdf", "type", "log"));
        String[][] sent = {{"pdf", "report"}, {"pdf", "log"}, {"zip", "log"}, {"zip", "report"}};
        for (String[] h : sent) {
            AMQP.BasicProperties props = new AMQP.BasicProperties.Builder()
                    .headers(Map.of("format", h[0], "type", h[1])).build();
            ch.basicPublish(x, "", props, bytes(h[0] + "-" + h[1]));
        }
        assertEquals("pdf-report", str(Broker.getOne(ch, qAll, true).getBody()));
        assertNull(ch.basicGet(qAll, true));
        List<String> any = new ArrayList<>();
        for (int i = 0; i < 3; i++) {
            any.add(str(Broker.getOne(ch, qAny, true).getBody()));
        }
        assertEquals(List.of("pdf-report", "pdf-log", "zip-log"), any);
        assertNull(ch.basicGet(qAny, true));
    }

    @Test
    void deadLetterOnRejectWithXDeath() throws Exception {
        // Goal: a rejected message is dead-lettered with x-dead-letter-routing-key and an x-death entry (reason rejected, queue, count 1).
        Channel ch = connect().createChannel();
        String dlx = names.exchange("dlx");
        String dlq = names.queue("dlq");
        String q = names.queue("q");
        ch.exchangeDeclare(dlx, BuiltinExchangeType.DIRECT);
        ch.queueDeclare(dlq, false, false, false, null);
        ch.queueBind(dlq, dlx, "dead");
        ch.queueDeclare(q, false, false, false, Map.of("x-dead-letter-exchange", dlx, "x-dead-letter-routing-key", "dead"));
        ch.basicPublish("", q, null, bytes("bad"));
        GetResponse r = Broker.getOne(ch, q, false);
        ch.basicReject(r.getEnvelope().getDeliveryTag(), false);
        GetResponse dead = Broker.getOne(ch, dlq, true);
        assertEquals("bad", str(dead.getBody()));
        assertEquals("dead", dead.getEnvelope().getRoutingKey());
        @SuppressWarnings("unchecked")
        List<Map<String, Object>> deaths = (List<Map<String, Object>>) dead.getProps().getHeaders().get("x-death");
        assertNotNull(deaths);
        Map<String, Object> death = deaths.get(0);
        assertEquals("rejected", death.get("reason").toString());
        assertEquals(q, death.get("queue").toString());
        assertEquals(1L, ((Number) death.get("count")).longValue());
    }

    @Test
    void transactions() throws Exception {
        // Goal: publishes inside tx.select appear only on commit and vanish on rollback.
        Channel ch = connect().createChannel();
        String q = names.queue("q");
        ch.queueDeclare(q, false, false, false, null);
        ch.txSelect();
        ch.basicPublish("", q, null, bytes("rolled back"));
        ch.txRollback();
        ch.basicPublish("", q, null, bytes("committed"));
        assertEquals(0, ch.queueDeclarePassive(q).getMessageCount());
        ch.txCommit();
        assertEquals("committed", str(Broker.getOne(ch, q, true).getBody()));
        assertNull(ch.basicGet(q, true));
    }

    @Test
    void largeMessage() throws Exception {
        // Goal: a 1 MiB body, larger than frame_max, arrives byte for byte.
        Connection conn = connect();
        Channel ch = conn.createChannel();
        String q = names.queue("q");
        ch.queueDeclare(q, false, false, false, null);
        byte[] body = new byte[1 << 20];
        new Random(42).nextBytes(body);
        assertTrue(conn.getFrameMax() > 0 && conn.getFrameMax() * 4 <= body.length);
        ch.basicPublish("", q, null, body);
        assertArrayEquals(body, Broker.getOne(ch, q, true).getBody());
    }

    @Test
    void consumerCancelNotification() throws Exception {
        // Goal: deleting a queue sends basic.cancel to its consumer (handleCancel), and the channel stays open.
        Connection conn = connect();
        Channel ch = conn.createChannel();
        String q = names.queue("q");
        ch.queueDeclare(q, false, false, false, null);
        BlockingQueue<String> cancelled = new LinkedBlockingQueue<>();
        String tag = ch.basicConsume(q, false, (t, d) -> { }, cancelled::add);
        conn.createChannel().queueDelete(q);
        assertEquals(tag, cancelled.poll(Broker.WAIT_TIMEOUT.toMillis(), TimeUnit.MILLISECONDS));
        assertTrue(ch.isOpen());
    }

    @Test
    void nackRequeueRedelivers() throws Exception {
        // Goal: nack with requeue puts the message back, flagged redelivered.
        Channel ch = connect().createChannel();
        String q = names.queue("q");
        ch.queueDeclare(q, false, false, false, null);
        ch.basicPublish("", q, null, bytes("again"));
        GetResponse first = Broker.getOne(ch, q, false);
        assertFalse(first.getEnvelope().isRedeliver());
        ch.basicNack(first.getEnvelope().getDeliveryTag(), false, true);
        GetResponse second = Broker.getOne(ch, q, true);
        assertEquals("again", str(second.getBody()));
        assertTrue(second.getEnvelope().isRedeliver());
    }

    @Test
    void passiveDeclareMissing404ConnectionSurvives() throws Exception {
        // Goal: a passive declare of a missing queue closes the channel with 404 while the connection keeps working.
        Connection conn = connect();
        Channel ch = conn.createChannel();
        IOException e = assertThrows(IOException.class, () -> ch.queueDeclarePassive(names.queue("missing")));
        assertEquals(404, Broker.replyCode(e));
        assertFalse(ch.isOpen());
        assertTrue(conn.isOpen());
        conn.createChannel().queueDeclare();
    }

    @Test
    void redeclareWithOtherArguments406() throws Exception {
        // Goal: redeclaring a queue with another x-message-ttl closes the channel with 406.
        Connection conn = connect();
        String q = names.queue("q");
        conn.createChannel().queueDeclare(q, false, false, false, Map.of("x-message-ttl", 1000));
        Channel ch = conn.createChannel();
        IOException e = assertThrows(IOException.class,
                () -> ch.queueDeclare(q, false, false, false, Map.of("x-message-ttl", 2000)));
        assertEquals(406, Broker.replyCode(e));
    }

    @Test
    void exclusiveQueueFromOtherConnection405() throws Exception {
        // Goal: consuming from another connection's exclusive queue closes the channel with 405.
        String q = names.queue("q");
        connect().createChannel().queueDeclare(q, false, true, false, null);
        Channel intruder = connect().createChannel();
        IOException e = assertThrows(IOException.class, () -> intruder.basicConsume(q, true, (t, d) -> { }, t -> { }));
        assertEquals(405, Broker.replyCode(e));
    }

    @Test
    void ackUnknownDeliveryTag406() throws Exception {
        // Goal: acking a tag the channel never issued closes the channel with 406.
        Connection conn = connect();
        Channel ch = conn.createChannel();
        BlockingQueue<ShutdownSignalException> closed = new LinkedBlockingQueue<>();
        ch.addShutdownListener(closed::add);
        ch.basicAck(999, false);
        ShutdownSignalException sse = closed.poll(Broker.WAIT_TIMEOUT.toMillis(), TimeUnit.MILLISECONDS);
        assertNotNull(sse, "channel not closed");
        assertEquals(406, Broker.replyCode(sse));
        assertTrue(conn.isOpen());
    }

    @Test
    void wrongPasswordRefused() throws Exception {
        // Goal: a wrong password is refused with 403 ACCESS_REFUSED (the client's AuthenticationFailureException).
        ConnectionFactory f = Broker.factory();
        f.setPassword("not-the-password");
        AuthenticationFailureException e = assertThrows(AuthenticationFailureException.class, f::newConnection);
        assertTrue(e.getMessage().contains("ACCESS_REFUSED"), e.getMessage());
    }

    @Test
    void unknownVhostNotAllowed() throws Exception {
        // Goal: opening a missing vhost is refused with connection.close 530 NOT_ALLOWED.
        ConnectionFactory f = Broker.factory();
        f.setVirtualHost("no-such-vhost");
        Exception e = assertThrows(Exception.class, f::newConnection);
        assertTrue(e instanceof IOException || e instanceof TimeoutException, e.toString());
        assertEquals(530, Broker.replyCode(e));
    }
}
