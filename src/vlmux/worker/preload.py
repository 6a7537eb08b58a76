"""Imported once by the fork server so that every worker starts with torch and transformers ready.

Importing must not initialise CUDA: each worker creates its own context after the fork.
"""
import vlmux.backends  # noqa: F401  (first: it quiets what importing transformers logs)
import vlmux.worker.cuda_free
import vlmux.worker.lean  # noqa: F401  (before transformers' model modules: keeps scikit-learn and SciPy out)
import torch  # noqa: F401
import transformers  # noqa: F401
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: F401

import vlmux.backends.transformers  # noqa: F401
import vlmux.backends.warm  # noqa: F401
import vlmux.worker.main  # noqa: F401

# Workers report through the parent; a weight-loading bar per worker would only garble the parent's progress bar.
transformers.utils.logging.disable_progress_bar()

try:  # transformers' checkpoint renaming rules: hundreds of regular expressions compiled on first use, once here
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    get_checkpoint_conversion_mapping("llava")
except (ImportError, AttributeError, TypeError):  # another transformers version: the loader pays it itself
    pass

vlmux.worker.cuda_free.check_cuda_not_started("workers' fork server")
