"""Speed and memory of the capture at real scale, with random full-size weights (no files needed).

Uses configs/random_1_3b.yaml (the Wan2.1-T2V-1.3B transformer with random weights) on a GPU and
the Figure 4 job: 21 latent frames of 60x104, layers 0 and 4.

1. In this process: plain inference against inference with the capture on (pass 0 of the last block),
   best of ``--repeats`` timed runs after a warm-up; GPU peaks; whether the latents stay
   bit-identical; the capture's work after inference (exact fp32 summary, fp16 logits to host).
2. The CLI itself, in a child process per ``--save_mode``: wall time, host peak (the child's maximum
   resident set), and the file size.

    PYTHONPATH=. python experiments/benchmark.py [--num_frames 21] [--layers 0 4] [--repeats 2]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
from omegaconf import OmegaConf

from pipeline.causal_inference import CausalInferencePipeline
from wan.modules.attention import ATTENTION_WEIGHT_CAPTURE

CONFIG = "configs/random_1_3b.yaml"


def timed(fn, device):
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def in_process(args, device):
    config = OmegaConf.merge(OmegaConf.load("configs/default_config.yaml"), OmegaConf.load(CONFIG))
    pipeline = CausalInferencePipeline(config, device, dtype=torch.bfloat16)
    model = pipeline.generator.model
    shape = (1, *pipeline.latent_shape(args.num_frames))

    def run():
        torch.manual_seed(0)
        noise = torch.randn(shape, device=device, dtype=torch.bfloat16)
        return pipeline.inference(noise, ["benchmark"], return_latents=True)

    run()  # warm-up
    torch.cuda.reset_peak_memory_stats(device)
    plain_times = []
    for _ in range(args.repeats):
        plain, seconds = timed(run, device)
        plain_times.append(seconds)
    plain_peak = torch.cuda.max_memory_allocated(device) / 2**30

    torch.cuda.reset_peak_memory_stats(device)
    capture_times = []
    for repeat in range(args.repeats):
        ATTENTION_WEIGHT_CAPTURE.enable(args.layers, num_layers=len(model.blocks))
        captured, seconds = timed(run, device)
        capture_times.append(seconds)
    capture_peak = torch.cuda.max_memory_allocated(device) / 2**30
    kept, seen = ATTENTION_WEIGHT_CAPTURE.kept_calls, ATTENTION_WEIGHT_CAPTURE.calls_seen

    fsl = model.frame_seq_length(shape[3], shape[4])
    summaries, seconds_summary = timed(lambda: [r.summary(fsl) for r in kept], device)
    hosts, seconds_host = timed(lambda: [r.to_host(torch.float16, frame_seq_length=fsl) for r in kept], device)
    after_peak = torch.cuda.max_memory_allocated(device) / 2**30
    ATTENTION_WEIGHT_CAPTURE.disable()
    host_bytes = sum(h.numel() * h.element_size() for h in hosts)

    plain_s, capture_s = min(plain_times), min(capture_times)
    print(f"frames {args.num_frames}, layers {args.layers}, frame_seq_length {fsl}, "
          f"kept Q={list(kept[0].q_shape)} K={list(kept[0].k_shape)}, calls seen {seen}, kept {len(kept)}")
    print(f"latents bit-identical with capture on: {torch.equal(plain, captured)}")
    print(f"plain inference:        {plain_s:.3f} s (runs: {', '.join(f'{t:.3f}' for t in plain_times)})")
    print(f"inference with capture: {capture_s:.3f} s (runs: {', '.join(f'{t:.3f}' for t in capture_times)})")
    print(f"ratio: {capture_s / plain_s:.4f}")
    print(f"GPU peak: plain {plain_peak:.2f} GiB, with capture {capture_peak:.2f} GiB (+{capture_peak - plain_peak:.2f}), "
          f"while copying logits to the host {after_peak:.2f} GiB (+{after_peak - plain_peak:.2f})")
    print(f"exact fp32 summary of {len(kept)} layers: {seconds_summary:.3f} s")
    print(f"fp16 logits to host: {host_bytes / 1e9:.2f} GB in {seconds_host:.3f} s ({host_bytes / 1e9 / seconds_host:.1f} GB/s)")
    print(f"largest |logit| in the kept calls: {max(s['logit_max'].abs().max().item() for s in summaries):.2f}")


def cli_run(args, save_mode, folder):
    """Run the CLI in a child process; its own peak RSS comes with its exit status (wait4)."""
    out = os.path.join(folder, f"{save_mode}.pt")
    command = [sys.executable, "experiments/run_extraction_figure4.py", "--config_path", CONFIG, "--no_checkpoint", "--quiet",
               "--num_frames", str(args.num_frames), "--layer_indices", *map(str, args.layers),
               "--save_mode", save_mode, "--output_path", out]
    start = time.perf_counter()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed")
    size = os.path.getsize(out)
    print(f"CLI --save_mode {save_mode}: {seconds:.1f} s wall (model build included), file {size / 2**30:.3f} GiB, "
          f"host peak {usage.ru_maxrss / 2**20:.2f} GiB")
    os.remove(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_frames", type=int, default=21)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each kind (after one warm-up)")
    parser.add_argument("--save_dir", default=None, help="folder for the CLI's output files (default: a temporary folder)")
    parser.add_argument("--skip_cli", action="store_true", help="only the in-process measurements")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.set_grad_enabled(False)
    print(f"GPU: {torch.cuda.get_device_name(device)}; torch {torch.__version__}")
    in_process(args, device)
    if not args.skip_cli:
        with tempfile.TemporaryDirectory(dir=args.save_dir) as folder:
            for save_mode in ("summary", "full"):
                cli_run(args, save_mode, folder)


if __name__ == "__main__":
    main()
