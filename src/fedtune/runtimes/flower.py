"""The Flower runtimes.

``flower-sim``: Flower's simulation engine (its SuperLink state, Grid and message routing run
in this process). The ``thread`` backend runs each ClientApp in a worker thread of this
process, sharing the one frozen base model with the ServerApp as the in-process runtime does;
``ray`` uses Flower's Ray backend (``pip install "flwr[simulation]==1.41.0"``), one process
per actor.

``flower``: the deployment engine. With ``flower.superlink`` empty, fedtune starts a SuperLink
and ``fed.clients`` SuperNodes on 127.0.0.1 (TLS and SuperNode authentication on, throwaway
certificates and keys) and stops them after the run, whatever happens; else it submits the run
to that SuperLink (docs/flower.md). The app bundle fedtune submits is generated per run: a
shim module naming runtimes/flower_app.py's apps, no dependencies (nothing is installed at run
time: torch would pull CUDA builds), the run config in ``[tool.flwr.app.config]``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import tomli_w

from ..config import to_dict
from ..errors import FedtuneError
from ..console import Progress
from ..rundir import SUMMARY, RunDir
from . import flower_app

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
CONNECTION = "fedtune"
APP_MODULE = "fedtune_flower_app"


def run(cfg, rundir: RunDir, progress: Progress | None = None, resume: bool = False):
    if cfg.runtime == "flower-sim":
        return run_simulation(cfg, rundir, progress, resume)
    return run_deployment(cfg, rundir, progress, resume)


# =========================================================================== simulation


def run_simulation(cfg, rundir: RunDir, progress: Progress | None = None, resume: bool = False):
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation as flwr_run_simulation

    result = {}
    app = ServerApp()

    @app.main()
    def _main(grid, context):
        result["summary"] = flower_app.run_server(grid, cfg, rundir, resume, progress)

    backend = cfg.flower.sim_backend
    with _quiet_flower(), _thread_backend(backend == "thread"):
        flwr_run_simulation(app, flower_app.client, num_supernodes=cfg.fed.clients, backend_name=backend,
                            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    if "summary" not in result:
        raise FedtuneError("the Flower simulation ended without finishing the run (see the log above)")
    return result["summary"]


class ThreadBackend:
    """A Flower simulation backend that runs ClientApps one at a time in the engine's worker
    thread. Flower 1.41 always asks for its Ray backend; ``_thread_backend`` answers this instead."""

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

        try:
            return self.app_fn()(message=message, context=context), context
        except Exception as exc:  # reported to the ServerApp as an error reply, as Ray's backend does
            raise ClientAppException(str(exc)) from exc


@contextlib.contextmanager
def _thread_backend(enabled: bool):
    name = "flwr.server.superlink.fleet.vce.backend.raybackend"
    if not enabled:
        yield
        return
    saved = sys.modules.get(name)
    stub = types.ModuleType(name)
    stub.RayBackend = ThreadBackend
    sys.modules[name] = stub
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved


@contextlib.contextmanager
def _quiet_flower():
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)  # not its per-message INFO lines nor run_simulation's deprecation
    try:
        yield
    finally:
        logger.setLevel(level)


# =========================================================================== deployment


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedtuneError(f"{proc.args[0]} exited with code {proc.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise FedtuneError(f"{proc.args[0]} did not open port {port} in {timeout:g} s; see {log}")


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process's whole group (a SuperLink's ServerApp, a SuperNode's ClientApps),
    then SIGKILL what is left after ``grace`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children of an exited leader may survive it
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1, each in its own process group, with a Flower
    config (``FLWR_HOME``) whose ``fedtune`` connection points at the SuperLink. Use as a
    context manager: everything is stopped on exit, on an error and on Ctrl-C."""

    def __init__(self, workdir: str | Path, logdir: str | Path, tls: bool = True, auth: bool = True):
        self.workdir, self.logdir = Path(workdir), Path(logdir)
        self.tls, self.auth = tls, auth
        self.home = self.workdir / "flwr-home"
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                    "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = 0
        self.ports: list[int] = []  # every port a process of ours listens on or dials
        self.certs = None

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        self.logdir.mkdir(parents=True, exist_ok=True)
        log = open(self.logdir / f"{name}.log", "ab")
        exe = shutil.which(args[0]) or args[0]
        proc = subprocess.Popen([exe, *args[1:]], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def start_superlink(self) -> None:
        from .certs import make_tls

        self.port = free_port()
        self.ports.append(self.port)
        args = ["flower-superlink", "--disable-runtime-dependency-installation", "--port", str(self.port)]
        if self.tls:
            self.certs = make_tls(self.workdir / "tls")
            args += ["--ssl-ca-certfile", str(self.certs.ca_cert), "--ssl-certfile", str(self.certs.cert),
                     "--ssl-keyfile", str(self.certs.key)]
        else:
            args.append("--insecure")
        if self.auth:
            args.append("--enable-supernode-auth")
        proc = self._spawn("superlink", args)
        _wait_port(self.port, proc, self.logdir / "superlink.log")
        write_connection(self.home, f"127.0.0.1:{self.port}", str(self.certs.ca_cert) if self.tls else "")

    def start_supernode(self, partition: int, num_partitions: int, register: bool = True) -> subprocess.Popen:
        """A SuperNode for client ``partition``; with authentication on, its key pair is made
        and (if ``register``) registered with the SuperLink first."""
        from .certs import make_node_keys

        name, port = f"supernode{partition}", free_port()
        self.ports.append(port)
        args = ["flower-supernode", "--superlink", f"127.0.0.1:{self.port}", "--port", str(port),
                "--node-config", f"partition-id={partition} num-partitions={num_partitions}",
                "--max-retries", "0"]
        args += ["--root-certificates", str(self.certs.ca_cert)] if self.tls else ["--insecure"]
        if self.auth:
            private, public = make_node_keys(self.workdir / "keys", name)
            if register:
                self.flwr(["supernode", "register", str(public), CONNECTION])
            args += ["--auth-supernode-private-key", str(private)]
        return self._spawn(name, args)

    def flwr(self, args: list[str], timeout: float = 60.0) -> str:
        """Run the ``flwr`` CLI against this federation -> its output."""
        exe = shutil.which("flwr") or "flwr"
        try:
            out = subprocess.run([exe, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise FedtuneError(f"flwr {' '.join(args)} timed out after {timeout:g} s") from None
        if out.returncode != 0:
            raise FedtuneError(f"flwr {' '.join(args[:2])} failed: {(out.stdout + out.stderr).strip()[-500:]}")
        return out.stdout

    def stop(self) -> None:
        for name in reversed(list(self.procs)):  # SuperNodes first, the SuperLink last
            stop_process(self.procs.pop(name))
        # Flower starts helpers (SuperExec, ServerApp, ClientApps) that may outlive their group's
        # leader for a moment; each names the SuperLink's or its SuperNode's address.
        deadline = time.monotonic() + 10
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def leftovers(self) -> list[int]:
        return sorted({pid for port in self.ports for pid in processes_mentioning(f"127.0.0.1:{port}")})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def processes_mentioning(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line contains ``marker``."""
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


def write_connection(home: Path, address: str, root_certificates: str = "") -> None:
    """The Flower CLI config (``$FLWR_HOME/config.toml``) with one connection, ``fedtune``."""
    conn = {"address": address}
    if root_certificates:
        conn["root-certificates"] = str(Path(root_certificates).resolve())
    else:
        conn["insecure"] = True
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))


def write_app(directory: Path, cfg, rundir: RunDir, resume: bool) -> Path:
    """The Flower app bundle fedtune submits: its apps live in the installed fedtune package."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{APP_MODULE}.py").write_text(
        "from fedtune.runtimes import flower_app\n\n"
        "# Assigned, not imported by name: flwr checks the names statically.\n"
        "server = flower_app.server\nclient = flower_app.client\n"
    )
    pyproject = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        # No dependencies: the SuperLink and SuperNodes run in an environment with fedtune
        # installed, and nothing may be installed at run time.
        "project": {"name": "fedtune-flower-app", "version": "1.0.0", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "fedtune",
            "components": {"serverapp": f"{APP_MODULE}:server", "clientapp": f"{APP_MODULE}:client"},
            "config": {flower_app.RUN_CONFIG: json.dumps(to_dict(cfg)),
                       flower_app.RUN_DIR: str(rundir.path.resolve()),
                       flower_app.RUN_RESUME: bool(resume)},
        }}},
    }
    (directory / "pyproject.toml").write_text(tomli_w.dumps(pyproject))
    return directory


