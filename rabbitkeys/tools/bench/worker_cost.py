"""The worker's own CPU per job, beside a bare aio-pika consumer of the same key queues.

``python -m rabbitkeys.tools.bench.worker_cost [--keys 1000] [--jobs 10] [--batch 10]
[--rounds 2] [--code NAME=DIR ...] [--variants rabbitkeys,raw,NAME] [--profile DIR]``

In a vhost of its own (``broker.run_vhost``: made through the management API and deleted
at the end, with all its queues), a registry runs in this process and ensures ``--keys``
keys. Then, for each variant in turn, one worker process is started and left to take every
key, then stopped (SIGSTOP) while ``--jobs`` jobs per key are put into the key queues
(plain messages, or batches of ``--batch``); its CPU time (``/proc``) is read, it is woken
(SIGCONT), and its CPU time is read again once it handled them all:

* ``rabbitkeys``: ``rabbitkeys worker`` with an async handler that does nothing;
* ``NAME`` of ``--code NAME=DIR``: the same with the package found in ``DIR`` (e.g. an
  older commit's ``git archive``), to compare with in the same run;
* ``raw``: a bare aio-pika consumer of the same queues (one consumer each, prefetch 4, an ack
  per message), the floor of what a worker in Python on aio-pika spends.

``--profile DIR`` runs the rabbitkeys worker under cProfile and writes ``DIR/<variant>.prof``.
The figures are CPU milliseconds per job: compare them within one run (the machine's other
load moves them all).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
from pydantic import SecretStr

from ..._broker.control import ControlClient
from ..._registry.registry import Registry
from ..._settings import Settings, split_urls
from ..._wire.batch import Record
from ..._wire.envelope import HEADER_JOBS, encode_batch, encode_envelope
from ..._wire.protocol import Ensured, EnsureKey
from ..._wire.topology import KeyRef, Names
from ..cluster import _settings_env
from .broker import cpu_seconds, run_vhost
from .scale import free_port

__all__ = ["main"]

_APP = """
from rabbitkeys import App, Message

app = App()


@app.handler()
async def nothing(message: Message) -> None:
    return None
