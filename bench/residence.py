#!/usr/bin/env python3
"""How long each PerfTest message stays inside a broker, read from a loopback
packet capture: the time from the packet that completes a message's body on
its way in (basic.publish) to the packet that completes the same body on its
way out (basic.deliver). PerfTest bodies start with a sequence number and the
producer's clock, so every body is unique and matches in to out.

Capture during a run, then read the capture (standard library only):

    tcpdump -i lo -w s4.pcap --time-stamp-precision=nano 'tcp port AMQP_PORT'
    bench/residence.py s4.pcap AMQP_PORT [--skip SECONDS]

It prints the residence percentiles over the whole capture and per second,
and how far each message's send lagged the producer's own clock (relative to
the fastest one). With a broker's residence small and the end-to-end latency
large, the time goes to the clients or to waiting for a CPU.
"""

import argparse
import collections
import statistics
import struct
import sys

FRAME_BODY = 3
PCAP_MAGIC_MICRO = 0xA1B2C3D4
PCAP_MAGIC_NANO = 0xA1B23C4D
LINKTYPE_ETHERNET = 1  # Linux "lo" captures have an all-zero Ethernet header
LINKTYPE_LINUX_SLL = 113  # tcpdump -i any


def packets(data):
    """(time_s, link type, frame bytes) for each record of a little-endian pcap."""
    magic = struct.unpack("<I", data[:4])[0]
    if magic not in (PCAP_MAGIC_MICRO, PCAP_MAGIC_NANO):
        raise ValueError("not a little-endian pcap file")
    scale = 1e9 if magic == PCAP_MAGIC_NANO else 1e6
    link_type = struct.unpack("<I", data[20:24])[0]
    offset = 24
    while offset + 16 <= len(data):
        seconds, fraction, captured, _original = struct.unpack("<IIII", data[offset : offset + 16])
        offset += 16
        yield seconds + fraction / scale, link_type, data[offset : offset + captured]
        offset += captured


def tcp_payloads(data):
    """(time_s, source port, destination port, payload) of IPv4 TCP segments with data."""
    for t, link_type, frame in packets(data):
        header = {LINKTYPE_ETHERNET: 14, LINKTYPE_LINUX_SLL: 16}.get(link_type, 4)
        ip = frame[header:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
            continue
        ip_header = (ip[0] & 0x0F) * 4
        total = struct.unpack(">H", ip[2:4])[0]
        tcp = ip[ip_header:total]
        source, destination = struct.unpack(">HH", tcp[:4])
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if payload:
            yield t, source, destination, payload


def bodies(data, port):
    """(time_s, 'in' or 'out', body) for each AMQP body frame to or from `port`,
    timed by the packet that completed it. Needs full packets (no snap length)."""
    streams = {}
    for t, source, destination, payload in tcp_payloads(data):
        if destination == port:
            key = ("in", source)
        elif source == port:
            key = ("out", destination)
        else:
            continue
        if key not in streams:
            streams[key] = bytearray()
            if payload[:4] == b"AMQP":
                payload = payload[8:]  # the client's protocol header
        buf = streams[key]
        buf += payload
        while len(buf) >= 7:
            kind, _channel, size = struct.unpack(">BHI", buf[:7])
            if len(buf) < size + 8:
                break
            frame = bytes(buf[7 : 7 + size])
            del buf[: size + 8]
            if kind == FRAME_BODY:
                yield t, key[0], frame


def percentile(sorted_values, p):
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


def residence(data, port, skip_s=0.0):
    """Per message (seconds since the first packet, residence µs, producer lag µs),
    for messages that came in at least `skip_s` after the first packet."""
    ins, outs = {}, {}
    start = next((t for t, *_ in tcp_payloads(data)), 0.0)  # the first packet with data
    for t, direction, body in bodies(data, port):
        (ins if direction == "in" else outs).setdefault(body, t)
    rows = []
    for body, t_in in ins.items():
        if body in outs and t_in - start >= skip_s:
            lag = None
            if len(body) >= 12:
                _sequence, producer_ns = struct.unpack(">iq", body[:12])
                lag = t_in * 1e6 - producer_ns / 1e3
            rows.append((t_in - start, (outs[body] - t_in) * 1e6, lag))
    rows.sort()
    return rows, len(ins), len(outs)


def summary(values):
    values = sorted(values)
    points = [percentile(values, p) for p in (0.5, 0.9, 0.99, 0.999)]
    return "p50 {:.0f}  p90 {:.0f}  p99 {:.0f}  p99.9 {:.0f}  max {:.0f}".format(*points, values[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pcap")
    parser.add_argument("port", type=int, help="the broker's AMQP port")
    parser.add_argument("--skip", type=float, default=5.0, help="seconds of warm-up to leave out (default 5)")
    args = parser.parse_args()
    with open(args.pcap, "rb") as f:
        rows, n_in, n_out = residence(f.read(), args.port, args.skip)
    if not rows:
        sys.exit(f"no message seen both ways (bodies in {n_in}, out {n_out})")
    print(f"messages matched {len(rows)} (bodies in {n_in}, out {n_out})")
    print("broker residence µs:", summary([r[1] for r in rows]))
    lags = [r[2] for r in rows if r[2] is not None]
    if lags:
        fastest = min(lags)
        print("producer clock to wire µs (relative to the fastest):", summary([lag - fastest for lag in lags]))
    by_second = collections.defaultdict(list)
    for t, micros, _ in rows:
        by_second[int(t)].append(micros)
    p99s = [percentile(sorted(v), 0.99) for _, v in sorted(by_second.items()) if len(v) >= 100]
    if p99s:
        print(f"per-second residence p99 µs: median {statistics.median(p99s):.0f}; {[round(x) for x in p99s]}")


if __name__ == "__main__":
    main()
