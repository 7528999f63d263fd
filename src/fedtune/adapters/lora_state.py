"""LoRA factors in a tunable state, the algebra that frameworks and strategies share: finding
the (A, B) pairs, changing a state's rank, the products B A, stacking and SVD re-factorisation,
the aggregation-error metric, and merging dense updates into frozen weights (FLoRA).

How a client of rank r lives in the one shared model: the model is built at the largest rank
any client uses (``adapters.lora.max_rank``) and a rank-r state is loaded *zero-padded*: A's rows and
B's columns beyond r are zero. Such a component is exactly inert: its output B[:, j] A[j] x is
zero, and both its gradients are too (dA[j] needs B[:, j], dB[:, j] needs A[j] x), so Adam leaves
it at zero and the model trains exactly a rank-r adapter; the client uploads only its leading r
components, so the bytes are those of its true rank. The alternative, rebuilding the adapters
per client, would re-create PEFT modules every round for the same arithmetic. Every client
shares the global adapter's scale (alpha / r_max, or alpha / sqrt(r_max) with rsLoRA): a rank-r
client holds the leading r components of the rank-r_max adapter, as in HetLoRA, so the clients'
products B_i A_i are comparable and can be averaged."""

from __future__ import annotations

import torch

from ..training import derive_seed

State = dict[str, torch.Tensor]
A_KEY, B_KEY = ".lora_A.", ".lora_B."


def pairs(state: State) -> dict[str, tuple[str, str]]:
    """module -> (A key, B key) for every LoRA module whose A and B are in ``state``."""
    out = {}
    for key in state:
        if A_KEY in key:
            b = key.replace(A_KEY, B_KEY)
            if b in state:
                out[key.split(A_KEY)[0]] = (key, b)
    return out


def rank(state: State) -> int:
    """The LoRA rank of a state (0 when it holds no A/B pair)."""
    return max((state[a].shape[0] for a, _ in pairs(state).values()), default=0)


def resize(state: State, r: int, seed: int | None = None, std: float = 0.0) -> State:
    """The state at rank ``r``: its leading r components, or zero-padded up to r. With ``seed``,
    added rows of A are drawn from N(0, std^2) (seeded, the same on every party) while added
    columns of B stay zero: the product, so the model's output, is unchanged and the new
    components can learn (a zero A row would never receive a gradient)."""
    out = dict(state)
    for module, (a_key, b_key) in pairs(state).items():
        a, b = state[a_key], state[b_key]
        have = a.shape[0]
        if r <= have:
            out[a_key], out[b_key] = a[:r].clone(), b[:, :r].clone()
            continue
        new_a = a.new_zeros(r - have, a.shape[1])
        if seed is not None:
            gen = torch.Generator().manual_seed(derive_seed(seed, "grow", module, r))
            new_a = (torch.randn(new_a.shape, generator=gen, dtype=torch.float64) * std).to(a.dtype)
        out[a_key] = torch.cat([a, new_a])
        out[b_key] = torch.cat([b, b.new_zeros(b.shape[0], r - have)], dim=1)
    return out


def fit_to(state: State, shapes: dict[str, torch.Size]) -> State:
    """Zero-pad each LoRA factor of ``state`` to the model's ``shapes`` (the rank-r_max adapter)."""
    r_model = max((shapes[a][0] for a, _ in pairs(shapes).values()), default=0)
    return resize(state, r_model) if rank(state) < r_model else state


def products(state: State, frozen: State | None = None) -> dict[str, torch.Tensor]:
    """module -> B A in float64. ``frozen`` supplies factors a state lacks (FFA-LoRA's A)."""
    full = {**(frozen or {}), **state}
    return {m: full[b].double() @ full[a].double() for m, (a, b) in pairs(full).items()}


def weighted(xs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    total = float(sum(weights))
    return sum(x.double() * (w / total) for x, w in zip(xs, weights))



def stack(updates: list[tuple[State, float]]) -> State:
    """Each module's factors stacked (FLoRA): A = [A_1; ...; A_K], B = [p_1 B_1, ..., p_K B_K]
    with p_i the normalised weights, so B A = sum_i p_i B_i A_i exactly (rank sum_i r_i)."""
    total = float(sum(w for _, w in updates))
    out = {}
    for a, b in pairs(updates[0][0]).values():
        out[a] = torch.cat([s[a] for s, _ in updates])
        out[b] = torch.cat([s[b] * (w / total) for s, w in updates], dim=1)
    return out


def svd_factors(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (B, A) with B A the best rank-r approximation of w (float64), split evenly:
    B = U sqrt(S), A = sqrt(S) V^T, in singular-value order."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def aggregation_error(updates: list[tuple[State, float]], global_state: State | None = None,
                      frozen: State | None = None) -> float:
    """sqrt(sum_m ||G_m - P_m||_F^2) / sqrt(sum_m ||P_m||_F^2) over the LoRA modules m, where
    P_m = mean_i(B_i A_i) is the weighted mean of the clients' products and G_m is mean_i(B_i)
    mean_i(A_i) (factors zero-padded to the largest rank) or, with ``global_state``, the
    product of that state's factors. Summing squared norms before the ratio makes it the
    relative error of the whole adapter as one block-diagonal update."""
    states, weights = [s for s, _ in updates], [w for _, w in updates]
    r = max(rank({**(frozen or {}), **s}) for s in states)
    padded = [resize({**(frozen or {}), **s}, r) for s in states]
    per_client = [products(s) for s in padded]
    if not per_client or not per_client[0]:
        return 0.0
    if global_state is None:
        mean_state = {k: weighted([s[k] for s in padded], weights) for k in padded[0]}
        global_products = products(mean_state)
    else:
        global_products = products(global_state, frozen)
    num = den = 0.0
    for m in per_client[0]:
        mean_product = weighted([p[m] for p in per_client], weights)
        num += float(((global_products[m] - mean_product) ** 2).sum())
        den += float((mean_product**2).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


# --------------------------------------------------------------------------- merging (FLoRA)

MERGE = "merge."  # prefix of the stacked factors a client merges into its frozen weights
MERGE_TAG = "merge.round"  # which aggregation the stack is: a model merges each one once


def merge_once(model, deltas: dict[str, torch.Tensor], tag: int) -> None:
    """Add each module's dense update (already scaled) to its frozen base weight, unless this
    model has merged aggregation ``tag`` already (in-process, the server and every client share
    one model: the first of them merges)."""
    if getattr(model, "_fedtune_merged", 0) >= tag:
        return
    with torch.no_grad():
        for module, delta in deltas.items():
            layer = model.get_submodule(module)
            weight = layer.get_base_layer().weight
            weight += (delta.T if layer.fan_in_fan_out else delta).to(weight.dtype)
    model._fedtune_merged = tag


def scaled_products(model, state: State) -> dict[str, torch.Tensor]:
    """module -> scale * B A: what the adapter adds to each module's weight."""
    return {m: p * model.get_submodule(m).scaling["default"] for m, p in products(state).items()}


def apply_merges(model, tensors: State) -> State:
    """A client's side of FLoRA: merge the stacked factors it received (once) and return the
    rest of the message, its new adapter and head."""
    stacked = {k[len(MERGE):]: v for k, v in tensors.items() if k.startswith(MERGE) and k != MERGE_TAG}
    if stacked:
        merge_once(model, scaled_products(model, stacked), int(tensors[MERGE_TAG]))
    return {k: v for k, v in tensors.items() if not k.startswith(MERGE)}

