"""The shared library every service is built on: settings, NATS and Redis clients, the app with
health and metrics, JSON logs, tracing, QuestDB line protocol, the runner."""
