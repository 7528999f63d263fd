"""What stands between one client's private rows and what it sends in a round.

Every framework opens a ``ClientGuard`` at the start of its ``fit`` and uses it the same way:
its local steps are DP-SGD steps when ``guard.dp`` is set (privacy.dp_sgd), the outputs it
sends (kd's public-set logits, split's activations) pass ``guard.noise_outputs`` /
``guard.noise_activations`` (privacy.output_noise_multiplier), its upload passes
``guard.upload`` (a simulated attacker's rewrite, fed.attack), its record gets
``guard.record()`` and its kept state ``guard.keep(state)``: the accountants travel with the
client's state, so a resumed run counts every step it took before."""

from __future__ import annotations

import torch

from . import attacks, dp_sgd, outputs

State = dict[str, torch.Tensor]


class ClientGuard:
    def __init__(self, cfg, cid: int, n_records: int, state: dict | None):
        self.cfg, self.cid = cfg, cid
        self.dp = dp_sgd.for_client(cfg, n_records, state)  # None unless privacy.dp_sgd
        self.odp = outputs.for_client(cfg, n_records, state)  # None unless output noise

    def noise_outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """kd: the public-set outputs clipped and noised before they leave (one release a round)."""
        return self.odp.outputs(logits) if self.odp else logits

    def noise_activations(self, packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """split: each example's activations at the cut clipped and noised before they leave."""
        return self.odp.activations(packed, mask) if self.odp else packed.detach()

    def account_epochs(self, epochs: int) -> None:
        """split: each local epoch releases every record's activations once."""
        if self.odp:
            self.odp.account_epochs(epochs)

    def upload(self, sent: State, local: State) -> State:
        """The tunable state this client sends, given what the server sent and what it trained."""
        return attacks.poison(self.cfg, self.cid, sent, local)

    def record(self) -> dict:
        """What the client's record carries: the attacker mark and each accountant's epsilon."""
        return {**attacks.mark(self.cfg, self.cid), **(self.dp.record() if self.dp else {}),
                **(self.odp.record() if self.odp else {})}

    def keep(self, state: dict | None) -> dict | None:
        """The client's kept state with its accountants' state added."""
        return outputs.keep(self.odp, dp_sgd.keep(self.dp, state))