"""


@dataclass
class Measured:
    variant: str
    batch: int
    jobs: int
    cpu_seconds: float
    seconds: float

    def line(self) -> str:
        shape = "plain" if self.batch == 1 else f"batches of {self.batch}"
        return (
            f"{self.variant:<11} {shape:<14} {self.jobs:>7} jobs  "
            f"{1000 * self.cpu_seconds / self.jobs:6.3f} ms CPU/job  "
            f"{self.jobs / self.seconds:8.0f} jobs/s"
        )


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.2)


class _Feeder:
    def __init__(self, settings: Settings, routing: dict[str, str], channel: Any) -> None:
        self.settings = settings
        self.routing = routing
        self.channel: aiormq.Channel = channel
        self.exchange = Names(settings.namespace).jobs_exchange("default")
        self.sequence = 0

    async def feed(self, jobs: int, batch: int) -> int:
        """``jobs`` per key, as plain messages (``batch`` 1) or batches; returns the jobs."""
        sends: list[Awaitable[Any]] = []
        body = b"x" * 20
        for key, routing_key in self.routing.items():
            ref = KeyRef.of(key)
            for start in range(0, jobs, batch):
                if batch == 1:
                    self.sequence += 1
                    properties = encode_envelope(
                        ref, publisher_id="cost", sequence=self.sequence, delivery_mode=2
                    )
                    payload = body
                else:
                    records = []
                    for _ in range(min(batch, jobs - start)):
                        self.sequence += 1
                        records.append(Record(self.sequence, time.time_ns() // 1000, body))
                    payload, properties = encode_batch(
                        ref, records, publisher_id="cost", delivery_mode=2
                    )
                sends.append(
                    self.channel.basic_publish(
                        payload,
                        exchange=self.exchange,
                        routing_key=routing_key,
                        properties=properties,
                    )
                )
                if len(sends) >= 500:
                    await asyncio.gather(*sends)
                    sends = []
        await asyncio.gather(*sends)
        return jobs * len(self.routing)


async def _run_variant(
    variant: str,
    settings: Settings,
    feeder: _Feeder,
    queues: list[str],
    *,
    jobs: int,
    batch: int,
    app_dir: str,
    code: dict[str, str],
    profile: str | None,
) -> Measured:
    env = {**os.environ, **_settings_env(settings)}
    env["RABBITKEYS_LOG_LEVEL"] = "WARNING"
    path = [app_dir, *([code[variant]] if variant in code else [])]
    env["PYTHONPATH"] = os.pathsep.join([*path, env.get("PYTHONPATH", "")])
    ready: Callable[[], bool]
    handled: Callable[[], float]
    if variant == "raw":
        queue_file = Path(app_dir) / "queues.txt"
        queue_file.write_text("\n".join(queues))
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "rabbitkeys.tools.bench.worker_cost",
            "--raw-consumer",
            str(queue_file),
            env=env,
            cwd=app_dir,
            stdout=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        counted = [-1.0]  # the consumer prints 0 once it consumes every queue

        async def read() -> None:
            assert process.stdout is not None
            async for line in process.stdout:
                counted[0] = float(line)

        reader: asyncio.Task[None] | None = asyncio.create_task(read())
        ready = lambda: counted[0] >= 0  # noqa: E731
        handled = lambda: counted[0]  # noqa: E731
    else:
        port = free_port()
        env["RABBITKEYS_METRICS_PORT"] = str(port)
        command = ["-m", "rabbitkeys", "worker", "cost_app:app"]
        if profile:
            command = ["-m", "cProfile", "-o", f"{profile}/{variant}-{batch}.prof", *command]
        # run from app_dir: ``python -m`` puts the working directory first on sys.path
        process = await asyncio.create_subprocess_exec(
            sys.executable, *command, env=env, cwd=app_dir
        )

        def owned() -> bool:
            try:
                return _scrape(port).get("rabbitkeys_owned_keys", 0) >= len(queues)
            except OSError:
                return False

        ready = owned
        handled = lambda: _scrape(port).get("rabbitkeys_handled_messages_total", 0)  # noqa: E731
        reader = None
    try:
        await _until(ready, 120, f"{variant}: the worker did not take every key")
        await asyncio.sleep(1)
        # Stopped while the queues fill: the jobs then come as fast as the worker takes
        # them, and nothing else (the feeding here) shares the CPU with it.
        before_count = handled()
        process.send_signal(signal.SIGSTOP)
        total = await feeder.feed(jobs, batch)
        before_cpu, started = cpu_seconds(process.pid), time.monotonic()
        process.send_signal(signal.SIGCONT)
        await _until(lambda: handled() - before_count >= total, 300, f"{variant}: not all handled")
        seconds = time.monotonic() - started
        cpu = cpu_seconds(process.pid) - before_cpu
    finally:
        process.send_signal(signal.SIGCONT)  # a stopped process takes no SIGTERM
        process.send_signal(signal.SIGTERM)
        await process.wait()
        if reader is not None:
            reader.cancel()
    return Measured(variant, batch, total, cpu, seconds)


def _reads_batches(directory: str | None) -> bool:
    if directory is None:
        return True
    execution = Path(directory, "rabbitkeys", "_worker/execution.py")
    return "jobs_of" in execution.read_text()


async def _measure(args: argparse.Namespace) -> list[Measured]:
    code = dict(item.split("=", 1) for item in args.code)
    variants = args.variants.split(",")
    for variant in variants:
        if variant not in ("rabbitkeys", "raw", *code):
            raise SystemExit(f"{variant}: not rabbitkeys, raw or a --code NAME")
    results: list[Measured] = []
    local = Settings(
        amqp_url=SecretStr("amqp://guest:guest@127.0.0.1:5672/"),
        namespace="cost",
        heartbeat_interval=1.0,
        worker_timeout=600.0,  # the worker is stopped (SIGSTOP) while the queues fill
        idle_period=3600.0,  # no key retired between two variants
    )
    async with run_vhost(local, "worker-cost") as settings:
        url = settings.amqp_urls[0]
        registry = Registry(settings)
        await registry.start()
        try:
            await asyncio.wait_for(registry.wait_leading(), 30)
            connection = await aio_pika.connect(url)
            client = ControlClient(connection, Names("cost"), "guest")
            await client.start()
            keys = [f"key-{n}" for n in range(args.keys)]
            routing: dict[str, str] = {}

            async def ensure(key: str) -> None:
                reply = await client.request(EnsureKey(job_type="default", key=key), timeout=60)
                assert isinstance(reply, Ensured), reply
                routing[key] = reply.routing_key

            for start in range(0, len(keys), 100):
                await asyncio.gather(*(ensure(k) for k in keys[start : start + 100]))
            raw = await aiormq.connect(url)
            channel = await raw.channel(publisher_confirms=True)
            feeder = _Feeder(settings, routing, channel)
            queues = [Names("cost").key_queue(KeyRef.of(k)) for k in keys]
            with tempfile.TemporaryDirectory() as app_dir:
                Path(app_dir, "cost_app.py").write_text(_APP)  # noqa: ASYNC240
                for _ in range(args.rounds):
                    for variant in variants:
                        for batch in (1, args.batch):
                            if batch > 1 and not _reads_batches(code.get(variant)):
                                continue
                            measured = await _run_variant(
                                variant,
                                settings,
                                feeder,
                                queues,
                                jobs=args.jobs,
                                batch=batch,
                                app_dir=app_dir,
                                code=code,
                                profile=args.profile,
                            )
                            print(measured.line(), flush=True)
                            results.append(measured)
            await raw.close()
            await connection.close()
        finally:
            await registry.close()
    return results


async def _raw_consumer(queue_file: str) -> None:
    """One bare consumer per queue, prefetch 4, an ack per message."""
    queues = Path(queue_file).read_text().split()  # noqa: ASYNC240
    count = 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    connection = await aio_pika.connect(split_urls(os.environ["RABBITKEYS_AMQP_URL"])[0])
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=4)

    async def nothing(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        return None

    async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal count
        await nothing(message)
        await message.ack()
        jobs = message.headers.get(HEADER_JOBS)
        count += jobs if isinstance(jobs, int) else 1

    for name in queues:
        await (await channel.get_queue(name, ensure=False)).consume(handle)
    print(0, flush=True)
    while not stop.is_set():
        await asyncio.sleep(0.2)
        print(count, flush=True)
    await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=10, help="jobs per key")
    parser.add_argument("--batch", type=int, default=10, help="jobs per batch")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--code",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a variant NAME: the worker with the rabbitkeys package found in DIR (e.g. an "
        "older commit's `git archive`); repeatable",
    )
    parser.add_argument("--variants", default="rabbitkeys,raw", help="which to run, in this order")
    parser.add_argument("--profile", help="write cProfile output of the workers here")
    parser.add_argument("--raw-consumer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    if args.raw_consumer:
        runner(_raw_consumer(args.raw_consumer))
        return
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    runner(_measure(args))


if __name__ == "__main__":
    main()
