"""What the server can recover from what clients send. Two attacks, each writing its own section of
benchmarks/leakage.md (the other section is kept):

``--attack split`` (default): the private tokens behind split learning's activations at the
cut, for cuts after 1, 2 and 4 blocks, without and with activation noise (privacy.output_noise_multiplier).

The attacker is the honest-but-curious server. It knows the architecture and the client part's
weights (the base model is public and it aggregates the client LoRA), and it has public text.
Its attack is a learned inverse: on the public set it runs the client part itself (noised the
same way, since the mechanism is public), fits a ridge regression from each token's activation
to that token's input word embedding, and then maps each private activation to the nearest
vocabulary embedding (cosine). The rate is the fraction of the private rows' real tokens, the
[CLS]/[SEP] markers excluded, recovered exactly.

``--attack inversion``: gradient inversion (DLG, Zhu et al., 2019; iDLG, Zhao et al., 2020; the
cosine loss of Geiping et al., 2020) on fedavg's upload: the LoRA (and head) update of one
private batch of 1 or 4 rows. The server is given the batch's gradient itself (FedSGD: one plain
SGD step on one batch, update / -lr), the attacker's best case. It optimises dummy input
embeddings and soft labels, with the rows' lengths and the [CLS]/[SEP] positions known, so that
their gradient matches the observed one (1 - cosine over all observed tensors), then maps each
recovered embedding to the nearest vocabulary embedding (cosine).

    python benchmarks/leakage.py [--model minilm] [--private 200] [--public 500]
    python benchmarks/leakage.py --attack inversion [--steps 200]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fedtune import config as configlib
from fedtune import models
from fedtune.frameworks.base import Context
from fedtune.frameworks.split.cut import CutModel, hf_model
from fedtune.privacy.accounting import Accountant
from fedtune.privacy.outputs import clip_and_noise
from fedtune.training import train_pass

SIGMAS = (0.0, 0.001, 0.01, 0.1)


@torch.no_grad()
def activations(split: CutModel, ctx: Context, key: str, labels):
    acts, toks, counts = [], [], []
    for batch in ctx.batches(key, labels, 32):
        acts.append(split.client_forward(batch.input_ids, batch.attention_mask))
        toks.append(batch.input_ids[batch.attention_mask.bool()])
        counts += batch.attention_mask.sum(1).tolist()
    return torch.cat(acts), torch.cat(toks), counts


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    x = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    return torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1], dtype=torch.float64), x.T @ y.double())


def nearest(pred: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    v = F.normalize(vocab.float(), dim=1)
    return torch.cat([(F.normalize(chunk, dim=1) @ v.T).argmax(1) for chunk in pred.float().split(1024)])


INVERSION = "## fedavg: gradient inversion on a LoRA update"


def write_section(path: Path, text: str, inversion: bool) -> None:
    """Replace this attack's section of the results file and keep the other one."""
    old = path.read_text() if path.is_file() else ""
    split_part, _, inversion_part = old.partition(INVERSION)
    split_part = text if not inversion else split_part.rstrip() + "\n\n"
    inversion_part = text if inversion else (INVERSION + inversion_part if inversion_part else "")
    path.write_text(split_part + inversion_part)


