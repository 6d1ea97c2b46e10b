#!/usr/bin/env python3
"""Tests bench/run's PerfTest output parsing, statistics, table, S7 cluster plan
and AMQP declaration client without brokers.

Run: python3 bench/test_run.py (standard library only; about a second).
"""

import importlib.machinery
import importlib.util
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))


def load_module(filename):
    name = "bench_" + filename.replace(".py", "")
    loader = importlib.machinery.SourceFileLoader(name, os.path.join(HERE, filename))
    spec = importlib.util.spec_from_loader(name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def load_run():
    return load_module("run")


run = load_run()
residence = load_module("residence.py")

# Lines as PerfTest 2.22 prints them (trimmed from a real run against RabbitMQ).
S1_OUTPUT = """\
id: S1, starting consumer #0
id: S1, time 1.051 s, sent: 1294 msg/s, received: 1158 msg/s, min/median/75th/95th/99th consumer latency: 5655/71159/118525/209327/244413 µs
id: S1, time 2.007 s, sent: 7216 msg/s, received: 4304 msg/s, min/median/75th/95th/99th consumer latency: 2308/93653/119137/290830/291474 µs
id: S1, time 3.002 s, sent: 7733 msg/s, received: 10119 msg/s, min/median/75th/95th/99th consumer latency: 17979/277464/342472/373935/417567 µs
id: S1, time 4.007 s, sent: 14866 msg/s, received: 10483 msg/s, min/median/75th/95th/99th consumer latency: 19718/437426/460857/490021/497492 µs
id: S1, time 5.083 s, sent: 11631 msg/s, received: 11593 msg/s, min/median/75th/95th/99th consumer latency: 5905/262455/341214/560370/571378 µs
id: S1, time 6.001 s, sent: 12000 msg/s, received: 12001 msg/s, min/median/75th/95th/99th consumer latency: 5905/300000/341214/560370/600000 µs
test stopped (Reached time limit)
id: S1, sending rate avg: 8295 msg/s
id: S1, receiving rate avg: 8144 msg/s
id: S1, consumer latency min/median/75th/95th/99th 4871/309550/446470/570366/575061 µs
"""

S2_LINE = (
    "id: S2, time 4.000 s, sent: 3000 msg/s, returned: 0 msg/s, confirmed: 2990 msg/s, "
    "nacked: 0 msg/s, received: 2980 msg/s, min/median/75th/95th/99th consumer latency: 1/2/3/4/5 ms\n"
)


class ParseTest(unittest.TestCase):
    def test_steady_rates_skip_warmup(self):
        # Goal: only seconds after the warm-up count towards throughput.
        r = run.PerfTestRun(S1_OUTPUT, 6.0, warmup_s=3)
        self.assertEqual(len(r.samples), 6)
        # Seconds 3.002 to 6.001 are after the 3 s warm-up; 1.051 and 2.007 are not.
        self.assertAlmostEqual(r.rate("received"), (10119 + 10483 + 11593 + 12001) / 4)
        self.assertAlmostEqual(r.rate("sent"), (7733 + 14866 + 11631 + 12000) / 4)

    def test_summary_and_stop_reason(self):
        # Goal: whole-run averages and the reason PerfTest stopped are read.
        r = run.PerfTestRun(S1_OUTPUT, 6.0, warmup_s=3)
        self.assertEqual(r.avg, {"sending": 8295, "receiving": 8144})
        self.assertEqual(r.stop_reason, "Reached time limit")
        self.assertEqual(r.summary_latency, (4871, 309550, 446470, 570366, 575061))

    def test_latency_is_median_of_steady_seconds(self):
        # Goal: p50/p99 are medians of per-second percentiles after warm-up.
        r = run.PerfTestRun(S1_OUTPUT, 6.0, warmup_s=3)
        self.assertEqual(r.latency(1), (277464 + 300000) / 2)
        self.assertEqual(r.latency(4), (497492 + 571378) / 2)

    def test_confirm_rates_and_millisecond_latency(self):
        # Goal: confirmed rate is parsed and latency in ms is turned into µs.
        r = run.PerfTestRun(S2_LINE, 4.0, warmup_s=3)
        self.assertEqual(r.rate("confirmed"), 2990)
        self.assertEqual(r.rate("received"), 2980)
        self.assertEqual(r.latency(4), 5000)

    def test_total_counts_messages_over_the_run(self):
        # Goal: totals weight each per-second rate by its interval.
        r = run.PerfTestRun(S1_OUTPUT, 6.0, warmup_s=3)
        expected = 1158 * 1.051 + 4304 * (2.007 - 1.051) + 10119 * (3.002 - 2.007)
        expected += 10483 * (4.007 - 3.002) + 11593 * (5.083 - 4.007) + 12001 * (6.001 - 5.083)
        self.assertAlmostEqual(r.total("received"), expected)

    def test_short_run_uses_all_samples(self):
        # Goal: a run shorter than the warm-up still yields a figure.
        r = run.PerfTestRun(S1_OUTPUT.splitlines()[1] + "\n", 1.0, warmup_s=3)
        self.assertEqual(r.rate("received"), 1158)


class TableTest(unittest.TestCase):
    class Args:
        duration = None
        quick = True
        s5_connections = None
        s6_messages = None
        profile = False

    def render(self, results, failures=None, names=("S1", "S4", "S7")):
        st = run.Settings(self.Args())
        return run.render_table(results, failures or {}, list(names), ("Synod", "RabbitMQ"), st, 3)

    def test_ratio_and_target_met(self):
        # Goal: the ratio is of medians, and a met target says yes.
        table = self.render({"S1 received msg/s": {"candidate": [30, 31, 90], "baseline": [10, 9, 11]}})
        self.assertIn("| S1 received msg/s | 31.0 (30.0–90.0) | 10.0 (9.00–11.0) | 3.10x | >= 3x | yes |", table)

    def test_lower_is_better_target_missed(self):
        # Goal: a latency ratio above its ceiling is reported as missed.
        table = self.render({"S4 latency p99 µs": {"candidate": [600], "baseline": [1000]}})
        self.assertIn("| 0.60x | <= 0.5x | **no** |", table)

    def test_failures_are_visible(self):
        # Goal: a scenario that failed in some round gets an errors row.
        table = self.render({}, {"S1": {"candidate": "broker failed to start"}})
        self.assertIn("| S1 errors (at least one round) | broker failed to start |", table)

    def test_cluster_rows_targets_and_cross_node_ratio(self):
        # Goal: S7 rows sit under S7 with their targets, and the cross-node /
        # single-node ratio is derived per broker from the same run's medians.
        results = {
            "S1 received msg/s": {"candidate": [100, 200, 300], "baseline": [50]},
            "S7-S1 received msg/s": {"candidate": [150], "baseline": [10]},
            "S7-S2 received msg/s": {"candidate": [40], "baseline": [10]},
            "S7 idle RSS after start MiB (3 nodes)": {"candidate": [30], "baseline": [400]},
        }
        table = self.render(results, names=("S1", "S7"))
        rows = table.splitlines()
        self.assertIn("| S7-S1 received msg/s | 150 | 10.0 | 15.00x | >= 3x | yes |", rows)
        self.assertIn("| S7-S2 received msg/s | 40.0 | 10.0 | 4.00x | >= 2x | yes |", rows)
        self.assertIn("| S7-S1 received, cross-node / single-node | 0.75 | 0.20 | 3.75x |  |  |", rows)
        # No S2 single-node figure: no S2 cross-node ratio.
        self.assertNotIn("S7-S2 received, cross-node", table)
        s7_rows = [i for i, r in enumerate(rows) if r.startswith("| S7")]
        s1_rows = [i for i, r in enumerate(rows) if r.startswith("| S1 ")]
        self.assertGreater(min(s7_rows), max(s1_rows))
        self.assertIn("producer on node 2", table)


class ClusterPlanTest(unittest.TestCase):
    class Cluster:
        uris = ["amqp://node1", "amqp://node2", "amqp://node3"]

    def test_s7_clients_cross_nodes_on_the_predeclared_queue(self):
        # Goal: the producer talks to node 2, the consumer to node 3, both on
        # the queue declared on node 1 (-p), with S1's and S2's own flags.
        for part, queue, producer_flag, consumer_flag in (
            ("S1", "q.s7.s1", "-s", "-a"),
            ("S2", "q.s7.s2", "-c", "-A"),
        ):
            (c_uri, c_label, c_flags), (p_uri, p_label, p_flags) = run.s7_clients(self.Cluster(), part, 15)
            self.assertEqual((c_uri, p_uri), ("amqp://node3", "amqp://node2"))
            self.assertEqual((c_label, p_label), (f"S7-{part}-consumer", f"S7-{part}-producer"))
            for flags in (c_flags, p_flags):
                self.assertIn("-p", flags)
                self.assertEqual(flags[flags.index("-u") + 1], queue)
                self.assertEqual(flags[flags.index("-z") + 1], "15")
            self.assertEqual(p_flags[:4], ["-x", "1", "-y", "0"])
            self.assertEqual(c_flags[:4], ["-x", "0", "-y", "1"])
            self.assertIn(producer_flag, p_flags)
            self.assertIn(consumer_flag, c_flags)

    def test_round_runs_s7_on_the_cluster(self):
        # Goal: a round starts the broker's cluster (not the broker) for S7,
        # records the cluster's idle memory under S7, and always stops it.
        events = []

        class Fake:
            def __init__(self, name):
                self.name, self.role, self.cluster, self.log_path = name, "candidate", None, None

            def start(self):
                events.append(("start", self.name))

            def stop(self):
                events.append(("stop", self.name))

            def alive(self):
                return True

            def rss_bytes(self):
                return 3 * run.MB

        single, cluster = Fake("single"), Fake("cluster")
        single.cluster = cluster

        def scenario(perf, broker, st):
            events.append(("S7", broker.name))
            return {"S7-S1 received msg/s": 5.0}

        class Perf:
            log_dir = os.environ.get("TMPDIR", "/tmp")

        saved = run.SCENARIOS["S7"]
        run.SCENARIOS["S7"] = (scenario, "cluster")
        try:
            results, failures = {}, {}
            run.run_round(Perf(), single, ["S7"], None, results, failures, 1)
        finally:
            run.SCENARIOS["S7"] = saved
        self.assertEqual(events, [("start", "cluster"), ("S7", "cluster"), ("stop", "cluster")])
        self.assertEqual(results["S7-S1 received msg/s"], {"candidate": [5.0]})
        self.assertEqual(results["S7 idle RSS after start MiB (3 nodes)"], {"candidate": [3.0]})
        self.assertEqual(failures, {})


class AmqpTest(unittest.TestCase):
    def test_method_frame_layout(self):
        # Goal: a Queue.Declare frame is type 1, channel, size, class 50
        # method 10, the durable bit, an empty table, and the frame end.
        frame = run.method_frame(1, 50, 10, run.queue_declare_args("q", durable=True))
        self.assertEqual(
            frame,
            b"\x01\x00\x01\x00\x00\x00\x0d" + b"\x00\x32\x00\x0a" + b"\x00\x00\x01q\x02"
            + b"\x00\x00\x00\x00" + b"\xce",
        )

    def test_declare_against_a_scripted_peer(self):
        # Goal: the client completes the handshake, declares, reads the
        # message count, and reports a channel close as an error.
        import socket
        import struct
        import threading

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        sent_by_client = []

        def peer():
            conn, _ = listener.accept()
            with conn:
                header = conn.recv(8)
                sent_by_client.append(header)
                start_args = b"\x00\x09" + struct.pack(">I", 0) + struct.pack(">I", 5) + b"PLAIN" + struct.pack(">I", 5) + b"en_US"
                conn.sendall(run.method_frame(0, 10, 10, start_args))
                conn.sendall(run.method_frame(0, 10, 30, struct.pack(">HIH", 2047, 131072, 60)))
                conn.sendall(run.method_frame(0, 10, 41, b"\x00"))
                conn.sendall(run.method_frame(1, 20, 11, struct.pack(">I", 0)))
                conn.sendall(bytes([8, 0, 0, 0, 0, 0, 0, 0xCE]))  # a heartbeat in between
                conn.sendall(run.method_frame(1, 50, 11, run.shortstr("q") + struct.pack(">II", 7, 0)))
                close = struct.pack(">H", 406) + run.shortstr("PRECONDITION_FAILED") + struct.pack(">HH", 50, 10)
                conn.sendall(run.method_frame(1, 20, 40, close))
                deadline = run.time.monotonic() + 5
                conn.settimeout(5)
                data = b""
                while run.time.monotonic() < deadline:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                sent_by_client.append(data)

        thread = threading.Thread(target=peer, daemon=True)
        thread.start()
        port = listener.getsockname()[1]
        client = run.AmqpClient(port, timeout_s=5)
        try:
            self.assertEqual(client.declare_queue("q", durable=True), 7)
            with self.assertRaisesRegex(run.BenchError, "406 PRECONDITION_FAILED"):
                client.declare_queue("q", durable=False)
        finally:
            client.sock.close()
        thread.join(10)
        listener.close()
        self.assertEqual(sent_by_client[0], b"AMQP\x00\x00\x09\x01")
        self.assertIn(run.shortstr("PLAIN") + run.longstr(b"\x00guest\x00guest"), sent_by_client[1])
        self.assertIn(run.method_frame(1, 50, 10, run.queue_declare_args("q", durable=True)), sent_by_client[1])


class ResidenceTest(unittest.TestCase):
    @staticmethod
    def pcap(packets):
        """A nanosecond pcap of loopback (Ethernet) IPv4/TCP packets."""
        import struct

        out = struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1)
        for t_ns, source, destination, payload in packets:
            tcp = struct.pack(">HHIIBBHHH", source, destination, 0, 0, 5 << 4, 0x18, 65535, 0, 0) + payload
            ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0,
                             bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1])) + tcp
            frame = bytes(14) + ip
            out += struct.pack("<IIII", t_ns // 10**9, t_ns % 10**9, len(frame), len(frame)) + frame
        return out

    def test_residence_matches_bodies_in_and_out(self):
        # Goal: a body's residence runs from the packet completing it inbound
        # to the packet completing it outbound, across split frames and the
        # client's protocol header; other ports are ignored.
        import struct

        def body_frame(sequence, producer_ns):
            body = struct.pack(">iq", sequence, producer_ns) + bytes(4)
            return struct.pack(">BHI", 3, 1, len(body)) + body + b"\xce"

        header = struct.pack(">BHI", 2, 1, 14) + bytes(14) + b"\xce"  # a content header, skipped
        one, two = body_frame(1, 500), body_frame(2, 900)
        s = 10**9
        capture = self.pcap([
            (1 * s, 40000, 5672, b"AMQP\x00\x00\x09\x01"),
            (2 * s, 40000, 5672, header + one),
            (2 * s + 1000, 40000, 5672, two[:5]),
            (2 * s + 3000, 40000, 5672, two[5:]),
            (2 * s + 50_000, 5672, 40001, header + one + two[:9]),
            (2 * s + 80_000, 5672, 40001, two[9:]),
            (2 * s + 90_000, 6000, 40002, body_frame(3, 0)),
        ])
        rows, n_in, n_out = residence.residence(capture, 5672)
        self.assertEqual((n_in, n_out), (2, 2))
        self.assertEqual(len(rows), 2)
        self.assertAlmostEqual(rows[0][1], 50.0, places=3)
        self.assertAlmostEqual(rows[1][1], 77.0, places=3)
        # Producer clock to wire: 2 s minus 500 ns against 2.000003 s minus 900 ns.
        self.assertAlmostEqual(rows[1][2] - rows[0][2], 3.0 - 0.4, places=3)
        # The warm-up counts from the first packet (the protocol header at 1 s).
        self.assertEqual(len(residence.residence(capture, 5672, skip_s=0.5)[0]), 2)
        self.assertEqual(len(residence.residence(capture, 5672, skip_s=1.5)[0]), 0)


class ProcessTest(unittest.TestCase):
    def test_process_tree_and_rss_of_self(self):
        # Goal: our own process is found in its tree and has a resident size.
        tree = run.process_tree(os.getppid())
        self.assertIn(os.getpid(), tree)
        self.assertGreater(run.rss_bytes(os.getpid()), 1024 * 1024)

    def test_cpu_seconds_grow_with_work(self):
        # Goal: CPU time read from /proc increases when this process computes.
        before = run.cpu_seconds(os.getpid())
        deadline = run.time.process_time() + 0.2
        while run.time.process_time() < deadline:
            pass
        self.assertGreater(run.cpu_seconds(os.getpid()) - before, 0.1)


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=1).result
    failed = len(result.failures) + len(result.errors)
    print(f"bench: {result.testsRun - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
