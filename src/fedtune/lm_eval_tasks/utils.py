"""The shipped lm-eval tasks' scoring: fedtune's own rule (tasks/sft.final_number), so that
``fedtune eval`` and a run's per-round metric agree on the same rows."""

from fedtune.tasks.sft import final_number


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    answer, reference = results[0], str(doc["answer"]).strip()
    return {"exact_match": float(final_number(answer) is not None and final_number(answer) == final_number(reference))}
