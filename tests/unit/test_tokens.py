"""Token counts: the two encoders' tokenizers share one encode where they provably agree."""

import os
from pathlib import Path
from typing import Any

import pytest

from app.tokens import TokenCounter, _load
from tests.procs import ROOT

MODEL = Path(os.environ.get("SDXL_TEST_MODEL_DIR", ROOT / ".models" / "tiny"))
TEXTS = [
    "a lighthouse at dusk, oil painting",
    "wow!!! a cat!",
    "!",
    "",
    "   spaces    and\ttabs\n",
    "ünïcödé ñ 東京 🚀🚀",
    "it's the cat's hat, isn't it? 3.14159",
    "word " * 90,
]


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    folder = MODEL / "base"
    if not (folder / "tokenizer_2").is_dir():
        pytest.skip("tiny model not built (make model)")
    return TokenCounter(_load(folder / "tokenizer"), _load(folder / "tokenizer_2"))


def test_the_tiny_models_tokenizers_differ_only_in_the_pad_token(counter: TokenCounter) -> None:
    assert counter.differing == frozenset({"!"})


@pytest.mark.parametrize("text", TEXTS)
def test_a_shared_count_equals_each_tokenizers_own(counter: TokenCounter, text: str) -> None:
    assert counter.count(text, 1) == len(counter.tok1.encode(text).ids)
    assert counter.count(text, 2) == len(counter.tok2.encode(text).ids)


def test_a_prompt_is_encoded_once_for_both_encoders_unless_it_holds_a_differing_token(
        counter: TokenCounter, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    class Spy:
        def __init__(self, name: str, tok: Any) -> None:
            self.name, self.tok = name, tok

        def encode(self, text: str) -> Any:
            calls.append(self.name)
            return self.tok.encode(text)

    monkeypatch.setattr(counter, "tok1", Spy("tok1", counter.tok1))
    monkeypatch.setattr(counter, "tok2", Spy("tok2", counter.tok2))
    counter._last = None
    counter.count("a red bicycle", 1)
    counter.count("a red bicycle", 2)
    assert calls == ["tok1"]
    calls.clear()
    counter.count("a red bicycle!", 1)
    counter.count("a red bicycle!", 2)
    assert calls == ["tok1", "tok2"]


def test_tokenizers_that_differ_elsewhere_are_never_shared(counter: TokenCounter) -> None:
    other = _load(MODEL / "base" / "tokenizer_2")
    other.normalizer = None  # no lowercasing: "CAT" and "cat" now split differently
    mixed = TokenCounter(counter.tok1, other)
    assert mixed.differing is None
    assert mixed.count("A CAT", 2) == len(other.encode("A CAT").ids)
