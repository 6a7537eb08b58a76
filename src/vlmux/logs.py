"""The caller's logging and warnings settings, carried to a worker at each load: workers fork from a server that
started with its own, so `transformers.logging.set_verbosity_error()`, `logging.disable` or a warnings filter made
in the caller would otherwise not reach the code that logs and warns. vlmux itself logs to the `vlmux` logger."""
from __future__ import annotations

import importlib
import logging
import warnings
from dataclasses import dataclass

LOGGER = logging.getLogger("vlmux")


@dataclass(frozen=True)
class LogSettings:
    disabled: int  # logging.disable's level
    levels: tuple[tuple[str, int], ...]  # (logger name, "" for the root; its level), where a level is set
    # warnings.filters in order: action, message pattern, category as "module:qualname", module pattern, line
    warning_filters: tuple[tuple[str, str, str, str, int], ...]

    @classmethod
    def here(cls) -> LogSettings:
        """This process's settings now."""
        loggers = list(logging.root.manager.loggerDict.items())
        levels = [("", logging.root.level)] + [(name, logger.level) for name, logger in loggers
                                               if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET]
        filters = [(action, _pattern(message), f"{category.__module__}:{category.__qualname__}", _pattern(module), lineno)
                   for action, message, category, module, lineno in warnings.filters]
        return cls(logging.root.manager.disable, tuple(levels), tuple(filters))

    def apply(self) -> None:
        """Make them this process's: levels set, the caller's warnings filters ahead of this process's own (a
        category that cannot be imported here is skipped)."""
        logging.disable(self.disabled)
        for name, level in self.levels:
            logging.getLogger(name or None).setLevel(level)
        for action, message, category, module, lineno in reversed(self.warning_filters):
            found = _category(category)
            if found is not None:
                warnings.filterwarnings(action, message, found, module, lineno)


def _pattern(pattern: object) -> str:
    """A filter's message or module: a compiled pattern, a plain string (Python's own defaults) or None (any)."""
    return getattr(pattern, "pattern", pattern) or ""


def _category(name: str) -> type[Warning] | None:
    module, _, qualname = name.partition(":")
    try:
        found = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError):
        return None
    return found if isinstance(found, type) and issubclass(found, Warning) else None
