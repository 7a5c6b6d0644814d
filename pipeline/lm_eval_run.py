"""evaluate.lm_eval: lm-evaluation-harness tasks on a model already loaded by the evaluate stage (on its
device, in its dtype), through lm_eval's Python API, so that nothing is fetched from the hub. Imported
only when evaluate.lm_eval is set (lm_eval is the optional `eval` extra)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

from pipeline import distributed
from pipeline.config_lm_eval import INSTALL_HINT, LmEvalConfig
from pipeline.errors import UserError

# How long the other ranks wait for rank 0's tasks under torchrun: big task suites take hours.
WAIT = datetime.timedelta(days=2)


@dataclass(frozen=True)
class Harness:
    settings: LmEvalConfig
    manager: Any  # lm_eval's TaskManager, holding the configured tasks

    def scores(self, model: torch.nn.Module, tokenizer: Any) -> dict[str, dict[str, float]]:
        return harness_scores(model, tokenizer, self.settings, self.manager)


def prepared(settings: LmEvalConfig | None) -> Harness | None:
    """None when evaluate.lm_eval is unset; its tasks found (or a UserError) before any model loads."""
    return None if settings is None else Harness(settings, task_manager(settings))


def task_manager(settings: LmEvalConfig) -> Any:
    """lm_eval's task index for the configured tasks; a UserError naming evaluate.lm_eval.tasks for a
    name it does not know. The built-in catalogue (thousands of YAML files, seconds to index) is read
    only when include_path does not define every task."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise UserError(f"evaluate.lm_eval: cannot import lm_eval ({err}): {INSTALL_HINT}") from None
    include = settings.include_path
    if include is not None:
        manager = TaskManager(include_path=include, include_defaults=False)
        if set(settings.tasks) <= set(manager.all_tasks):
            return manager
    manager = TaskManager(include_path=include)
    check_known(settings.tasks, manager.all_tasks, include)
    return manager


def check_known(tasks: list[str], known: list[str], include_path: str | None) -> None:
    unknown = [name for name in tasks if name not in set(known)]
    if unknown:
        where = f"built in or under {include_path}" if include_path else "built in; see include_path"
        names = ", ".join(map(repr, unknown))
        raise UserError(f"evaluate.lm_eval.tasks: unknown lm-eval task {names} ({where})")


def harness_scores(model: torch.nn.Module, tokenizer: Any, settings: LmEvalConfig, manager: Any) -> dict:
    """Each task's metrics, {task: {metric: value}}, computed by rank 0 alone (lm_eval's own data
    parallelism needs accelerate's launcher); every rank returns them."""
    return distributed.on_main(lambda: _scores(model, tokenizer, settings, manager), WAIT)


def _scores(model: torch.nn.Module, tokenizer: Any, settings: LmEvalConfig, manager: Any) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    # lm_eval bootstraps standard errors (perplexity's, say) in a forked multiprocessing pool. A fork of
    # a process running torch's and gloo's threads can leave the child holding a lock no thread will
    # release: a torchrun rank hung forever that way. Its single-process path gives the same numbers.
    os.environ["DISABLE_MULTIPROC"] = "1"
    limit = settings.limit if settings.limit is None or settings.limit < 1 else int(settings.limit)
    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
    output = lm_eval.simple_evaluate(
        model=harness_model, tasks=list(settings.tasks), task_manager=manager,
        num_fewshot=settings.num_fewshot, limit=limit, log_samples=False)
    return task_metrics(output["results"])


def task_metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm_eval's "metric,filter" keys as MLflow-safe names ("acc,none" -> "acc", "exact_match,strict-match"
    -> "exact_match_strict-match"); numbers only (a stderr lm_eval could not compute is "N/A")."""
    tasks = {}
    for task, values in results.items():
        tasks[task] = {_metric_name(key): float(value) for key, value in values.items()
                       if isinstance(value, (int, float)) and not isinstance(value, bool)}
    return tasks


def _metric_name(key: str) -> str:
    metric, _, filter_name = key.partition(",")
    return metric if filter_name in ("", "none") else f"{metric}_{filter_name}"
