"""Privacy and robustness (docs/privacy.md): simulated attackers (attacks.py), record-level
DP-SGD on each client (dp_sgd.py), client-level DP-FedAvg at the server (central_dp.py), with
Opacus's RDP accountant for every epsilon (accounting.py)."""
