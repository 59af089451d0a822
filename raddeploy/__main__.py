"""``python -m raddeploy``: the ``raddeploy`` command."""

import sys

from raddeploy.cli import main

sys.exit(main())
