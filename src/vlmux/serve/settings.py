"""What `vlmux serve` is told: the server's settings and the named models (from --model and a TOML file), as frozen
records. Durations are written like Ollama's keep_alive: 300, "90s", "5m", "1h"; 0 unloads once idle, -1 never."""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from vlmux.budget import check_budget
from vlmux.config import DECODE_MODES, DTYPES
from vlmux.serve.limits import RequestLimits

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib

FOREVER = None  # a keep-alive of -1: the model stays until evicted or unloaded
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str | int | float) -> float | None:
    """Seconds from 300, "90s", "5m", "1h"; a negative value means forever (None)."""
    wrong = ValueError(f"a duration like 300, 90s, 5m or -1, not {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):  # JSON gives lists and objects too
        raise wrong
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip().lower()
        unit = next((u for u in ("ms", "s", "m", "h") if text.endswith(u)), "")
        try:
            seconds = float(text[: len(text) - len(unit)]) * _UNITS.get(unit, 1.0)
        except ValueError:
            raise wrong from None
    if not math.isfinite(seconds):  # "nan" and "inf" parse as floats; a timer cannot use them
        raise wrong
    return FOREVER if seconds < 0 else seconds


def parse_residency(value: str) -> float | None:
    """--min-residency: auto (None: each model's own load time) or a duration like 30, 30s, 2m, 0."""
    wrong = ValueError(f"auto or a duration like 30, 30s, 2m or 0, not {value!r} (--min-residency)")
    if value.strip().lower() == "auto":
        return None
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise wrong from None
    if seconds is None:  # a negative duration means forever elsewhere; a residency that never ends is no policy
        raise wrong
    return seconds


def option(parse):
    """An argparse `type` from a parser that raises ValueError: its message becomes the usage error (exit 2)."""
    def checked(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    checked.__name__ = parse.__name__
    return checked


def budget_option(text: str) -> str:
    """--vram-budget: 0.8, 80% or 40GiB, checked now; a bare number above 1 is refused ("40" is not 40 bytes)."""
    check_budget(text, "")
    return text


def whole_option(least: int):
    def whole(text: str) -> int:
        if not text.strip().isdigit() or int(text) < least:
            raise ValueError(f"a whole number of at least {least}, not {text!r}")
        return int(text)

    return whole


@dataclass(frozen=True)
class ModelEntry:
    """A model the server answers for under `name`."""

    name: str
    model: str  # a hub id or a local folder
    dtype: str = "auto"
    decode: str = "auto"
    keep_alive: float | None | str = "default"  # seconds; None forever; "default": the server's --keep-alive
    pinned: bool = False  # never evicted for another model (it still unloads on request)
    max_concurrent: int | None = None  # requests handed to its worker at once; None: no limit

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name and self.name != self.model:
            raise ValueError(f"model name {self.name!r}: use a short name without '/'")
        if self.dtype not in DTYPES or self.decode not in DECODE_MODES:
            raise ValueError(f"model {self.name}: dtype one of {DTYPES}, decode one of {DECODE_MODES}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ValueError(f"model {self.name}: max_concurrent must be at least 1")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    vram_budget: str | float | None = 0.8
    api_key: str | None = None
    keep_alive: float | None = 300.0
    max_queue: int = 256  # chat requests held at once (waiting or answering); more get 429
    models: tuple[ModelEntry, ...] = ()
    allow_any_model: bool = False  # a request may name a hub id or a local folder that is not in `models`
    allow_remote_images: bool = False
    allow_private_images: bool = False  # remote images from private, loopback and link-local addresses too
    allow_local_images: Path | None = None  # image paths are read only under this folder
    max_body_bytes: int = 32 * 2**20
    max_image_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    image_timeout: float = 10.0
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    request_log: int = 200  # recent requests the dashboard lists
    history_seconds: float = 600.0  # memory over the last minutes, for the dashboard
    min_residency: float | None = None  # the pool's PoolConfig.min_residency: seconds, or None for auto
    limits: RequestLimits = RequestLimits()  # images, pixels and text per chat request

    def __post_init__(self) -> None:
        if self.vram_budget is not None:
            check_budget(self.vram_budget, "vram_budget")
        for name in ("keep_alive", "min_residency"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value < math.inf):
                raise ValueError(f"{name} {value!r}: seconds, 0 or more, or None")
        for name in ("max_queue", "max_body_bytes", "max_image_bytes", "max_pixels", "default_max_tokens",
                     "max_tokens_limit", "request_log"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)!r}: a whole number of at least 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port}: 0 (any free port) to 65535")

    def model_keep_alive(self, entry: ModelEntry) -> float | None:
        return self.keep_alive if entry.keep_alive == "default" else entry.keep_alive


def model_option(text: str) -> ModelEntry:
    """--model NAME=MODEL (or just MODEL, named by its last path part)."""
    name, sep, model = text.partition("=")
    if not sep:
        model, name = text, Path(text.rstrip("/")).name
    if not name or not model:
        raise ValueError(f"--model NAME=MODEL, not {text!r}")
    return ModelEntry(name, model)


def models_from_toml(path: Path) -> tuple[ModelEntry, ...]:
    """[[model]] tables: name, model, dtype, decode, keep_alive, pinned, max_concurrent. Relative model folders are
    relative to the file."""
    data = tomllib.loads(path.read_text())
    entries = []
    for table in data.get("model", []):
        unknown = set(table) - {"name", "model", "dtype", "decode", "keep_alive", "pinned", "max_concurrent"}
        if unknown or "model" not in table:
            raise ValueError(f"{path}: each [[model]] needs model = ...; unknown keys: {sorted(unknown)}")
        model = table["model"]
        if model.startswith("."):
            model = str((path.parent / model).resolve())
        keep = parse_duration(table["keep_alive"]) if "keep_alive" in table else "default"
        entries.append(ModelEntry(table.get("name") or Path(model.rstrip("/")).name, model, table.get("dtype", "auto"),
                                  table.get("decode", "auto"), keep, bool(table.get("pinned", False)),
                                  table.get("max_concurrent")))
    if not entries:
        raise ValueError(f"{path} names no [[model]]")
    return tuple(entries)


def unique(entries: tuple[ModelEntry, ...]) -> tuple[ModelEntry, ...]:
    names = [e.name for e in entries]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise ValueError(f"two models are named {', '.join(doubled)}; give each its own NAME=MODEL")
    return entries
