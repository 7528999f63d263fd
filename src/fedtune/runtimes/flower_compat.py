"""Every use of something Flower does not promise to keep, in one place, for one version.

fedtune runs on flwr's public API (``ServerApp``, ``ClientApp``, ``Grid``, ``Message``,
``run_simulation``, the ``flower-superlink``/``flower-supernode``/``flwr`` commands). What it
needs beyond that lives here and only here: the simulation's thread backend (a stand-in module
for Flower's Ray backend), Flower's ``ClientAppException``, the run id that ``flwr run`` prints,
the Flower CLI's config file, where Flower's executables are and how its processes are named.
Importing this module checks the installed flwr is the version all of this was written for,
so a new flwr fails with one line instead of misbehaving. This module imports nothing heavy:
deployment ClientApps import it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import types
from pathlib import Path

import flwr

from ..errors import FedtuneError

FLWR_VERSION = "1.42.0"


def check_version(found: str) -> None:
    if found != FLWR_VERSION:
        raise FedtuneError(f"fedtune's Flower runtimes were written for flwr {FLWR_VERSION}, found flwr {found}: "
                           f"pip install 'flwr=={FLWR_VERSION}'")


check_version(flwr.__version__)

# =========================================================================== simulation

# flwr 1.42's simulation engine always builds its Ray backend, imported from this module.
_RAY_BACKEND_MODULE = "flwr.server.superlink.fleet.vce.backend.raybackend"


class ThreadBackend:
    """A simulation backend that runs ClientApps one at a time in the engine's worker thread
    (of this process), so they share the ServerApp's model. It implements the interface of
    flwr's ``Backend`` (build, num_workers, is_worker_idle, process_message, terminate)."""

    def __init__(self, backend_config):
        self.app_fn = None

    def build(self, app_fn):
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1  # the shared model serves one client at a time

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        pass

    def process_message(self, message, context):
        from flwr.clientapp.client_app import ClientAppException
        from flwr.common.serde import message_from_proto, message_to_proto

        # The ClientApp gets its own copy, as over a network (Ray pickles it): SecAgg+'s client mod
        # edits the message it gets, which the ServerApp shares among the stage's messages.
        message = message_from_proto(message_to_proto(message))
        try:
            return self.app_fn()(message=message, context=context), context
        except Exception as exc:  # reported to the ServerApp as an error reply, as Ray's backend does
            raise ClientAppException(str(exc)) from exc


@contextlib.contextmanager
def thread_backend():
    """While open, Flower's simulation engine gets ``ThreadBackend`` when it asks for Ray's."""
    saved = sys.modules.get(_RAY_BACKEND_MODULE)
    stub = types.ModuleType(_RAY_BACKEND_MODULE)
    stub.RayBackend = ThreadBackend
    sys.modules[_RAY_BACKEND_MODULE] = stub
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop(_RAY_BACKEND_MODULE, None)
        else:
            sys.modules[_RAY_BACKEND_MODULE] = saved


@contextlib.contextmanager
def quiet():
    """Flower logs every message at INFO, and run_simulation's deprecation: keep errors only."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# =========================================================================== deployment



def executable(name: str) -> str:
    """A Flower command (flower-superlink, flower-supernode, flwr): the one installed beside
    this Python first (a virtual environment need not be activated), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FedtuneError(f"{name} not found beside {sys.executable} nor on PATH: pip install 'flwr=={FLWR_VERSION}'")
    return found


def environment(base: dict[str, str]) -> dict[str, str]:
    """``base`` for Flower's processes: the SuperLink and SuperNodes start their SuperExec by name
    (``flower-superexec``), so the directory of Flower's commands goes first on PATH; a SuperExec
    polls for a ClientApp to launch every 0.2 s instead of flwr's 1 s."""
    bindir = str(Path(executable("flwr")).parent)
    return {**base, "PATH": os.pathsep.join([bindir, base.get("PATH", "")]),
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}


# flwr 1.42's SuperNode sleeps a fixed 3 s after each empty poll of the SuperLink, and 0.5 s
# between looks for its ClientApp's reply: a round's messages wait up to 3.5 s on each node for
# nothing. The SuperNodes fedtune starts itself poll at most this often instead.
SUPERNODE_POLL_S = 0.25


def supernode_command(args: list[str]) -> list[str]:
    """The command that runs ``flower-supernode ARGS`` with the shorter poll."""
    return [sys.executable, "-m", __name__, "supernode", *args]


def _supernode(args: list[str]) -> None:
    import time

    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    fast = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fast.sleep = lambda seconds: time.sleep(min(seconds, SUPERNODE_POLL_S))
    start_client_internal.time = fast  # the polling loop's module only
    sys.argv = ["flower-supernode", *args]
    flower_supernode()


def run_id(log_text: str) -> str | None:
    """The run id in ``flwr run``'s output (it has no machine-readable form for a streamed run)."""
    m = re.search(r"Successfully started run (\d+)", log_text)
    return m.group(1) if m else None


def write_connection(home: Path, name: str, address: str, root_certificates: str = "") -> None:
    """The Flower CLI's config (``$FLWR_HOME/config.toml``) with one SuperLink connection, the default."""
    import tomli_w

    conn = {"address": address}
    if root_certificates:
        conn["root-certificates"] = str(Path(root_certificates).resolve())
    else:
        conn["insecure"] = True
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": name, name: conn}}))


