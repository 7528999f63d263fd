"""A client's round from bytes to bytes, and the warm worker that runs it for a SuperNode.

Flower 1.42 starts a fresh ClientApp process for every message. Were that process to import
torch and build the model, every message would pay seconds (minutes for a 1-7B model). So a
deployment ClientApp (runtimes/flower_app.py) imports only flwr and numpy and hands the round to
its node's worker: one long-lived process beside each SuperNode that keeps the model, data and
framework of the run warm across messages and rounds, reached over a unix socket. The model is
built once per run on each node, on the run's first message (the server's ``query``).

A SuperNode names its worker in its node config, ``fedtune-worker='/path/to.sock'``; one
without a worker runs the round inside its ClientApp process (the simulation's ClientApps do:
they share the ServerApp's model). ``--runtime flower`` starts and stops a worker with each
local SuperNode; beside a SuperNode of your own (docs/flower.md)::

    python -m fedtune.runtimes.flower_worker --socket /run/fedtune/node0.sock

Only processes that can open the socket file can use the worker (it is made owner-only).
What a message's client state is (kd's local model) travels as bytes: the ClientApp keeps it in
Flower's node state, so a restarted worker loses nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

NODE_CONFIG_KEY = "fedtune-worker"  # the node config entry naming the worker's socket

_contexts: dict[str, Any] = {}  # config JSON -> fedtune Context: one run's model per process
_frameworks: dict[int, Any] = {}  # id(Context) -> the client-side Framework of that run


def shared_context(cfg, run: str = ""):
    """One model and data per process, run and config. In simulation the ServerApp and every
    ClientApp run in one process and share it, exactly as the in-process runtime does; a
    worker keeps it for the messages of one deployment run (``run``: Flower's run id)."""
    from ..config import to_dict
    from ..frameworks.base import Context

    key = run + json.dumps(to_dict(cfg), sort_keys=True)
    if key not in _contexts:
        forget()  # a new run in this process: drop the previous run's model
        start = time.perf_counter()
        _contexts[key] = Context.build(cfg)
        if run:
            print(f"fedtune worker: run {run}: built {cfg.model.name} and data in {time.perf_counter() - start:.1f} s",
                  flush=True)
    return _contexts[key]


def forget() -> None:
    """Drop the model a previous run trained: a new run (a resumed one too) starts from scratch."""
    _contexts.clear()
    _frameworks.clear()


def _framework(cfg, run: str = ""):
    from ..frameworks import get

    ctx = shared_context(cfg, run)
    if id(ctx) not in _frameworks:
        _frameworks[id(ctx)] = get(cfg.framework)(ctx)
    return _frameworks[id(ctx)]


def client_round(control: dict, blob: bytes, state: bytes | None) -> tuple[bytes, dict, bytes | None]:
    """One client's round: ``control`` (round, client, config JSON, the split channel's address,
    Flower's run id in a worker), the server's blob and the client's state -> (upload blob,
    metrics record, new state)."""
    from ..config import from_dict
    from .channel import ChannelClient, ChannelInfo
    from .rounds import MeteredLink, run_client

    cfg = from_dict(json.loads(control["config"]))
    rnd, cid = int(control["round"]), int(control["client"])
    fw = _framework(cfg, control.get("run", ""))
    channel = None
    if control.get("channel_address"):
        root = control["channel_root"].encode() or None
        info = ChannelInfo(control["channel_address"], control["channel_token"], root)
        channel = ChannelClient(info, rnd, cid)
    try:
        reply = run_client(fw, rnd, cid, blob, state_from_bytes(state), MeteredLink(channel) if channel else None)
    finally:
        if channel:
            channel.close()
    return reply.blob, reply.record, state_to_bytes(reply.state)


def state_to_bytes(state) -> bytes | None:
    # A client's state as Flower carries it (node state, the server's checkpoint): control data,
    # not protocol traffic, so it is not metered.
    if state is None:
        return None
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def state_from_bytes(blob: bytes | None):
    if blob is None:
        return None
    import io

    import torch

    return torch.load(io.BytesIO(blob), weights_only=False)


# =========================================================================== the ClientApp's side


def ask(path: str, control: dict, blob: bytes = b"", state: bytes | None = None,
        connect_timeout_s: float = 300.0) -> tuple[bytes, dict, bytes | None]:
    """``client_round`` in the worker at ``path``. A worker that is still starting (importing
    torch) is waited for; a worker that failed raises its error here, so the ClientApp's
    reply carries it to the server."""
    with _connect(path, connect_timeout_s) as conn:
        _send(conn, {"control": control}, blob, state)
        head, up, new_state = _recv(conn)
    if "error" in head:
        raise RuntimeError(f"fedtune worker {path}: {head['error']}")
    return up, head.get("record", {}), new_state


def _connect(path: str, timeout: float) -> Connection:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Client(path, family="AF_UNIX")
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no fedtune worker at {path} after {timeout:g} s "
                                   f"(start one: python -m fedtune.runtimes.flower_worker --socket {path})") from None
            time.sleep(0.1)


# A request and a reply are three frames: a JSON head, a blob, a state (head["state"]: present).
def _send(conn: Connection, head: dict, blob: bytes, state: bytes | None) -> None:
    conn.send_bytes(json.dumps({**head, "state": state is not None}).encode())
    conn.send_bytes(blob)
    conn.send_bytes(state or b"")


def _recv(conn: Connection) -> tuple[dict, bytes, bytes | None]:
    head = json.loads(conn.recv_bytes())
    blob, state = conn.recv_bytes(), conn.recv_bytes()
    return head, blob, state if head["state"] else None


# =========================================================================== the worker


def serve(path: str) -> None:
    """Answer rounds on ``path``, one at a time (the node's one model), until killed. A request
    without a round (the run's first message, the server's ``query``) builds the run's model
    (importing torch the first time) before it is answered: the server starts round 1 once
    every node is ready, and no round waits for a model to load."""
    from ..config import from_dict

    if os.path.exists(path):
        os.unlink(path)  # a previous worker's socket
    old = os.umask(0o177)  # the socket file is owner-only from the moment it exists
    try:
        listener = Listener(path, family="AF_UNIX")
    finally:
        os.umask(old)
    print(f"fedtune worker: listening on {path}", flush=True)
    while True:
        with listener.accept() as conn:
            try:
                head, blob, state = _recv(conn)
            except (EOFError, OSError):
                continue  # the ClientApp went away (its SuperNode stopped it)
            control = head["control"]
            try:
                if "round" in control:
                    up, record, new_state = client_round(control, blob, state)
                    reply = ({"record": record}, up, new_state)
                else:  # the run's first message: load its model, then answer
                    _framework(from_dict(json.loads(control["config"])), control.get("run", ""))
                    reply = ({}, b"", None)
            except Exception as exc:  # noqa: BLE001 - the server gets the error in the client's reply
                traceback.print_exc()
                reply = ({"error": f"{type(exc).__name__}: {exc}"}, b"", None)
            try:
                _send(conn, *reply)
            except OSError:
                pass  # the ClientApp went away; the server counts the client as dropped


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fedtune.runtimes.flower_worker", description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True, help="unix socket path; name it in the SuperNode's node config as "
                                                   f"{NODE_CONFIG_KEY}='PATH'")
    args = p.parse_args(argv)
    try:
        serve(args.socket)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
