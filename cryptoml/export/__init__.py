"""ONNX export of the trained models as bundles (``model.onnx`` + ``model_meta.json``), with a parity gate.

- :mod:`cryptoml.export.convert`: converters per model kind and :func:`~cryptoml.export.convert.export_model`
  (imports tensorflow / tf2onnx / onnxmltools lazily, only for the kind being converted).
- :mod:`cryptoml.export.parity`: ONNX predictions and the native-vs-ONNX parity check.
- :mod:`cryptoml.export.bundle`: write, read and verify a bundle; imports only numpy, onnxruntime and the
  standard library, because the edge runner loads its models with it.

This package file imports nothing, so that ``import cryptoml.export.bundle`` stays light.
"""
