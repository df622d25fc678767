"""Claims as checks (retrac_lib.book.claims), the wording helpers (retrac_lib.book.prose) and the page
extension that lists the claims (book/_ext/retrac_claims.py)."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from book_tools import NOTEBOOKS, ROOT

from retrac_lib.book import claims, prose


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setattr(claims, "_records", {})
    monkeypatch.setenv(claims.CLAIMS_ENV, str(tmp_path))
    return tmp_path


def test_smoke_records_and_never_fails(fresh, monkeypatch, capsys):
    monkeypatch.setenv("RETRAC_SMOKE", "1")
    assert claims.check("ch4-more-distinct", "ReTrac has more", False, "3 vs 5") is False
    assert claims.check("ch4-fewer-general", "ReTrac has fewer", np.bool_(True), "1 vs 4") is True
    assert "DOES NOT HOLD (3 vs 5)" in capsys.readouterr().out
    saved = json.loads((fresh / "ch4.json").read_text())
    assert [(r["name"], r["holds"], r["mode"], r["chapter"]) for r in saved] == [
        ("ch4-more-distinct", False, "smoke", "ch4"), ("ch4-fewer-general", True, "smoke", "ch4")]


def test_full_quality_failure_raises_after_recording(fresh, monkeypatch):
    monkeypatch.setenv("RETRAC_SMOKE", "0")
    assert claims.check("ch2-ratio", "ratio >= 10", True, "12.0x")
    with pytest.raises(claims.ClaimFailed, match="ch2-bad.*measured: 0.5"):
        claims.check("ch2-bad", "ratio >= 10", False, "0.5")
    saved = {r["name"]: r for r in claims.read_records(fresh)}
    assert saved["ch2-bad"]["holds"] is False and saved["ch2-bad"]["mode"] == "full"


def test_rerun_replaces_and_files_sort_by_chapter_number(fresh, monkeypatch):
    monkeypatch.setenv("RETRAC_SMOKE", "1")
    for name in ("ch10-a", "ch2-a", "ch4b-a", "ch4-a", "ch2-a"):
        claims.check(name, "s", name != "ch2-a", "m")
    assert [r["name"] for r in claims.read_records(fresh)] == ["ch2-a", "ch4-a", "ch4b-a", "ch10-a"]
    assert len(claims.records()) == 4


def test_without_folder_records_stay_in_memory(monkeypatch):
    monkeypatch.setattr(claims, "_records", {})
    monkeypatch.delenv(claims.CLAIMS_ENV, raising=False)
    claims.check("ch1-x", "s", True, "m")
    assert claims.claims_dir() is None and claims.records()[0]["name"] == "ch1-x"


@pytest.mark.parametrize("args, error, match", [
    (("distinct", "s", True, "m"), ValueError, "chapter prefix"),
    (("ch4-Distinct", "s", True, "m"), ValueError, "chapter prefix"),
    (("ch4-x", "", True, "m"), ValueError, "statement must be a non-empty string"),
    (("ch4-x", "s", True, 3.0), ValueError, "measured must be a non-empty string"),
    (("ch4-x", "s", 1, "m"), TypeError, "holds must be a bool"),
])
def test_bad_claims_name_the_argument(fresh, args, error, match):
    with pytest.raises(error, match=match):
        claims.check(*args)


def test_prose_wordings():
    assert prose.pick(np.bool_(False), "more", "fewer") == "fewer"
    assert [prose.compare(a, 1.0, "more", "less", "same", tolerance=0.1)
            for a in (1.2, 0.8, 1.05)] == ["more", "less", "same"]
    with pytest.raises(TypeError, match="bool"):
        prose.pick(1, "a", "b")
    with pytest.raises(TypeError, match="pass the text"):
        prose.glue("ch4_x", 0.5)
    with pytest.raises(ValueError, match="glue name"):
        prose.glue("ch4-x", "0.5")
    assert prose.glue("ch4_x", "0.50") == "0.50"     # outside a kernel: checked and returned


def _extension():
    spec = importlib.util.spec_from_file_location("retrac_claims", ROOT / "book/_ext/retrac_claims.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_extension_maps_every_chapter_to_its_claim_prefix():
    ext = _extension()
    assert ext.chapter_of("notebooks/04b_recipes") == "ch4b"
    assert ext.chapter_of("book/intro") is None
    prefixes = [ext.chapter_of(f"notebooks/{p.stem}") for p in NOTEBOOKS]
    assert None not in prefixes and len(set(prefixes)) == len(prefixes)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_claims_use_their_chapter_prefix_once(path):
    import re
    prefix = _extension().chapter_of(f"notebooks/{path.stem}")
    names = re.findall(r'claims\.check\(\s*"([^"]+)"', path.read_text())
    wrong = [n for n in names if not n.startswith(prefix + "-")]
    assert not wrong, f"{path.name}: claims {wrong} should start with {prefix}-"
    assert len(names) == len(set(names)), f"{path.name}: a claim name is used twice"


def test_built_page_lists_every_recorded_claim():
    """The page of a built site (``$RETRAC_SITE`` or ``_build/html``) against its claim records."""
    import os
    from pathlib import Path
    site = Path(os.environ.get("RETRAC_SITE") or ROOT / "_build" / "html")
    page, folder = site / "book" / "measured.html", site.parent / "claims"
    if not page.exists() or not folder.exists():
        if os.environ.get("RETRAC_SITE"):
            pytest.fail(f"RETRAC_SITE={site} has no claims page or no claim records")
        pytest.skip(f"no built book with claim records at {site}")
    html, records = page.read_text(), claims.read_records(folder)
    assert records, "the build recorded no claims"
    missing = [r["name"] for r in records if f'id="{r["name"]}"' not in html]
    assert not missing, f"claims recorded but not on the page: {missing}"
    held = sum(r["holds"] for r in records)
    assert f"{len(records)} claims in this build, {held} held" in html


@pytest.mark.parametrize("text", ["+0.96", "0.45, 0.60", "1,437", "0.20", "ReTrac's top", "25 x 8"])
def test_glued_text_reads_back_verbatim(text):
    """myst-nb's {glue:text} literal-evaluates the stored text/plain: what prose.glue stores must
    come back exactly as printed (not "0.2" for "0.20", not a tuple for "1,437")."""
    from IPython.core.formatters import format_display_data
    from myst_nb.ext.glue.roles import format_plain_text
    bundle, _ = format_display_data(text)
    assert format_plain_text(bundle["text/plain"], "s") == text
