"""``python -m dora_network.smoke``: the README's smoke train (scripts/smoke_train.sh runs this)."""

import sys

from .train import main

sys.exit(main())
