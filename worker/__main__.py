"""``python -m worker`` is the ``sae-studio`` command."""

import sys

from .cli import main

sys.exit(main())
