"""`python -m core.cli …`: the `promptdev` command."""

import sys

from core.cli import main

sys.exit(main())
