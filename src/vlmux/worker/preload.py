"""Imported once by the fork server so that every worker starts with torch and transformers ready.

Importing must not initialise CUDA: each worker creates its own context after the fork.
"""
import torch  # noqa: F401
import transformers  # noqa: F401
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: F401

import vlmux.backends.transformers  # noqa: F401
import vlmux.worker.main  # noqa: F401

# Workers report through the parent; a weight-loading bar per worker would only garble the parent's progress bar.
transformers.utils.logging.disable_progress_bar()
