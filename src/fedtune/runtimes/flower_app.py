"""fedtune's Flower ServerApp and ClientApp (Message API of flwr 1.42).

The apps only move bytes: the server side runs ``rounds.run_rounds`` over a ``FlowerGrid``, the
client side runs ``rounds.run_client``. Each message carries the very blob the in-process runtime meters
(``wire.serialize``), as one uint8 array, so bytes_up/bytes_down agree across runtimes.
What a message carries besides the blob (round, client id, the run config, the split
channel's address) is control data, not counted, as in the in-process runtime.

This module imports only flwr and numpy: in deployment every message starts a fresh ClientApp
process, which hands the round to its node's warm worker (runtimes/flower_worker.py) and must
not pay for importing torch. In simulation the ClientApp runs the round itself, in-process.
"""

from __future__ import annotations

import json
import time
import zlib

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from . import flower_compat  # the flwr version check, before any message moves
from . import flower_worker

BLOB, CONTROL, STATE = "blob", "control", "fedtune-state"
# The keys of the app's run config (the generated FAB's [tool.flwr.app.config]).
RUN_CONFIG, RUN_DIR, RUN_RESUME = "fedtune-config", "fedtune-rundir", "fedtune-resume"


def _blob_record(blob: bytes) -> ArrayRecord:
    return ArrayRecord({BLOB: Array(np.frombuffer(blob, dtype=np.uint8))})


def _blob(content: RecordDict) -> bytes:
    return content.array_records[BLOB][BLOB].numpy().tobytes()


# =========================================================================== server


class FlowerGrid:
    """The round loop's Grid over Flower's: each sampled client's blob goes to its SuperNode as
    a ``train`` message; the loop waits at most fed.client_timeout_s for the replies. A framework
    that talks per batch trains its clients one after another (its server part learns from each
    batch, so the order of batches is the result)."""

    keeps_states = True  # each SuperNode keeps its client's state; the loop hands it back after --resume only

    def __init__(self, grid: Grid, cfg, max_weight: float = 0.0):
        self.grid, self.cfg = grid, cfg
        self.config_json = json.dumps(_to_dict(cfg))
        self.nodes: dict[int, int] = {}
        self.channel = None
        self.max_weight = max_weight  # privacy.secagg: the largest weight a client reports (its rows)
        self._summed = None

    def start(self, serve):
        self.nodes = discover(self.grid, self.cfg)
        if serve is not None:  # the framework talks per batch: open the channel
            from .channel import ChannelServer

            f = self.cfg.flower
            self.channel = ChannelServer(serve, f.channel_bind, f.channel_host, f.channel_certfile,
                                         f.channel_keyfile, f.channel_ca_certfile)

    def fit(self, rnd, blobs, restore, on_reply):
        from .rounds import Reply

        if self.cfg.privacy.secagg:
            return self._fit_secagg(rnd, blobs, restore, on_reply)
        messages, online = {}, set(self.grid.get_node_ids())
        for cid, blob in blobs.items():
            if self.nodes[cid] not in online:
                continue  # its SuperNode is gone: the loop counts it as dropped
            control = {"round": rnd, "client": cid, "config": self.config_json}
            if self.channel:
                info = self.channel.info
                control.update(channel_address=info.address, channel_token=info.token,
                               channel_root=(info.root_certificates or b"").decode())
            content = RecordDict({BLOB: _blob_record(blob), CONTROL: ConfigRecord(control)})
            if cid in restore:  # a resumed run: the node continues from the checkpointed state
                content[STATE] = ConfigRecord({"state": flower_worker.state_to_bytes(restore[cid])})
            messages[cid] = Message(content, dst_node_id=self.nodes[cid], message_type="train")
        errors, seconds, replies = {}, {}, {}
        timeout = self.cfg.fed.client_timeout_s or None
        if self.channel:  # one server part serves the clients in turn, in sampled order, as in-process
            for cid, message in messages.items():
                replies.update(exchange(self.grid, {cid: message}, timeout, seconds))
        else:
            replies = exchange(self.grid, messages, timeout, seconds)
        for cid in blobs:  # in sampled order, as in-process
            if cid not in replies:
                continue
            if replies[cid].has_error():  # the ClientApp raised, or Flower found its node gone
                errors[cid] = replies[cid].error.reason
                continue
            content = replies[cid].content
            state = None
            if STATE in content.config_records:
                state = flower_worker.state_from_bytes(content.config_records[STATE]["state"])
            record = json.loads(content.config_records[CONTROL]["record"])
            # What the message cost, as the server saw it: Flower's routing, the ClientApp's start
            # and the client's round (client_seconds of it).
            record["message_seconds"] = seconds[cid]
            on_reply(cid, Reply(_blob(content), state, record))
        return errors

    def _fit_secagg(self, rnd, blobs, restore, on_reply):
        """privacy.secagg: the round as Flower's SecAgg+ runs it. Each client's round runs inside
        the protocol's masking stage; the server gets each client's metrics record and state
        (control data, as always) but its upload only as a masked vector, and of the uploads only
        their weighted mean (``summed``). The records add what the protocol cost: the serialized
        size of every Flower message of the round each way (``secagg_bytes_up/down``), the seconds
        its stages spent on the client outside the client's round; ``bytes_up`` is the masked
        vector, the one form in which the upload left the client."""
        from ..errors import FedtuneError
        from .rounds import Reply, Sum

        p, online, self._summed = self.cfg.privacy, set(self.grid.get_node_ids()), None
        fitins = {}
        for cid, blob in blobs.items():
            if self.nodes[cid] not in online:
                continue  # its SuperNode is gone: the loop counts it as dropped
            config = {"round": rnd, "client": cid, "config": self.config_json}
            if cid in restore:
                config[STATE] = flower_worker.state_to_bytes(restore[cid])
            fitins[self.nodes[cid]] = (blob, config)
        metered = MeteredGrid(self.grid)
        start = time.perf_counter()
        results, mean = flower_compat.secagg_round(
            metered, self.grid.run.run_id, rnd, fitins, self.max_weight, p.secagg_clip_range,
            p.secagg_quantization_range, p.secagg_reconstruction_threshold, self.cfg.fed.client_timeout_s or None)
        seconds = time.perf_counter() - start
        cid_of = {node: cid for cid, node in self.nodes.items()}
        errors = {cid_of[node]: reason for node, reason in metered.errors.items()}
        if mean is None:  # the protocol halted: no sum, no upload
            return {cid: errors.get(cid, "SecAgg+ halted: too few clients answered for "
                                         "privacy.secagg_reconstruction_threshold") for cid in blobs}
        layouts = {metrics["layout"] for _, metrics in results.values()}
        if len(layouts) != 1:
            raise FedtuneError(f"round {rnd}: privacy.secagg sums equal-shaped uploads; the clients' differ")
        for cid in blobs:  # in sampled order, as in-process
            node = self.nodes[cid]
            if node not in results:
                continue
            metrics = results[node][1]
            record = json.loads(metrics["record"])
            record.update(bytes_up=metered.masked[node], secagg_bytes_up=metered.up[node],
                          secagg_bytes_down=metered.down[node], secagg_client_seconds=metered.seconds[node])
            state = flower_worker.state_from_bytes(metrics[STATE]) if STATE in metrics else None
            on_reply(cid, Reply(None, state, record))
        record = {"secagg_bytes_up": sum(metered.up.values()), "secagg_bytes_down": sum(metered.down.values()),
                  "secagg_server_seconds": seconds - metered.waited}
        weight = sum(w for w, _ in results.values())
        self._summed = Sum(_upload_blob(layouts.pop(), mean), weight, record)
        return errors

    def summed(self):
        return self._summed

    def stop(self):
        if self.channel:
            self.channel.stop()


