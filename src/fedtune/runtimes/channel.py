"""A persistent per-batch channel between split-learning clients and the split server.

Flower's message path costs ~0.1 s per exchange in simulation and seconds in deployment, so
the per-batch traffic of split learning runs beside it, on one gRPC bidirectional stream per
client and round: the client writes a blob, the server answers with one blob. The channel
knows nothing about frameworks: it moves bytes (``runtimes.rounds.MeteredLink`` serializes and
meters them), so whatever a framework's ``serve`` does, it works unchanged.

Every stream carries metadata (round, client, a per-run token: only clients that received
the token from the server in a Flower message can talk to it). TLS is optional.
"""

from __future__ import annotations

import queue
import secrets
import threading
from concurrent import futures
from dataclasses import dataclass
from typing import Callable

import grpc

from ..errors import FedtuneError

METHOD = "/fedtune.SplitChannel/Exchange"
# Activations of a large batch can exceed gRPC's 4 MB default; 1 GiB is a sanity bound.
OPTIONS = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]

Handler = Callable[[int, int, bytes], bytes]  # (round, client, request blob) -> reply blob


@dataclass
class ChannelInfo:
    """What a client needs to connect: sent to it inside the round's Flower message."""

    address: str  # host:port the client dials
    token: str
    root_certificates: bytes | None = None  # PEM of the CA that signed the server's certificate; None = plaintext


class ChannelServer:
    """Serves ``handler`` on a gRPC port. One lock serializes the handler: the split server's
    model is shared by all clients, as in the in-process runtime."""

    def __init__(self, handler: Handler, bind: str = "127.0.0.1:0", advertise_host: str = "",
                 certfile: str = "", keyfile: str = "", ca_certfile: str = "", workers: int = 8):
        self.handler, self.token, self.lock = handler, secrets.token_hex(16), threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=OPTIONS)
        rpc = grpc.stream_stream_rpc_method_handler(self._exchange)  # no (de)serializers: raw bytes
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("fedtune.SplitChannel", {"Exchange": rpc})]
        )
        host = bind.rsplit(":", 1)[0]
        if certfile:
            creds = grpc.ssl_server_credentials([(_read(keyfile), _read(certfile))])
            port = self.server.add_secure_port(bind, creds)
        else:
            port = self.server.add_insecure_port(bind)
        if port == 0:
            raise FedtuneError(f"split channel: cannot bind {bind}")
        self.server.start()
        root = _read(ca_certfile) if ca_certfile else None
        if certfile and root is None:
            root = _read(certfile)  # a self-signed server certificate is its own root
        self.info = ChannelInfo(f"{advertise_host or host}:{port}", self.token, root)

    def _exchange(self, requests, context):
        meta = dict(context.invocation_metadata())
        if not secrets.compare_digest(meta.get("fedtune-token", ""), self.token):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad or missing fedtune-token")
        rnd, cid = int(meta["fedtune-round"]), int(meta["fedtune-client"])
        for blob in requests:
            try:
                with self.lock:
                    reply = self.handler(rnd, cid, blob)
            except Exception as exc:  # the client sees the server's error, not a hang
                context.abort(grpc.StatusCode.INTERNAL, f"split server failed: {type(exc).__name__}: {exc}")
            yield reply

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait()


class ChannelClient:
    """A bytes -> bytes transport over one open stream (plugs into ``MeteredLink``).
    Requests and replies alternate, so the stream stays open for the whole round."""

    def __init__(self, info: ChannelInfo, rnd: int, cid: int, timeout_s: float = 0.0):
        if info.root_certificates:
            self.channel = grpc.secure_channel(info.address, grpc.ssl_channel_credentials(info.root_certificates),
                                               options=OPTIONS)
        else:
            self.channel = grpc.insecure_channel(info.address, options=OPTIONS)
        self.requests: queue.Queue = queue.Queue()
        call = self.channel.stream_stream(METHOD)
        metadata = [("fedtune-token", info.token), ("fedtune-round", str(rnd)), ("fedtune-client", str(cid))]
        self.replies = call(iter(self.requests.get, None), metadata=metadata, timeout=timeout_s or None)

    def __call__(self, blob: bytes) -> bytes:
        self.requests.put(blob)
        try:
            return next(self.replies)
        except grpc.RpcError as exc:
            raise FedtuneError(f"split channel: {exc.code().name}: {exc.details()}") from None
        except StopIteration:
            raise FedtuneError("split channel: the server closed the stream") from None

    def close(self) -> None:
        self.requests.put(None)  # ends the request iterator: the server's loop returns
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise FedtuneError(f"split channel: cannot read {path}: {exc.strerror}") from None
