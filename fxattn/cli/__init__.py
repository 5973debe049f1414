"""The ``fxattn`` command line: ``inspect``, ``transform``, ``export``, ``compile``, ``bench``,
``demo`` (see ``fxattn --help``)."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
