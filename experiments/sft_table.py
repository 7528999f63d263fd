"""The tables of docs/results/sft/*/README.md from the run directories of an sft comparison:
    python experiments/sft_table.py OUT        # OUT/before/before.json, OUT/{fedavg,kd,split}/metrics.jsonl
Held-out response loss (perplexity) and exact match per round, then traffic and client compute per
client per round (means over the clients and rounds each framework ran)."""

import json
import sys
from pathlib import Path

FRAMEWORKS = ("fedavg", "kd", "kd-uniform", "split")  # kd-uniform: kd with kd.topk_tail = "uniform"


def records(run: Path) -> tuple[dict[int, dict], list[dict]]:
    server, clients = {}, []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["client"] == "server":
            server[r["round"]] = r
        else:
            clients.append(r)
    return server, clients


def main(out: Path) -> None:
    before = json.loads((out / "before" / "before.json").read_text())
    runs = {fw: records(out / fw) for fw in FRAMEWORKS if (out / fw / "metrics.jsonl").exists()}
    rounds = max(max(s, default=0) for s, _ in runs.values())
    head = "| round | " + " | ".join(f"{fw} loss (ppl) | {fw} exact match" for fw in runs) + " |"
    print(head)
    print("|" + " --- |" * (1 + 2 * len(runs)))
    cell = lambda r: (f"{r['test_loss']:.3f} ({r['test_perplexity']:.2f}) | {100 * r['test_final_number']:.0f}%"
                      if r else "n/a | n/a")
    print("| 0 (untrained) | " + " | ".join(cell(before) for _ in runs) + " |")
    for rnd in range(1, rounds + 1):
        print(f"| {rnd} | " + " | ".join(cell(server.get(rnd)) for server, _ in runs.values()) + " |")
    print()
    print("| framework | MB up | MB down | client GFLOPs | client s | client peak memory (GB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for fw, (_, clients) in runs.items():
        mean = lambda key: sum(c.get(key, 0) for c in clients) / len(clients)  # noqa: E731
        print(f"| {fw} | {mean('bytes_up') / 1e6:.2f} | {mean('bytes_down') / 1e6:.2f} | "
              f"{mean('client_flops') / 1e9:,.0f} | {mean('client_seconds'):.0f} | "
              f"{mean('client_peak_mem_bytes') / 1e9:.1f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
