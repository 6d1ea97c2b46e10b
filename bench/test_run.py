#!/usr/bin/env python3
"""Tests bench/run's PerfTest output parsing, statistics and table without brokers.

Run: python3 bench/test_run.py (standard library only; about a second).
"""

import importlib.machinery
import importlib.util
import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))


def load_run():
    loader = importlib.machinery.SourceFileLoader("bench_run", os.path.join(HERE, "run"))
    spec = importlib.util.spec_from_loader("bench_run", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


run = load_run()

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

    def test_failures_and_cluster_row(self):
        # Goal: a failed scenario and the absent cluster scenario are both visible.
        table = self.render({}, {"S1": {"candidate": "broker failed to start"}})
        self.assertIn("| S1 errors (at least one round) | broker failed to start |", table)
        self.assertIn("| S7 cluster", table)
        self.assertIn("n/a", table)


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
