"""Prediction with Ray Data, post-processing rules and their calibration, ONNX export and the
HTTP service (Ray Serve)."""
