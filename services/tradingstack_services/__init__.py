"""The trading services and the small library they share (settings, NATS, health, metrics, tracing)."""
