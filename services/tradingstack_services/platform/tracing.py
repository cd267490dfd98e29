"""OpenTelemetry trace context carried in NATS message headers (W3C traceparent)."""

from __future__ import annotations

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.trace import TracerProvider

_provider = TracerProvider()
trace.set_tracer_provider(_provider)


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Headers for an outgoing message, carrying the current span's context."""
    carrier = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def passthrough(headers: dict[str, str] | None) -> dict[str, str]:
    """The W3C trace headers of an incoming message, to carry on to what it causes without a span of ours."""
    return {k: v for k, v in (headers or {}).items() if k in ("traceparent", "tracestate")}


def extract(headers: dict[str, str] | None) -> context.Context:
    """The context an incoming message was published in (empty when it carried none)."""
    return propagate.extract(headers or {})
