"""``python -m hpcflow.run.campaign ...`` = ``hpcflow campaign ...``."""

import sys

from hpcflow.run.campaign.cli import main

sys.exit(main())