def split_attack(args) -> None:
    cfg = configlib.build_config("demo", None, {"model.name": args.model, "fed.clients": 1, "data.test_size": 10,
                                                "data.private_size": args.private, "data.public_size": args.public})
    ctx = Context.build(cfg)
    ctx.model.eval()
    vocab = hf_model(ctx.model).get_input_embeddings().weight.detach()
    special = set(ctx.tokenizer.all_special_ids)
    rows = ["| cut (blocks on the client) | noise multiplier | clip | epsilon per epoch (delta = 1/n) | tokens recovered |",
            "|---|---|---|---|---|"]
    n = len(ctx.data.clients[0])
    start = time.perf_counter()
    for cut in (1, 2, 4):
        split = CutModel(ctx.model, cut)
        pub_x, pub_t, pub_c = activations(split, ctx, "public", ctx.data.public.labels)
        priv_x, priv_t, priv_c = activations(split, ctx, "client0", ctx.data.clients[0].labels)
        # A clip that leaves the typical example unclipped: the median per-example norm on public text.
        norms, s = [], 0
        for c in pub_c:
            norms.append(float(pub_x[s:s + c].norm()))
            s += c
        clip = float(torch.tensor(norms).median())
        keep = torch.tensor([int(t) not in special for t in priv_t])
        for sigma in SIGMAS:
            torch.manual_seed(0)
            w = ridge(clip_and_noise(pub_x, pub_c, clip, sigma), vocab[pub_t])
            noised = clip_and_noise(priv_x, priv_c, clip, sigma)
            pred = torch.cat([noised, torch.ones(len(noised), 1)], 1).double() @ w
            rate = float((nearest(pred, vocab) == priv_t)[keep].float().mean())
            acct = Accountant()
            acct.step(sigma / 2, 1.0)  # privacy/outputs.py: replacement sensitivity 2 x clip, one release per epoch
            eps = acct.epsilon(1 / n)
            rows.append(f"| {cut} | {sigma:g} | {clip:.1f} | {'inf' if eps == float('inf') else f'{eps:.3g}'} "
                        f"| {100 * rate:.1f}% |")
            print(rows[-1], flush=True)
    text = "\n".join([
        "# Leakage: what the server can recover",
        "",
        "## split learning: token recovery from the activations at the cut",
        "",
        f"`python benchmarks/leakage.py --model {args.model} --private {args.private} --public {args.public}` "
        f"({time.perf_counter() - start:.0f} s on a shared 2-core CPU).",
        "",
        f"{args.model}, the client part at the start of training (LoRA B = 0: the pretrained weights), "
        f"one client's {n} private Banking77 rows ({int(keep.sum())} real tokens without [CLS]/[SEP]); the attacker "
        f"fits a ridge inverse (activation -> input word embedding) on {args.public} public rows it runs through the "
        "client part itself, noised the same way, then takes the nearest vocabulary embedding (benchmarks/leakage.py). "
        "Noise: privacy.output_noise_multiplier with output_clip = the median per-example activation norm on the "
        "public set (the noise std per value is multiplier x clip). Epsilon: one epoch's release of a record's "
        "activations, Opacus RDP, replacement sensitivity 2 x clip (privacy/outputs.py); it composes over epochs and rounds.",
        "",
        *rows,
        "",
        "Labels cross the cut in the clear in every setting: their leakage is total and not in this table.",
        "",
    ])
    write_section(Path(args.out), text, inversion=False)


# --------------------------------------------------------------------------- fedavg: gradient inversion


def soft_ce(logits: torch.Tensor, label_logits: torch.Tensor) -> torch.Tensor:
    return -(F.softmax(label_logits, -1) * F.log_softmax(logits, -1)).sum(-1).mean()


