"""The stack's claim on its Redis database: one database, one stack.

The services keep every key of a stack in its Redis database (orders and their client ids,
resting orders, routing marks, positions, the order-event publishers' consumer group): two
stacks on one database would fill, cancel and count each other's orders. The operator records
the stack as the database's owner (`tradingstack:owner`, set only if absent) and refuses a second
stack with OwnedByAnotherStack; another database of the same server (`redis://host:6379/1`) or
another server is the way to run two. deletionPolicy Delete gives the database back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis

from tradingstack.changes import BackendResult, Change, ItemStatus, Problem, UnreachableError
from tradingstack.credentials import ServerCredentials
from tradingstack.plan import OWNER_PREFIX, Plan

KEY_PREFIX = "tradingstack:"  # every key the services keep
OWNER_KEY = KEY_PREFIX + "owner"


class RedisProvisioner:
    backend = "redis"

    def __init__(self, url: str, credentials: ServerCredentials | None = None, timeout: float = 5.0) -> None:
        self.url = url
        options = (credentials or ServerCredentials()).redis_options()
        if credentials is not None and credentials.ca_data:
            options["ssl_ca_data"] = credentials.ca_data
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, **options)

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        """Redis's own errors as the backends' UnreachableError: the pass is retried later."""
        try:
            yield
        except redis.RedisError as exc:
            raise UnreachableError(f"Redis at {self.url}: {type(exc).__name__}: {exc}") from exc

    def _holder(self) -> str | None:
        with self._reachable():
            raw = self.client.get(OWNER_KEY)
        return raw.decode() if isinstance(raw, bytes) else raw

    def reconcile(self, plan: Plan, dry_run: bool = False) -> BackendResult:
        result = BackendResult(self.backend, dry_run=dry_run)
        owner = plan.stack.owner
        holder = self._holder()
        if holder is None:
            result.changes.append(Change("create", "Redis", OWNER_KEY, f"database owned by {plan.stack.namespace}/"
                                         f"{plan.stack.name}"))  # fmt: skip
            holder = owner
            if not dry_run:
                with self._reachable():
                    if not self.client.set(OWNER_KEY, owner, nx=True):
                        holder = self._holder()  # another stack claimed it first
        if holder != owner:
            other = (holder or "").removeprefix(OWNER_PREFIX)
            message = (f"Redis database {self.url} belongs to stack {other}: two stacks on one database would fill "
                       "and count each other's orders; give this stack a database of its own "
                       "(redis://host:6379/N) or another Redis")  # fmt: skip
            result.changes.clear()
            result.problems.append(Problem("Redis", OWNER_KEY, "OwnedByAnotherStack", message))
            result.items.append(ItemStatus("database", False, "OwnedByAnotherStack", message))
        else:
            result.items.append(ItemStatus("database", True, "InSync"))
        return result

    def delete(self, plan: Plan) -> list[Change]:
        """Delete the stack's keys and give the database back, if it is this stack's: a stack made next
        on it (the same one again, say) must not find old orders resting or old positions."""
        if self._holder() != plan.stack.owner:
            return []
        with self._reachable():
            removed = 0
            batch: list[bytes] = []
            for key in self.client.scan_iter(match=f"{KEY_PREFIX}*", count=1_000):
                if key != OWNER_KEY.encode():
                    batch.append(key)
                if len(batch) >= 1_000:
                    removed += int(self.client.unlink(*batch))
                    batch = []
            if batch:
                removed += int(self.client.unlink(*batch))
            self.client.delete(OWNER_KEY)
        return [Change("delete", "Redis", OWNER_KEY, f"database released, {removed} keys of the stack deleted")]
