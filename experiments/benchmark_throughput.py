"""Items per GPU-hour of capture sweeps, the fused summary's fidelity, and the warm start (one GPU).

1. Fidelity and speed of the capture's fused summary (utils.attention_stats.summarize_qk) against
   today's tiled fp32 reductions (summarize_logits over query_key_logits tiles) on q and k of a real
   entry's shapes (3 query frames against --frames key frames of 1560 tokens, 12 heads of 128; bf16,
   and fp32 without TF32), with a sink-like key frame, then with NaN and infinities planted.
2. Sweeps of --items items (1 prompt x seeds), each setting in ONE process of the CLI
   (experiments/run_extraction_figure4.py, configs/random_1_3b.yaml: full-size random weights,
   summary mode, fast mode by default, 21 frames): (a) the default Figure 4 setting, pass 0 of the
   last block, layers 0 and 4; (b) every pass of layers 0 and 4; (c) every layer x every pass. Per
   item after the first (the manifest's times): inference (the capture's summaries overlap it on a
   second stream), the reductions and save after it, the whole item; items per GPU-hour.
3. Warm start: the processes share a compiled-kernel cache (utils/compile_cache.py) that starts empty
   here, so (a) compiles and (b), (c) reuse: the first item's extra time over the later ones.
4. --upstream_cmd: upstream Self-Forcing as a shell loop, one process per item ({seed} replaced; run
   from the repository without its PYTHONPATH, which would shadow upstream's packages of the same
   names: UPSTREAM_PYTHONPATH, if set, is its PYTHONPATH). Each process prints "inference X s".

    PYTHONPATH=. python experiments/benchmark_throughput.py                       # ~4 min on an H100
    UPSTREAM_PYTHONPATH=... PYTHONPATH=. python experiments/benchmark_throughput.py \
        --upstream_cmd "python path/to/upstream_item.py {seed}"                     # + ~1-2 min
    PYTHONPATH=. python experiments/benchmark_throughput.py --config configs/tiny.yaml --device cpu --skip_fidelity  # smoke
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "experiments" / "run_extraction_figure4.py"
PROMPT = "A majestic eagle soaring through a cloudy sky, cinematic lighting"
SETTINGS = {  # name -> (layers, capture_step)
    "(a) pass 0, layers 0 and 4": (["0", "4"], "0"),
    "(b) every pass, layers 0 and 4": (["0", "4"], "all"),
    "(c) every layer x every pass": (["all"], "all"),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="configs/random_1_3b.yaml")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--items", type=int, default=3, help="items per sweep (the first includes compiling)")
    parser.add_argument("--frames", type=int, default=21, help="latent frames per item")
    parser.add_argument("--precision", choices=("exact", "fast"), default=None, help="passed to the CLI (default: its own)")
    parser.add_argument("--skip_fidelity", action="store_true")
    parser.add_argument("--skip_sweeps", action="store_true")
    parser.add_argument("--upstream_cmd", default=None, help="one upstream item as a shell command with {seed}")
    parser.add_argument("--work_dir", default=None, help="caches, logs, compiled kernels (default: a temporary folder)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds before a process is killed")
    args = parser.parse_args()
    if args.items < 2:
        parser.error("--items: at least 2 (the first item includes compiling)")
    if args.upstream_cmd is not None and "{seed}" not in args.upstream_cmd:
        parser.error("--upstream_cmd: needs {seed}")
    return args


def differences(got, want):
    """Per tensor: (largest |difference|, that over the largest finite |value|), NaN and infinities
    required at the same places."""
    rows = {}
    for name, value in want.items():
        x, y = got[name].double().cpu(), value.double().cpu()
        if not (torch.equal(x.isnan(), y.isnan()) and torch.equal(x.isinf() & (x > 0), y.isinf() & (y > 0))
                and torch.equal(x.isinf() & (x < 0), y.isinf() & (y < 0))):
            rows[name] = (float("inf"), float("inf"))
            continue
        finite = y.isfinite()
        diff = (x[finite] - y[finite]).abs().max().item() if finite.any() else 0.0
        scale = y[finite].abs().max().item() if finite.any() else 1.0
        rows[name] = (diff, diff / scale if scale else diff)
    return rows


def fidelity(args):
    """The fused summary against the tiled fp32 one on random q, k of an entry's shapes; ms per entry."""
    from utils.attention_stats import exact_means, query_key_logits, summarize_logits, summarize_qk

    device = torch.device(args.device)
    fsl, fq, heads, dim = 1560, 3, 12, 128
    g = torch.Generator(device=device).manual_seed(0)
    print(f"GPU: {torch.cuda.get_device_name(device)}; fused summary against the tiled fp32 reductions, "
          f"q [1, {fq * fsl}, {heads}, {dim}], k [1, {args.frames * fsl}, {heads}, {dim}]", flush=True)
    worst = {}
    for dtype, plant in ((torch.bfloat16, None), (torch.float32, None), (torch.bfloat16, "nan/inf")):
        q = torch.randn(1, fq * fsl, heads, dim, device=device, generator=g) + 0.5
        k = torch.randn(1, args.frames * fsl, heads, dim, device=device, generator=g)
        k[:, :fsl] += 0.8  # a sink-like first key frame
        q, k = q.to(dtype), k.to(dtype)
        if plant:
            q[0, 100, 3, 7] = float("nan")
            q[0, 2000, 5, 0] = float("inf")
            k[0, 5000, 5, 1] = float("-inf")

        def fused():
            return exact_means(summarize_qk(q, k, fsl), q, k, fsl)

        def tiled():
            return summarize_logits(lambda h, f: query_key_logits(q, k, h, slice(f * fsl, (f + 1) * fsl)), heads, fq, fsl)

        fused(), tiled()  # compile, warm up
        times = {}
        for name, fn in (("fused", fused), ("tiled", tiled)):
            runs = []
            for _ in range(5 if name == "fused" else 2):
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                out = fn()
                torch.cuda.synchronize(device)
                runs.append(time.perf_counter() - start)
            times[name] = (statistics.median(runs), out)
        rows = differences(times["fused"][1], times["tiled"][1])
        label = f"{str(dtype).replace('torch.', '')}{' + NaN/Inf' if plant else ''}"
        print(f"  {label}: fused {times['fused'][0] * 1e3:.2f} ms, tiled {times['tiled'][0] * 1e3:.1f} ms per entry")
        for name, (diff, rel) in rows.items():
            print(f"    {name:22s} max |diff| {diff:.2e}  relative to max |value| {rel:.2e}")
            key = "frame_attention_mass (abs)" if name == "frame_attention_mass" else "others (rel)"
            worst[key] = max(worst.get(key, 0.0), diff if name == "frame_attention_mass" else rel)
        worst[f"fused ms/entry {label}"] = times["fused"][0] * 1e3
    return worst


