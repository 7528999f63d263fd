"""lm-evaluation-harness task definitions shipped with fedtune (fedtune eval, lm_evaluation.py)."""
