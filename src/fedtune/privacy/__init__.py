"""Privacy and robustness (docs/privacy.md): simulated attackers (attacks.py), record-level
DP-SGD on each client (dp_sgd.py, with its Poisson sampler in sampling.py and per-example
gradients in per_example.py), client-level DP-FedAvg at the server (central_dp.py), Opacus's RDP
or PRV accountant for every epsilon (accounting.py), and the one-run audit with canaries that
measures a lower bound beside it (canaries.py, audit.py)."""
