"""Split-FedLLM (``--framework split``, docs/split.md):

    framework.py  SplitFramework: the cuts, the server's step (serve), aggregation, checkpoints
    client.py     a client's round, each batch's step in phases (forward, send, receive, backward)
    codecs.py     what crosses the cut: one codec for the activations and their gradient
                  (dense fp32/fp16/bf16/int8, top-k, a traffic budget's tiers)
    plan.py       the cost model behind split.auto's cut per client
    cut.py        a model cut after block k into client and server parts
"""

from .framework import SplitFramework

__all__ = ["SplitFramework"]
