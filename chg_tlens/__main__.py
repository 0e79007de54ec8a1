"""``python -m chg_tlens`` (and ``torchrun ... -m chg_tlens``) runs the CLI."""

import sys

from chg_tlens.app.cli import main

sys.exit(main())
