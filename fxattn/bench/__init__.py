"""Benchmark: latency and training-step cost of the original, transformed and lean models.

``benchmark.py`` runs the protocol (interleaved, warmed-up runs; medians and intervals);
``cost.py`` accounts for where DIA's time goes in an ONNX file.
"""

from .benchmark import BenchmarkResult, benchmark

__all__ = ["BenchmarkResult", "benchmark"]
