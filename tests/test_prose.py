"""``retrac_lib.book.prose``: where glue cannot store its text (Colab has no myst-nb; outside a
kernel there is nothing to store it in) it returns the text, so a chapter runs the same; bad names
and numbers passed unformatted are refused; pick and compare choose the true wording."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from retrac_lib.book import prose


def test_glue_without_myst_nb_returns_the_text(monkeypatch):
    monkeypatch.setitem(sys.modules, "myst_nb", None)   # `import myst_nb` raises ImportError
    assert prose.glue("ch1_final_loss", "0.123") == "0.123"
    assert prose.glue_all("ch1", n="40", loss="0.12") == {"ch1_n": "40", "ch1_loss": "0.12"}


@pytest.mark.parametrize("name", ["Ch1_loss", "1st", "ch1-loss", "", None])
def test_glue_refuses_names_the_book_cannot_read(name):
    with pytest.raises(ValueError, match="must be lower-case letters, digits and '_'"):
        prose.glue(name, "1")


def test_glue_refuses_numbers_that_are_not_formatted_text():
    with pytest.raises(TypeError, match=r"glue ch1_loss: pass the text as it should read.*float"):
        prose.glue("ch1_loss", 0.5)
    with pytest.raises(ValueError, match="at least one name=text"):
        prose.glue_all("ch1")


def test_pick_takes_python_and_numpy_bools_only():
    assert prose.pick(True, "up", "down") == "up"
    assert prose.pick(np.bool_(False), "up", "down") == "down"
    with pytest.raises(TypeError, match=r"pick needs a bool condition.*got Tensor"):
        prose.pick(torch.tensor(True), "up", "down")


@pytest.mark.parametrize("a, b, tolerance, word", [
    (0.30, 0.20, 0.0, "more"), (0.20, 0.30, 0.0, "less"), (0.25, 0.25, 0.0, "same"),
    (0.29, 0.25, 0.05, "same"), (0.31, 0.25, 0.05, "more"), (0.19, 0.25, 0.05, "less")])
def test_compare_words_the_difference_beyond_the_tolerance(a, b, tolerance, word):
    assert prose.compare(a, b, "more", "less", "same", tolerance=tolerance) == word


def test_compare_refuses_a_negative_tolerance():
    with pytest.raises(ValueError, match="tolerance must be >= 0, got -0.1"):
        prose.compare(1, 2, "more", "less", "same", tolerance=-0.1)
