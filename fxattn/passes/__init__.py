"""Graph passes: each takes a graph (or module) and returns a new one plus a small report."""

from .insert_dia import DIAInsertReport, insert_dia
from .insert_ssia import SSIAInsertReport, insert_ssia
from .strip import StripReport, strip_pass

__all__ = [
    "DIAInsertReport",
    "SSIAInsertReport",
    "StripReport",
    "insert_dia",
    "insert_ssia",
    "strip_pass",
]
