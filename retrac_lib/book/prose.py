"""Numbers and outcome-dependent words for the book's prose, through myst-nb's ``glue``.

A chapter never types a result by hand: a cell computes it, ``glue`` stores its text under a
name, and the markdown shows it with ``{glue:text}`name```. Where a sentence depends on the
outcome, ``pick`` and ``compare`` choose its wording from the numbers; each alternative is
written once, there. The calls live in a section's "what this section states" cell, which the
book removes and Colab collapses (a ``#@title`` cell; see ``tools/sync_notebooks.py``), so the
cells a reader reads hold the recipe and its printed output only. In Colab (no myst-nb) ``glue``
stores nothing; the reader cells print the values.

    #@title What this section states
    prose.glue_all("ch1", first_loss=f"{first:.3f}", final_loss=f"{final:.3f}")
"""
from __future__ import annotations

import re

NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def glue(name: str, text) -> str:
    """Store ``text`` for ``{glue:text}`name``` in the book; return it (as a plain ``str``).

    Numbers must come pre-formatted (``f"{x:.2f}"``), so the page shows exactly what the
    notebook prints. Outside a Jupyter kernel with myst-nb this only checks and returns.
    """
    if not isinstance(name, str) or not NAME.match(name):
        raise ValueError(f"glue name {name!r} must be lower-case letters, digits and '_', "
                         "starting with a letter (e.g. 'ch4_distinct_tracin').")
    if not isinstance(text, str):
        raise TypeError(f"glue {name}: pass the text as it should read, e.g. f'{{x:.2f}}'; "
                        f"got {type(text).__name__}.")
    try:
        from IPython import get_ipython
        from myst_nb import glue as nb_glue
    except ImportError:
        return text
    if get_ipython() is not None:   # stored as repr(text): {glue:text} reads it back verbatim
        nb_glue(name, text, display=False)
    return text


def glue_all(chapter: str, **texts: str) -> dict[str, str]:
    """``glue`` every ``name=text`` as ``{chapter}_{name}``; return the glued names and texts."""
    if not texts:
        raise ValueError("glue_all needs at least one name=text, e.g. glue_all('ch1', n=f'{n}').")
    return {f"{chapter}_{name}": glue(f"{chapter}_{name}", text) for name, text in texts.items()}


def pick(condition: bool, if_true: str, if_false: str) -> str:
    """The wording that is true: ``if_true`` when ``condition`` holds, else ``if_false``."""
    if type(condition).__name__ not in ("bool", "bool_"):
        raise TypeError(f"pick needs a bool condition (for a tensor, pass bool(...)); "
                        f"got {type(condition).__name__}.")
    return if_true if condition else if_false


def compare(a: float, b: float, more: str, less: str, same: str, tolerance: float = 0.0) -> str:
    """``more`` if ``a`` exceeds ``b`` by more than ``tolerance``, ``less`` if it falls short by
    more than that, else ``same``."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}.")
    if a > b + tolerance:
        return more
    if a < b - tolerance:
        return less
    return same
