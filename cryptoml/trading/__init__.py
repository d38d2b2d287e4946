"""Trading core shared by the edge runner and the backtest: the rule set (strategy) and the broker interface.

NumPy and the standard library only (it runs on the edge next to onnxruntime).
"""
