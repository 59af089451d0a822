"""``python -m listener``: the listener service (what ``raddeploy listen`` runs)."""

import sys

from listener.service import main

sys.exit(main())
