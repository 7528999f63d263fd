"""Per-exchange overhead of the split channel (runtimes/channel.py) on loopback.

One exchange = the client sends a blob of N bytes and the server answers with a blob of N
bytes, as a split client's activations go up and the gradients come down. The payload
transfer itself is measured with a raw TCP socket echo (length-prefixed, same N both ways);
the channel's overhead is its median round trip minus the raw socket's.

    python benchmarks/split_channel.py [--repeats 50] > benchmarks/split_channel.md
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time

from fedtune.runtimes.certs import make_tls
from fedtune.runtimes.channel import ChannelClient, ChannelServer

SIZES = [1_000, 100_000, 1_000_000, 4_000_000]  # 4 MB ~ fp32 activations of 16 x 64 tokens x 1024


def _recv(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("closed")
        got += k
    return buf


def raw_echo_server() -> tuple[int, threading.Thread]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                try:
                    (n,) = struct.unpack("!Q", _recv(conn, 8))
                except ConnectionError:
                    return
                body = _recv(conn, n)
                conn.sendall(struct.pack("!Q", n))
                conn.sendall(body)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


def time_raw(size: int, repeats: int) -> list[float]:
    port, _ = raw_echo_server()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    blob, times = b"x" * size, []
    for _ in range(repeats + 2):
        t = time.perf_counter()
        sock.sendall(struct.pack("!Q", size))
        sock.sendall(blob)
        (n,) = struct.unpack("!Q", _recv(sock, 8))
        _recv(sock, n)
        times.append(time.perf_counter() - t)
    sock.close()
    return times[2:]  # the first exchanges warm up


def time_channel(size: int, repeats: int, tls) -> list[float]:
    kw = dict(certfile=str(tls.cert), keyfile=str(tls.key), ca_certfile=str(tls.ca_cert)) if tls else {}
    server = ChannelServer(lambda rnd, cid, blob: blob, **kw)  # echo: the reply has the request's size
    blob, times = b"x" * size, []
    try:
        with ChannelClient(server.info, 1, 0) as transport:
            for _ in range(repeats + 2):
                t = time.perf_counter()
                transport(blob)
                times.append(time.perf_counter() - t)
    finally:
        server.stop()
    return times[2:]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    tls = make_tls(tempfile.mkdtemp(prefix="fedtune-bench-"))
    ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    print("| payload each way | raw TCP echo (ms) | gRPC channel (ms) | overhead (ms) | gRPC + TLS (ms) | overhead TLS (ms) |")
    print("|---:|---:|---:|---:|---:|---:|")
    worst = 0.0
    for size in SIZES:
        raw = ms(time_raw(size, args.repeats))
        plain = ms(time_channel(size, args.repeats, None))
        secure = ms(time_channel(size, args.repeats, tls))
        worst = max(worst, plain - raw, secure - raw)
        print(f"| {size / 1e6:g} MB | {raw:.2f} | {plain:.2f} | {plain - raw:+.2f} | {secure:.2f} | {secure - raw:+.2f} |")
    print(f"\nmedian of {args.repeats} exchanges each; worst overhead beyond the transfer: {worst:.2f} ms "
          f"(target <= 20 ms): {'met' if worst <= 20 else 'NOT met'}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
