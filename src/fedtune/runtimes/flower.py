"""The Flower runtimes.

``flower-sim``: Flower's simulation engine (its SuperLink state, Grid and message routing run
in this process). The ``thread`` backend runs each ClientApp in a worker thread of this
process, sharing the one frozen base model with the ServerApp as the in-process runtime does;
``ray`` uses Flower's Ray backend (``pip install "flwr[simulation]==1.42.0"``), one process
per actor.

``flower``: the deployment engine. With ``flower.superlink`` empty, fedtune starts a SuperLink
and ``fed.clients`` SuperNodes on 127.0.0.1 (TLS and SuperNode authentication on, throwaway
certificates and keys), each with its warm worker (runtimes/flower_worker.py), and stops them
after the run, whatever happens; else it submits the run to that SuperLink (docs/flower.md).
What this needs from Flower beyond its public API is in runtimes/flower_compat.py. The app
bundle fedtune submits is generated per run: a shim module naming runtimes/flower_app.py's apps,
no dependencies (nothing is installed at run time: torch would pull CUDA builds), the run config
in ``[tool.flwr.app.config]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import tomli_w

from ..config import to_dict
from ..errors import FedtuneError
from ..console import Progress
from ..rundir import SUMMARY, RunDir
from . import flower_app
from . import flower_compat as compat

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

    from .flower_worker import forget

    forget()  # clients share the ServerApp's model: this run's, built from scratch
    result = {}
    app = ServerApp()

    @app.main()
    def _main(grid, context):
        result["summary"] = flower_app.run_server(grid, cfg, rundir, resume, progress)

    backend = cfg.flower.sim_backend
    with compat.quiet(), compat.thread_backend() if backend == "thread" else contextlib.nullcontext():
        flwr_run_simulation(app, flower_app.client, num_supernodes=cfg.fed.clients, backend_name=backend,
                            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    if "summary" not in result:
        raise FedtuneError("the Flower simulation ended without finishing the run (see the log above)")
    return result["summary"]


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

    def __init__(self, workdir: str | Path, logdir: str | Path, tls: bool = True, auth: bool = True,
                 workers: bool = True):
        self.workdir, self.logdir = Path(workdir), Path(logdir)
        self.tls, self.auth = tls, auth
        self.use_workers = workers  # False: each ClientApp process builds the model (benchmarks' "before")
        self.home = self.workdir / "flwr-home"
        self.env = compat.environment({**os.environ, "FLWR_HOME": str(self.home), "FLWR_TELEMETRY_ENABLED": "0",
                                       "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = 0
        self.ports: list[int] = []  # every port a process of ours listens on or dials
        self.workers: list[subprocess.Popen] = []  # one warm worker per SuperNode, in its process group
        self.sockets = Path(tempfile.mkdtemp(prefix="fedtune-w-"))  # short: a unix socket path has <= 107 bytes
        self.certs = None

    def _spawn(self, name: str, args: list[str], group: int = 0) -> subprocess.Popen:
        """Start ``args`` logging to ``<logdir>/<name>.log``, leading a new process group (``group``
        0) or joining ``group``: stop_process ends a group, Ctrl-C in a terminal reaches none."""
        self.logdir.mkdir(parents=True, exist_ok=True)
        log = open(self.logdir / f"{name}.log", "ab")
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, process_group=group)
        log.close()
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
        proc = self.procs["superlink"] = self._spawn("superlink", [compat.executable(args[0]), *args[1:]])
        _wait_port(self.port, proc, self.logdir / "superlink.log")
        ca = str(self.certs.ca_cert) if self.tls else ""
        compat.write_connection(self.home, CONNECTION, f"127.0.0.1:{self.port}", ca)

    def start_supernode(self, partition: int, num_partitions: int, register: bool = True) -> subprocess.Popen:
        """A SuperNode for client ``partition`` and its warm worker (runtimes/flower_worker.py), in
        one process group; with authentication on, the node's key pair is made and (if
        ``register``) registered with the SuperLink first."""
        from .certs import make_node_keys
        from .flower_worker import NODE_CONFIG_KEY

        name, port = f"supernode{partition}", free_port()
        self.ports.append(port)
        worker = self.sockets / f"{partition}.sock"
        args = ["--superlink", f"127.0.0.1:{self.port}", "--port", str(port),
                "--node-config", f"partition-id={partition} num-partitions={num_partitions}"
                                 + (f" {NODE_CONFIG_KEY}='{worker}'" if self.use_workers else ""),
                "--max-retries", "0"]
        args += ["--root-certificates", str(self.certs.ca_cert)] if self.tls else ["--insecure"]
        if self.auth:
            private, public = make_node_keys(self.workdir / "keys", name)
            if register:
                self.flwr(["supernode", "register", str(public), CONNECTION])
            args += ["--auth-supernode-private-key", str(private)]
        node = self.procs[name] = self._spawn(name, compat.supernode_command(args))
        if self.use_workers:
            command = [sys.executable, "-m", "fedtune.runtimes.flower_worker", "--socket", str(worker)]
            self.workers.append(self._spawn(f"worker{partition}", command, group=node.pid))
        return node

    def flwr(self, args: list[str], timeout: float = 60.0) -> str:
        """Run the ``flwr`` CLI against this federation -> its output."""
        exe = compat.executable("flwr")
        try:
            out = subprocess.run([exe, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise FedtuneError(f"flwr {' '.join(args)} timed out after {timeout:g} s") from None
        if out.returncode != 0:
            raise FedtuneError(f"flwr {' '.join(args[:2])} failed: {(out.stdout + out.stderr).strip()[-500:]}")
        return out.stdout

    def stop(self) -> None:
        for name in reversed(list(self.procs)):  # SuperNodes (and their workers) first, the SuperLink last
            stop_process(self.procs.pop(name))
        for worker in self.workers:  # stopped with its SuperNode's group; reaped here
            if worker.poll() is None:
                worker.kill()
            worker.wait()
        self.workers.clear()
        # Flower starts helpers (SuperExec, ServerApp, ClientApps) that may outlive their group's
        # leader for a moment; each names the SuperLink's or its SuperNode's address.
        deadline = time.monotonic() + 10
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.sockets, ignore_errors=True)

    def leftovers(self) -> list[int]:
        """Live processes of this federation: Flower's (they name our ports) and our workers
        (they name their socket)."""
        markers = [f"127.0.0.1:{port}" for port in self.ports] + [str(self.sockets)]
        return sorted({pid for marker in markers for pid in compat.processes_mentioning(marker)})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


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
            compat.write_connection(home, CONNECTION, cfg.flower.superlink, cfg.flower.root_certificates)
        app = write_app(tmp / "app", cfg, rundir, resume)
        env = compat.environment({**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"})
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
    exe = compat.executable("flwr")
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
                run_id = compat.run_id(log_path.read_text(errors="replace"))
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
