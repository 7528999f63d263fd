"""The in-process runtime: every simulated client and the server share one process and one
frozen base model; clients swap in their small tunable state, so memory does not grow with
the number of clients. Messages are still serialized and decoded, so the bytes counted are
the bytes a network would carry."""

from __future__ import annotations

from ..console import Progress
from ..frameworks import get
from ..frameworks.base import Context, Framework
from ..rundir import RunDir
from .rounds import Grid, MeteredLink, Serve, run_client, run_rounds


class InProcessGrid(Grid):
    """Runs each sampled client in turn, in this process. Like a node, it keeps each client's
    state between rounds."""

    def __init__(self, fw: Framework, progress: Progress):
        self.fw, self.progress = fw, progress
        self.states: dict[int, object] = {}
        self.serve: Serve | None = None

    def start(self, serve):
        self.serve = serve

    def fit(self, rnd, blobs, restore, on_reply):
        self.states.update(restore)
        for pos, (cid, blob) in enumerate(blobs.items(), 1):
            self.progress.client(rnd, cid, pos, len(blobs))
            link = MeteredLink(lambda b, c=cid: self.serve(rnd, c, b)) if self.serve else None
            reply = run_client(self.fw, rnd, cid, blob, self.states.get(cid), link)
            if reply.state is not None:
                self.states[cid] = reply.state
            on_reply(cid, reply)
        return {}


def run(cfg, rundir: RunDir, progress: Progress | None = None, resume: bool = False):
    progress = progress or Progress()
    ctx = Context.build(cfg)
    ctx.on_step = progress.step
    fw = get(cfg.framework)(ctx)
    return run_rounds(fw, InProcessGrid(fw, progress), rundir, progress, resume)
