"""A bench measure, the table printed, and bench/results.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Measure:
    name: str
    value: float
    unit: str
    floor: float | None
    target: float | None = None
    lower_is_better: bool = False
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.value / self.floor if self.floor else None

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.value <= self.target if self.lower_is_better else self.value >= self.target


def table(measures: list[Measure]) -> str:
    lines = [f"{'measure':<32} {'value':>14} {'unit':<10} {'floor':>12} {'ratio':>7} {'target':>10} met",
             "-" * 96]  # fmt: skip
    for m in measures:
        floor = f"{m.floor:,.1f}" if m.floor is not None else "-"
        ratio = f"{m.ratio:.2f}" if m.ratio is not None else "-"
        target = ("<=" if m.lower_is_better else ">=") + f"{m.target:,.1f}" if m.target is not None else "-"
        met = {True: "yes", False: "NO", None: "-"}[m.met]
        lines.append(f"{m.name:<32} {m.value:>14,.1f} {m.unit:<10} {floor:>12} {ratio:>7} {target:>10} {met}")
    return "\n".join(lines)


def write(measures: list[Measure], path: Path) -> None:
    rows = [{**asdict(m), "ratio": m.ratio, "met": m.met} for m in measures]
    path.write_text(json.dumps(rows, indent=2) + "\n")
