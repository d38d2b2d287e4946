"""The edge runner's pieces that run on the Raspberry Pi: numpy, onnxruntime, ccxt and the standard library only."""
