"""Tokenizer built from GGUF metadata on top of the HF `tokenizers` library.

Two vocabulary kinds found in GGUF files are supported, following llama.cpp's
reading of the same metadata so that token ids agree with llama.cpp exactly
(tests/test_tokenizer.py checks this against tests/data/tokenizer_golden.json):

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. Tokens are stored in the
  GPT-2 byte-to-unicode alphabet, ``tokenizer.ggml.merges`` holds "left right"
  pairs in rank order, and ``tokenizer.ggml.pre`` names the pre-tokenizer:
  one or more split regexes applied in sequence before byte-level BPE.
* ``tokenizer.ggml.model == "llama"``: SentencePiece-style BPE. No merges are
  stored; llama.cpp merges the adjacent pair whose *merged* piece has the
  highest score. The same result comes from an HF BPE model whose merge ranks
  are ordered by descending merged-piece score. Spaces become "▁", a "▁" is
  prepended to each text segment when add_space_prefix is set, and characters
  outside the vocabulary fall back to <0xXX> byte tokens.

Special tokens (control, user-defined and unknown token types) are matched as
whole tokens anywhere in the text, like llama.cpp's ``parse_special=true``.
Decoding concatenates token bytes without llama.cpp's optional
"clean_up_tokenization_spaces" rewrite, so that decode(encode(s)) == s.
"""

from __future__ import annotations

import codecs
import datetime
import json
import logging
from typing import Iterable

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

log = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|"
              r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (split regexes applied in order, ignore_merges).
# ignore_merges: a pre-token that is itself in the vocabulary is emitted as one
# token without running merges (llama.cpp does this for the llama3 family).
_PRE_TOKENIZERS: dict[str, tuple[list[str], bool]] = {
    "gpt2": ([_GPT2_RE], False),
    "gpt-2": ([_GPT2_RE], False),
    "smollm": ([r"\p{N}", _GPT2_RE], False),
    "starcoder": ([r"\p{N}", _GPT2_RE], False),
    "llama-bpe": ([_LLAMA3_RE], True),
    "llama3": ([_LLAMA3_RE], True),
    "llama-v3": ([_LLAMA3_RE], True),
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", r"[0-9][0-9][0-9]"], False),
}

# Token texts that end a generation when present. llama.cpp treats the same
# end-of-turn markers, and the fill-in-the-middle pad/repo/file-separator
# markers, as end-of-generation; we follow it so generations stop alike.
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|eom_id|>", "<|end_of_text|>", "</s>", "<eos>",
              "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<|fim_repo|>", "<|repo_name|>", "<fim-repo>",
              "<reponame>", "<|file_sep|>")
_EOG_KEYS = ("eos", "eot", "eom", "fim_pad", "fim_rep", "fim_sep")

DEFAULT_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_DECODER = {c: b for b, c in _byte_to_unicode().items()}


