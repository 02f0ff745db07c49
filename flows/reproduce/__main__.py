"""`python -m flows.reproduce`: the command line of flows/reproduce/runner.py."""

import sys

from flows.reproduce.runner import main

sys.exit(main())