def processes_mentioning(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker`` (Linux /proc). Flower's SuperLink and
    SuperNodes start helpers (SuperExec, ServerApp, ClientApps) that are not their children to
    wait for; each names its parent's address on its command line."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            pids.append(int(d.name))
    return pids


# =========================================================================== secure aggregation

# Flower's SecAgg+ (Bell et al., 2020) exists in flwr 1.42 as a legacy workflow: a ``Strategy``
# picks the clients and receives the unmasked aggregate, FitIns/FitRes travel as RecordDicts,
# and the client side is a mod around the ClientApp. fedtune uses all of it as it is: its
# Strategy below only hands out the prepared fit instructions and keeps what SecAgg+ returns.
SECAGG_RECORD = "secaggplus_configs"  # the record SecAgg+'s messages carry its stage in
SECAGG_SECONDS = "fedtune-secagg-seconds"  # fedtune's record in a client's reply: the stage's own seconds


def is_secagg(msg) -> bool:
    """A ``train`` message of SecAgg+'s protocol (any of its four stages)."""
    return SECAGG_RECORD in msg.content.config_records


def secagg_client(msg, context, fit):
    """Run SecAgg+'s client side (``secaggplus_mod``) for one stage; ``fit(blob, config, context)``
    is the client's round (in the masking stage) -> (float arrays, weight, metrics). The reply carries
    the seconds the stage spent outside ``fit`` (keys, shares, masking) for the metrics."""
    import time

    from flwr.app import ConfigRecord, Message
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Code, FitRes, Parameters, Status, ndarray_to_bytes
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

    inside = [0.0]

    def call_next(m, ctx):
        start = time.perf_counter()
        ins = recorddict_to_fitins(m.content, keep_input=True)
        arrays, weight, metrics = fit(ins.parameters.tensors[0], dict(ins.config), ctx)
        res = FitRes(Status(Code.OK, ""), Parameters([ndarray_to_bytes(a) for a in arrays], "numpy.ndarray"),
                     int(weight), metrics)
        inside[0] = time.perf_counter() - start
        return Message(fitres_to_recorddict(res, keep_input=False), reply_to=m)

    start = time.perf_counter()
    reply = secaggplus_mod(msg, context, call_next)
    reply.content[SECAGG_SECONDS] = ConfigRecord({"seconds": time.perf_counter() - start - inside[0]})
    return reply


def message_bytes(msg) -> int:
    """The size of a Flower message as Flower serializes it (its protobuf)."""
    from flwr.common.serde import message_to_proto

    return message_to_proto(msg).ByteSize()


def masked_bytes(reply) -> int:
    """The bytes of the masked vector in a SecAgg+ reply (0 in the other stages)."""
    record = reply.content.config_records.get(SECAGG_RECORD, {})
    return sum(len(b) for b in record.get("masked_params", []))


def reply_seconds(reply) -> float:
    record = reply.content.config_records.get(SECAGG_SECONDS)
    return float(record["seconds"]) if record else 0.0


def secagg_round(grid, run_id: int, rnd: int, fitins: dict[int, tuple[bytes, dict]], max_weight: float,
                 clip_range: float, quantization_range: int, threshold: float, timeout: float | None):
    """One round of SecAgg+ over ``grid`` (anything with ``send_and_receive``) for the nodes in
    ``fitins`` ({node: (blob, config)}) -> ({node: (weight, metrics)} of the clients whose masked
    vectors went into the sum, their weighted mean as a list of float64 arrays), or ({}, None)
    when the protocol halted (too few clients answered a stage). Every node holds one share of
    every other's secrets (SecAgg+'s neighbourhood is the whole sample)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.common import FitIns, Parameters, parameters_to_ndarrays
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import Strategy
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    class Hand(Strategy):  # configure_fit: the prepared instructions; aggregate_fit: keep the sum
        def __init__(self):
            self.results, self.mean = {}, None

        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return [(GridClientProxy(node, grid, run_id), FitIns(Parameters([blob], "fedtune.blob"), config))
                    for node, (blob, config) in fitins.items()]

        def aggregate_fit(self, server_round, results, failures):
            self.results = {proxy.node_id: (res.num_examples, dict(res.metrics)) for proxy, res in results}
            self.mean = parameters_to_ndarrays(results[0][1].parameters) if results else None
            return None, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    hand = Hand()
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: rnd}),
                        MAIN_PARAMS_RECORD: ArrayRecord()})
    context = LegacyContext(Context(run_id, 0, {}, state, {}), strategy=hand)
    workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=float(threshold),
                                  max_weight=float(max_weight), clipping_range=float(clip_range),
                                  quantization_range=int(quantization_range), timeout=timeout)
    with quiet():
        workflow(grid, context)
    return hand.results, hand.mean


if __name__ == "__main__":
    if sys.argv[1:2] != ["supernode"]:
        sys.exit("usage: python -m fedtune.runtimes.flower_compat supernode [flower-supernode options]")
    _supernode(sys.argv[2:])
