"""Market data: the gateway and its dashboard, the tick schema, the normalizer (ticks to QuestDB
and bars), the Delta Lake sinks, the quote book."""
