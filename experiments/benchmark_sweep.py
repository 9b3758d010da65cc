"""A sweep in one CLI process against one CLI process per item, at full size (random weights, one GPU).

Every run is a subprocess of experiments/run_extraction_figure4.py with configs/random_1_3b.yaml (the
Wan2.1-T2V-1.3B transformer with random weights, no files), --save_mode summary, --capture_step all
(the 4 denoising passes and the cache pass of the last block), layers 0 and 4, 21 latent frames:

  (a) the N items (2 prompts x N/2 seeds) in ONE process with --output_dir;
  (b) the same N items as N single-run processes with --output_path;
  (c) one item with --layer_indices all --capture_step all (30 layers x 5 passes).

Each whole process is timed from start to exit, with its host peak RSS (wait4). Per item in (a), the
manifest gives the inference time, the whole item (inference, reductions, save, manifest) and the
peak host/GPU memory of the item: item 2 and item N must be flat. A table closes the output.

    PYTHONPATH=. python experiments/benchmark_sweep.py            # ~8 min on one H200
    PYTHONPATH=. python experiments/benchmark_sweep.py --items 4 --frames 9 --skip_all_layers
    PYTHONPATH=. python experiments/benchmark_sweep.py --config configs/tiny.yaml --device cpu  # smoke test
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "experiments" / "run_extraction_figure4.py"
PROMPTS = ["A majestic eagle soaring through a cloudy sky, cinematic lighting",
           "A red fox trotting through fresh snow at dawn, soft light"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="configs/random_1_3b.yaml")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--items", type=int, default=8, help="items of (a) and (b): 2 prompts x items/2 seeds (1 prompt if odd)")
    parser.add_argument("--frames", type=int, default=21, help="latent frames per item")
    parser.add_argument("--layers", nargs="+", default=["0", "4"], help="captured layers of (a) and (b)")
    parser.add_argument("--precision", choices=("exact", "fast"), default=None, help="passed to the CLI (default: its own)")
    parser.add_argument("--skip_all_layers", action="store_true", help="leave out (c)")
    parser.add_argument("--work_dir", default=None, help="where the caches and logs go (default: a temporary folder)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds before a CLI process is killed")
    args = parser.parse_args()
    if args.items < 2:
        parser.error("--items: at least 2 (item 2 against item N)")
    return args


def items_of(n):
    """(prompts, seeds) giving n items: 2 prompts when n is even, else 1."""
    prompts = PROMPTS[: 2 if n % 2 == 0 else 1]
    return prompts, list(range(n // len(prompts)))


def run_cli(args, extra, log):
    """One CLI process: its wall time, host peak RSS (GiB), and the GPU peak and total it prints."""
    command = [sys.executable, str(CLI), "--config_path", args.config, "--no_checkpoint", "--device", args.device,
               "--num_frames", str(args.frames), "--save_mode", "summary", "--capture_step", "all", "--quiet", *extra]
    if args.precision:
        command += ["--precision", args.precision]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with open(log, "w") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        killer = threading.Timer(args.timeout, process.kill)
        killer.start()
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        killer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    text = Path(log).read_text()
    if process.returncode != 0:
        tail = "\n".join(text.splitlines()[-20:])
        sys.exit(f"CLI exited with {process.returncode} ({'killed after --timeout' if process.returncode < 0 else 'failed'}):\n"
                 f"  {' '.join(command)}\nlast lines of {log}:\n{tail}")
    gpu = re.search(r"GPU peak: ([\d.]+) GiB", text)
    return {"seconds": seconds, "host_rss": usage.ru_maxrss / 2**20, "gpu_peak": float(gpu[1]) if gpu else math.nan}


def manifest(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def same_tensors(a, b):
    """Whether two cache files hold bit-identical tensors, entry by entry."""
    x, y = (torch.load(p, weights_only=True)["attention_weights"] for p in (a, b))
    return len(x) == len(y) and all(torch.equal(u[k], v[k]) for u, v in zip(x, y) for k in u if isinstance(u[k], torch.Tensor))


def mean(values):
    return sum(values) / len(values)


def main():
    args = parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="benchmark_sweep_"))
    work.mkdir(parents=True, exist_ok=True)
    prompts, seeds = items_of(args.items)
    n = len(prompts) * len(seeds)
    layers = ["--layer_indices", *args.layers]
    print(f"{n} items ({len(prompts)} prompts x {len(seeds)} seeds), {args.frames} frames, layers {' '.join(args.layers)}, "
          f"every pass, summary mode, {args.config} on {args.device}; files and logs in {work}", flush=True)

    sweep_dir = work / "sweep"
    prompt_words = [w for p in prompts for w in ("--prompt", p)]
    a = run_cli(args, [*prompt_words, "--seeds", *map(str, seeds), *layers, "--output_dir", str(sweep_dir)],
                work / "a_sweep.log")
    lines = manifest(sweep_dir)
    print(f"(a) one process: {a['seconds']:.1f} s, host RSS {a['host_rss']:.2f} GiB", flush=True)
    for i, line in enumerate(lines, 1):
        s, peak = line["seconds"], line["peak_gib"]
        print(f"    item {i} {line['file']}: inference {s['inference']:.2f} s, item {s['item']:.2f} s "
              f"(reduce {s['reduce']:.2f}, save {s['save']:.2f}), GPU peak {peak['gpu']} GiB, host peak {peak['host']:.2f} GiB",
              flush=True)

    single_dir = work / "single"
    singles = []
    for p, prompt in enumerate(prompts):
        for seed in seeds:
            path = single_dir / f"p{p:04d}_s{seed:04d}.pt"
            run = run_cli(args, ["--prompt", prompt, "--seed", str(seed), *layers, "--output_path", str(path)],
                          work / f"b_{path.stem}.log")
            run["identical"] = same_tensors(path, sweep_dir / path.name)
            singles.append(run)
            print(f"(b) {path.name}: {run['seconds']:.1f} s, GPU peak {run['gpu_peak']:.2f} GiB, host RSS "
                  f"{run['host_rss']:.2f} GiB, tensors {'identical to' if run['identical'] else 'DIFFER from'} (a)", flush=True)

    c = None
    if not args.skip_all_layers:
        c_dir = work / "all_layers"
        c = run_cli(args, ["--prompt", prompts[0], "--seeds", "0", "--layer_indices", "all", "--output_dir", str(c_dir)],
                    work / "c_all_layers.log")
        (c["line"],) = manifest(c_dir)
        print(f"(c) all layers x all passes: {c['seconds']:.1f} s, inference {c['line']['seconds']['inference']:.2f} s, "
              f"GPU peak {c['line']['peak_gib']['gpu']} GiB, file {c['line']['bytes'] / 1e6:.1f} MB", flush=True)

    b_total = sum(r["seconds"] for r in singles)
    inference = mean([x["seconds"]["inference"] for x in lines])
    item = mean([x["seconds"]["item"] for x in lines])
    second, last = lines[1]["peak_gib"], lines[-1]["peak_gib"]
    gpu_drift = (last["gpu"] - second["gpu"]) if second["gpu"] is not None else math.nan
    rows = [
        ("(a) one process: whole process", f"{a['seconds']:.1f} s"),
        ("(a) per item (process / N)", f"{a['seconds'] / n:.2f} s"),
        ("(b) N processes: sum", f"{b_total:.1f} s"),
        ("(b) per item (process)", f"{b_total / n:.2f} s (min {min(r['seconds'] for r in singles):.1f}, "
                                   f"max {max(r['seconds'] for r in singles):.1f})"),
        ("ratio (b) / (a)", f"{b_total / a['seconds']:.2f}x"),
        ("(a) mean inference per item", f"{inference:.2f} s"),
        ("(a) mean whole item", f"{item:.2f} s"),
        ("(a) overhead beyond inference", f"{item - inference:.3f} s per item ({(item - inference) / item:.1%})"),
        ("(a) GPU peak item 2 / item N", f"{second['gpu']} / {last['gpu']} GiB (drift {gpu_drift:+.3f})"),
        ("(a) host peak item 2 / item N", f"{second['host']:.2f} / {last['host']:.2f} GiB (drift "
                                          f"{last['host'] - second['host']:+.3f})"),
        ("(a) host RSS whole process", f"{a['host_rss']:.2f} GiB"),
        ("(b) GPU peak per item (mean)", f"{mean([r['gpu_peak'] for r in singles]):.2f} GiB"),
        ("(b) host RSS per process (max)", f"{max(r['host_rss'] for r in singles):.2f} GiB"),
        ("(b) tensors identical to (a)", f"{sum(r['identical'] for r in singles)} of {n} items"),
    ]
    if c is not None:
        rows += [
            ("(c) all layers x passes: process", f"{c['seconds']:.1f} s"),
            ("(c) inference / whole item", f"{c['line']['seconds']['inference']:.2f} / {c['line']['seconds']['item']:.2f} s"),
            ("(c) GPU peak / host RSS", f"{c['line']['peak_gib']['gpu']} GiB / {c['host_rss']:.2f} GiB"),
            ("(c) file", f"{c['line']['bytes'] / 1e6:.1f} MB, {len(torch.load(c_dir / c['line']['file'], weights_only=True)['attention_weights'])} entries"),
        ]
    width = max(len(name) for name, _ in rows)
    print("\n" + "-" * (width + 40))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
