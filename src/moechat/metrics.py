"""A stage's report, split in two: metrics users compare across experiments, and the run's facts.

DVC puts every key of a `metrics:` file into `dvc exp show` and `dvc metrics diff`. Those tables stay
readable only if the metrics files hold what users compare (losses, perplexities, router health,
quantization ratio, throughput, parameter counts). Run facts (fingerprints, seconds, devices, resolved
paths, echoes of params, per-layer detail) go to `metrics/run/<stage>.json`, declared in dvc.yaml as a
plain out with `cache: false`: kept and committed with each experiment, never a table column.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, Optional

from moechat.atomic import write_json


def split_report(report: dict[str, Any], metric_keys: Iterable[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, facts): the dotted `metric_keys` (e.g. `router.mean_cv`) moved out of a copy of `report`.

    Every key lands in exactly one of the two; a listed key missing from the report is a programming
    error (KeyError), not something to skip.
    """
    metrics: dict[str, Any] = {}
    facts = copy.deepcopy(report)
    for key in metric_keys:
        *parents, leaf = key.split(".")
        sections, target = [facts], metrics
        for name in parents:
            sections.append(sections[-1][name])
            target = target.setdefault(name, {})
        target[leaf] = sections[-1].pop(leaf)
        for depth in range(len(parents), 0, -1):  # drop the sections the move emptied, innermost first
            if sections[depth]:
                break
            sections[depth - 1].pop(parents[depth - 1])
    return metrics, facts


def facts_path_for(metrics_path: Path) -> Path:
    """The default run-facts file of a metrics file: metrics/x.json -> metrics/run/x.json."""
    return Path(metrics_path).parent / "run" / Path(metrics_path).name


def write_stage_report(report: dict[str, Any], metric_keys: Iterable[str], metrics_path: Path,
                       facts_path: Optional[Path] = None) -> dict[str, Any]:
    """Write the metrics and the run facts of `report`; return the metrics."""
    metrics, facts = split_report(report, metric_keys)
    write_json(metrics_path, metrics)
    write_json(facts_path or facts_path_for(metrics_path), facts)
    return metrics
