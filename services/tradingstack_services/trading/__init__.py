"""Trading: the order model, the OMS with its store, blotter and live stream, risk, paper
execution, positions and P&L."""
