#!/usr/bin/env python3
"""Writes examples/generate/testdata/reference.txt, the reference data for the
unit tests of examples/generate/gguf.rs and examples/generate/tokenizer.rs.

Both come from implementations independent of the Rust code:

* dequantized weights: gguf-py's GGUFReader and gguf.quants.dequantize (numpy);
* token ids: llama.cpp itself, through the prebuilt CPU library shipped in the
  llama-cpp-cffi wheel (llama_tokenize with add_special=false, and
  parse_special=false for "encode", true for "encode_special").

Setup (in a virtual environment):

    pip install gguf numpy cffi
    pip install --no-deps llama-cpp-cffi==0.4.42

Usage:

    python tools/gguf_reference.py MODEL.gguf examples/generate/testdata/reference.txt

The wheel's library was built against a newer libstdc++ than some systems have
(Debian 12); its one missing symbol, __cxa_call_terminate, is then supplied by
a two-line shim compiled with g++ into a temporary folder.

Output: one record per line, fields separated by tabs, '#' starts a comment:

    dequant  NAME  N_ELEMENTS  WEIGHTED_BIT_SUM  INDEX:0xBITS INDEX:0xBITS ...
    encode          TEXT  ID ID ...
    encode_special  TEXT  ID ID ...

WEIGHTED_BIT_SUM is sum over i of f32_bits(x[i]) * (i + 1) modulo 2^64, over the
whole tensor in ggml element order. TEXT escapes backslash, tab, newline, CR as
\\\\, \\t, \\n, \\r, and other control characters as \\xHH.
"""

import ctypes
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

TENSORS = [
    "token_embd.weight",  # Q8_0
    "blk.0.attn_q.weight",  # Q4_1
    "blk.0.attn_norm.weight",  # F32
    "blk.29.ffn_down.weight",  # Q4_1
]

ENCODE = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "In 2024, 3.14159 of 1,000,000 people said 42.",
    "don't we'll they're I've she'd it's you'll I'M DON'T o'clock",
    "Punctuation!!! (parens) [brackets] {braces} <angle> ... --- ?! @#$%^&*",
    "a  b\n\n  c",
    " leading space and trailing spaces   ",
    "caf\u00e9 na\u00efve \u2014 \u00fcn\u00efc\u00f6d\u00e9 \u65e5\u672c\u8a9e "
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u0440\u0443\u0441\u0441\u043a\u0438\u0439 "
    "\ud55c\uad6d\uc5b4 \U0001f600\U0001f980",
    'fn main() {\n    println!("hi");\n}\n',
    "\ttabs\tand\r\nCRLF\r\n",
    "x\u00b2+y\u00b3=z\u00bd, \u216b numerals, \u0663 arabic digit, \uff11 fullwidth",
    "a\x04b\x06c",
    "<|im_start|> is plain text here <|im_end|>",
    "e\u0301 combining accent, \ufb01 ligature, \u00a0nbsp\u2003emspace\u3000ideographic",
    "   ",
    "\n",
    "Large language models tokenize text into subword units. Byte-level BPE "
    "starts from the 256 byte values and applies learned merges; SmolLM2's "
    "vocabulary has 49152 tokens and 48900 merges (ranked by frequency).",
]

ENCODE_SPECIAL = [
    "<|im_start|>user\nHi<|im_end|>\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "text<|endoftext|>more<|im_end|><|im_start|>  spaced  <|im_end|>",
    "<|im_start|><|im_end|>",
]