def run_deployment(cfg, rundir: RunDir, progress: Progress | None = None, resume: bool = False,
                   federation: LocalFederation | None = None):
    """Submit the run with ``flwr run`` and follow it until the ServerApp has written the summary.
    ``federation``: an already started LocalFederation (tests); else one is started when
    flower.superlink is empty."""
    progress = progress or Progress()
    with tempfile.TemporaryDirectory(prefix="fedtune-flower-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        stack.enter_context(_sigterm_unwinds())
        if federation is None and not cfg.flower.superlink:
            federation = stack.enter_context(LocalFederation(tmp, rundir.path / "flower", cfg.flower.local_tls,
                                                             cfg.flower.local_auth))
            federation.start_superlink()
            for cid in range(cfg.fed.clients):
                federation.start_supernode(cid, cfg.fed.clients)
        if federation is not None:
            home = federation.home
        else:
            home = tmp / "flwr-home"
            write_connection(home, cfg.flower.superlink, cfg.flower.root_certificates)
        app = write_app(tmp / "app", cfg, rundir, resume)
        env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
        return _submit_and_follow(cfg, rundir, progress, app, env)


@contextlib.contextmanager
def _sigterm_unwinds():
    """SIGTERM would end Python without running ``finally``: make it unwind like Ctrl-C so
    the SuperLink and SuperNodes are stopped (SIGKILL cannot be caught by anyone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _submit_and_follow(cfg, rundir: RunDir, progress: Progress, app: Path, env: dict):
    (rundir.path / SUMMARY).unlink(missing_ok=True)
    log_path = rundir.path / "flower" / "run.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("flwr") or "flwr"
    wall = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([exe, "run", str(app), CONNECTION, "--stream"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    run_id, seen = None, 0
    progress.start(cfg.fed.rounds, 1)
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            if run_id is None:
                m = re.search(r"Successfully started run (\d+)", log_path.read_text(errors="replace"))
                run_id = m.group(1) if m else None
            for rec in rundir.metrics.records()[seen:]:
                seen += 1
                if rec["client"] == "server":
                    progress.round_done(rec["round"], rec)
            if (rundir.path / SUMMARY).is_file():
                break  # the ServerApp is done; the log stream may lag behind
    except BaseException:  # Ctrl-C or an error here: stop the run on the SuperLink too
        if run_id is not None:
            subprocess.run([exe, "stop", run_id, CONNECTION], env=env, capture_output=True, timeout=30)
        raise
    finally:
        progress.stop()
        stop_process(proc, grace=2.0)
    if not (rundir.path / SUMMARY).is_file():
        tail = log_path.read_text(errors="replace")[-1500:]
        raise FedtuneError(f"the Flower run ended without a summary (log: {log_path}):\n{tail}")
    summary = json.loads((rundir.path / SUMMARY).read_text())
    summary["submit_wall_seconds"] = time.perf_counter() - wall
    return summary
