"""``python -m listener``: the listener service (what ``raddeploy listen`` runs)."""

from raddeploy_provider.cli import main

import sys

sys.exit(main(["listen"]))