def load_llama_cpp():
    """The cffi `lib` and `ffi` of llama-cpp-cffi's CPU build, loaded without
    importing the `llama` package (whose __init__ needs many more packages)."""
    spec = importlib.util.find_spec("llama")
    if spec is None or spec.origin is None:
        sys.exit("llama-cpp-cffi is not installed: pip install --no-deps llama-cpp-cffi==0.4.42")
    folder = os.path.dirname(spec.origin)
    names = [f for f in os.listdir(folder) if f.startswith("_llama_cpp_cpu")]
    if not names:
        sys.exit(f"no _llama_cpp_cpu library in {folder}")
    path = os.path.join(folder, names[0])

    def load():
        loader = importlib.machinery.ExtensionFileLoader("llama._llama_cpp_cpu", path)
        s = importlib.util.spec_from_file_location("llama._llama_cpp_cpu", path, loader=loader)
        module = importlib.util.module_from_spec(s)
        loader.exec_module(module)
        return module.lib, module.ffi

    try:
        return load()
    except ImportError as e:
        if "__cxa_call_terminate" not in str(e):
            raise
    shim_dir = tempfile.mkdtemp(prefix="cxa_shim_")
    src = os.path.join(shim_dir, "shim.cc")
    so = os.path.join(shim_dir, "libshim.so")
    with open(src, "w") as f:
        f.write(
            "#include <exception>\n"
            'extern "C" void* __cxa_begin_catch(void*) noexcept;\n'
            'extern "C" [[noreturn]] void __cxa_call_terminate(void* e) noexcept '
            "{ if (e) __cxa_begin_catch(e); std::terminate(); }\n"
        )
    subprocess.run(["g++", "-shared", "-fPIC", "-O2", "-o", so, src], check=True)
    ctypes.CDLL(so, mode=ctypes.RTLD_GLOBAL)
    return load()


def escape(text):
    out = []
    for c in text:
        if c == "\\":
            out.append("\\\\")
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c == "\r":
            out.append("\\r")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append("\\x%02x" % ord(c))
        else:
            out.append(c)
    return "".join(out)


def weighted_bit_sum(x):
    bits = x.reshape(-1).astype(np.float32).view(np.uint32).astype(np.uint64)
    weights = np.arange(1, bits.size + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return int(np.sum(bits * weights, dtype=np.uint64))


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    model, out_path = sys.argv[1], sys.argv[2]
    lines = [
        "# Reference data for examples/generate/gguf.rs and tokenizer.rs tests.",
        "# Generated by: python tools/gguf_reference.py %s %s" % (model, out_path),
        "# Model: SmolLM2-135M-Instruct.Q4_1.gguf (%d bytes)" % os.path.getsize(model),
        "# Dequantized with gguf-py %s (numpy %s); token ids from llama.cpp via llama-cpp-cffi %s."
        % (
            importlib.metadata.version("gguf"),
            np.__version__,
            importlib.metadata.version("llama-cpp-cffi"),
        ),
        "# Fields are tab-separated; see tools/gguf_reference.py for the format.",
    ]

    reader = GGUFReader(model)
    by_name = {t.name: t for t in reader.tensors}
    for name in TENSORS:
        t = by_name[name]
        x = dequantize(t.data, t.tensor_type).reshape(-1).astype(np.float32)
        n = x.size
        rng = np.random.default_rng(len(name))
        fixed = [0, 1, 2, 15, 16, 17, 31, 32, n // 2, n - 1]
        picks = sorted(set(i for i in fixed if i < n) | set(int(i) for i in rng.integers(0, n, 6)))
        bits = x.view(np.uint32)
        pairs = " ".join("%d:0x%08x" % (i, int(bits[i])) for i in picks)
        lines.append("dequant\t%s\t%d\t%d\t%s" % (name, n, weighted_bit_sum(x), pairs))

    lib, ffi = load_llama_cpp()
    lib.llama_backend_init()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    llm = lib.llama_model_load_from_file(model.encode(), params)
    if llm == ffi.NULL:
        sys.exit("llama.cpp could not load " + model)
    vocab = lib.llama_model_get_vocab(llm)

    def tokenize(text, parse_special):
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = ffi.new("int32_t[]", cap)
        n = lib.llama_tokenize(vocab, raw, len(raw), buf, cap, False, parse_special)
        if n < 0:
            sys.exit("llama_tokenize failed on %r" % text)
        return [buf[i] for i in range(n)]

    for kind, texts, special in (
        ("encode", ENCODE, False),
        ("encode_special", ENCODE_SPECIAL, True),
    ):
        for text in texts:
            ids = tokenize(text, special)
            lines.append("%s\t%s\t%s" % (kind, escape(text), " ".join(map(str, ids))))
    lib.llama_model_free(llm)

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote %s (%d records)" % (out_path, len(lines)))


if __name__ == "__main__":
    main()
