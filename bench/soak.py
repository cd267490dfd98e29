"""Memory under sustained load: every trading service's resident set, sampled while orders flow at a
steady rate and ticks arrive for ever-new symbols (a hostile feed: the price book must keep only the
symbols traded), then the growth over the second half of the run. Warm-up (imports, first
allocations, caches filling) happens in the first half; a bounded service is flat in the second.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import nats

from bench.report import Measure
from bench.trading import open_loop, order_body, platform

RATE = 200  # orders a second, well inside one OMS's capacity here: this measures memory, not speed


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def _hostile_ticks(url: str, stop: threading.Event) -> int:
    """Ticks for a new symbol each time, as fast as the stream takes them a few hundred a second."""
    nc = await nats.connect(url)
    n = 0
    while not stop.is_set():
        symbol = f"X{n:08d}"
        tick = {"symbol": symbol, "timestamp": int(time.time() * 1000), "price": 1.0, "bid": 0.9, "ask": 1.1}
        await nc.publish(f"market.tick.{symbol}", json.dumps(tick).encode())
        n += 1
        if n % 100 == 0:
            await nc.flush()
            await asyncio.sleep(0.2)
    await nc.close()
    return n


def run(quick: bool, duration: float | None = None) -> list[Measure]:
    seconds = duration or (20.0 if quick else 120.0)
    with platform() as stack:
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in stack.pids if name != "bench"}
        stop = threading.Event()
        feed_count: list[int] = []
        feed = threading.Thread(target=lambda: feed_count.append(asyncio.run(_hostile_ticks(stack.nats_url, stop))))
        feed.start()

        def sample() -> None:
            started = time.monotonic()
            while not stop.is_set():
                for name, series in samples.items():
                    series.append((time.monotonic() - started, rss_mb(stack.pids[name])))
                stop.wait(1.0)

        sampler = threading.Thread(target=sample)
        sampler.start()
        load = asyncio.run(open_loop(stack.ports["oms"], "/orders", order_body(f"soak-{uuid.uuid4().hex[:6]}"),
                                     RATE, seconds))  # fmt: skip
        stop.set()
        feed.join(30)
        sampler.join(10)
    measures = []
    note = f"{len(load.latencies)} orders at {RATE}/s over {seconds:.0f} s, {feed_count[0] if feed_count else 0} " \
           "ticks of distinct symbols"  # fmt: skip
    for name, series in samples.items():
        half = [rss for at, rss in series if at >= seconds / 2]
        if len(half) < 2:
            continue
        growth = half[-1] - half[0]
        measures.append(Measure(f"{name} RSS growth, 2nd half", growth, "MB", half[0], target=5.0,
                                lower_is_better=True, note=note))  # fmt: skip
        note = ""
    return measures
