"""Speed and device memory of long rollouts in each attention mode, full size, random weights.

Uses configs/random_1_3b.yaml (the Wan2.1-T2V-1.3B transformer with random weights, no files) in
bf16 and runs, after one short warm-up:
- ``deep_sink`` (S=10, W=21) and ``participative_compression`` (N=16, R=4, S=10, W=21) at 126 and
  240 latent frames: time per block, device memory allocated after each block (flat once the window
  is full) and the peak; then the same at the first length with the capture on for 2 layers at blocks
  6, 20 and the last (first pass);
- ``global`` attention at the lengths in ``--global_frames`` (126 by default; 240 needs ~70 GB of
  cache and minutes), for contrast.
A compact table is printed at the end. One model is built; each mode gets a model sharing its weights.
Timing a block waits for the device at the end of each block (one synchronization per 5 forwards).

    PYTHONPATH=. python experiments/benchmark_deep_forcing.py [--frames 126 240] [--global_frames 126]
"""
import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

from pipeline.causal_inference import CausalInferencePipeline
from wan.modules.attention import ATTENTION_WEIGHT_CAPTURE
from wan.cache_policies import policy_from_kwargs

MODES = {
    "deep_sink": dict(attention_mode="deep_sink", local_attn_size=21, sink_size=10),
    "participative_compression": dict(attention_mode="participative_compression", local_attn_size=21, sink_size=10,
                                      budget=16, recent=4),
    "global": dict(attention_mode="global", local_attn_size=-1, sink_size=0),
}


def use_mode(pipeline, mode):
    """Give the pipeline's model the cache policy of ``mode`` (read when a run builds its caches)."""
    pipeline.generator.model.cache_policy = policy_from_kwargs(MODES[mode], pipeline.num_frame_per_block)


class BlockClock:
    """Forward hook on the generator: at the end of every block (``passes`` forwards) waits for the
    device and records the block's seconds, the memory allocated and the block's peak (GiB)."""

    def __init__(self, device, passes):
        self.device, self.passes = device, passes
        self.seconds, self.allocated, self.peaks = [], [], []
        self.forwards = 0

    def start(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.forwards, self.seconds, self.allocated, self.peaks = 0, [], [], []
        self.last = time.perf_counter()

    def __call__(self, module, args, output):
        self.forwards += 1
        if self.forwards % self.passes:
            return
        torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds.append(now - self.last)
        self.allocated.append(torch.cuda.memory_allocated(self.device) / 2**30)
        self.peaks.append(torch.cuda.max_memory_allocated(self.device) / 2**30)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.last = now


def rollout(pipeline, clock, frames, device):
    """One inference of ``frames`` latent frames; returns its measurements."""
    torch.manual_seed(0)
    noise = torch.randn((1, *pipeline.latent_shape(frames)), device=device, dtype=torch.bfloat16)
    clock.start()
    pipeline.inference(noise, ["benchmark"], return_latents=True)
    filled = 21 // pipeline.num_frame_per_block  # blocks until a 21-frame window is full
    steady = clock.allocated[filled:] or clock.allocated
    return dict(total=sum(clock.seconds), per_block=statistics.median(clock.seconds[1:] or clock.seconds),
                first=clock.seconds[0], mem_first=clock.allocated[0], mem_steady=(min(steady), max(steady)),
                peak=max(clock.peaks))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[126, 240])
    parser.add_argument("--global_frames", type=int, nargs="*", default=[126])
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 4], help="layers captured for the overhead run")
    parser.add_argument("--config", default="configs/random_1_3b.yaml")
    parser.add_argument("--device", default="cuda", help="a CUDA device")
    parser.add_argument("--precision", choices=("exact", "fast"), default="fast", help="numerics (fast: compiled)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    print(f"GPU: {torch.cuda.get_device_name(device)}; torch {torch.__version__}")
    config = OmegaConf.merge(OmegaConf.load("configs/default_config.yaml"), OmegaConf.load(args.config),
                             {"precision": args.precision})
    pipeline = CausalInferencePipeline(config, device, dtype=torch.bfloat16)
    base = pipeline.generator.model
    clock = BlockClock(device, len(pipeline.denoising_steps) + 1)
    pipeline.generator.register_forward_hook(clock)
    fsl = base.frame_seq_length(*pipeline.latent_shape(1)[2:])
    print(f"{fsl} tokens a frame, {len(base.blocks)} layers, {len(pipeline.denoising_steps) + 1} forwards a block, "
          f"precision {base.precision} (compiled: {base.compiled})")

    use_mode(pipeline, "participative_compression")
    rollout(pipeline, clock, 2 * 21, device)  # warm-up, with a compression

    rows = []
    runs = [(m, f) for m in ("deep_sink", "participative_compression") for f in args.frames]
    runs += [("global", f) for f in args.global_frames]
    for mode, frames in runs:
        use_mode(pipeline, mode)
        result = rollout(pipeline, clock, frames, device)
        if mode != "global" and frames == args.frames[0]:
            ATTENTION_WEIGHT_CAPTURE.enable(args.layers, num_layers=len(base.blocks), passes=[0], blocks=[6, 20, "last"])
            captured = rollout(pipeline, clock, frames, device)
            kept = ATTENTION_WEIGHT_CAPTURE.kept_calls
            labelled = all(r.key_positions is not None and r.key_positions[0].shape[1] == r.k_shape[1] for r in kept)
            ATTENTION_WEIGHT_CAPTURE.disable()
            result["capture"] = (captured["total"] / result["total"], captured["peak"] - result["peak"], len(kept), labelled)
        rows.append((mode, frames, result))
        print(f"{mode} {frames} frames: {result['total']:.1f} s", flush=True)

    print()
    print(f"{'mode':<26}{'frames':>7}{'total s':>9}{'s/block':>9}{'GiB after block 0':>19}{'GiB steady min-max':>20}"
          f"{'peak GiB':>10}  capture (time ratio, +peak GiB, calls kept, labelled)")
    for mode, frames, r in rows:
        capture = "" if "capture" not in r else f"  {r['capture'][0]:.3f}, +{r['capture'][1]:.2f}, {r['capture'][2]}, {r['capture'][3]}"
        low, high = r["mem_steady"]
        print(f"{mode:<26}{frames:>7}{r['total']:>9.1f}{r['per_block']:>9.3f}{r['mem_first']:>19.2f}{f'{low:.2f}-{high:.2f}':>20}"
              f"{r['peak']:>10.2f}{capture}")


if __name__ == "__main__":
    main()
