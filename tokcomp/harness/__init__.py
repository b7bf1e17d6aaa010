"""Evaluation harness helpers: real datasets and small models used to measure accuracy."""