def run_cli(args, work, name, layers, step):
    """One sweep process: its wall time, manifest lines and header lines."""
    folder = work / re.sub(r"\W+", "_", name).strip("_")
    command = [sys.executable, str(CLI), "--config_path", args.config, "--no_checkpoint", "--device", args.device,
               "--num_frames", str(args.frames), "--save_mode", "summary", "--capture_step", step, "--quiet",
               "--layer_indices", *layers, "--prompt", PROMPT, "--seeds", *map(str, range(args.items)),
               "--output_dir", str(folder)]
    if args.precision:
        command += ["--precision", args.precision]
    compiled = work / "compiled"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               TORCHINDUCTOR_CACHE_DIR=str(compiled / "inductor"), TRITON_CACHE_DIR=str(compiled / "triton"))
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        sys.exit(f"{name}: CLI killed after --timeout {args.timeout} s")
    seconds = time.perf_counter() - start
    (work / f"{folder.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"{name}: CLI exited with {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    lines = [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]
    cache_line = next((x for x in done.stdout.splitlines() if x.startswith("compiled-kernel cache:")), "?")
    gpu = re.search(r"GPU peak: ([\d.]+) GiB", done.stdout)
    return {"process": seconds, "lines": lines, "cache": cache_line, "gpu_peak": gpu[1] if gpu else "?"}


def upstream_loop(args, work):
    """--upstream_cmd for seeds 0..items-1 in one shell loop; its wall time and printed lines."""
    loop = "; ".join(args.upstream_cmd.format(seed=s) for s in range(args.items))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if os.environ.get("UPSTREAM_PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["UPSTREAM_PYTHONPATH"]
    start = time.perf_counter()
    try:
        done = subprocess.run(["bash", "-c", f"set -e; {loop}"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"upstream loop killed after --timeout {args.timeout} s", flush=True)
        return None
    seconds = time.perf_counter() - start
    (work / "upstream.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        print(f"upstream loop failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}", flush=True)
        return None
    inference = [float(x) for x in re.findall(r"inference ([\d.]+) s", done.stdout)]
    print("\n".join(x for x in done.stdout.splitlines() if x.startswith("UPSTREAM")), flush=True)
    return {"process": seconds, "inference": inference}


def main():
    args = parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="benchmark_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    if not args.skip_fidelity:
        for name, value in fidelity(args).items():
            rows.append((f"fidelity: {name}" if "ms" not in name else name, f"{value:.2e}" if "ms" not in name else f"{value:.2f}"))
        torch.cuda.empty_cache()
    results = {}
    if not args.skip_sweeps:
        for name, (layers, step) in SETTINGS.items():
            result = run_cli(args, work, name, layers, step)
            results[name] = result
            later = result["lines"][1:]
            inference = statistics.mean(x["seconds"]["inference"] for x in later)
            reduce = statistics.mean(x["seconds"]["reduce"] for x in later)
            save = statistics.mean(x["seconds"]["save"] for x in later)
            after = reduce + save
            item = statistics.mean(x["seconds"]["item"] for x in later)
            first = result["lines"][0]["seconds"]["inference"] - inference
            result.update(inference=inference, after=after, item=item, first_extra=first)
            print(f"{name}: process {result['process']:.1f} s; per item after the first: inference {inference:.3f} s, "
                  f"reductions + save after it {reduce:.3f} + {save:.3f} s ({after / inference:.1%}), item {item:.3f} s "
                  f"({item / inference:.2f}x inference); first item +{first:.1f} s; GPU peak {result['gpu_peak']} GiB; "
                  f"file {result['lines'][0]['bytes'] / 1e6:.1f} MB; "
                  f"{result['cache']}", flush=True)
            rows += [(f"{name}: items per GPU-hour (steady; whole process)",
                      f"{3600 / item:.0f}; {3600 * args.items / result['process']:.0f}"),
                     (f"{name}: item / inference, after-inference share",
                      f"{item / inference:.3f}x, {after / inference:.1%}")]
        base = results[next(iter(SETTINGS))]["inference"]
        last = results[list(SETTINGS)[-1]]
        rows.append(("(c) item / (a) inference", f"{last['item'] / base:.3f}x"))
        for name, result in results.items():
            rows.append((f"warm start: {name[:3]} first item's extra over later items", f"{result['first_extra']:.1f} s"))
    if args.upstream_cmd:
        up = upstream_loop(args, work)
        if up is not None:
            rows += [("upstream loop: items per GPU-hour (one process per item)", f"{3600 * args.items / up['process']:.0f}"),
                     ("upstream loop: per process; inference", f"{up['process'] / args.items:.1f} s; "
                                                                f"{statistics.mean(up['inference']):.2f} s")]
    width = max(len(name) for name, _ in rows)
    device = torch.device(args.device)
    print(f"\n{torch.cuda.get_device_name(device) if device.type == 'cuda' else device}, {args.items} items per sweep, {args.frames} frames; "
          f"logs in {work}\n" + "-" * (width + 30))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