class MeteredGrid:
    """Flower's Grid as SecAgg+'s workflow uses it (``send_and_receive``), counting per node the
    serialized size of every message each way (as pushed to Flower, as pulled from it), the
    bytes of the masked vectors and the seconds each stage spent on the node outside its round.
    ``waited``: the seconds the server spent waiting for replies, not computing."""

    def __init__(self, grid: Grid):
        from collections import Counter

        self.grid = grid
        self.down, self.up, self.masked, self.seconds = Counter(), Counter(), Counter(), Counter()
        self.errors: dict[int, str] = {}
        self.waited = 0.0

    def send_and_receive(self, messages, *, timeout=None):
        messages = dict(enumerate(messages))
        start = time.perf_counter()
        replies = exchange(self.grid, messages, timeout)
        self.waited += time.perf_counter() - start
        for msg in messages.values():  # as pushed: Flower gave each its id
            self.down[msg.metadata.dst_node_id] += flower_compat.message_bytes(msg)
        for key, reply in replies.items():
            node = messages[key].metadata.dst_node_id  # an error reply comes from the SuperLink
            self.up[node] += flower_compat.message_bytes(reply)
            if reply.has_error():
                self.errors[node] = reply.error.reason
                continue
            self.masked[node] += flower_compat.masked_bytes(reply)
            self.seconds[node] += flower_compat.reply_seconds(reply)
        return list(replies.values())


