"""A pytest plugin (``-p block_book_packages``) that makes the book's packages unimportable.

``tests/test_layers.py`` runs a few core test files under it: the core must work where
matplotlib, ipywidgets, ``retrac_lib.evaluation`` and ``retrac_lib.book`` cannot be imported
(a researcher's install without the ``[book]`` extra).
"""
import sys

BLOCKED = ("matplotlib", "ipywidgets", "retrac_lib.evaluation", "retrac_lib.book")
for _name in BLOCKED:
    sys.modules[_name] = None   # any import of it raises ImportError
