"""What tracing's hooks (:mod:`rabbitkeys._observe.tracing`, the worker's in
:mod:`rabbitkeys._worker.tracing`) cost per job, in three states.

``python -m rabbitkeys.tools.bench.tracing_cost [--jobs 200000] [--rounds 3]``

The publisher calls ``publish_span`` once per ``publish()`` (``start_publish`` and
``end_publish`` per sync publish), the worker ``handle_span`` once per attempt (with
``failed`` on a failed one). This times those calls alone, each in a fresh interpreter:

* ``absent``: opentelemetry not importable (the ``rabbitkeys[otel]`` extra not installed;
  simulated by ``sys.modules["opentelemetry"] = None``);
* ``api``: the API installed, no tracer provider set (what a library user who installed
  the extra, or got the API through another package, runs without configuring tracing);
* ``sdk``: the SDK's TracerProvider set, spans exported nowhere (a span processor that drops
  them), the cost of tracing on, for scale.

The figures are microseconds per job, the fastest of ``--rounds``; set them beside the
worker's and publisher's CPU per job (``worker_cost``, docs/internals/publisher.md "Batches":
40 to 330 microseconds).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

__all__ = ["main"]

_MODES = ("absent", "api", "sdk")

_CHILD = """
import json, sys, time
mode, jobs, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if mode == "absent":
    sys.modules["opentelemetry"] = None
if mode == "sdk":
    from opentelemetry import trace
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    provider = TracerProvider()
    provider.add_span_processor(SpanProcessor())  # the base class: drops every span
    trace.set_tracer_provider(provider)

from rabbitkeys._worker.app import Message
from rabbitkeys._wire.topology import KeyRef
from rabbitkeys._observe.tracing import end_publish, publish_span, start_publish
from rabbitkeys._worker.tracing import handle_span

ref = KeyRef.of("user-1", "mail")
published_at = time.time_ns() // 1000
message = Message(
    key="user-1", job_type="mail", body=b"x",
    headers={"x-rabbitkeys-published-at": published_at}, publisher_id="p", sequence=1,
    attempt=1, redelivered=False,
)


def publish():
    for _ in range(jobs):
        with publish_span("ns", ref, None):
            pass


def sync_publish():
    for _ in range(jobs):
        span, headers = start_publish("ns", ref, None)
        if span is not None:
            end_publish(span, None)


def handle():
    for _ in range(jobs):
        with handle_span(message, published_at):
            pass


def empty():
    for _ in range(jobs):
        pass


result = {}
for name, loop in (("empty", empty), ("publish", publish), ("sync publish", sync_publish),
                   ("handle", handle)):
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        loop()
        best = min(best, time.perf_counter() - started)
    result[name] = best / jobs * 1e6
print(json.dumps(result))
"""


def measure(mode: str, jobs: int, rounds: int) -> dict[str, float]:
    """Microseconds per call of each hook in ``mode``, the empty loop's subtracted."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CHILD), mode, str(jobs), str(rounds)],
        capture_output=True,
        text=True,
        check=True,
    )
    figures: dict[str, float] = json.loads(done.stdout)
    empty = figures.pop("empty")
    return {name: max(0.0, value - empty) for name, value in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = {
        mode: measure(mode, args.jobs if mode != "sdk" else args.jobs // 10, args.rounds)
        for mode in _MODES
    }
    hooks = list(rows["absent"])
    print("| opentelemetry | " + " | ".join(f"{hook} (µs/job)" for hook in hooks) + " |")
    print("| --- | " + " | ".join("---:" for _ in hooks) + " |")
    for mode, figures in rows.items():
        print(f"| {mode} | " + " | ".join(f"{figures[hook]:.2f}" for hook in hooks) + " |")


if __name__ == "__main__":
    main()
