"""A task's accuracy as a table (per subject, overall, mean over subjects) and as JSON with the settings."""
from __future__ import annotations

import json
import os
from dataclasses import asdict

from mindport.evaluation.tasks import TaskResult


def format_table(task: str, result: TaskResult) -> str:
    metrics = [m for m in result.overall if m != "n"]
    width = max(len(name) for name in [*result.subjects, "mean over subjects", task])
    lines = [f"{task:<{width}}  {'n':>6}" + "".join(f"  {m:>11}" for m in metrics)]
    rows = list(result.subjects.items()) if len(result.subjects) > 1 else []
    rows += [("overall", result.overall)]
    if len(result.subjects) > 1:
        rows += [("mean over subjects", {"n": len(result.subjects)} | result.subject_mean)]
    for name, values in rows:
        lines.append(f"{name:<{width}}  {int(values['n']):>6}" + "".join(f"  {values[m]:>11.4f}" for m in metrics))
    return "\n".join(lines)


def write_json(path: str, result: TaskResult, settings: dict) -> None:
    """``{"settings": ..., "overall": ..., "subject_mean": ..., "subjects": ...}``, written whole or not at all."""
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump({"settings": settings, **asdict(result)}, f, ensure_ascii=False, indent=2)
    os.replace(partial, path)
