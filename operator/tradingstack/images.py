"""Which images a TradingStack may run: the operator's answer to the confused deputy.

Whoever may edit a TradingStack can point its pods at any image (and any Secret of the
namespace), which is as much power as creating Deployments there. An operator started with
allowed repositories refuses any other image: nothing is applied, and the stack reports
Degraded/ImageNotAllowed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tradingstack.plan import Plan

ALLOWED_ENV = "TRADINGSTACK_ALLOWED_IMAGE_REPOSITORIES"  # comma-separated; set by --allowed-image-repository


def repository_of(image: str) -> str:
    """`registry/path/name[:tag][@digest]` -> `registry/path/name` (a registry's :port is kept)."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


@dataclass(frozen=True)
class ImagePolicy:
    """Allowed repositories: an entry allows itself and what is below it (`ghcr.io/acme` allows
    `ghcr.io/acme/tradingstack`, not `ghcr.io/acme-evil/x`). No entries: every image is allowed."""

    allowed: tuple[str, ...] = ()

    @classmethod
    def from_environment(cls) -> ImagePolicy:
        entries = (e.strip().rstrip("/") for e in os.environ.get(ALLOWED_ENV, "").split(","))
        return cls(tuple(e for e in entries if e))

    def allows(self, image: str) -> bool:
        repository = repository_of(image)
        return not self.allowed or any(repository == a or repository.startswith(a + "/") for a in self.allowed)

    def refusal(self, plan: Plan) -> str | None:
        """Why the plan may not run, or None."""
        refused = sorted({w.image for w in plan.workloads if not self.allows(w.image)})
        if not refused:
            return None
        return f"image(s) {', '.join(refused)} not in the operator's allowed repositories ({', '.join(self.allowed)})"
