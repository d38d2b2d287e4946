"""Walk-forward backtest: windows, the event engine shared with the edge strategy, metrics and reports."""
