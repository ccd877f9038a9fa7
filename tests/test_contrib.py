"""``quotient_opt.contrib``: the tools of narrower scope, and the old spellings that still
resolve to them (the same objects, not copies)."""

from __future__ import annotations

import importlib

import pytest

import quotient_opt as qo

#: ``(old module, name)`` spellings from before the move to ``quotient_opt.contrib``
OLD = [
    ("quotient_opt", "place_kinks"),
    ("quotient_opt", "kink_init"),
    ("quotient_opt", "levenberg_marquardt"),
    ("quotient_opt", "LevenbergMarquardtState"),
    ("quotient_opt.transforms", "levenberg_marquardt"),
    ("quotient_opt.transforms", "LevenbergMarquardtState"),
] + [("quotient_opt.training", n) for n in [
    "BreatheResult", "breathe", "dense_relu_chain", "extract_units", "grow_units",
    "kink_init", "merge_or_prune", "place_kinks", "present_units",
]]


@pytest.mark.parametrize("module,name", OLD, ids=[f"{m}.{n}" for m, n in OLD])
def test_old_spellings_are_the_contrib_objects(module, name):
    assert getattr(importlib.import_module(module), name) is getattr(qo.contrib, name)
    assert name in qo.contrib.__all__


def test_from_import_of_an_old_spelling():
    from quotient_opt.training import breathe
    from quotient_opt.transforms import levenberg_marquardt

    assert breathe is qo.contrib.breathe
    assert levenberg_marquardt is qo.contrib.levenberg_marquardt


def test_moved_names_are_listed_once_and_unknown_names_still_fail():
    for mod in (qo, qo.training, qo.transforms):
        assert not set(mod.__all__) & set(qo.contrib.__all__), mod.__name__
        with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
            getattr(mod, "not_a_name")
    assert "contrib" in qo.__all__


def test_scope_is_stated():
    assert "Dense ReLU MLPs only" in qo.contrib.__doc__
