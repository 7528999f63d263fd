"""What SecAgg+ (privacy.secagg) adds per round: bytes each way, seconds, and whether the accuracy
changes. Reads a plain run directory and a SecAgg+ run directory of the same config and prints
one markdown table row per round (docs/results/privacy/secagg/README.md has the commands).

    python experiments/secagg_cost.py PLAIN_RUN_DIR SECAGG_RUN_DIR [--label NAME]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MB = 1e6


def rounds(run: Path) -> dict[int, dict]:
    """{round: {"server": record, "clients": [records]}} from a run's metrics.jsonl."""
    out: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        slot = out.setdefault(r["round"], {"server": None, "clients": []})
        if r["client"] == "server":
            slot["server"] = r
        else:
            slot["clients"].append(r)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("plain")
    p.add_argument("secagg")
    p.add_argument("--label", default="")
    args = p.parse_args()
    plain, secagg = rounds(Path(args.plain)), rounds(Path(args.secagg))
    print("| model | round | MB up plain | MB up secagg | MB down plain | MB down secagg | round s plain | "
          "round s secagg | extra s | SecAgg+ client s (sum) | SecAgg+ server s | accuracy plain | accuracy secagg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rnd in sorted(plain):
        a, b = plain[rnd], secagg[rnd]
        up_a = sum(c["bytes_up"] for c in a["clients"]) / MB
        down_a = sum(c["bytes_down"] for c in a["clients"]) / MB
        up_b, down_b = b["server"]["secagg_bytes_up"] / MB, b["server"]["secagg_bytes_down"] / MB
        sa, sb = a["server"]["round_seconds"], b["server"]["round_seconds"]
        client_s = sum(c["secagg_client_seconds"] for c in b["clients"])
        print(f"| {args.label} | {rnd} | {up_a:.3f} | {up_b:.3f} | {down_a:.3f} | {down_b:.3f} | {sa:.1f} | {sb:.1f} | "
              f"{sb - sa:+.1f} | {client_s:.2f} | {b['server']['secagg_server_seconds']:.2f} | "
              f"{a['server']['test_accuracy']:.4f} | {b['server']['test_accuracy']:.4f} |")


if __name__ == "__main__":
    main()
