"""`python -m tests.chaos` (scripts/chaos): see tests/chaos/campaign.py."""

import sys

from tests.chaos.campaign import main

sys.exit(main())
