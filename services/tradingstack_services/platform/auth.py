"""Who is calling: API keys of trading accounts, sent as `Authorization: Bearer <key>`.

The operator lists the accounts in AUTH_ACCOUNTS and sets AUTH_KEYS_<ACCOUNT> from each
account's Secret: SHA-256 hex digests of its keys, one a line. A key is looked up by its
digest, so the service never holds a key it could leak, and a wrong key costs one hash.
With no accounts, order entry is open (account None); with accounts but no readable keys,
nobody gets in (fail closed). Oversight endpoints take the same keys; an account listed in
AUTH_OVERSIGHT (role oversight) reads every account's rows there, any other only its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException

from tradingstack.plan import account_keys_variable
from tradingstack_services.platform.settings import ServiceSettings

log = logging.getLogger(__name__)
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="tradingstack"'}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Reader:
    """Who reads oversight data (alerts, reports, execution quality, resting orders), and how much of it."""

    account: str | None  # the caller's account; None when no accounts are configured
    everything: bool  # every account's rows: an account with role oversight, or no accounts at all

    def sees(self, account: str | None) -> bool:
        return self.everything or account == self.account

    def require_everything(self, what: str) -> None:
        """403 unless the caller reads across accounts (what it asks for is not per account)."""
        if not self.everything:
            raise HTTPException(403, f"{what} needs an account with role oversight")


def _names(listed: str | None) -> list[str]:
    return [n.strip() for n in (listed or "").split(",") if n.strip()]


class Accounts:
    def __init__(self, names: list[str], digests: dict[str, str], oversight: frozenset[str] = frozenset()) -> None:
        self.names = names
        self.by_digest = digests  # SHA-256 hex -> account
        self.oversight = oversight  # accounts that read every account's oversight data

    @classmethod
    def from_environment(cls, accounts: str | None, environ: Mapping[str, str] = os.environ,
                         oversight: str | None = None) -> Accounts:  # fmt: skip
        names = _names(accounts)
        digests: dict[str, str] = {}
        for name in names:
            variable = account_keys_variable(name)
            lines = [line.strip().lower() for line in environ.get(variable, "").splitlines()]
            found = [line for line in lines if len(line) == 64 and all(c in "0123456789abcdef" for c in line)]
            if not found:
                log.warning("account %s has no API key digests (%s): it cannot log in", name, variable)
            digests |= dict.fromkeys(found, name)
        return cls(names, digests, frozenset(_names(oversight)) & frozenset(names))

    @property
    def required(self) -> bool:
        return bool(self.names)

    def account_for(self, authorization: str | None) -> str | None:
        """The caller's account (None when order entry is open); 401 without a known key."""
        if not self.required:
            return None
        scheme, _, key = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise HTTPException(401, "an API key is required: Authorization: Bearer <key>", headers=CHALLENGE)
        account = self.by_digest.get(digest(key.strip()))
        if account is None:
            raise HTTPException(401, "unknown API key", headers=CHALLENGE)
        return account

    def dependency(self) -> Callable[..., Awaitable[str | None]]:
        """A FastAPI dependency giving the caller's account."""

        async def caller(authorization: Annotated[str | None, Header()] = None) -> str | None:
            return self.account_for(authorization)

        return caller

    def reader(self) -> Callable[..., Awaitable[Reader]]:
        """A FastAPI dependency for oversight endpoints: the same keys as order entry (401 without
        one when accounts are configured), and whether the caller may read across accounts."""

        async def reader(authorization: Annotated[str | None, Header()] = None) -> Reader:
            account = self.account_for(authorization)
            return Reader(account, not self.required or account in self.oversight)

        return reader


def readers(settings: ServiceSettings) -> Any:
    """The oversight endpoints' dependency (`reader: auth.Reader = readers`), from the service's settings."""
    return Depends(Accounts.from_environment(settings.AUTH_ACCOUNTS, oversight=settings.AUTH_OVERSIGHT).reader())


class PolicyUnavailableError(RuntimeError):
    """No decision (the policy server is away, slow or answered nonsense): refuse, and say retry."""


class Policy:
    """An external authorization policy, OPA's data API: `POST {url}/v1/data/{path}` with
    `{"input": ...}`; only `{"result": true}` allows. An undefined decision (no "result", as OPA
    answers when no rule matched) refuses, and no answer at all refuses too: fail closed."""

    def __init__(self, url: str | None, path: str, timeout: float) -> None:
        self.target = f"{url.rstrip('/')}/v1/data/{path.strip('/')}" if url else None
        self.timeout = timeout

    def _ask(self, target: str, body: bytes) -> Any:
        request = urllib.request.Request(target, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    async def allows(self, action: str, account: str | None, **facts: Any) -> bool:
        if self.target is None:
            return True
        body = json.dumps({"input": {"action": action, "account": account, **facts}}).encode()
        try:
            answer = await asyncio.to_thread(self._ask, self.target, body)
        except (OSError, ValueError) as exc:  # refused, timed out, 5xx, not JSON
            raise PolicyUnavailableError(f"the authorization policy did not decide ({type(exc).__name__})") from exc
        return isinstance(answer, dict) and answer.get("result") is True
