"""Prometheus text exposition (format 0.0.4) for the server's counters, gauges and histograms.

Small enough to write here rather than add a dependency. Every update happens on the asyncio
event-loop thread, so no locking is needed. With several API-server processes, each keeps its
own counters and histograms; /metrics renders them summed with the others' (snapshot()/render()).
"""
from __future__ import annotations

import bisect
from typing import Callable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(str(v))}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(x: float) -> str:
    return repr(float(x)) if x != int(x) else str(int(x))


class Counter:
    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.values: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def state(self) -> dict:
        return dict(self.values)

    def merged(self, states: list) -> "Counter":
        out = Counter(self.name, self.help)
        for values in [self.values, *states]:
            for key, v in values.items():
                out.values[key] = out.values.get(key, 0.0) + v
        return out

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, v in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(dict(key))} {_num(v)}")
        return lines


class Gauge:
    """A value read when scraped (from a callable), e.g. queue depth or KV-cache use."""

    def __init__(self, name: str, help: str, fn: Callable[[], float]):
        self.name, self.help, self.fn = name, help, fn

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_num(self.fn())}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets=LATENCY_BUCKETS):
        self.name, self.help = name, help
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def state(self) -> tuple:
        return list(self.counts), self.sum, self.count

    def merged(self, states: list) -> "Histogram":
        out = Histogram(self.name, self.help, self.buckets)
        for counts, total, count in [self.state(), *states]:
            out.counts = [a + b for a, b in zip(out.counts, counts)]
            out.sum += total
            out.count += count
        return out

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for le, c in zip(self.buckets, self.counts):
            running += c
            lines.append(f'{self.name}_bucket{{le="{_num(le)}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum {_num(self.sum)}")
        lines.append(f"{self.name}_count {self.count}")
        return lines


class ServerMetrics:
    """All series the server exports; gauges read live state through the callables given."""

    def __init__(self, queue_depth: Callable[[], float], running: Callable[[], float],
                 waiting: Callable[[], float], kv_usage: Callable[[], float],
                 prompt_tokens: Callable[[], float], generation_tokens: Callable[[], float],
                 engine_steps: Callable[[], dict[str, list]] = dict, admission_window: Callable[[], float] = float):
        """engine_steps: {kind: [steps, seconds]} (kinds "prompt": a step that computed prompt
        tokens, "decode": one that did not); admission_window: seconds (engine_core.Admission)."""
        self.requests = Counter("exactllm_requests_total",
                                "HTTP generation requests by endpoint and outcome "
                                "(ok, rejected, invalid, aborted, error)")
        self.sequences = Counter("exactllm_sequences_total", "Sequences by how they ended (stop, length, abort, error)")
        self.ttft = Histogram("exactllm_time_to_first_token_seconds",
                              "Seconds from request arrival to the first generated token")
        self.itl = Histogram("exactllm_inter_token_latency_seconds",
                             "Seconds between consecutive tokens of a sequence")
        self.e2e = Histogram("exactllm_request_latency_seconds", "Seconds from arrival to the last token")
        self._series = [
            self.requests, self.sequences,
            _CounterFn("exactllm_prompt_tokens_total", "Prompt tokens admitted to the engine", prompt_tokens),
            _CounterFn("exactllm_generation_tokens_total", "Tokens generated", generation_tokens),
            Gauge("exactllm_queue_depth", "Sequences admitted by the server and not finished", queue_depth),
            Gauge("exactllm_num_requests_running", "Sequences the engine scheduler is running", running),
            Gauge("exactllm_num_requests_waiting", "Sequences waiting in the engine scheduler", waiting),
            Gauge("exactllm_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", kv_usage),
            _LabeledCounterFn("exactllm_engine_steps_total", "Engine steps by kind (prompt: computed prompt tokens)",
                              "kind", lambda: {k: v[0] for k, v in engine_steps().items()}),
            _LabeledCounterFn("exactllm_engine_step_seconds_total", "Seconds spent in engine steps, by kind",
                              "kind", lambda: {k: v[1] for k, v in engine_steps().items()}),
            Gauge("exactllm_admission_window_seconds",
                  "How long requests arriving during decode may wait to be added together", admission_window),
            self.ttft, self.itl, self.e2e,
        ]

    def snapshot(self) -> dict:
        """This process's own series (counters, histograms), to be summed by another's render()."""
        return {s.name: s.state() for s in self._series if hasattr(s, "state")}

    def render(self, others: list[dict] = ()) -> str:
        """The text exposition, this process's series summed with the snapshots of others."""
        series = [s.merged([o[s.name] for o in others]) if others and hasattr(s, "state") else s
                  for s in self._series]
        return "\n".join(line for s in series for line in s.render()) + "\n"


class _CounterFn(Gauge):
    """A counter whose value lives elsewhere (the engine's own stats)."""

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter", f"{self.name} {_num(self.fn())}"]


class _LabeledCounterFn:
    """Counters, one per label value, read when scraped from a callable {value: count}."""

    def __init__(self, name: str, help: str, label: str, fn: Callable[[], dict]):
        self.name, self.help, self.label, self.fn = name, help, label, fn

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter",
                *(f"{self.name}{_labels({self.label: k})} {_num(v)}" for k, v in sorted(self.fn().items()))]
