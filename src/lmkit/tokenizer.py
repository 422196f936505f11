"""Train and load tokenizers: a thin layer over the Hugging Face ``tokenizers`` library.

Three kinds of subword model, and characters:

- ``"bpe"``: GPT-2 style byte-level BPE (no unknown tokens, exact round trip);
- ``"wordpiece"``: BERT style (BertNormalizer, BertPreTokenizer, ``##`` continuations);
- ``"unigram"``: T5 / SentencePiece style (NFKC, Metaspace ``▁`` word starts);
- ``"char"``: one token per character seen in the corpus (nanoGPT's character-level
  models), and a character never seen falls back to its UTF-8 bytes (``<0x..>`` tokens), so
  any text round-trips exactly.

Special tokens depend on the model family the tokenizer is for:

- ``decoder`` (GPT-like): ``<|endoftext|>`` only, which is bos, eos and pad at once, as in
  GPT-2 (padding is told apart by the attention mask, never by the id). Nothing is added
  around encoded text. WordPiece and Unigram models also get ``<unk>``.
- ``encoder`` (BERT-like): ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (ids 0-4); encoding adds
  ``[CLS] A [SEP]`` and ``[CLS] A [SEP] B [SEP]`` for pairs.
- ``encoder-decoder`` (T5/BART-like): ``<pad> </s> <unk> <s> <mask>`` (ids 0-4, T5's
  pad=0, eos=1, unk=2) then the sentinels ``<extra_id_0>`` .. ``<extra_id_99>`` (ids 5-104)
  for span corruption; encoding appends ``</s>``.

Roles (which token is pad, eos, ...) are saved in ``tokenizer_config.json`` beside
``tokenizer.json``, with the key names Hugging Face uses. On load, roles missing from that
file (or a missing file) are derived from the special tokens' names, which works for the
usual GPT-2, BERT, T5 and BART files. Sentinels are the special tokens named
``<extra_id_N>``, ordered by N. The file's other settings (``model_max_length``,
``chat_template``, ``do_lower_case``, ...) are kept in ``Tokenizer.settings`` and written back.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmkit import sources
from lmkit.errors import LmkitError, TokenizerError, reading
from lmkit.textfiles import read_json

PathLike = str | os.PathLike
KINDS = ("bpe", "wordpiece", "unigram", "char")
BYTE_ALPHABET = 256  # byte-level BPE starts from every byte value
BYTE_KINDS = ("bpe", "char")  # kinds holding a token for every byte (no unknown token)
FAMILIES = ("decoder", "encoder", "encoder-decoder")
NUM_SENTINELS = 100
ROLES = ("pad", "bos", "eos", "unk", "mask", "cls", "sep")
# Names tried, in order, when a role is not given explicitly.
ROLE_NAMES = {
    "pad": ("[PAD]", "<pad>", "<|pad|>", "<|endoftext|>"),
    "bos": ("<s>", "<|begin_of_text|>", "<|endoftext|>"),
    "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
    "mask": ("[MASK]", "<mask>"),
    "cls": ("[CLS]",),
    "sep": ("[SEP]",),
}
FAMILY_SPECIALS = {
    "decoder": ["<|endoftext|>"],
    "encoder": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "encoder-decoder": ["<pad>", "</s>", "<unk>", "<s>", "<mask>"]
    + [f"<extra_id_{i}>" for i in range(NUM_SENTINELS)],
}
SENTINEL = re.compile(r"<extra_id_(\d+)>")
CONFIG_FILE = "tokenizer_config.json"
log = logging.getLogger("lmkit")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves the chat template
# tokenizer_config.json keys that save() writes from the tokenizer itself (the roles, the
# class) or that describe the Python class or ids of the source (tokenizer.json has them).
_REWRITTEN = {f"{r}_token" for r in ROLES} | {"additional_special_tokens", "tokenizer_class",
                                              "added_tokens_decoder", "auto_map",
                                              "name_or_path", "tokenizer_file"}


@dataclass
class Encoding:
    """One encoded text with the alignment information tasks need.

    ``offsets[i]`` is the (start, end) character span of token i in its text ((0, 0) for
    added special tokens); ``word_ids[i]`` numbers the words of the text (None for special
    tokens); ``type_ids`` is 0 for the first text of a pair and 1 for the second.
    """

    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    word_ids: list[int | None]
    type_ids: list[int]
    special_tokens_mask: list[int]


def _role_property(role: str, doc: str) -> property:
    def get(self: Tokenizer) -> int | None:
        return self._role_id(role)
    return property(get, doc=doc)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the roles of its special tokens.

    Args:
        backend: the Hugging Face ``tokenizers.Tokenizer``.
        roles: role -> token, e.g. ``{"pad": "<pad>"}``; overrides the roles derived from
            the special tokens' names (a ``None`` value removes a role).
    """

    def __init__(self, backend: tokenizers.Tokenizer, roles: dict[str, str | None] | None = None):
        self.backend = backend
        unknown = set(roles or {}) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown special-token roles {sorted(unknown)}: use {ROLES}")
        specials = self._special_tokens()
        self.roles: dict[str, str | None] = {
            role: next((t for t in names if t in specials), None)
            for role, names in ROLE_NAMES.items()
        }
        for role, token in (roles or {}).items():
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{role} token '{token}' is not in the vocabulary")
            self.roles[role] = token
        self.sentinels = sorted((t for t in specials if SENTINEL.fullmatch(t)),
                                key=lambda t: int(SENTINEL.fullmatch(t).group(1)))
        # tokenizer_config.json settings carried through load and save (model_max_length,
        # chat_template, normalisation flags of the source, ...)
        self.settings: dict[str, Any] = {}

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template (tokenizer_config.json, chat_template.jinja or GGUF
        metadata), or None."""
        return self.settings.get("chat_template")

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        if template is None:
            self.settings.pop("chat_template", None)
        else:
            self.settings["chat_template"] = template

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, **variables: Any) -> str:
        """The text of a chat (``[{"role": ..., "content": ...}]``) rendered by the chat
        template as transformers renders it (sandboxed Jinja, the special tokens as
        variables), with the prompt for the assistant's turn when `add_generation_prompt`."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template (tokenizer_config.json "
                                 "has no chat_template): pass prompts, or set "
                                 "tokenizer.chat_template")
        import jinja2  # a dependency of torch, so always installed with lmkit
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TokenizerError(f"the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False,
                                                                   indent=indent)
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime
                           .datetime.now().strftime(f))
        tokens = {f"{r}_token": t for r, t in self.roles.items() if t is not None}
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                **tokens, **variables)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"the chat template failed: {e}") from None

    def _special_tokens(self) -> set[str]:
        return {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}

    def __repr__(self) -> str:
        roles = ", ".join(f"{r}={t!r}" for r, t in self.roles.items() if t is not None)
        kind = type(self.backend.model).__name__
        return f"Tokenizer({kind}, vocab_size={self.vocab_size}, {roles})"

    def __len__(self) -> int:
        return self.vocab_size

    # ---- training --------------------------------------------------------------------

    @classmethod
    def train(cls, files: Sequence[PathLike], kind: str, vocab_size: int | None,
              family: str = "decoder", min_frequency: int = 2, text_field: str | None = None,
              lowercase: bool = False) -> Tokenizer:
        """Train a tokenizer of ``kind`` for a model ``family`` on corpus sources.

        Documents are streamed (see ``lmkit.sources.iter_documents``). ``lowercase``
        applies to WordPiece only (BERT "uncased"). ``min_frequency`` is ignored by Unigram
        and "char". For "char", ``vocab_size`` is a cap (None: every character seen): the
        rarest characters beyond it are written as bytes.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown tokenizer kind '{kind}': use one of {KINDS}")
        if family not in FAMILIES:
            raise ValueError(f"unknown model family '{family}': use one of {FAMILIES}")
        paths = sources.check(files)
        specials, unk = _specials(kind, family)
        need = min_vocab_size(kind, family)
        if vocab_size is None and kind != "char":
            raise ValueError(f"a {kind} tokenizer needs a vocab_size")
        if vocab_size is not None and vocab_size < need:
            raise TokenizerError(
                f"vocab_size={vocab_size} is too small for a {kind} tokenizer: its "
                f"{len(specials)} special tokens"
                + (f" and {BYTE_ALPHABET} byte tokens" if kind in BYTE_KINDS else "")
                + f" need at least {need}: use a larger vocab_size")

        num_docs = 0

        def texts() -> Iterator[str]:
            nonlocal num_docs
            for p in paths:
                for doc in sources.iter_documents(p, text_field):
                    num_docs += 1
                    yield doc

        names = ", ".join(f"'{p}'" for p in paths)
        if kind == "char":
            tok = cls(_characters(Counter(c for doc in texts() for c in doc), specials,
                                  vocab_size))
            if num_docs == 0:
                raise ValueError(f"corpus {names} has no text to train a tokenizer on: "
                                 "check the files (and text_field for JSONL)")
            tok._set_post_processor(family, byte_level=False)
            return tok
        backend, trainer = _BUILDERS[kind](vocab_size, min_frequency, specials, unk, lowercase)
        try:
            backend.train_from_iterator(texts(), trainer)
        except (LmkitError, OSError):  # from reading the corpus: already names the file
            raise
        except Exception as e:  # the trainer's own bare Exception
            raise TokenizerError(f"training a {kind} tokenizer of vocab_size={vocab_size} on "
                                 f"{names} failed: {e} (a larger vocab_size may fit)") from e
        if num_docs == 0:
            raise ValueError(f"corpus {names} has no text to train a tokenizer on: "
                             "check the files (and text_field for JSONL)")
        if backend.get_vocab_size() > vocab_size:  # the corpus's alphabet did not fit
            raise TokenizerError(
                f"vocab_size={vocab_size} is smaller than the corpus's characters and the "
                f"special tokens need ({backend.get_vocab_size()}): use a larger vocab_size")
        if backend.get_vocab_size() < vocab_size:
            why = ("pieces the corpus offers" if kind == "unigram" else
                   f"merges of pairs seen at least min_frequency={min_frequency} times")
            log.warning("the %s tokenizer has %s tokens, fewer than the %s asked: %s (%s "
                        "documents) has no more %s; it is used as it is (more text gives "
                        "a larger vocabulary)", kind, f"{backend.get_vocab_size():,}",
                        f"{vocab_size:,}", names, f"{num_docs:,}", why)
        tok = cls(backend)
        tok._set_post_processor(family, byte_level=kind == "bpe")
        return tok

    def _set_post_processor(self, family: str, byte_level: bool) -> None:
        template = None
        if family == "encoder":
            template = ("[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1", ["[CLS]", "[SEP]"])
        elif family == "encoder-decoder":
            template = ("$A </s>", "$A </s> $B:1 </s>:1", ["</s>"])
        steps = []
        if byte_level:  # trims the leading space out of offsets: spans cover only the word
            steps.append(processors.ByteLevel(add_prefix_space=False, trim_offsets=True))
        if template:
            single, pair, names = template
            steps.append(processors.TemplateProcessing(
                single=single, pair=pair,
                special_tokens=[(t, self.backend.token_to_id(t)) for t in names]))
        if steps:
            self.backend.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(
                steps)

    # ---- loading and saving ------------------------------------------------------------

    @classmethod
    def from_file(cls, path: PathLike) -> Tokenizer:
        """Load a ``tokenizer.json``; roles come from a ``tokenizer_config.json`` beside it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file '{path}' does not exist: pass the path "
                                    "of a tokenizer.json (or its folder to from_dir)")
        with _reading(path):
            text = path.read_text(encoding="utf-8")
            _check_ids(path, json.loads(text))
            backend = tokenizers.Tokenizer.from_str(text)
            return cls(backend, _read_roles(path.parent, backend))._with_settings(path.parent)

    def _with_settings(self, folder: Path) -> Tokenizer:
        """Keep `folder`'s tokenizer_config.json settings (and chat_template.jinja)."""
        config = _read_config(folder)
        self.settings = {k: v for k, v in config.items() if k not in _REWRITTEN}
        template = self.settings.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict)
                             and t.get("name") == "default"), None)
        if (folder / CHAT_TEMPLATE_FILE).is_file():
            with _reading(folder / CHAT_TEMPLATE_FILE):
                template = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        if template is not None:
            self.settings["chat_template"] = template
        return self

    @classmethod
    def from_dir(cls, path: PathLike) -> Tokenizer:
        """Load a folder with ``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` (GPT-2
        byte-level BPE), or ``vocab.txt`` (BERT WordPiece), tried in that order."""
        path = Path(path)
        if (path / "tokenizer.json").is_file():
            return cls.from_file(path / "tokenizer.json")
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return cls.from_gpt2_files(path / "vocab.json",
                                       path / "merges.txt")._with_settings(path)
        if (path / "vocab.txt").is_file():
            config = _read_config(path)
            return cls.from_bert_vocab(
                path / "vocab.txt", config.get("do_lower_case", True),
                config.get("strip_accents"),
                config.get("tokenize_chinese_chars", True))._with_settings(path)
        raise FileNotFoundError(f"no tokenizer in '{path}': expected tokenizer.json, or "
                                "vocab.json + merges.txt, or vocab.txt")

    @classmethod
    def from_gpt2_files(cls, vocab_json: PathLike, merges_txt: PathLike) -> Tokenizer:
        """GPT-2 byte-level BPE from its ``vocab.json`` (encoder.json) and ``merges.txt``."""
        for p in (vocab_json, merges_txt):
            if not Path(p).is_file():
                raise FileNotFoundError(f"GPT-2 tokenizer file '{p}' does not exist")
        with _reading(vocab_json):
            backend = tokenizers.Tokenizer(models.BPE.from_file(str(vocab_json),
                                                                str(merges_txt)))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        if backend.token_to_id("<|endoftext|>") is not None:
            backend.add_special_tokens(["<|endoftext|>"])  # keeps its id in vocab.json
        tok = cls(backend)
        tok._set_post_processor("decoder", byte_level=True)
        return tok

    @classmethod
    def from_bert_vocab(cls, vocab_txt: PathLike, lowercase: bool = True,
                        strip_accents: bool | None = None,
                        chinese_chars: bool = True) -> Tokenizer:
        """BERT WordPiece from a ``vocab.txt`` (one token a line, id = line number), with
        transformers' BertTokenizer options: `strip_accents` (None: as `lowercase`) and
        `chinese_chars` (a space around every CJK character)."""
        if not Path(vocab_txt).is_file():
            raise FileNotFoundError(f"BERT vocabulary '{vocab_txt}' does not exist")
        with _reading(vocab_txt):
            backend = tokenizers.Tokenizer(models.WordPiece.from_file(str(vocab_txt),
                                                                      unk_token="[UNK]"))
        _bert_pipeline(backend, lowercase, strip_accents, chinese_chars)
        present = [t for t in FAMILY_SPECIALS["encoder"] if backend.token_to_id(t) is not None]
        backend.add_special_tokens(present)
        missing = {"[CLS]", "[SEP]"} - set(present)
        if missing:
            raise TokenizerError(f"'{vocab_txt}' lacks {sorted(missing)}: not a BERT "
                                 "vocabulary")
        tok = cls(backend)
        tok._set_post_processor("encoder", byte_level=False)
        return tok

    def save(self, path: PathLike) -> Path:
        """Write ``tokenizer.json`` (into ``path`` if it is a folder, else to ``path`` when
        it ends in ``.json``) and ``tokenizer_config.json`` beside it. Returns the file."""
        path = Path(path)
        file = path if path.suffix == ".json" else path / "tokenizer.json"
        file.parent.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(file))
        config = {**self.settings, **{f"{r}_token": t for r, t in self.roles.items()
                                      if t is not None}}
        config["additional_special_tokens"] = self.sentinels
        config["tokenizer_class"] = "PreTrainedTokenizerFast"  # loadable by transformers
        (file.parent / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return file

    # ---- encoding and decoding ---------------------------------------------------------

    def encode(self, text: str, pair: str | None = None,
               add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (and ``pair``), with the family's special tokens around."""
        return self.backend.encode(text, pair, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], pairs: Sequence[str] | None = None,
                     add_special_tokens: bool = True) -> list[list[int]]:
        """``encode`` for many texts at once (in parallel inside ``tokenizers``)."""
        inputs = list(texts) if pairs is None else list(zip(texts, pairs, strict=True))
        encs = self.backend.encode_batch(inputs, add_special_tokens=add_special_tokens)
        return [e.ids for e in encs]

    def encode_with_offsets(self, text: str, pair: str | None = None,
                            add_special_tokens: bool = True) -> Encoding:
        """``encode`` plus tokens, character offsets, word ids and type ids."""
        e = self.backend.encode(text, pair, add_special_tokens=add_special_tokens)
        return Encoding(e.ids, e.tokens, e.offsets, e.word_ids, e.type_ids,
                        e.special_tokens_mask)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list or a 1-D tensor)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]],
                     skip_special_tokens: bool = True) -> list[str]:
        """``decode`` for many sequences."""
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    # ---- vocabulary --------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self.backend.id_to_token(id)

    def _role_id(self, role: str) -> int | None:
        token = self.roles[role]
        return None if token is None else self.backend.token_to_id(token)

    pad_id = _role_property("pad", "Padding id, or None.")
    bos_id = _role_property("bos", "Beginning-of-sequence id, or None.")
    eos_id = _role_property("eos", "End-of-sequence id, or None.")
    unk_id = _role_property("unk", "Unknown-token id, or None.")
    mask_id = _role_property("mask", "Mask id (for masked LM), or None.")
    cls_id = _role_property("cls", "[CLS] id, or None.")
    sep_id = _role_property("sep", "[SEP] id, or None.")

    @property
    def sentinel_ids(self) -> list[int]:
        """Ids of ``<extra_id_0>``, ``<extra_id_1>``, ... (empty when there are none)."""
        return [self.backend.token_to_id(t) for t in self.sentinels]

    @property
    def special_ids(self) -> list[int]:
        """Sorted ids of all special tokens (never masked or corrupted by objectives)."""
        ids = {self.backend.token_to_id(t) for t in self._special_tokens()}
        ids |= {i for i in map(self._role_id, ROLES) if i is not None}
        return sorted(ids)

    def word_starts(self) -> list[bool]:
        """For every id, whether that token begins a word (for whole-word masking).

        WordPiece: tokens not starting with ``##``; byte-level BPE and Unigram: tokens
        starting with ``Ġ`` or ``▁``; characters: whitespace. Special tokens count as word
        starts.
        """
        model = self.backend.model
        if isinstance(model, models.WordPiece):
            prefix = model.continuing_subword_prefix
            def starts(t: str) -> bool:
                return not t.startswith(prefix)
        else:
            def starts(t: str) -> bool:
                return t.startswith(("Ġ", "▁")) or t.isspace()
        flags = [False] * self.vocab_size
        for token, i in self.backend.get_vocab(with_added_tokens=True).items():
            flags[i] = starts(token)
        for i in self.special_ids:
            flags[i] = True
        return flags


