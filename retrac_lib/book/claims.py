"""Claims as checks: what the book says about its results, evaluated where it is said.

A chapter states a result only through ``check``: the claim in words, whether the numbers the
notebook just computed bear it out, and the measured value. At full quality a claim that does
not hold raises ``ClaimFailed``, so the strict book build fails instead of printing a sentence its
numbers no longer support; under ``RETRAC_SMOKE=1`` (tiny sizes that prove nothing) claims are
recorded and printed but never fail.

Records go to ``$RETRAC_CLAIMS_DIR/<chapter>.json`` when that variable is set (the book build sets
it: ``book/_ext/retrac_claims.py`` lists every record on the page "What this book measured").
Each kernel rewrites the file of its chapter with the claims it has made, so a claim removed from a
chapter disappears from the page at its next build. Outside a book build the records stay in
memory (``records()``).

    from retrac_lib.book import claims
    claims.check("ch4-distinct-proponents",
                 "ReTrac's top-10 lists hold more distinct training digits than TracIn's",
                 distinct["retrac"] > distinct["tracin"],
                 f"TracIn {distinct['tracin']}, ReTrac {distinct['retrac']}")
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..config import is_smoke

CLAIMS_ENV = "RETRAC_CLAIMS_DIR"
NAME = re.compile(r"^(ch[0-9]+[a-z]?)-[a-z0-9]+(-[a-z0-9]+)*$")

# name -> record, in the order first made. A fresh kernel starts empty, so its first write of a
# chapter's file replaces what an earlier build of that chapter left there.
_records: dict[str, dict] = {}


class ClaimFailed(AssertionError):
    """A claim the book makes did not hold at full quality."""


def check(name: str, statement: str, holds: bool, measured: str) -> bool:
    """Record the claim ``statement`` under ``name`` with its ``measured`` value; return ``holds``.

    ``name`` is a unique id with a chapter prefix ("ch4-distinct-proponents"); ``holds`` the
    computed truth (a Python or NumPy bool); ``measured`` a short text of the measured value(s).
    At full quality a claim that does not hold raises ``ClaimFailed`` after it is recorded.
    """
    match = NAME.match(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"claim name {name!r} must be a chapter prefix and lower-case words joined "
                         "by '-', e.g. 'ch4-distinct-proponents'.")
    for arg, value in (("statement", statement), ("measured", measured)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"claim {name}: {arg} must be a non-empty string, got {value!r}.")
    if type(holds).__name__ not in ("bool", "bool_"):
        raise TypeError(f"claim {name}: holds must be a bool computed from the results (for a "
                        f"tensor, pass bool(...)); got {type(holds).__name__}.")
    holds, smoke = bool(holds), is_smoke()
    chapter = match.group(1)
    record = dict(name=name, chapter=chapter, statement=statement.strip(),
                  measured=measured.strip(), holds=holds, mode="smoke" if smoke else "full")
    _records[name] = record
    _write(chapter)
    print(f"claim {name}: {'holds' if holds else 'DOES NOT HOLD'} ({record['measured']}): "
          f"{record['statement']}")
    if not holds and not smoke:
        raise ClaimFailed(f"Claim {name} does not hold at full quality: {statement} "
                          f"(measured: {measured}). Change the claim, not the sizes or seeds.")
    return holds


def records() -> list[dict]:
    """Every claim checked in this process, in the order first made."""
    return list(_records.values())


def claims_dir() -> Path | None:
    """Where records are written: ``$RETRAC_CLAIMS_DIR``, or None (memory only)."""
    folder = os.environ.get(CLAIMS_ENV)
    return Path(folder) if folder else None


def read_records(folder: Path) -> list[dict]:
    """All records written to ``folder``, ordered by chapter file name, then as made."""
    def order(path):   # ch2 before ch10; ch4 before ch4b
        number, suffix = re.match(r"ch([0-9]+)([a-z]?)", path.stem).groups()
        return int(number), suffix

    out = []
    for path in sorted(Path(folder).glob("ch*.json"), key=order):
        out.extend(json.loads(path.read_text()))
    return out


def _write(chapter: str) -> None:
    folder = claims_dir()
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{chapter}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([r for r in _records.values() if r["chapter"] == chapter], indent=1))
    tmp.replace(path)
