"""Oversight: what watches the trading (the compliance-scanner's rules over the order stream)."""
