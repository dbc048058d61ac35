"""Evaluation: task metrics, predictions from each system, side-by-side reports."""
