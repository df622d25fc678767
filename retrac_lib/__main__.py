"""``python -m retrac_lib attribute ...``: see ``retrac_lib.cli``."""
import sys

from .cli import main

sys.exit(main())