# ---- pipelines per kind --------------------------------------------------------------------


def _bert_pipeline(backend: tokenizers.Tokenizer, lowercase: bool,
                   strip_accents: bool | None = None, chinese_chars: bool = True) -> None:
    backend.normalizer = normalizers.BertNormalizer(
        lowercase=lowercase, handle_chinese_chars=chinese_chars,
        strip_accents=lowercase if strip_accents is None else strip_accents)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")


def _bpe(vocab_size: int, min_frequency: int, specials: list[str], unk: str | None,
         lowercase: bool) -> tuple[tokenizers.Tokenizer, trainers.Trainer]:
    backend = tokenizers.Tokenizer(models.BPE())  # byte-level: every byte has a token
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return backend, trainer


def _wordpiece(vocab_size: int, min_frequency: int, specials: list[str], unk: str | None,
               lowercase: bool) -> tuple[tokenizers.Tokenizer, trainers.Trainer]:
    backend = tokenizers.Tokenizer(models.WordPiece(unk_token=unk))
    _bert_pipeline(backend, lowercase)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=specials, show_progress=False,
                                        continuing_subword_prefix="##")
    return backend, trainer


def _unigram(vocab_size: int, min_frequency: int, specials: list[str], unk: str | None,
             lowercase: bool) -> tuple[tokenizers.Tokenizer, trainers.Trainer]:
    backend = tokenizers.Tokenizer(models.Unigram())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      unk_token=unk, show_progress=False)
    return backend, trainer


