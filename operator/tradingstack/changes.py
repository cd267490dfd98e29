"""What a provisioner changed or found, shared by every backend (Kubernetes included)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Change:
    """One mutation made (or, in a dry run, needed)."""

    action: Literal["create", "update", "delete"]
    kind: str
    name: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.action} {self.kind}/{self.name}" + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class Problem:
    """Something the provisioner will not fix on its own (an immutable field, a type change)."""

    kind: str
    name: str
    reason: str  # CamelCase, becomes the condition reason
    message: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}: {self.message}"


@dataclass
class ItemStatus:
    """One stream, bucket or table in status.streams[] / buckets[] / tables[]."""

    name: str
    ready: bool
    reason: str
    message: str = ""

    def as_status(self) -> dict[str, Any]:
        return {"name": self.name, "ready": self.ready, "reason": self.reason, "message": self.message}


@dataclass
class BackendResult:
    """The outcome of one backend's pass."""

    backend: str  # "streams", "buckets", "tables"
    changes: list[Change] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    items: list[ItemStatus] = field(default_factory=list)
    unreachable: str | None = None  # why the server could not be reached
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return self.unreachable is None and not self.problems and not (self.dry_run and self.changes)


class UnreachableError(Exception):
    """The backend's server did not answer; the pass for this backend is retried later."""
