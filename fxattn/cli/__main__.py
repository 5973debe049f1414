"""``python -m fxattn.cli``: the same as the ``fxattn`` command."""

import sys

from .main import main

sys.exit(main())
