"""KD-FedLLM: clients share knowledge as their outputs on a public dataset instead of weights
(paper steps b1-b8). One exchange per round:

  down  the server's outputs on the public set from the previous round (nothing in round 1)
  b8+b1 the client trains its own local model (kept across rounds as its state) on its private
        rows and, from round 2, distils the server's outputs in the same pass (mixed.py)
  b2-b3 outputs on the public set, encoded (codecs.py), uploaded
  b4    server: check each upload, turn them into one distribution per public row (refiners.py)
  b5    server: distil that into the global model (KL at temperature T, losses.py)
  b6-b7 server: the global model's outputs on the public set, sent next round

The client's schedule (b8 with b1). Each local epoch is ONE pass that walks the private rows in
batches of ``train.batch_size`` and the public rows, shuffled, in as many equal slices as there
are private batches; every step minimises (1 - lambda) * CE + lambda * KD (mixed.py), so an
epoch sees every private row and every public row exactly once, and the teacher never trains
the local model alone: a separate distillation pass before local training (the paper's order)
pulls clients that have barely learned back to the server's near-uniform outputs, and they stop
learning on datasets with few rows per class.

Confidence weighting (``kd.confidence_weighting``, off by default): a public row teaches with
weight 1 - H(p) / ln(width), where p is the teacher's own prediction (its distribution at T = 1),
so a uniform teacher teaches nothing and a one-hot teacher teaches fully; on the client's
teacher (the server's outputs) and on the server's (the clients' merged outputs) alike. It is
off by default because it cost accuracy in every setting measured (docs/kd.md): the mixed pass
alone keeps the clients learning, and down-weighting an unsure but right teacher slows them.

A "row" is one example under classify and one answer token under generate (tasks.py), so
the payload is rows x labels or rows x vocabulary (codecs.py says how each encoding sends it).

The paper's research directions (docs/kd.md) are choices among registered objects:
``kd.align`` (alignment.py) adds the client's label histogram to its upload and weights the
server's rows; ``kd.public_per_round`` and ``kd.select`` (selectors.py) make every public pass
run on the round's selected examples, whose ids travel down with the knowledge;
``kd.logit_rank`` is one more codec; ``kd.aggregation = "cluster"`` is one more refiner."""

from .codecs import decode_outputs, encode_outputs
from .framework import KDFramework
from .losses import confidence, entropy, kd_loss
from .refiners import refine

__all__ = ["KDFramework", "confidence", "decode_outputs", "encode_outputs", "entropy", "kd_loss", "refine"]