class Tokenizer:
    """Text <-> token ids, streaming detokenization and chat templates."""

    def __init__(self, hf: HFTokenizer, *, kind: str, tokens: list[str], token_types: list[int],
                 bos_id: int | None, eos_id: int | None, eos_ids: Iterable[int],
                 add_bos: bool, add_eos: bool, add_space_prefix: bool, chat_template: str | None):
        self.hf = hf
        self.kind = kind
        self.tokens = tokens
        self.token_types = token_types
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eos_ids = set(eos_ids)
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self.chat_template = chat_template or DEFAULT_CHATML_TEMPLATE
        self._token_bytes: list[bytes] | None = None
        self._template = None

    # ------------------------------------------------------------------ build
    @classmethod
    def from_gguf(cls, path: str) -> "Tokenizer":
        import gguf  # lazy: the GPU box has no gguf package

        reader = gguf.GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
        return cls.from_gguf_metadata(meta)

    @classmethod
    def from_gguf_metadata(cls, meta: dict) -> "Tokenizer":
        kind = meta["tokenizer.ggml.model"]
        tokens = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)

        # Without tokenizer.ggml.add_bos_token, llama.cpp adds BOS for SentencePiece
        # and llama3-family vocabularies only.
        if kind == "gpt2":
            hf = _build_bpe(meta, tokens, vocab)
            add_bos_default = meta.get("tokenizer.ggml.pre") in ("llama-bpe", "llama3", "llama-v3")
            add_space_prefix = False
        elif kind == "llama":
            add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            hf = _build_spm(meta, tokens, types, vocab, add_space_prefix)
            add_bos_default = True
        else:
            raise ValueError(f"unsupported tokenizer.ggml.model {kind!r} (supported: gpt2, llama)")

        # Special tokens are matched before normalization/pre-tokenization.
        # Control/unknown tokens are "special" (dropped by decode(skip_special=True));
        # user-defined tokens are always rendered, as in llama.cpp.
        added = []
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED) and vocab.get(t) == i and t:
                added.append(AddedToken(t, special=ty != TOKEN_USER_DEFINED, normalized=False,
                                        single_word=False, lstrip=False, rstrip=False))
        hf.add_tokens(added)

        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eog = {meta[f"tokenizer.ggml.{k}_token_id"] for k in _EOG_KEYS if f"tokenizer.ggml.{k}_token_id" in meta}
        eog |= {vocab[t] for t in _EOG_TEXTS if t in vocab}
        return cls(hf, kind=kind, tokens=tokens, token_types=types,
                   bos_id=None if bos is None else int(bos), eos_id=None if eos is None else int(eos),
                   eos_ids={int(i) for i in eog},
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
                   add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                   add_space_prefix=add_space_prefix,
                   chat_template=meta.get("tokenizer.chat_template"))

    @classmethod
    def synthetic(cls, vocab_size: int) -> "Tokenizer":
        """Deterministic byte-level tokenizer for random-weight models.

        Ids: 0 "<s>" (BOS), 1 "</s>" (EOS), 2..257 one token per byte, then
        "<filler_N>" control tokens up to vocab_size. No merges: every byte of
        the UTF-8 text is one token, so any text round-trips.
        """
        if vocab_size < 258:
            raise ValueError(f"synthetic tokenizer needs vocab_size >= 258, got {vocab_size}")
        b2u = _byte_to_unicode()
        tokens = ["<s>", "</s>"] + [b2u[b] for b in range(256)]
        tokens += [f"<filler_{i}>" for i in range(vocab_size - len(tokens))]
        types = [TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_NORMAL] * 256 + [TOKEN_CONTROL] * (vocab_size - 258)
        meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2", "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": [],
                "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
                "tokenizer.ggml.add_bos_token": True}
        return cls.from_gguf_metadata(meta)

    # ------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def is_special(self, token_id: int) -> bool:
        return self.token_types[token_id] in (TOKEN_CONTROL, TOKEN_UNKNOWN)

    # ----------------------------------------------------------------- encode
    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; BOS/EOS added per the model's flags when add_special."""
        self.hf.encode_special_tokens = not parse_special
        ids = self.hf.encode(text, add_special_tokens=False).ids if text else []
        if add_special and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if add_special and self.add_eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    # ----------------------------------------------------------------- decode
    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`: their bytes joined, decoded as UTF-8 (invalid bytes -> U+FFFD).

        Done from token bytes rather than by the HF decoder so that it equals
        the streaming output exactly, broken UTF-8 included (HF's byte-fallback
        decoder replaces each invalid byte separately, Python per maximal run).
        """
        sd = self.stream(skip_special)
        return "".join(sd.push(i) for i in ids) + sd.flush()

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (special tokens: their text)."""
        if self._token_bytes is None:
            self._token_bytes = [self._bytes_of(t, ty) for t, ty in zip(self.tokens, self.token_types)]
        return self._token_bytes[token_id]

    def _bytes_of(self, tok: str, ty: int) -> bytes:
        if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED):
            return tok.encode()
        if self.kind == "gpt2":
            return b"".join(bytes([_BYTE_DECODER[c]]) if c in _BYTE_DECODER else c.encode() for c in tok)
        if ty == TOKEN_BYTE and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            return bytes([int(tok[3:5], 16)])
        return tok.replace("\u2581", " ").encode()

    def stream(self, skip_special: bool = True) -> "StreamDecoder":
        """A fresh incremental detokenizer (one per generated sequence)."""
        return StreamDecoder(self, skip_special)

    # ---------------------------------------------------------- chat template
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render messages with the model's jinja2 chat template (ChatML if none)."""
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        bos = self.tokens[self.bos_id] if self.bos_id is not None else ""
        eos = self.tokens[self.eos_id] if self.eos_id is not None else ""
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=bos, eos_token=eos, **kwargs)


class StreamDecoder:
    """Turns token ids into text deltas as they are generated.

    Token bytes go through an incremental UTF-8 decoder, so a character split
    across tokens is emitted only once complete; "".join(deltas) + flush()
    is Tokenizer.decode(ids). A SentencePiece space prefix is stripped from
    the start of the text, as the model's encoder added it.
    """

    def __init__(self, tok: Tokenizer, skip_special: bool = True):
        self.tok = tok
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_leading_space = tok.kind == "llama" and tok.add_space_prefix
        self._started = False

    def push(self, token_id: int) -> str:
        if self.skip_special and self.tok.is_special(token_id):
            return ""
        return self._emit(self._utf8.decode(self.tok.token_bytes(token_id)))

    def flush(self) -> str:
        """Text still held back (an incomplete UTF-8 sequence becomes U+FFFD)."""
        return self._emit(self._utf8.decode(b"", final=True))

    def _emit(self, text: str) -> str:
        if text and not self._started:
            self._started = True
            if self._strip_leading_space and text.startswith(" "):
                text = text[1:]
        return text


# ---------------------------------------------------------------- builders
def _build_bpe(meta: dict, tokens: list[str], vocab: dict[str, int]) -> HFTokenizer:
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre not in _PRE_TOKENIZERS:
        log.warning("unknown tokenizer.ggml.pre %r: falling back to the gpt2 pre-tokenizer", pre)
        pre = "gpt2"
    regexes, ignore_merges = _PRE_TOKENIZERS[pre]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf


def _build_spm(meta: dict, tokens: list[str], types: list[int], vocab: dict[str, int],
               add_space_prefix: bool) -> HFTokenizer:
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    # Every split of a piece into two in-vocabulary pieces is a merge; ranks follow
    # the merged piece's score (highest first), ties by id, as llama.cpp chooses.
    mergeable = (TOKEN_NORMAL, TOKEN_USER_DEFINED, TOKEN_UNUSED)
    ranked = []
    for i, t in enumerate(tokens):
        if types[i] not in mergeable or len(t) < 2 or vocab.get(t) != i:
            continue
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, vocab[left], vocab[right], left, right))
    ranked.sort()
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(r[4], r[5]) for r in ranked],
                                unk_token=unk, byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Prepend("\u2581")] if add_space_prefix else []
    hf.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(dec)
    return hf


def _compile_template(source: str):
    """jinja2 template in a sandbox, with the helpers HF chat templates call."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.exceptions import TemplateError

    def raise_exception(message):
        raise TemplateError(message)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)
