"""The torch-free tokenizer of the generation path equals transformers' AutoTokenizer on the same folder."""

from __future__ import annotations

import pytest

from river.models.tokenizer import TextTokenizer

TEXTS = ["What is a river delta?", "  spaces  and\ttabs\nnew lines", "naïve café — 東京 🙂", "x = [1, 2]; print(x) ",
         "Don't stop . ok ?", ""]


def _same_as_transformers(folder):
    from transformers import AutoTokenizer

    ours, theirs = TextTokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    assert ours.eos_token_id == theirs.eos_token_id
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
        chat = [{"role": "user", "content": text}]
        want = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) else want
        assert ours.apply_chat_template(chat, add_generation_prompt=True) == list(want), text
        assert ours.decode(want, skip_special_tokens=True) == theirs.decode(want, skip_special_tokens=True)
        assert ours.decode(want) == theirs.decode(want)


def test_tiny_tokenizer_matches_transformers(tiny_onnx):
    _same_as_transformers(tiny_onnx.parent)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smol_onnx):
    _same_as_transformers(smol_onnx.parent)


def test_missing_or_damaged_tokenizer_is_one_line(tmp_path):
    from river.errors import RiverError

    with pytest.raises(RiverError, match="no tokenizer.json"):
        TextTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(RiverError, match="cannot read the tokenizer"):
        TextTokenizer(tmp_path)
