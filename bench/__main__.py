"""python -m bench [NAME ...] [--quick]: run the benchmarks, print the table, write bench/results.json.

`trading`: risk (in-process and HTTP), the OMS at 1,000 orders/s and flat out, order -> position.
`lake`: ticks -> NATS -> sink -> Delta on S3 against the raw JetStream consume rate.
`normalizer`: ticks -> QuestDB ticks and bars against the same floor.
`durability`: what sync_interval: always costs (JetStream acks and the OMS), on nats-server 2.10+.
`soak`: each trading service's RSS under steady orders and a feed of ever-new symbols (flat = bounded).
`scaleout`: one sink (and one normalizer) replica against two on one durable consumer.
`upkeep`: one symbol's day read from a sink-shaped Delta table before and after compaction, against one file.
`operator`: TradingStack apply -> Ready and a no-op resync on a real kube-apiserver (../shared/envtest).
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable
from pathlib import Path

from bench import durability, lake, normalizer, operator_bench, scaleout, soak, trading, upkeep_bench
from bench.report import Measure, table, write

BENCHES: dict[str, Callable[[bool, float | None], list[Measure]]] = {
    "trading": trading.run,
    "lake": lake.run,
    "normalizer": normalizer.run,
    "durability": durability.run,
    "soak": soak.run,
    "operator": operator_bench.run,
    "upkeep": upkeep_bench.run,
    "scaleout": scaleout.run,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(BENCHES), help=f"benchmarks ({', '.join(BENCHES)})")
    parser.add_argument("--quick", action="store_true", help="small loads, for a smoke check")
    parser.add_argument("--duration", type=float, help="seconds of sustained load (300 for the seed's 5-minute soak)")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    measures: list[Measure] = []
    for name in args.names:
        measures += BENCHES[name](args.quick, args.duration)
    print(f"machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}")
    print(table(measures))
    write(measures, Path(__file__).parent / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
