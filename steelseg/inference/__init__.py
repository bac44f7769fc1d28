"""Prediction with Ray Data, post-processing rules and their calibration."""
