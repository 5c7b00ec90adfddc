"""The tokenizer of an exported model folder, for the generation and serving path and calibration: the folder's ``tokenizer.json`` through the
``tokenizers`` library and its chat template through jinja2, as Hugging Face's fast tokenizers do,
without importing ``transformers`` (whose tokenizer modules load torch).

It offers what generation needs and behaves like ``AutoTokenizer`` on the same folder (the tests
check encode, decode and the chat template against it): ``tok(text)["input_ids"]``,
``apply_chat_template``, ``decode(ids, skip_special_tokens=True)``, ``eos_token_id``, ``chat_template``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from river.errors import ModelNotFound, RiverError


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _clean_up_spaces(text: str) -> str:
    """Hugging Face's ``clean_up_tokenization`` (used when the config asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class TextTokenizer:
    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelNotFound(f"no tokenizer.json in {folder}; pass --tokenizer DIR (a folder with tokenizer.json)")
        try:
            self._tok = Tokenizer.from_file(str(path))
            config_path = folder / "tokenizer_config.json"
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except Exception as exc:  # a damaged tokenizer file: say which one
            raise RiverError(f"cannot read the tokenizer in {folder}: {exc}") from None
        template_file = folder / "chat_template.jinja"
        self.chat_template = template_file.read_text() if template_file.is_file() else config.get("chat_template")
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.special_tokens = {name: _token_text(config.get(name)) for name in
                               ("bos_token", "eos_token", "unk_token", "pad_token")}
        eos = self.special_tokens["eos_token"]
        self.eos_token_id = self._tok.token_to_id(eos) if eos else None
        self._template = None

    def __call__(self, text: str) -> dict:
        return {"input_ids": self._tok.encode(text, add_special_tokens=True).ids}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self.clean_up_spaces else text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True):
        """The rendered chat (HF's jinja environment: trim_blocks, lstrip_blocks, loop controls, sandboxed),
        as token ids without added special tokens (the template writes them) or as text."""
        if not self.chat_template:
            raise RiverError("this tokenizer has no chat template: generate with --raw")
        if self._template is None:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise RiverError(f"chat template: {message}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent, **kw)
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **{k: v for k, v in self.special_tokens.items() if v is not None})
        return self._tok.encode(text, add_special_tokens=False).ids if tokenize else text


def encode_prompt(tokenizer, prompt: str, chat: bool = True) -> list[int]:
    """Token ids of a prompt; with ``chat`` (and a chat template) it is wrapped as one user turn.
    The one home of prompt encoding: generation, serving and calibration all call it."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:  # e.g. undecodable bytes in sys.argv arrive as lone surrogates
        raise RiverError(f"the prompt is not valid UTF-8 text (character {exc.start})") from None
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return list(tokenizer(prompt)["input_ids"])
