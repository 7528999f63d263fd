"""fedtune: federated fine-tuning of LLMs with LoRA (FedAvg, KD and split frameworks)."""

__version__ = "0.1.0"
