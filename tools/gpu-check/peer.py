"""PyTorch peer for kvq's GPU check (tools/gpu-check/run).

Times f16 scaled_dot_product_attention on the decode shapes kvq's bench times
(one query per sequence, 32 q / 8 kv heads, D 128, GQA) with every SDPA backend
that takes them, keeping the fastest, and a device-to-device copy; prints JSON
lines. Calls are timed from CUDA graphs of ten (kernel time, as kvq's bench takes
it from timestamps), each reading its own copy of K and V, rotating over copies
worth at least 256 MB, so that no call is served from L2. Without PyTorch or a
CUDA device it says so and prints nothing.
"""

import argparse
import json
import statistics
import sys

L2_FLUSH_BYTES = 256 << 20


def numbers(text):
    return [int(x) for x in text.split(",") if x]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=numbers, default=[1024, 4096, 16384, 32768])
    ap.add_argument("--batches", type=numbers, default=[1, 16])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    a = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError as e:
        print(f"peer: no PyTorch here ({e}): skipped", file=sys.stderr)
        return 0
    if not torch.cuda.is_available():
        print("peer: PyTorch sees no CUDA device: skipped", file=sys.stderr)
        return 0
    dev = torch.device("cuda")
    print(f"peer: torch {torch.__version__} on {torch.cuda.get_device_name(dev)}", file=sys.stderr)

    def median_us(fn, iters, reps=10):
        """Median µs of one call: `reps` calls captured in a CUDA graph and replayed
        between events, so that no host launch gap is timed (plain back-to-back
        calls where the graph cannot be captured)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(reps):
                    fn()
            run = graph.replay
        except RuntimeError as e:
            print(f"peer: no CUDA graph ({str(e).splitlines()[0]}): timing calls back to back",
                  file=sys.stderr)

            def run():
                for _ in range(reps):
                    fn()
        times = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            run()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e3 / reps)
        return statistics.median(times)

    n = 1 << 30
    src = torch.ones(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    us = median_us(lambda: dst.copy_(src), a.iters)
    print(json.dumps({"peer": "copy", "bytes": 2 * n, "median_us": round(us, 1),
                      "gbps": round(2 * n / us / 1e3, 3)}))
    del src, dst

    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]
    hq, hkv, d = a.q_heads, a.kv_heads, a.head_dim
    for batch in a.batches:
        for ctx in a.contexts:
            kv_bytes = 2 * batch * hkv * ctx * d * 2
            copies = max(1, min(64, -(-L2_FLUSH_BYTES // kv_bytes)))
            q = torch.randn(batch, hq, 1, d, dtype=torch.float16, device=dev)
            ks = [torch.randn(batch, hkv, ctx, d, dtype=torch.float16, device=dev) for _ in range(copies)]
            vs = [torch.randn(batch, hkv, ctx, d, dtype=torch.float16, device=dev) for _ in range(copies)]
            turn = [0]

            def call():
                i = turn[0] % copies
                turn[0] += 1
                return F.scaled_dot_product_attention(q, ks[i], vs[i], enable_gqa=True)

            best = None
            for name, backend in backends:
                if best is not None and name == "math":
                    break  # the reference path: timed only when nothing else runs
                try:
                    with sdpa_kernel(backend):
                        us = median_us(call, a.iters)
                except RuntimeError as e:
                    print(f"peer: batch {batch} context {ctx}: {name} refused: {str(e).splitlines()[0]}",
                          file=sys.stderr)
                    continue
                if best is None or us < best[1]:
                    best = (name, us)
            if best is None:
                print(f"peer: batch {batch} context {ctx}: no SDPA backend ran", file=sys.stderr)
                continue
            print(json.dumps({"peer": "torch-sdpa-f16", "sdpa": best[0], "batch": batch, "context": ctx,
                              "median_us": round(best[1], 1), "bytes": kv_bytes,
                              "gbps": round(kv_bytes / best[1] / 1e3, 3)}))
            del q, ks, vs
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
