"""The API's tokenizer lookup: a miss is retried after a back-off, so token counts appear once the weights do,
without a restart."""

import shutil
from pathlib import Path

import pytest

from app import tokens


def test_a_missing_tokenizer_is_found_once_it_arrives(tiny_model: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model"
    model.mkdir()
    clock = [1000.0]
    monkeypatch.setattr(tokens.time, "monotonic", lambda: clock[0])
    assert tokens.counter_for(str(model)) is None
    for sub in ("tokenizer", "tokenizer_2"):  # the weights arrive (a first download)
        shutil.copytree(tiny_model / "base" / sub, model / sub)
    assert tokens.counter_for(str(model)) is None  # within the back-off: not looked up again yet
    clock[0] += tokens.MISSING_RETRY_SECONDS + 1
    counter = tokens.counter_for(str(model))
    assert counter is not None and counter.count("a lighthouse", 1) > 2
    assert tokens.counter_for(str(model)) is counter  # found: kept
