"""Time and peak memory of greedy DPP MAP inference as the pool grows.

Run: ``PYTHONPATH=src python perf/dpp_scaling.py`` (or after ``pip install -e .``). Add ``--quick`` for
N <= 10k only.

Every case runs in a fresh subprocess (2 torch threads) on random unit features (d = 384) and uniform
random quality. Three implementations, all in ``spard.selection.dpp``:

* ``greedy_map``: factored incremental Cholesky, features only (the one spard uses);
* ``full_kernel``: Chen et al.'s algorithm on a materialised N x N float64 kernel; the time includes
  building the kernel. Skipped when the kernel alone would exceed ``KERNEL_LIMIT_GB``;
* ``brute_force``: greedy with explicit log-determinants; only run where it finishes in seconds.

``eps = 0`` so every case makes exactly k picks (with d = 384 < k = 1000, the default eps would stop
the run once the selection spans the feature space, and the timings would not be comparable).

Memory column: peak resident set size *during the call* minus the resident set size just before it, in
MiB. The peak is reset before the call by writing 5 to ``/proc/self/clear_refs`` and read from ``VmHWM``
in ``/proc/self/status`` (Linux only); it counts every allocation (torch, MKL, Python), not just tensors.
The input features (N x d float32) exist before the call and are not included; their float64 copy is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

D = 384
KERNEL_LIMIT_GB = 4.0
BRUTE_FORCE_MAX = (1_000, 100)  # largest (N, k) the brute force is run for: O(N k^4) work
IMPLS = ("greedy_map", "full_kernel", "brute_force")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_case(impl: str, n: int, k: int) -> dict[str, float | list[int]]:
    """Run one case in this process; returns seconds, extra peak MiB and the picks."""
    import torch

    from spard.selection.dpp import dpp_kernel, greedy_map, greedy_map_full_kernel, greedy_map_naive

    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(n + k)
    features = torch.nn.functional.normalize(torch.randn(n, D, generator=gen), dim=1)
    quality = torch.rand(n, generator=gen)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss_before = _status_kib("VmRSS")
    start = time.perf_counter()
    if impl == "greedy_map":
        picks = greedy_map(features, quality, k, eps=0.0)
    elif impl == "full_kernel":
        picks = greedy_map_full_kernel(dpp_kernel(features, quality), k, eps=0.0)
    else:
        picks = greedy_map_naive(features, quality, k, eps=0.0)
    seconds = time.perf_counter() - start
    peak_mib = (_status_kib("VmHWM") - rss_before) / 1024
    return {"seconds": seconds, "peak_mib": peak_mib, "picks": picks}


def skip_reason(impl: str, n: int, k: int) -> str | None:
    if impl == "full_kernel":
        gib = n * n * 8 / 2**30
        if gib > KERNEL_LIMIT_GB:
            return f"skipped: kernel would need {gib:.0f} GiB"
    if impl == "brute_force" and (n, k) > BRUTE_FORCE_MAX:
        return f"skipped: O(N k^4) = {n * k**4:.0e} flops"
    return None


def spawn(impl: str, n: int, k: int) -> dict[str, float | list[int]]:
    out = subprocess.run(
        [sys.executable, __file__, "--case", impl, str(n), str(k)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", nargs=3, metavar=("IMPL", "N", "K"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="only N <= 10k")
    args = parser.parse_args()
    if args.case:
        impl, n, k = args.case[0], int(args.case[1]), int(args.case[2])
        print(json.dumps(run_case(impl, n, k)))
        return
    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    print(f"greedy DPP MAP, d={D}, random unit features, uniform quality, eps=0 (exactly k picks), 2 threads")
    print("peak = extra peak RSS during the call (MiB); same = picks identical to greedy_map's")
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other processes on the machine slow every timing)")
    header = f"{'N':>7} {'k':>5} {'impl':<12} {'seconds':>9} {'peak MiB':>9}  same"
    print(header)
    print("-" * len(header))
    for n in sizes:
        for k in (100, 1_000):
            reference: list[int] | None = None
            for impl in IMPLS:
                reason = skip_reason(impl, n, k)
                if reason:
                    print(f"{n:>7} {k:>5} {impl:<12} {reason}", flush=True)
                    continue
                res = spawn(impl, n, k)
                picks = res["picks"]
                reference = picks if reference is None else reference
                diff = next((i for i, (a, b) in enumerate(zip(picks, reference, strict=False)) if a != b), len(picks))
                same = "yes" if picks == reference else f"no, from pick {diff}"
                print(f"{n:>7} {k:>5} {impl:<12} {res['seconds']:>9.2f} {res['peak_mib']:>9.0f}  {same}", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
