"""lm-evaluation-harness task definitions shipped with fedtune (fedtune eval, lm_evaluation.py)."""

# The shipped tasks whose prompts fedtune formats and answers as the run's own sft metric does.
FEDTUNE_FORMAT = {"gsm8k_fedtune"}