def _characters(counts: Counter, specials: list[str], cap: int | None) -> tokenizers.Tokenizer:
    """A character-level model: the specials, the characters (the most frequent ones when
    `cap` limits the vocabulary) in sorted order as nanoGPT numbers them, then the 256 byte
    tokens that any other character falls back to. BPE without merges is exactly this."""
    room = None if cap is None else cap - len(specials) - BYTE_ALPHABET
    chars = sorted(c for c, _ in counts.most_common(room))
    tokens = specials + chars + [f"<0x{b:02X}>" for b in range(BYTE_ALPHABET)]
    backend = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                              merges=[], byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(specials)
    return backend


_BUILDERS = {"bpe": _bpe, "wordpiece": _wordpiece, "unigram": _unigram}


def _specials(kind: str, family: str) -> tuple[list[str], str | None]:
    """The special tokens of a `kind` tokenizer for a model `family`, and its unknown token."""
    specials = list(FAMILY_SPECIALS[family])
    unk = next((t for t in ROLE_NAMES["unk"] if t in specials), None)
    if kind not in BYTE_KINDS and unk is None:  # WordPiece and Unigram need an unknown token
        unk = "<unk>"
        specials.append(unk)
    return specials, unk


def min_vocab_size(kind: str, family: str | None = None) -> int:
    """The smallest vocab_size `Tokenizer.train` accepts (for the family with the fewest
    special tokens when `family` is None): byte-level BPE and "char" hold all 256 bytes plus
    the specials; WordPiece and Unigram need room for one token beside the specials (their
    alphabet is checked after training)."""
    families = [family] if family else list(FAMILIES)
    specials = min(len(_specials(kind, f)[0]) for f in families)
    return BYTE_ALPHABET + specials if kind in BYTE_KINDS else specials + 1


