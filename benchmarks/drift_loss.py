"""Drift-loss benchmark: the batched engine (DriftingLoss) against the literal loop (reference.authors_loss).

    python benchmarks/drift_loss.py              # full run: minutes on a 2-core CPU
    python benchmarks/drift_loss.py --quick      # smoke test at toy sizes
    python benchmarks/drift_loss.py --device cuda
    python benchmarks/drift_loss.py --channels --locations 1024 --repeats 1   # one size, per-location table only
    python benchmarks/drift_loss.py --official /tmp/official/drift_loss.py --threads 1 --channels --locations
                                                 # ours against the authors' loss only (issue 18's table)

Against the authors' loss (``--official PATH``): their ``drift_loss.py`` from a snapshot of github lambertae/drifting
(``git clone https://github.com/lambertae/drifting /tmp/official``), run as it is under ``jax.jit`` in a JAX venv
(``python3 -m venv /tmp/jaxvenv && /tmp/jaxvenv/bin/pip install jax einops numpy``; ``--jax-python`` names another
interpreter). Their code is loaded from PATH, never copied; the one shim: ``jnp.clip`` accepts the ``a_min``/``a_max``
keywords that their code uses and JAX >= 0.6 removed. Table 3, forward + backward at issue 18's shapes (G = 64 groups,
N = 64, P = 64, M = 16 weighted negatives, temperatures 0.02/0.05/0.2): C = 256 and 1024 with one global feature;
L = 16 (C = 256) and L = 64 (C = 128) locations, folded into the groups for theirs ([G L, N, C], as their code does)
and given as [G, N, L, C] to ours (no bound, the default). Every case runs in a fresh process, ours and theirs
alternating, ``--rounds`` rounds (default 3); each cell is the best of its rounds, each round the median of
``--repeats`` runs after one warm-up (compilation). With ``--threads 1`` both run on one thread (XLA's Eigen pool off)
and the clock is the process's CPU time, which a shared machine disturbs least. Skipped when PATH does not exist.

Two tables, forward + backward of one feature with 3 temperatures, median of several runs after one warm-up:
1. the paper's ablation shape (G = 64 groups, N = 64 generated, P = 64 positives, M = 16 extra negatives) for
   C in {64, 256, 1024}, engine vs literal loop;
2. a per-location feature map (C = 256, gen [G, N, L, C]) at G x L = 64 x {64, 256, 1024} location-groups under a
   ``max_chunk_elements`` bound (engine only), to show throughput (rows/s) against size and peak memory against
   the chunk budget.

Peak memory: every case runs in a fresh subprocess. On CPU the worker allocates its inputs, reads its resident set
size (RSS, /proc/self/statm) as the baseline, resets the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``,
so an earlier transient peak from imports does not hide the growth) and reports ru_maxrss at the end minus the
baseline: the peak extra memory of the loss over its inputs, gradient included. On CUDA it reports
max_memory_allocated minus the memory allocated after the inputs. For the engine it then measures one forward
without gradient the same way, with a new loss object (baseline and peak mark reset again after the gradient and
the first loss, which keeps its working memory between calls on the CPU, are dropped): the chunked working set
alone, with no force buffer. Freed blocks that the C allocator keeps for reuse instead of returning
them (blocks under its mmap threshold, 32 MiB at most) are not counted again by this second baseline.

Chunk budget: ``drifting_lightning.drift.chunks.chunk_budget_bytes``, the bound that module's docstring states:
rows = max_chunk_elements // (N T) rows per chunk, each holding at most 3 [N, T] float32 matrices (distances, the
sum of the temperatures' coefficients, one temperature's logits turned into coefficients) and (T + N) C float32
values (centred targets, one V or the chunk's force): 4 B x rows x (3 N T + (T + N) C).
Beyond it the loss keeps one float32 force buffer the size of gen from the forward on, which backward turns into
the gradient in place. The gradient is gen's size whatever the loss, so the table subtracts it: peak extra -
gradient is the loss's own working memory, the part a chunk budget can bound, and it is compared with the budget.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

TEMPERATURES = (0.02, 0.05, 0.2)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(spec: dict) -> dict:
    """One case in this (fresh) process: inputs, baseline, warm-up, timed runs, peak extra memory."""
    import torch

    from drifting_lightning.drift import DriftingLoss
    from drifting_lightning.drift.reference import authors_loss

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    g, n, p, m, c, loc = spec["G"], spec["N"], spec["P"], spec["M"], spec["C"], spec["L"]
    gen_ = torch.Generator(device=device).manual_seed(0)

    def randn(k: int):
        shape = (g, k, c) if loc is None else (g, k, loc, c)
        return torch.randn(shape, generator=gen_, device=device)

    gen, pos, neg = randn(n).requires_grad_(), randn(p) + 0.5, randn(m)
    w = torch.rand(g, m, generator=gen_, device=device)
    if spec["impl"] == "engine":
        loss_fn = DriftingLoss(temperatures=TEMPERATURES, max_chunk_elements=spec["chunk"])

        def step():
            loss_fn(gen, pos, neg, w).loss.backward()
    else:

        def step():
            authors_loss(gen, pos, neg, w, TEMPERATURES).backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def peak_extra(fn) -> int:
        """Runs fn; returns its peak memory over the memory in use when it started."""
        sync()
        if device.type == "cuda":
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = _rss_bytes()
            spec["peak_reset"] = _reset_peak_rss()
        fn()
        sync()
        if device.type == "cuda":
            return max(torch.cuda.max_memory_allocated() - base, 0)
        return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, 0)

    times = []

    now = time.process_time if spec.get("clock") == "cpu" else time.perf_counter

    def timed_runs():
        for i in range(spec["repeats"] + 1):
            gen.grad = None
            start = now()
            step()
            sync()
            if i:  # the first run warms up
                times.append(now() - start)

    extra = peak_extra(timed_runs)
    forward = None
    if spec["impl"] == "engine":
        # The chunked working set alone: a forward without gradient has no force buffer, nothing gen-sized. A new
        # loss object: on the CPU a loss keeps its working memory between calls, which would hide it here.
        gen.grad = None
        loss_fn = DriftingLoss(temperatures=TEMPERATURES, max_chunk_elements=spec["chunk"])
        forward = peak_extra(lambda: loss_fn(gen.detach(), pos, neg, w))
    input_bytes = sum(t.numel() * t.element_size() for t in (gen, pos, neg, w))
    return {**spec, "time": statistics.median(times), "times": times, "extra": extra, "forward_extra": forward,
            "inputs": input_bytes, "gen": gen.numel() * gen.element_size(), "torch_threads": torch.get_num_threads()}


def official_worker(spec: dict) -> dict:
    """One case of the authors' loss, in the JAX venv: forward + backward of their jitted drift_loss."""
    import importlib.util

    import jax
    import jax.numpy as jnp
    import numpy as np

    clip = jnp.clip

    def clip_with_old_keywords(x, min=None, max=None, *, a_min=None, a_max=None):  # noqa: A002 (jnp's names)
        return clip(x, min if a_min is None else a_min, max if a_max is None else a_max)

    jnp.clip = clip_with_old_keywords
    module_spec = importlib.util.spec_from_file_location("official_drift_loss", spec["official"])
    official = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(official)
    rng = np.random.default_rng(0)
    b, n, p, m, c = spec["G"] * (spec["L"] or 1), spec["N"], spec["P"], spec["M"], spec["C"]
    gen = jnp.asarray(rng.standard_normal((b, n, c), dtype=np.float32))
    pos = jnp.asarray(rng.standard_normal((b, p, c), dtype=np.float32) + 0.5)
    neg = jnp.asarray(rng.standard_normal((b, m, c), dtype=np.float32))
    w = jnp.asarray(rng.random((b, m), dtype=np.float32))
    grad = jax.jit(jax.grad(lambda g: official.drift_loss(g, pos, neg, weight_neg=w, R_list=TEMPERATURES)[0].mean()))
    now = time.process_time if spec["clock"] == "cpu" else time.perf_counter
    times = []
    for i in range(spec["repeats"] + 1):
        start = now()
        grad(gen).block_until_ready()
        if i:  # the first run compiles
            times.append(now() - start)
    return {**spec, "time": statistics.median(times), "times": times}