def invert(model, params, target, ids, mask, fixed, vocab, num_labels: int, steps: int, seed: int):
    """Dummy embeddings (at the positions not in ``fixed``) and soft labels whose gradient on
    ``params`` matches ``target`` -> (embeddings, label logits, final 1 - cosine)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*ids.shape, vocab.shape[1], generator=gen) * vocab.std()).requires_grad_()
    y = torch.randn(len(ids), num_labels, generator=gen).requires_grad_()
    known = vocab[ids]
    opt = torch.optim.Adam([x, y], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [steps // 2, 3 * steps // 4], 0.1)
    target_norm = torch.sqrt(sum(t.pow(2).sum() for t in target))
    for _ in range(steps):
        emb = torch.where(fixed[..., None], known, x)
        grads = torch.autograd.grad(soft_ce(model(inputs_embeds=emb, attention_mask=mask).logits, y), params,
                                    create_graph=True)
        dot = sum((g * t).sum() for g, t in zip(grads, target))
        loss = 1 - dot / (torch.sqrt(sum(g.pow(2).sum() for g in grads)) * target_norm + 1e-12)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return x.detach(), y.detach(), float(loss)


def recovery(pred: torch.Tensor, ids: torch.Tensor, free: torch.Tensor) -> tuple[float, float]:
    """-> (tokens recovered at their position, under the best order of the batch's rows among rows
    of equal length: the gradient of a batch does not know its order; tokens recovered anywhere in
    the batch, as a multiset)."""
    lengths = free.sum(1).tolist()
    best = 0
    for perm in itertools.permutations(range(len(ids))):
        if all(lengths[i] == lengths[j] for i, j in enumerate(perm)):
            best = max(best, int(((pred == ids[list(perm)]) & free).sum()))
    true = ids[free].tolist()
    found = pred[free].tolist()
    bag = sum(min(true.count(t), found.count(t)) for t in set(true))
    return best / len(true), bag / len(true)


def inversion_attack(args) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = configlib.build_config("demo", None, {"model.name": args.model, "fed.clients": 1, "data.test_size": 10,
                                                "data.private_size": 200, "data.public_size": 100,
                                                "data.max_labels": 10, "model.lora_dropout": 0.0})
    ctx = Context.build(cfg)
    model = ctx.model
    for m in model.modules():  # the attacker replays the client's forward pass exactly
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    hf_model(model).config._attn_implementation = "eager"  # the fused kernels have no double backward
    vocab = hf_model(model).get_input_embeddings().weight.detach()
    special = torch.tensor(ctx.tokenizer.all_special_ids)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # Private rows of at most 24 tokens, in data order (the attack's cost grows with the length).
    short = [i for i, t in enumerate(ctx.ids["client0"]) if len(t) <= 24]
    batches = [[i] for i in short[:args.rows]] + [short[args.rows:args.rows + 4]]
    adapters = {"round 1 (LoRA B = 0)": models.get_tunable(model)}
    train_pass(model, ctx.public_batches(), cfg.train, ctx.device, ctx.flops, ctx.task.loss)  # one epoch, public rows
    adapters["round 2 (after 1 epoch)"] = models.get_tunable(model)
    model.eval()
    header = ["| batch | adapter | server sees | 1 - cos at the end | tokens at their position | tokens anywhere "
              "(bag) | labels (soft-label argmax) | labels (iDLG: negative head-bias gradient) |",
              "|---|---|---|---|---|---|---|---|"]
    rows, start = [], time.perf_counter()
    with sdpa_kernel(SDPBackend.MATH):
        for rows_ in batches:
            ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(ctx.ids["client0"][i]) for i in rows_], batch_first=True,
                                                  padding_value=ctx.tokenizer.pad_token_id)
            mask = (torch.arange(ids.shape[1])[None] < torch.tensor([len(ctx.ids["client0"][i]) for i in rows_])[:, None]).long()
            labels = torch.tensor([ctx.data.clients[0].labels[i] for i in rows_])
            fixed = torch.isin(ids, special) | ~mask.bool()  # [CLS], [SEP] and padding: known to the attacker
            for adapter, state in adapters.items():
                models.set_tunable(model, state)
                for sees in ("LoRA + head", "LoRA only"):
                    if sees == "LoRA only" and len(rows_) > 1:
                        continue  # the batch of 4 only against what fedavg uploads
                    chosen = [(n, p) for n, p in named if sees == "LoRA + head" or not models.is_head(n)]
                    params = [p for _, p in chosen]
                    loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
                    target = [g.detach() for g in torch.autograd.grad(loss, params)]
                    x, y, end = invert(model, params, target, ids, mask, fixed, vocab, ctx.data.num_labels, args.steps, 0)
                    pred = torch.where(fixed, ids, nearest(x.reshape(-1, x.shape[-1]), vocab).reshape(ids.shape))
                    exact, bag = recovery(pred, ids, ~fixed)
                    soft = sorted(y.argmax(-1).tolist()) == sorted(labels.tolist())
                    idlg = "n/a"
                    if sees == "LoRA + head":
                        g_bias = next(t for (n, _), t in zip(chosen, target) if models.is_head(n) and n.endswith("bias"))
                        idlg = "yes" if set(torch.nonzero(g_bias < 0).flatten().tolist()) == set(labels.tolist()) else "no"
                    rows.append(f"| {len(rows_)} | {adapter} | {sees} | {end:.3f} | {100 * exact:.0f}% "
                                f"({int(exact * int((~fixed).sum()) + 0.5)}/{int((~fixed).sum())}) | {100 * bag:.0f}% | "
                                f"{'yes' if soft else 'no'} | {idlg} |")
                    print(rows[-1], flush=True)
    seconds = time.perf_counter() - start
    text = "\n".join([
        INVERSION,
        "",
        f"`python benchmarks/leakage.py --attack inversion --model {args.model} --rows {args.rows} --steps {args.steps}` "
        f"({seconds:.0f} s on a shared 2-core CPU).",
        "",
        f"{args.model} with LoRA r={cfg.model.lora_r} on the query and value projections plus the classification head "
        f"({sum(p.numel() for _, p in named)} tunable values), Banking77's 10 most frequent intents. The observed update "
        "is the gradient of one private batch (FedSGD; the attacker's best case: fedtune's clients take several AdamW "
        "steps, whose first update is about lr x sign(gradient)). Batches: "
        f"{args.rows} single private row(s) of at most 24 tokens (the first in data order), then the next 4 as one batch. The attacker "
        "knows the weights, each row's length and where [CLS]/[SEP] sit; it optimises the other positions' input "
        f"embeddings and soft labels for {args.steps} Adam steps (lr 0.1, decayed x0.1 at 1/2 and 3/4) from one "
        "random start, then takes the nearest vocabulary embedding. Adapters: the round-1 global adapter (LoRA B = 0, "
        "so A's gradient is exactly 0) and the same after one epoch on 100 public rows (B != 0). 'LoRA only' leaves the "
        "head's gradient out. Tokens at their position: the best order of equal-length rows; bag: tokens found "
        "anywhere in the batch (a multiset). Chance is ~0% (30,522 word pieces).",
        "",
        *header,
        *rows,
        "",
    ])
    write_section(Path(args.out), text, inversion=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--attack", choices=["split", "inversion"], default="split")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--private", type=int, default=200)
    ap.add_argument("--public", type=int, default=500)
    ap.add_argument("--rows", type=int, default=2, help="inversion: single-row batches attacked")
    ap.add_argument("--steps", type=int, default=200, help="inversion: optimisation steps per attack")
    ap.add_argument("--out", default="benchmarks/leakage.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    (inversion_attack if args.attack == "inversion" else split_attack)(args)


if __name__ == "__main__":
    main()
