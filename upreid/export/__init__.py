"""Shipping what was trained: ONNX export of the feature extractor (:mod:`upreid.export.onnx`)."""