def _reading(path: PathLike) -> contextlib.AbstractContextManager:
    """Errors of the tokenizers library (a bare Exception without the file's name) while
    reading `path` become a TokenizerError naming it."""
    return reading(path, TokenizerError, "tokenizer file", "it is truncated or corrupted: "
                   "copy it again or re-save the tokenizer")


def _check_ids(path: Path, data: Any) -> None:
    """Refuse token ids far beyond the number of tokens: the tokenizers library allocates a
    table as large as the largest id, so one corrupted id (10^9) would abort the process."""
    model = data.get("model") if isinstance(data, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    ids = list(vocab.values()) if isinstance(vocab, dict) else []
    ids += [t.get("id") for t in data.get("added_tokens") or [] if isinstance(t, dict)]
    ids = [i for i in ids if isinstance(i, int)]
    limit = 2 * len(ids) + 256  # real vocabularies are dense: ids 0..n-1
    bad = next((i for i in ids if not 0 <= i < limit), None)
    if bad is not None:
        raise TokenizerError(f"{path}: token id {bad} is out of range for {len(ids)} tokens; "
                             "the file is corrupted: copy it again or re-save the tokenizer")


def _read_config(folder: Path) -> dict:
    file = folder / CONFIG_FILE
    return read_json(file, "tokenizer config", TokenizerError) if file.is_file() else {}


def _read_roles(folder: Path, backend: tokenizers.Tokenizer) -> dict[str, str]:
    """Roles named in a (Hugging Face style) tokenizer_config.json, else in an older
    folder's special_tokens_map.json."""
    legacy = folder / "special_tokens_map.json"
    config = read_json(legacy, "special tokens map", TokenizerError) if legacy.is_file() else {}
    config, roles = {**(config if isinstance(config, dict) else {}), **_read_config(folder)}, {}
    for role in ROLES:
        value = config.get(f"{role}_token")
        if isinstance(value, dict):  # transformers writes AddedToken objects as dicts
            value = value.get("content")
        if isinstance(value, str) and backend.token_to_id(value) is not None:
            roles[role] = value
    return roles
