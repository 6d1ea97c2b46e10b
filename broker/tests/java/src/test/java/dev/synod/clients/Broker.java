package dev.synod.clients;

import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.GetResponse;
import com.rabbitmq.client.ShutdownSignalException;
import java.io.IOException;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.net.Socket;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.time.Instant;
import java.util.ArrayList;
import java.util.List;
import java.util.UUID;
import java.util.function.BooleanSupplier;

/**
 * The broker under test, started once per JVM: the one named by AMQP_URL, or a
 * synod-broker process on free loopback ports. Also what the tests
 * share: unique names cleaned up afterwards and waits on conditions with
 * deadlines, never bare sleeps.
 */
final class Broker {
    /** How long synod-broker may take to accept AMQP connections. */
    static final Duration START_TIMEOUT = Duration.ofSeconds(30);
    /** Default deadline for a broker-side effect (a delivery, an expiry). */
    static final Duration WAIT_TIMEOUT = Duration.ofSeconds(10);

    private static String url;

    private Broker() {}

    static synchronized String url() throws Exception {
        if (url == null) {
            url = start();
        }
        return url;
    }

    private static String start() throws Exception {
        String external = System.getenv("AMQP_URL");
        if (external != null && !external.isEmpty()) {
            return external;
        }
        String bin = System.getenv("SYNOD_BROKER_BIN");
        if (bin == null || bin.isEmpty()) {
            bin = "../../../target/debug/synod-broker";
        }
        if (!Files.isExecutable(Path.of(bin))) {
            throw new IllegalStateException("broker binary " + bin + " is missing: build it or set SYNOD_BROKER_BIN");
        }
        Path dataDir = Files.createTempDirectory("synod-java-");
        int amqpPort = freePort();
        Path log = dataDir.resolve("broker.log");
        Process process = new ProcessBuilder(bin,
                "--amqp-listen", "127.0.0.1:" + amqpPort,
                "--mgmt-listen", "127.0.0.1:" + freePort(),
                "--metrics-listen", "127.0.0.1:" + freePort(),
                "--cluster-listen", "127.0.0.1:" + freePort(),
                "--data-dir", dataDir.resolve("data").toString())
                .redirectErrorStream(true)
                .redirectOutput(log.toFile())
                .start();
        Runtime.getRuntime().addShutdownHook(new Thread(process::destroyForcibly));
        Instant deadline = Instant.now().plus(START_TIMEOUT);
        while (!accepts(amqpPort)) {
            if (!process.isAlive()) {
                throw new IllegalStateException("synod-broker exited with " + process.exitValue()
                        + " before accepting connections:\n" + Files.readString(log));
            }
            if (Instant.now().isAfter(deadline)) {
                process.destroyForcibly();
                throw new IllegalStateException("synod-broker did not accept AMQP connections within " + START_TIMEOUT);
            }
            Thread.sleep(50);
        }
        return "amqp://guest:guest@127.0.0.1:" + amqpPort + "/";
    }

    private static int freePort() throws IOException {
        try (ServerSocket socket = new ServerSocket()) {
            socket.bind(new InetSocketAddress("127.0.0.1", 0));
            return socket.getLocalPort();
        }
    }

    private static boolean accepts(int port) {
        try (Socket socket = new Socket()) {
            socket.connect(new InetSocketAddress("127.0.0.1", port), 500);
            return true;
        } catch (IOException e) {
            return false;
        }
    }

    static ConnectionFactory factory() throws Exception {
        ConnectionFactory factory = new ConnectionFactory();
        factory.setUri(url());
        // The Java client reads "amqp://host/" as the empty vhost; other
        // clients (and the URLs used here) mean the default vhost "/".
        if (factory.getVirtualHost().isEmpty()) {
            factory.setVirtualHost("/");
        }
        factory.setAutomaticRecoveryEnabled(false);
        factory.setConnectionTimeout((int) WAIT_TIMEOUT.toMillis());
        return factory;
    }

    /** Polls cond until it holds; fails after WAIT_TIMEOUT. */
    static void waitFor(String what, BooleanSupplier cond) throws InterruptedException {
        Instant deadline = Instant.now().plus(WAIT_TIMEOUT);
        while (!cond.getAsBoolean()) {
            if (Instant.now().isAfter(deadline)) {
                throw new AssertionError("timed out after " + WAIT_TIMEOUT + " waiting for " + what);
            }
            Thread.sleep(20);
        }
    }

    /** basic.get until a message arrives. */
    static GetResponse getOne(Channel ch, String queue, boolean autoAck) throws Exception {
        Instant deadline = Instant.now().plus(WAIT_TIMEOUT);
        while (true) {
            GetResponse r = ch.basicGet(queue, autoAck);
            if (r != null) {
                return r;
            }
            if (Instant.now().isAfter(deadline)) {
                throw new AssertionError("no message on " + queue + " within " + WAIT_TIMEOUT);
            }
            Thread.sleep(20);
        }
    }

    /** The reply code of the channel or connection close behind e. */
    static int replyCode(Throwable e) {
        for (Throwable t = e; t != null; t = t.getCause()) {
            if (t instanceof ShutdownSignalException sse) {
                Object reason = sse.getReason();
                if (reason instanceof AMQP.Channel.Close close) {
                    return close.getReplyCode();
                }
                if (reason instanceof AMQP.Connection.Close close) {
                    return close.getReplyCode();
                }
            }
        }
        throw new AssertionError("no AMQP close behind " + e, e);
    }

    /** Unique names for one test; deletes the queues and exchanges at close. */
    static final class Names implements AutoCloseable {
        private final String prefix = "java." + UUID.randomUUID().toString().substring(0, 8);
        private final List<String> queues = new ArrayList<>();
        private final List<String> exchanges = new ArrayList<>();

        String queue(String label) {
            String name = prefix + "." + label;
            queues.add(name);
            return name;
        }

        String exchange(String label) {
            String name = prefix + "." + label;
            exchanges.add(name);
            return name;
        }

        @Override
        public void close() throws Exception {
            try (Connection conn = factory().newConnection()) {
                for (String q : queues) {
                    try (Channel ch = conn.createChannel()) {
                        ch.queueDelete(q);
                    } catch (IOException | ShutdownSignalException ignored) {
                        // Already gone (auto-delete, exclusive, deleted by the test).
                    }
                }
                for (String x : exchanges) {
                    try (Channel ch = conn.createChannel()) {
                        ch.exchangeDelete(x);
                    } catch (IOException | ShutdownSignalException ignored) {
                        // Already gone.
                    }
                }
            }
        }
    }
}
