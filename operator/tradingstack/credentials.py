"""Credentials for NATS, Redis and QuestDB, and URLs made safe to print.

The operator reads them from the Secret a spec's `secretRef` names; a service reads them from
its environment, where Kubernetes put them from the same Secret (`valueFrom.secretKeyRef`).
They never travel in a URL, a ConfigMap, a status, an event or a log line.
"""

from __future__ import annotations

import base64
import functools
import re
import ssl
from dataclasses import dataclass, field
from typing import Any

# scheme://user:password@host -> scheme://***@host (the user may be a secret too: a token).
_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)[^/@\s]*@", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL with any user information replaced, fit for a log line, a status or an error."""
    return _USERINFO.sub(r"\1***@", url)


def has_userinfo(url: str) -> bool:
    return _USERINFO.match(url) is not None


@dataclass(frozen=True)
class ServerCredentials:
    """A username and password, or a token. Either may be absent: the server then needs none."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    ca_file: str | None = None  # a CA bundle (PEM file) verifying the server over TLS
    ca_data: str | None = field(default=None, repr=False)  # or the bundle itself (the operator reads it)

    @functools.cached_property
    def _ssl_context(self) -> ssl.SSLContext | None:
        if not (self.ca_file or self.ca_data):
            return None
        return ssl.create_default_context(cafile=self.ca_file, cadata=self.ca_data)

    def ssl_context(self) -> ssl.SSLContext | None:
        """A context verifying the server (hostname included) against the CA, or None: no TLS asked.
        Made once: QuestDB's clients ask for it on every request, and loading the CA is not free."""
        return self._ssl_context

    def nats_options(self) -> dict[str, Any]:
        """Keyword arguments for nats.connect."""
        options: dict[str, Any] = {}
        if (context := self.ssl_context()) is not None:
            options["tls"] = context
        if self.token:
            return options | {"token": self.token}
        if self.password:
            return options | {"user": self.username or "", "password": self.password}
        return options

    def redis_options(self) -> dict[str, Any]:
        """Keyword arguments for redis.Redis (Redis 6 ACL user, or the default user's password)."""
        options: dict[str, Any] = {"ssl_ca_certs": self.ca_file} if self.ca_file else {}
        if self.password:
            return options | {"username": self.username, "password": self.password}
        return options

    def authorization(self) -> str | None:
        """An HTTP Authorization header: QuestDB's basic auth (http.user/http.password), or a token."""
        if self.token:
            return f"Bearer {self.token}"
        if self.password:
            pair = f"{self.username or ''}:{self.password}".encode()
            return "Basic " + base64.b64encode(pair).decode()
        return None