def _upload_arrays(blob: bytes) -> tuple[list[np.ndarray], str]:
    """An upload (the wire format: safetensors) -> its tensors as arrays in name order, and its
    layout (names, dtypes, shapes, metadata): what SecAgg+ does not hide. numpy only: a
    deployment ClientApp does not import torch."""
    from safetensors.numpy import load

    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
    meta = header.pop("__metadata__", {})
    names = sorted(header)
    bad = sorted({header[n]["dtype"] for n in names} - set(_DTYPES))
    if bad:
        raise ValueError(f"privacy.secagg sums float tensors; this upload has {bad}")
    tensors = load(blob)
    layout = json.dumps({"meta": meta, "tensors": [[n, header[n]["dtype"], header[n]["shape"]] for n in names]})
    return [tensors[n] for n in names], layout


_DTYPES = ("F64", "F32", "F16")  # what numpy reads from safetensors


def _upload_blob(layout: str, arrays: list[np.ndarray]) -> bytes:
    """The inverse of ``_upload_arrays`` for SecAgg+'s float64 mean: one upload, serialized."""
    import torch

    from ..wire import Message, serialize

    spec = json.loads(layout)
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16}
    tensors = {name: torch.from_numpy(np.asarray(a, dtype=np.float64).reshape(shape)).to(dtypes[dtype])
               for (name, dtype, shape), a in zip(spec["tensors"], arrays, strict=True)}
    return serialize(Message(tensors, json.loads(spec["meta"].get("meta", "{}"))))


def run_server(grid: Grid, cfg, rundir, resume: bool = False, progress=None) -> dict:
    from ..frameworks import get
    from .rounds import run_rounds

    ctx = flower_worker.shared_context(cfg)
    if progress is not None:
        ctx.on_step = progress.step
    fw = get(cfg.framework)(ctx)
    # SecAgg+ scales each upload by its weight over a bound every client's weight (its rows) respects.
    max_weight = max(len(rows) for rows in ctx.data.clients)
    return run_rounds(fw, FlowerGrid(grid, cfg, max_weight), rundir, progress, resume)


def discover(grid: Grid, cfg) -> dict[int, int]:
    """-> {client id: node id}. A client's id is its SuperNode's ``partition-id`` (node
    config), so a client keeps its data and its state whatever order nodes connect in."""
    from ..errors import FedtuneError

    deadline = time.monotonic() + cfg.flower.wait_nodes_s
    while len(list(grid.get_node_ids())) < cfg.fed.clients:
        if time.monotonic() > deadline:
            raise FedtuneError(f"only {len(list(grid.get_node_ids()))} of {cfg.fed.clients} SuperNodes connected "
                               f"within flower.wait_nodes_s={cfg.flower.wait_nodes_s:g}")
        time.sleep(0.2)
    # The query carries the run's config: a node with a worker answers once its worker has built
    # the run's model, so no round waits for a model to load.
    control = ConfigRecord({"config": json.dumps(_to_dict(cfg))})
    queries = {n: Message(RecordDict({CONTROL: control}), dst_node_id=n, message_type="query")
               for n in grid.get_node_ids()}
    nodes: dict[int, int] = {}
    for node, reply in exchange(grid, queries, cfg.flower.wait_nodes_s).items():
        if reply.has_error():
            raise FedtuneError(f"SuperNode {node}: {reply.error.reason}")
        cid = int(reply.content.config_records[CONTROL]["partition-id"])
        if cid in nodes:
            raise FedtuneError(f"two SuperNodes have partition-id={cid}")
        if not 0 <= cid < cfg.fed.clients:
            raise FedtuneError(f"SuperNode partition-id={cid} is outside 0..{cfg.fed.clients - 1} (fed.clients)")
        nodes[cid] = node
    missing = sorted(set(range(cfg.fed.clients)) - set(nodes))
    if missing:
        raise FedtuneError(f"no SuperNode answered for partition-id {missing} within "
                           f"flower.wait_nodes_s={cfg.flower.wait_nodes_s:g} (see its log)")
    return nodes


def exchange(grid: Grid, messages: dict, timeout: float | None, seconds: dict | None = None,
             poll_s: float = 0.1) -> dict:
    """Grid.send_and_receive keyed: {key: message} -> {key: reply} for the replies that came
    within ``timeout`` (None: all); ``seconds`` gets each reply's time since the push. Replies
    are matched by the id of the message they answer: an error Flower generates (node
    unavailable) comes from the SuperLink, not the node. Polls faster than the deployment
    Grid's 3 s."""
    start = time.monotonic()
    pushed = grid.push_messages(list(messages.values()))  # in order; None for one not pushed (= dropped)
    ids = {i: key for i, key in zip(pushed, messages) if i is not None}
    end = start + timeout if timeout else float("inf")
    replies = {}
    while len(replies) < len(ids) and time.monotonic() < end:
        for reply in grid.pull_messages([i for i in ids if ids[i] not in replies]):
            replies[ids[reply.metadata.reply_to_message_id]] = reply
            if seconds is not None:
                seconds[ids[reply.metadata.reply_to_message_id]] = time.monotonic() - start
        if len(replies) < len(ids):
            time.sleep(poll_s)
    return replies


