"""Dice counts and scores, scoring a submission, and figures."""
