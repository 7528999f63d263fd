"""A run's numbers: the per-round, per-client metrics log (``metrics.jsonl``), its per-round
view and the run summary."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

MB = 1e6


class MetricsLog:
    """``metrics.jsonl``: one JSON object per client per round, and one ``client: "server"``
    record per round."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, rnd: int) -> None:
        """Drop records of rounds after ``rnd`` (a resumed run redoes them)."""
        keep = [r for r in self.records() if r["round"] <= rnd]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def per_round(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per round: the server's test metrics and the mean per participating client."""
    server: dict[int, dict[str, Any]] = defaultdict(dict)
    client_recs: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["client"] == "server":
            server[r["round"]] = r
        else:
            client_recs[r["round"]].append(r)
    rows = []
    for rnd in sorted(set(server) | set(client_recs)):
        row, clients = server[rnd], client_recs[rnd]
        n = max(len(clients), 1)
        mean = lambda key: sum(c.get(key, 0) or 0 for c in clients) / n  # noqa: E731
        rows.append(
            {
                "round": rnd,
                "test_accuracy": row.get("test_accuracy"),
                "test_loss": row.get("test_loss"),
                "val_accuracy": row.get("val_accuracy"),  # data.val_size rows; None without them
                "clients": len(clients),
                "mb_up_per_client": mean("bytes_up") / MB,
                "mb_down_per_client": mean("bytes_down") / MB,
                "gflops_per_client": mean("client_flops") / 1e9,
                "client_seconds": mean("client_seconds"),
                "client_peak_mem_mb": max((c.get("client_peak_mem_bytes", 0) for c in clients), default=0) / MB,
                "train_loss": mean("train_loss"),
                "round_seconds": row.get("round_seconds"),
            }
        )
    return rows


def summarize(records: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    rows = per_round(records)
    if not rows:
        return dict(extra or {})
    avg = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    accs = [r["test_accuracy"] for r in rows if r["test_accuracy"] is not None]
    summary = {
        "rounds": len(rows),
        "final_test_accuracy": rows[-1]["test_accuracy"],
        "best_test_accuracy": max(accs) if accs else None,
        "final_test_loss": rows[-1]["test_loss"],
        "mb_up_per_client_per_round": avg("mb_up_per_client"),
        "mb_down_per_client_per_round": avg("mb_down_per_client"),
        "gflops_per_client_per_round": avg("gflops_per_client"),
        "client_seconds_per_round": avg("client_seconds"),
        "client_peak_mem_mb": max(r["client_peak_mem_mb"] for r in rows),
        "round_seconds": avg("round_seconds") if all(r["round_seconds"] is not None for r in rows) else None,
        "total_mb": sum(r.get("bytes_up", 0) + r.get("bytes_down", 0) for r in records if r["client"] != "server") / MB,
    }
    vals = [r["val_accuracy"] for r in rows if r["val_accuracy"] is not None]
    if vals:  # data.val_size: what a sweep selects on (docs/sweeps.md)
        summary.update(final_val_accuracy=rows[-1]["val_accuracy"], best_val_accuracy=max(vals))
    from .continual import summary as continual_summary  # the forgetting matrix of a continual run

    summary.update(continual_summary(records))
    summary.update(extra or {})
    return summary
