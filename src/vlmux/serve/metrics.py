"""The server's Prometheus metrics, in a registry of its own (one per app, so that tests may run several)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
STATES = ("loading", "ready", "sleeping", "stopping", "dead")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("vlmux_requests", "Chat completion requests answered, by model and HTTP status",
                                ["model", "status"], registry=r)
        self.latency = Histogram("vlmux_request_seconds", "Seconds from a request's arrival to its last byte",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("vlmux_time_to_first_token_seconds", "Seconds from arrival to the first answer text",
                                     ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("vlmux_tokens", "Tokens read and written, by model and kind (prompt, completion)",
                              ["model", "kind"], registry=r)
        self.queue = Gauge("vlmux_queue_depth", "Chat requests held by the server (waiting or being answered)",
                           registry=r)
        self.vram = Gauge("vlmux_model_vram_bytes", "Device memory each loaded model's worker holds on its GPUs",
                          ["model"], registry=r)
        self.host = Gauge("vlmux_model_host_bytes", "Private host memory of each CPU model's worker (what its unload "
                          "returns)", ["model"], registry=r)
        self.state = Gauge("vlmux_model_state", "1 for a model's current state", ["model", "state"], registry=r)
        self.loads = Counter("vlmux_loads", "Models loaded", ["model"], registry=r)
        self.unloads = Counter("vlmux_unloads", "Models unloaded (asked, evicted or expired)", ["model"], registry=r)
        self.switch = Histogram("vlmux_switch_seconds", "Seconds a request waited for its model to load on demand",
                                ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.worker_exits = Counter("vlmux_worker_exits", "Workers that ended by themselves (killed, crashed, hung), "
                                    "by model and reason (SIGKILL, exit_N, hang, timeout, unknown)", ["model", "reason"],
                                    registry=r)
        self._seen: set[str] = set()
        self._on_host: set[str] = set()  # models whose worker ran on the CPU: their memory is host memory
        self.residue = Gauge("vlmux_release_residue_mib", "Device memory left behind by a model's last unload",
                             ["model"], registry=r)

    def models(self, states: dict[str, str], vram: dict[str, int], host: dict[str, int]) -> None:
        """Set the per-model gauges from the pool's current view; a model gone keeps its series, at 0."""
        for name in self._seen - set(states):
            (self.host if name in self._on_host else self.vram).labels(name).set(0)
        for name in self._seen | set(states):
            for state in STATES:
                self.state.labels(name, state).set(1 if states.get(name) == state else 0)
        for name, held in vram.items():
            self.vram.labels(name).set(held)
        for name, held in host.items():
            self.host.labels(name).set(held)
        self._seen |= set(states)
        self._on_host |= set(host)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
