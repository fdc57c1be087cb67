"""Benchmarks: serving load (any OpenAI-style image endpoint), pipeline stages, server overhead, encoding.

Each writes JSON (and a plot where it helps) and never passes or fails on a time.
Run as `stepimage bench <tool> ...` or `python -m benchmarks <tool> ...`.
"""
