"""The flower section: the Flower runtimes (docs/flower.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .checks import one_of


@dataclass
class FlowerConfig:
    """The Flower runtimes (docs/flower.md)."""

    # host:port of a running SuperLink; empty = start one and fed.clients SuperNodes on 127.0.0.1
    # (stopped after the run).
    superlink: str = ""
    root_certificates: str = ""  # CA certificate (PEM) of the SuperLink's TLS; empty with superlink = insecure
    local_tls: bool = True  # local SuperLink: serve TLS with a throwaway CA
    local_auth: bool = True  # local SuperLink: SuperNode authentication, local SuperNodes registered
    wait_nodes_s: float = 120.0  # how long the ServerApp waits for fed.clients SuperNodes (and their workers' models)
    sim_backend: str = "thread"  # flower-sim: "thread" (ClientApps in this process) or "ray" (flwr[simulation])
    # Split learning's per-batch channel (runtimes/channel.py), served by the ServerApp.
    channel_bind: str = "127.0.0.1:0"  # port 0 = any free port
    channel_host: str = ""  # the host clients dial; empty = the bind host
    channel_certfile: str = ""  # TLS for the channel; empty = plaintext
    channel_keyfile: str = ""  # the private key of channel_certfile
    channel_ca_certfile: str = ""  # sent to clients to verify the channel; empty = the certificate itself


def validate(cfg: Any) -> None:
    one_of("flower.sim_backend", cfg.flower.sim_backend, ("thread", "ray"))
