"""Imported by the two fork servers (workers, preparing processes) before transformers' model code: some of its
modules import scikit-learn and SciPy as they load, for features vlmux never calls: seconds of every caption job's
start (docs/BENCHMARKS.md). While those modules load,
transformers' check for each package answers False, so they go without it as if it were not installed (in the servers
and the processes they fork); every other module sees the packages as they are. Never imported in the caller's process
(isolation="none"), whose own code may use those features."""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import vlmux.worker.cuda_free  # noqa: F401 - first: importing transformers must not start CUDA
import transformers.utils

# A module that imports a package as it loads -> the check it asks first; above each, all the package is for there.
KEPT_OUT = {
    # sklearn.metrics.roc_curve: assisted generation tuning its confidence threshold (generate(assistant_model=...))
    "transformers.generation.candidate_generator": "is_sklearn_available",
    # scipy.optimize.linear_sum_assignment: the box matching of DETR-style detection losses (a forward with labels)
    "transformers.loss.loss_utils": "is_scipy_available",
}


@contextlib.contextmanager
def reported_missing(checks: list[str]) -> Iterator[None]:
    """transformers' `checks` answer False inside the block; a module that imports one there keeps that answer."""
    real = {check: getattr(transformers.utils, check) for check in checks}
    for check in checks:
        setattr(transformers.utils, check, lambda: False)
    try:
        yield
    finally:
        for check, function in real.items():
            setattr(transformers.utils, check, function)


with reported_missing(list(KEPT_OUT.values())):
    for module in KEPT_OUT:
        importlib.import_module(module)