def _to_dict(cfg) -> dict:
    from ..config import to_dict

    return to_dict(cfg)


# The deployment ServerApp: SuperLink starts it in its own process with the run config of
# the app bundle that runtimes/flower.py generated.
server = ServerApp()


@server.main()
def _server_main(grid: Grid, context: Context) -> None:
    from ..config import from_dict
    from ..rundir import RunDir

    cfg = from_dict(json.loads(context.run_config[RUN_CONFIG]))
    run_server(grid, cfg, RunDir(context.run_config[RUN_DIR]), bool(context.run_config[RUN_RESUME]))


# =========================================================================== client

client = ClientApp()


@client.query()
def _query(msg: Message, context: Context) -> Message:
    if "partition-id" not in context.node_config:
        raise ValueError("this SuperNode has no partition-id: start it with --node-config 'partition-id=N'")
    worker = context.node_config.get(flower_worker.NODE_CONFIG_KEY)
    if worker and CONTROL in msg.content.config_records:  # the worker loads the run's model first
        flower_worker.ask(str(worker), {"config": msg.content.config_records[CONTROL]["config"],
                                        "run": str(context.run_id)})
    return Message(RecordDict({CONTROL: ConfigRecord({"partition-id": int(context.node_config["partition-id"])})}),
                   reply_to=msg)


@client.train()
def _train(msg: Message, context: Context) -> Message:
    if flower_compat.is_secagg(msg):  # privacy.secagg: one of SecAgg+'s four stages
        return flower_compat.secagg_client(msg, context, _secagg_fit)
    control = dict(msg.content.config_records[CONTROL])
    state = None
    if STATE in msg.content.config_records:  # a resumed run: the server's checkpointed state wins
        state = msg.content.config_records[STATE]["state"]
    elif STATE in context.state.config_records:  # what this client kept from its previous round
        state = context.state.config_records[STATE]["state"]
    up, record, state = _round(control, _blob(msg.content), state, context)
    content = RecordDict({BLOB: _blob_record(up), CONTROL: ConfigRecord({"record": json.dumps(record)})})
    if state is not None:
        context.state[STATE] = ConfigRecord({"state": state})
        content[STATE] = ConfigRecord({"state": state})  # for the server's checkpoint
    return Message(content, reply_to=msg)


def _round(control: dict, blob: bytes, state: bytes | None, context: Context) -> tuple[bytes, dict, bytes | None]:
    """The client's round, by its node's worker if it has one."""
    if int(context.node_config["partition-id"]) != int(control["client"]):
        raise ValueError(f"message for client {control['client']} reached partition-id "
                         f"{context.node_config['partition-id']}")
    worker = context.node_config.get(flower_worker.NODE_CONFIG_KEY)
    if worker:
        control["run"] = str(context.run_id)
        return flower_worker.ask(str(worker), control, blob, state)
    return flower_worker.client_round(control, blob, state)


def _secagg_fit(blob: bytes, control: dict, context: Context) -> tuple[list[np.ndarray], int, dict]:
    """The client's round inside SecAgg+'s masking stage -> (its upload as arrays, which leave only
    masked, its weight, metrics: its record, the upload's layout and its state as control data)."""
    state = control.pop(STATE, None)  # a resumed run: the server's checkpointed state wins
    if state is None and STATE in context.state.config_records:
        state = context.state.config_records[STATE]["state"]
    up, record, state = _round(control, blob, state, context)
    arrays, layout = _upload_arrays(up)
    clip = json.loads(control["config"])["privacy"]["secagg_clip_range"]
    peak = max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)
    if peak > clip:  # SecAgg+ would clip it silently and the mean would be wrong
        raise ValueError(f"an uploaded value of magnitude {peak:g} exceeds privacy.secagg_clip_range={clip:g}")
    metrics = {"record": json.dumps(record), "layout": layout}
    if state is not None:
        context.state[STATE] = ConfigRecord({"state": state})
        metrics[STATE] = state  # for the server's checkpoint
    # SecAgg+ next rounds each value up or down at random with NumPy's global generator: seeded
    # by (seed, round, client) as training.derive_seed does (not imported: it brings torch), a
    # run is reproducible and a resumed one equals it. Masks use their own secret seeds.
    seed = json.loads(control["config"])["seed"]
    np.random.seed(zlib.crc32(f"{seed}/secagg/{control['round']}/{control['client']}".encode()))
    return arrays, record["num_samples"], metrics
