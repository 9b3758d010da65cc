"""Time per block, GPU memory and capture overhead of model families at real scale (random weights).

For each config (default: every ``configs/random_1_3b_*.yaml``), in this one process: the model built
with random full-size weights through the extraction's own ``Extractor`` (so each family runs its own
denoising loop), one prompt encoded, one warm-up run (the fast mode's compile), then ``--repeats``
plain runs and ``--repeats`` runs with the capture on (``--layers``, pass 0 of the last block). Times
are of the denoising loop alone (no VAE decode). Prints one table row per config: the best time, the
time per block, the GPU peak plain and with the capture, the ratio of the best times, and whether the
latents of the two kinds of run are bit-identical.

    python experiments/benchmark_families.py [--configs configs/random_1_3b_reward_forcing.yaml ...]
"""
import argparse
import glob
import time

import torch
from omegaconf import OmegaConf

from pipeline.extraction import Extractor
from utils.config import load_config
from wan.families import check_model

PROMPT = "A red fox runs through fresh snow at dawn"


def measure(config_path, precision, num_frames, layers, repeats, device):
    config = OmegaConf.merge(load_config(config_path, check_model=check_model), {"precision": precision})
    extractor = Extractor(config, device, torch.bfloat16)
    context = extractor.encode([PROMPT])[0][PROMPT][0]
    model = extractor.model
    shape = (1, *extractor.pipeline.latent_shape(num_frames))
    blocks = num_frames // config.num_frame_per_block

    def run():
        torch.manual_seed(0)
        noise = torch.randn(shape, device=device, dtype=torch.bfloat16)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        latents = extractor.pipeline.inference(noise, prompt_embeds=context, return_latents=True)
        torch.cuda.synchronize(device)
        return latents, time.perf_counter() - start

    def run_captured():
        model.observer.enable(layers, num_layers=len(model.blocks), passes=(0,))
        try:
            return run()
        finally:
            model.observer.disable()

    run()  # warm-up: the compile
    peaks, times, latents = {}, {"plain": [], "capture": []}, {}
    for kind, fn in (("plain", run), ("capture", run_captured)):
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeats):
            latents[kind], seconds = fn()
            times[kind].append(seconds)
        peaks[kind] = torch.cuda.max_memory_allocated(device) / 2**30
    plain, capture = min(times["plain"]), min(times["capture"])
    return (f"| {config_path} | {precision} | {blocks} | {plain:.3f} s | {1000 * plain / blocks:.1f} ms | {peaks['plain']:.2f} GiB | "
            f"×{capture / plain:.3f}, +{peaks['capture'] - peaks['plain']:.2f} GiB | "
            f"{torch.equal(latents['plain'], latents['capture'])} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=None, help="configs to measure (default: every configs/random_1_3b_*.yaml)")
    parser.add_argument("--precision", nargs="+", default=["fast"], choices=["fast", "exact"],
                        help="numerics to measure each config in (default: fast)")
    parser.add_argument("--num_frames", type=int, default=21, help="latent frames per run (default: 21)")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 4], help="captured layers (default: 0 4)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each kind after one warm-up (default: 2)")
    args = parser.parse_args()
    configs = args.configs or sorted(glob.glob("configs/random_1_3b_*.yaml"))
    device = torch.device("cuda")
    torch.set_grad_enabled(False)
    print(f"GPU: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; {args.num_frames} latent frames, "
          f"capture of layers {args.layers}, pass 0 of the last block; best of {args.repeats}")
    print("| config | precision | blocks | inference | per block | GPU peak | with capture | latents identical |")
    print("|---|---|---|---|---|---|---|---|")
    for config_path in configs:
        for precision in args.precision:
            start = time.perf_counter()
            print(measure(config_path, precision, args.num_frames, args.layers, args.repeats, device), flush=True)
            torch.cuda.empty_cache()  # the config's model went with measure()'s frame
            print(f"  ({time.perf_counter() - start:.0f} s with the build and compile)", flush=True)


if __name__ == "__main__":
    main()
