"""What each client keeps between its rounds (``ClientResult.state``: SCAFFOLD's variates, kd's
local model, a personalization method's personal part), over runs of many clients of which few
take part a round. The states of the round's clients stay in memory; every other client's state
lives in its own file, ``RUN/client_states/K.pt``, read back when the client is sampled again.
Memory and the checkpoint then follow the clients sampled a round, not the number of clients.

Why resume stays exact without versioned files: a file is only ever written with a state that
the last checkpoint already holds, and removed only once no checkpoint names it. A state changes
only in its client's round, in memory; at the round's end ``spill`` writes out the states of the
clients that did not take part (unchanged since the last checkpoint held them), then the new
checkpoint is saved (the in-memory states, and which clients are on disk), then the files it
no longer names go (``drop_stale``). Wherever a run is killed, the files and the checkpoint it
resumes from agree."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import torch

from ..errors import FedtuneError

DIRNAME = "client_states"


class ClientStates(MutableMapping[int, Any]):
    """client id -> its kept state, in memory or in ``directory``. Reading a state that is on disk
    loads a copy and keeps nothing, so iterating every client (the run's end) holds one at a
    time; assigning puts the state in memory, where it stays until the next ``spill``."""

    def __init__(self, directory: str | Path, memory: dict[int, Any] | None = None, disk: Iterable[int] = ()):
        self.directory = Path(directory)
        self.memory: dict[int, Any] = dict(memory or {})
        self.disk: set[int] = set(disk) - set(self.memory)  # clients whose file holds their current state
        self.stale: set[int] = set()  # files superseded since the last checkpoint, which may still name them

    @classmethod
    def of_run(cls, run: str | Path, ckpt: dict | None) -> "ClientStates":
        """The states a run directory's checkpoint names; empty before the first round. A
        checkpoint from before these files (every state in ``client_states``) reads as all in memory."""
        directory = Path(run) / DIRNAME
        if not ckpt:
            return cls(directory)
        if "clients" not in ckpt:
            return cls(directory, ckpt.get("client_states") or {})
        saved = ckpt["clients"]
        store = cls(directory, saved["memory"], saved["disk"])
        missing = [cid for cid in sorted(store.disk) if not store.path(cid).is_file()]
        if missing:
            raise FedtuneError(f"{directory}: the checkpoint names client states that are not there "
                               f"(clients {missing[:5]}{'...' if len(missing) > 5 else ''}); start a new run")
        return store

    def path(self, cid: int) -> Path:
        return self.directory / f"{cid}.pt"

    # ---- the mapping
    def __getitem__(self, cid: int) -> Any:
        if cid in self.memory:
            return self.memory[cid]
        if cid in self.disk:
            return torch.load(self.path(cid), weights_only=False)
        raise KeyError(cid)

    def __setitem__(self, cid: int, state: Any) -> None:
        self.memory[cid] = state
        self._supersede(cid)

    def __delitem__(self, cid: int) -> None:
        if cid not in self:
            raise KeyError(cid)
        self.memory.pop(cid, None)
        self._supersede(cid)

    def __contains__(self, cid: object) -> bool:  # without loading the state from disk
        return cid in self.memory or cid in self.disk

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.memory.keys() | self.disk))

    def __len__(self) -> int:
        return len(self.memory.keys() | self.disk)

    # ---- memory and disk
    def spill(self, keep: Iterable[int]) -> None:
        """Write every in-memory state but those of ``keep`` (the round's clients) to its file and
        let go of it. Call it before saving the round's checkpoint (see the module's docstring)."""
        keep = set(keep)
        for cid in [c for c in self.memory if c not in keep]:
            self._write(cid, self.memory[cid])
            del self.memory[cid]
            self.disk.add(cid)
            self.stale.discard(cid)

    def checkpoint(self) -> dict[str, Any]:
        """What the round's checkpoint records: the in-memory states and which clients are on disk."""
        return {"memory": dict(self.memory), "disk": sorted(self.disk)}

    def drop_stale(self) -> None:
        """Remove the files superseded since the last checkpoint; call it once the new one is saved."""
        for cid in self.stale:
            self.path(cid).unlink(missing_ok=True)
        self.stale.clear()

    def prune(self) -> None:
        """Remove the files no state here is read from: those of a run redone from round 1 in this
        directory, a write cut short by a kill, a superseded file a kill left behind."""
        if not self.directory.is_dir():
            return
        current = {self.path(cid).name for cid in self.disk}
        for p in self.directory.iterdir():
            if p.is_file() and p.name not in current:
                p.unlink()

    def _supersede(self, cid: int) -> None:
        # Its file no longer holds its state, but the last checkpoint may name it: it goes once
        # the next checkpoint is saved (``drop_stale``).
        if cid in self.disk:
            self.disk.discard(cid)
            self.stale.add(cid)

    def _write(self, cid: int, state: Any) -> None:
        # Written then renamed: a run killed while writing keeps the file's previous version.
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(cid)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