def run_case(spec: dict, python: str = sys.executable, flag: str = "--worker") -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if flag == "--official-worker" and spec["threads"] == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                            "intra_op_parallelism_threads=1").strip()
    out = subprocess.run(
        [python, __file__, flag, json.dumps(spec)], capture_output=True, text=True, env=env, check=False
    )
    if out.returncode != 0:
        return {**spec, "error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _engine_version() -> str:
    drift = ROOT / "drifting_lightning" / "drift"
    digest = hashlib.sha256()
    for name in ("chunks.py", "functional.py", "fields.py", "kernels.py", "loss.py", "reference.py"):
        digest.update((drift / name).read_bytes())
    return digest.hexdigest()[:12]


def ms(result: dict) -> str:
    """Median time in ms, with the range of the timed runs."""
    lo, hi = min(result["times"]) * 1e3, max(result["times"]) * 1e3
    return f"{result['time'] * 1e3:,.1f} ({lo:,.0f}-{hi:,.0f})"


def mb(nbytes: float) -> str:
    value = nbytes / 2**20
    return f"{value:,.0f}" if value >= 100 else f"{value:.2g}"


Row = dict[str, Any]


def ablation_rows(common: dict, shape: dict, channels: list[int]) -> Iterator[Row]:
    """Table 1, a row per C as it is measured: "C", "engine" and "literal" (worker results: "time" median seconds,
    "times", "extra" peak extra bytes; or "error") and "speedup" (literal time / engine time; None after an error)."""
    for c in channels:
        res = {impl: run_case({**common, **shape, "C": c, "L": None, "chunk": None, "impl": impl})
               for impl in ("engine", "literal")}  # fmt: skip
        failed = any("error" in r for r in res.values())
        yield {"C": c, **res, "speedup": None if failed else res["literal"]["time"] / res["engine"]["time"]}


def ablation_line(row: Row) -> str:
    e, lit = row["engine"], row["literal"]
    if row["speedup"] is None:
        return f"| {row['C']} | {e.get('error', '')} | {lit.get('error', '')} | | | |"
    return (f"| {row['C']} | {ms(e)} | {ms(lit)} | {row['speedup']:.1f}x "
            f"| {mb(e['extra'])} | {mb(lit['extra'])} |")  # fmt: skip


def location_rows(common: dict, shape: dict, locations: list[int], c: int, chunk: int, budget: int) -> Iterator[Row]:
    """Table 2, a row per L as it is measured: "G", "L", "rows" (G L), "inputs" and "gen" (bytes the shapes take),
    "budget" (the chunk budget, bytes), and then "needed" and "available" bytes (the case does not fit), "error", or
    "result" (the worker's: "time", "times", "inputs" and "gen" bytes of its tensors, "extra" and "forward_extra" peak
    extra bytes, "torch_threads"), "own" (peak extra - gradient, bytes) and "rows_per_s"."""
    n = shape["N"]
    previous = None
    for loc in locations:
        spec = {**common, **shape, "C": c, "L": loc, "chunk": chunk, "impl": "engine"}
        rows = shape["G"] * loc
        inputs = 4 * rows * c * (shape["N"] + shape["P"] + shape["M"])
        gen_bytes = 4 * rows * c * n
        row = {"G": shape["G"], "L": loc, "rows": rows, "inputs": inputs, "gen": gen_bytes, "budget": budget}
        # Expected extra: gradient + chunk budget; past cases calibrate it (the budget part does not grow with the
        # rows, so scaling the whole extra by the rows overestimates: safe).
        needed = inputs + (previous["extra"] * rows / previous["rows"] if previous else gen_bytes + budget)
        available = _available_bytes(common["device"])
        if needed > 0.75 * available:  # leave room for whatever else runs on the machine
            yield {**row, "needed": needed, "available": available}
            continue
        r = run_case(spec)
        if "error" in r:
            yield {**row, "error": r["error"]}
            continue
        previous = {**r, "rows": rows}
        yield {**row, "result": r, "own": r["extra"] - r["gen"], "rows_per_s": rows / r["time"]}


def location_line(row: Row) -> str:
    name = f"{row['G']} x {row['L']} = {row['rows']:,}"
    if "needed" in row:
        return (f"| {name} | does not fit: needs about {mb(row['needed'])} MB, {mb(row['available'])} MB available "
                f"| | {mb(row['inputs'])} | {mb(row['gen'])} | | | | | |")  # fmt: skip
    if "error" in row:
        return f"| {name} | failed: {row['error']} | | {mb(row['inputs'])} | {mb(row['gen'])} | | | | | |"
    r, own, budget = row["result"], row["own"], row["budget"]
    return (f"| {name} | {ms(r)} | {row['rows_per_s']:,.0f} | {mb(r['inputs'])} "
            f"| {mb(r['gen'])} | {mb(r['extra'])} | {mb(own)} | {own / budget:.2f} | {mb(r['forward_extra'])} "
            f"| {r['forward_extra'] / budget:.2f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, list[Row]]:
    """Prints the tables; returns their rows: {"official": ..., "ablation": ..., "locations": ...} (see
    ``official_rows``, ``ablation_rows``, ``location_rows``; a table not run has no rows)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes, two repeats: a smoke test")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 5, quick 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    parser.add_argument("--chunk-elements", type=int, default=None,
                        help="max_chunk_elements of the per-location case (default 2**24, quick 2**10)")
    parser.add_argument("--channels", type=int, nargs="*", default=None,
                        help="C of the ablation table (default 64 256 1024, quick 16; the flag alone skips it)")
    parser.add_argument("--locations", type=int, nargs="*", default=None,
                        help="L of the per-location table (default 64 256 1024, quick 4; the flag alone skips it)")
    parser.add_argument("--official", type=Path, default=None,
                        help="the authors' drift_loss.py (a lambertae/drifting snapshot): adds table 3, ours vs theirs")
    parser.add_argument("--jax-python", default="/tmp/jaxvenv/bin/python", help="interpreter with jax for --official")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of table 3 (best of them)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--official-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    if args.official_worker:
        print(json.dumps(official_worker(json.loads(args.official_worker))))
        return {}

    quick = args.quick
    repeats = args.repeats or (2 if quick else 5)
    chunk = args.chunk_elements or (2**10 if quick else 2**24)
    shape = dict(G=4, N=8, P=8, M=2) if quick else dict(G=64, N=64, P=64, M=16)
    channels = args.channels if args.channels is not None else [16] if quick else [64, 256, 1024]
    locations = args.locations if args.locations is not None else [4] if quick else [64, 256, 1024]
    common = dict(device=args.device, threads=args.threads, repeats=repeats)
    tables: dict[str, list[Row]] = {"official": [], "ablation": [], "locations": []}
    if args.device.startswith("cuda"):
        import torch

        where = torch.cuda.get_device_name(args.device)
    else:
        where = f"{_cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    print(f"drift loss benchmark, {time.strftime('%Y-%m-%d %H:%M')}, device {args.device} ({where}), "
          f"torch {metadata.version('torch')}, engine {_engine_version()}")
    print(f"forward + backward, temperatures {TEMPERATURES}, median of {repeats} runs after 1 warm-up\n")
    if args.official is not None:
        if not args.official.exists() or not Path(args.jax_python).exists():
            print(f"Against the authors' loss: skipped ({args.official} or {args.jax_python} not found; see the "
                  "docstring)\n")  # fmt: skip
        else:
            tables["official"] = official_rows(args, shape, repeats)
            print_official(tables["official"], args, shape, repeats)

    if channels:
        print(f"Ablation shape G={shape['G']}, N={shape['N']}, P={shape['P']}, M={shape['M']} (one [G, N, C] feature)"
              "\n")
        print("| C | engine ms (range) | literal loop ms (range) | speed-up "
              "| engine peak extra MB | literal peak extra MB |")
        print("|---:|---:|---:|---:|---:|---:|")
    for row in ablation_rows(common, shape, channels):
        tables["ablation"].append(row)
        print(ablation_line(row), flush=True)

    if not locations:
        return tables
    sys.path.insert(0, str(ROOT))  # the engine's own definition of the budget, also when not installed
    from drifting_lightning.drift.chunks import LIVE_MATRICES, chunk_budget_bytes

    c = 16 if quick else 256
    n, t = shape["N"], shape["N"] + shape["M"] + shape["P"]
    budget = chunk_budget_bytes(chunk, n, t, c)
    rows_per_chunk = max(1, chunk // (n * t))
    print(f"\nPer-location feature map, C={c}, gen [G, N, L, C] with G={shape['G']}, max_chunk_elements={chunk:,}: "
          f"chunks of <= {rows_per_chunk:,} rows, chunk budget {mb(budget)} MB = 4 B x rows x ({LIVE_MATRICES} N T "
          f"+ (T + N) C) "
          f"with N={n}, T={t} (drift/chunks.py docstring). Peak extra: over the inputs, of forward + backward (the "
          "gradient, gen's size, is part of it) and of one forward without gradient (no force buffer)\n")
    print("| G x L rows | ms (range) | rows/s | inputs MB | gen = gradient MB | peak extra MB | extra - gradient MB "
          "| (extra - gradient) / budget | forward without gradient: peak extra MB | forward / budget |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in location_rows(common, shape, locations, c, chunk, budget):
        tables["locations"].append(row)
        print(location_line(row), flush=True)
    measured = [row["result"] for row in tables["locations"] if "result" in row]
    threads = measured[-1]["torch_threads"] if measured else "?"
    print(f"\ntorch threads {threads}" + (f", load average {os.getloadavg()[0]:.1f} at the end; peak extra = ru_maxrss "
          "after the runs - RSS after allocating the inputs (peak mark reset there)" if args.device == "cpu" else ""))
    return tables


# Issue 18's rows: (C, L); L None is one global feature.
OFFICIAL_ROWS = [(256, None), (1024, None), (256, 16), (128, 64)]


def official_rows(args: argparse.Namespace, shape: dict, repeats: int) -> list[Row]:
    """Table 3, ours against the authors' loss, interleaved: a row per shape, "C", "L" (None: one global feature),
    "theirs" and "ours" (the best of the rounds: "time" median seconds, "times"; or "error") and "ratio" (their time
    / ours; None after an error)."""
    shapes = [(16, None), (8, 4)] if args.quick else OFFICIAL_ROWS
    clock = "cpu" if args.threads == 1 else "wall"
    common = dict(device="cpu", threads=args.threads, repeats=repeats, clock=clock, official=str(args.official))
    best: dict[tuple, dict] = {}
    for _ in range(args.rounds):
        for c, loc in shapes:
            for impl in ("engine", "official"):
                spec = {**common, **shape, "C": c, "L": loc, "chunk": None, "impl": impl}
                r = run_case(spec, args.jax_python, "--official-worker") if impl == "official" else run_case(spec)
                prev = best.get((c, loc, impl))
                if prev is None or ("error" not in prev and ("error" in r or r["time"] < prev["time"])):
                    best[(c, loc, impl)] = r  # an error sticks: its row reports it
    out = []
    for c, loc in shapes:
        theirs, ours = best[(c, loc, "official")], best[(c, loc, "engine")]
        failed = "error" in theirs or "error" in ours
        out.append({"C": c, "L": loc, "theirs": theirs, "ours": ours,
                    "ratio": None if failed else theirs["time"] / ours["time"]})  # fmt: skip
    return out


def print_official(rows: list[Row], args: argparse.Namespace, shape: dict, repeats: int) -> None:
    threads = "1 thread each, CPU time" if args.threads == 1 else f"threads {args.threads or 'default'}, wall time"
    print(f"Against the authors' loss ({args.official}, jax.jit, XLA CPU), G={shape['G']}, N={shape['N']}, "
          f"P={shape['P']}, M={shape['M']}; {threads}; best of {args.rounds} interleaved rounds, each the median of "
          f"{repeats} runs; load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| shape | authors' drift_loss.py ms | ours, DriftingLoss ms | theirs / ours |")
    print("|---|---:|---:|---:|")
    for row in rows:
        theirs, ours = row["theirs"], row["ours"]
        c, loc = row["C"], row["L"]
        name = f"one global feature, C = {c}" if loc is None else f"per-location, L = {loc}, C = {c}"
        if row["ratio"] is None:
            print(f"| {name} | {theirs.get('error', '')} | {ours.get('error', '')} | |")
            continue
        print(f"| {name} | {theirs['time'] * 1e3:,.1f} | {ours['time'] * 1e3:,.1f} | {row['ratio']:.2f}x |", flush=True)
    print()


if __name__ == "__main__":
    main()
