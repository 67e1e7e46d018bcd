#!/usr/bin/env python3
"""Outlier statistics of the real Q/K/V activations in tests/data (numpy only).

    python3 tools/kv_stats.py [tests/data]

Per layer and tensor ([T, H, D] .npy files written by tools/extract_qkv.py):
  * per-channel absmax (over the T positions) and the ratio of the largest channel
    absmax to the median channel absmax, over all heads and per head;
  * the three largest channels as (head, dim);
  * a quantisation baseline: relative L2 error ||x - deq(quant(x))|| / ||x|| of
    symmetric absmax round-to-nearest at 8 and 4 bits, with one scale per token
    and head (a row of D values, "per-token") vs one per channel over the T
    positions ("per-channel").
"""

import glob
import os
import re
import sys

import numpy as np


def rel_err(x, bits, axis):
    qmax = 2 ** (bits - 1) - 1
    s = np.abs(x).max(axis=axis, keepdims=True) / qmax
    s = np.where(s == 0, 1.0, s)
    y = np.clip(np.round(x / s), -qmax, qmax) * s
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "data")
    files = sorted(glob.glob(os.path.join(d, "*_L*_k.npy")),
                   key=lambda p: int(re.search(r"_L(\d+)_", p).group(1)))
    if not files:
        sys.exit(f"no *_L*_k.npy files in {d}")
    for kf in files:
        layer = re.search(r"_L(\d+)_", kf).group(1)
        for name in "kvq":
            x = np.load(kf[: -len("k.npy")] + f"{name}.npy").astype(np.float64)  # [T, H, D]
            T, H, D = x.shape
            ch = np.abs(x).max(axis=0)  # [H, D]
            med = np.median(ch)
            heads = " ".join(f"{ch[h].max() / np.median(ch[h]):.1f}" for h in range(H))
            top = [divmod(int(i), D) for i in np.argsort(ch.reshape(-1))[::-1][:3]]
            q8t, q4t = rel_err(x, 8, 2), rel_err(x, 4, 2)
            q8c, q4c = rel_err(x, 8, 0), rel_err(x, 4, 0)
            print(f"L{layer:>2} {name} {str(x.shape):13s} absmax {ch.max():6.2f} "
                  f"median-ch-absmax {med:5.2f} max/median {ch.max() / med:5.2f} | per head {heads} "
                  f"| top (h,d) {top} | relerr int8 tok/ch {q8t:.4f}/{q8c:.4f} "
                  f"int4 tok/ch {q4t:.3f}/{q4c:.3f}")


if __name__ == "__main__":
    main()
