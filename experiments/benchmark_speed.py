"""Exact against fast numerics at real scale, in one process on one GPU (random full-size weights).

configs/random_1_3b.yaml (the Wan2.1-T2V-1.3B transformer with random weights, no files), bf16, a fixed
random text context instead of the text encoder, 21 latent frames of 60x104. Prints, per mode, the
first (warm-up, compile included) run and the best of ``--repeats`` timed runs with the GPU peak:
exact, fast, fast + capture of layers 0 and 4 (pass 0 of the last block), and (not with ``--quick``) fast on 33
frames and with a local window (9 frames, sink 1). Then the fidelity gate: the same weights in fp32
with exact numerics are the truth; rel L2 of exact-bf16 and of fast-bf16 against it, over a whole run
(not with ``--quick``) and over one forward (first block, t = 1000); passes if rel(fast) <= 1.1 *
rel(exact). Also the largest difference between the logits captured in fast and in exact mode, and
whether fast-mode latents are bit-identical with the capture on and off. A table closes the output.

    PYTHONPATH=. python experiments/benchmark_speed.py [--quick] [--repeats 3] [--no_compile] [--profile]

(``--config configs/tiny.yaml --device cpu`` runs the same steps on the tiny model, as a smoke test.)
"""
import argparse
import copy
import time

import torch
import torch._dynamo
from omegaconf import OmegaConf
from torch import nn
from torch._dynamo.utils import counters

from pipeline.causal_inference import CausalInferencePipeline
from pipeline.wrappers import WanDiffusionWrapper
from wan.cache_policies.window import Window
from wan.modules.attention import ATTENTION_WEIGHT_CAPTURE

GATE = 1.1


class FixedContext(nn.Module):
    """Stands in for the text encoder: the same context [1, text_len, text_dim] for every prompt."""

    def __init__(self, context):
        super().__init__()
        self.context = nn.Buffer(context.clone())

    def forward(self, text_prompts):
        return {"prompt_embeds": self.context.expand(len(text_prompts), -1, -1)}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized_seconds(fn, device):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def measure(label, run, repeats, device, rows, frames):
    """One warm-up run, then ``repeats`` timed runs; appends a table row and returns the last output."""
    reset_peak(device)
    out, warm = synchronized_seconds(run, device)
    times = []
    for _ in range(repeats):
        out, seconds = synchronized_seconds(run, device)
        times.append(seconds)
    peak = peak_gib(device)
    rows.append(dict(label=label, frames=frames, warm=warm, best=min(times), peak=peak))
    print(f"{label}, {frames} frames: warm-up {warm:.2f} s, runs {', '.join(f'{t:.3f}' for t in times)} s, GPU peak {peak:.2f} GiB",
          flush=True)
    return out


KERNEL_GROUPS = (  # (group, substrings of a kernel's name), first match wins
    ("attention", ("flash", "fmha", "sdpa", "attention")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "sm90_xmma")),
    ("fused (inductor/triton)", ("triton",)),
    ("copies", ("copy", "memcpy", "memset", "cat")),
)


def kernel_profile(run, device):
    """One run of ``run`` under the torch profiler: GPU time per kernel group, wall time, and the
    largest kernels of the elementwise/other group."""
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _, wall = synchronized_seconds(run, device)
    groups, kernels = {}, {}
    for event in prof.key_averages():
        gpu_us = event.self_device_time_total
        if gpu_us <= 0 or event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.key.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other elementwise")
        calls, us = groups.get(group, (0, 0.0))
        groups[group] = (calls + event.count, us + gpu_us)
        kernels.setdefault(group, []).append((gpu_us, event.count, event.key))
    total = sum(us for _, us in groups.values()) / 1e6
    print(f"profile of one run: wall {wall:.3f} s, GPU kernel time {total:.3f} s, gaps ~{wall - total:.3f} s")
    for group, (calls, us) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        print(f"  {group:<26}{calls:>7} kernels {us / 1e6:>8.3f} s {100 * us / 1e6 / total:>6.1f}%")
        for gpu_us, count, name in sorted(kernels[group], reverse=True)[:6]:
            print(f"      {gpu_us / 1e6:.3f} s {count:>6}x  {name[:100]}")


def rel_l2(x, truth):
    return ((x.float() - truth.float()).norm() / truth.float().norm()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_frames", type=int, default=21)
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 4], help="layers captured in the capture run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode, after one warm-up")
    parser.add_argument("--quick", action="store_true", help="leave out 33 frames, the local window and the whole fp32 run")
    parser.add_argument("--no_compile", action="store_true", help="fast mode without torch.compile")
    parser.add_argument("--config", default="configs/random_1_3b.yaml", help="model config, merged onto configs/default_config.yaml")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--profile", action="store_true", help="also profile one fast-mode run: GPU time per kernel group")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 stays fp32: the truth run
    torch.backends.cudnn.allow_tf32 = False
    torch._dynamo.config.suppress_errors = True  # a compile failure falls back to eager (reported below) instead of ending the run
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; config {args.config}", flush=True)

    config = OmegaConf.merge(OmegaConf.load("configs/default_config.yaml"), OmegaConf.load(args.config), {"precision": "exact"})
    start = time.perf_counter()
    truth_generator = WanDiffusionWrapper.from_config(config, device, torch.float32)
    sizes = config.model_config
    context = torch.randn(1, sizes.text_len, sizes.text_dim, generator=torch.Generator().manual_seed(0)).to(device)
    truth = CausalInferencePipeline(config, device, generator=truth_generator, text_encoder=FixedContext(context), dtype=torch.float32)
    bf16 = CausalInferencePipeline(config, device, generator=copy.deepcopy(truth_generator), text_encoder=FixedContext(context),
                                   dtype=torch.bfloat16)
    model = bf16.generator.model
    print(f"models built in {time.perf_counter() - start:.1f} s (fp32 truth and its bf16 copy)", flush=True)

    per_block = bf16.num_frame_per_block
    shape = (1, *bf16.latent_shape(args.num_frames))
    torch.manual_seed(0)
    noise = torch.randn(shape, device=device)  # fp32; each run casts it, so every run starts from the same noise

    def inference(pipeline, dtype, frames=args.num_frames):
        torch.manual_seed(1)  # the re-noising draws: the same stream in every run
        frame_noise = noise if frames == args.num_frames else torch.randn((1, *pipeline.latent_shape(frames)), device=device)
        return pipeline.inference(frame_noise.to(dtype), ["benchmark"], return_latents=True)

    def first_forward(pipeline, dtype):
        generator = pipeline.generator
        fsl = generator.model.frame_seq_length(*shape[3:])
        kv, xattn = generator.model.new_caches(1, args.num_frames, fsl, dtype, device)
        t = torch.full((1, per_block), pipeline.denoising_steps[0], device=device)
        embeds = {"prompt_embeds": context.to(dtype)}
        return generator(noise[:, :per_block].to(dtype), embeds, t, kv, xattn, 0)[0]

    def capture_run():
        ATTENTION_WEIGHT_CAPTURE.enable(args.layers, num_layers=len(model.blocks))
        return inference(bf16, torch.bfloat16)

    rows = []
    model.set_numerics("exact")
    exact_latents = measure("exact", lambda: inference(bf16, torch.bfloat16), args.repeats, device, rows, args.num_frames)
    exact_forward = first_forward(bf16, torch.bfloat16)
    capture_run()
    exact_calls = ATTENTION_WEIGHT_CAPTURE.kept_calls
    ATTENTION_WEIGHT_CAPTURE.disable()

    model.set_numerics("fast", compile=not args.no_compile)
    print(f"fast mode here: {model.describe_numerics(device, torch.bfloat16)}", flush=True)
    fast_latents = measure("fast", lambda: inference(bf16, torch.bfloat16), args.repeats, device, rows, args.num_frames)
    fast_forward = first_forward(bf16, torch.bfloat16)
    layers = " ".join(f"L{i}" for i in args.layers)
    captured_latents = measure(f"fast + capture {layers}", capture_run, args.repeats, device, rows, args.num_frames)
    fast_calls = ATTENTION_WEIGHT_CAPTURE.kept_calls
    logit_diff, logit_scale = 0.0, 0.0
    for fast_call, exact_call in zip(fast_calls, exact_calls):
        assert (fast_call.layer_idx, fast_call.labels) == (exact_call.layer_idx, exact_call.labels)
        for head in range(fast_call.num_heads):
            exact_logits = exact_call.weights(head)
            logit_diff = max(logit_diff, (fast_call.weights(head) - exact_logits).abs().max().item())
            logit_scale = max(logit_scale, exact_logits.abs().max().item())
    ATTENTION_WEIGHT_CAPTURE.disable()
    del fast_calls, exact_calls
    if not args.quick:
        measure("fast", lambda: inference(bf16, torch.bfloat16, 33), args.repeats, device, rows, 33)
        policy = model.cache_policy
        model.cache_policy = Window(local_attn_size=9, sink_size=1)  # what new_caches reads
        measure("fast, window 9 sink 1", lambda: inference(bf16, torch.bfloat16), args.repeats, device, rows, args.num_frames)
        model.cache_policy = policy

    truth_forward = first_forward(truth, torch.float32)
    gate_rows = [("one forward (block 0, t=1000)", rel_l2(exact_forward, truth_forward), rel_l2(fast_forward, truth_forward))]
    if not args.quick:
        truth_latents, seconds = synchronized_seconds(lambda: inference(truth, torch.float32), device)
        print(f"fp32 truth run: {seconds:.1f} s", flush=True)
        gate_rows.insert(0, (f"whole run ({args.num_frames} frames)", rel_l2(exact_latents, truth_latents), rel_l2(fast_latents, truth_latents)))

    graphs = counters["stats"]["unique_graphs"]
    exact_s = rows[0]["best"]
    print("\n" + "=" * 88)
    print(f"{'mode':<28}{'frames':>7}{'warm-up s':>11}{'best s':>9}{'exact/this':>12}{'GPU peak GiB':>14}")
    for row in rows:
        ratio = f"{exact_s / row['best']:.3f}" if row["frames"] == args.num_frames and "window" not in row["label"] else "-"
        print(f"{row['label']:<28}{row['frames']:>7}{row['warm']:>11.2f}{row['best']:>9.3f}{ratio:>12}{row['peak']:>14.2f}")
    print(f"speed-up fast/exact ({args.num_frames} frames, best of {args.repeats}): {exact_s / rows[1]['best']:.3f}x; "
          f"compiled: {model.compiled}, graphs compiled: {graphs} (2 block halves, +1 where FlashAttention's key halves are merged; 0: eager fallback)")
    print(f"{'fidelity vs fp32 truth':<32}{'rel L2 exact':>14}{'rel L2 fast':>14}   rel(fast) <= {GATE} rel(exact)")
    for label, exact_rel, fast_rel in gate_rows:
        print(f"{label:<32}{exact_rel:>14.3e}{fast_rel:>14.3e}   {'PASS' if fast_rel <= GATE * exact_rel else 'FAIL'}")
    print(f"captured logits, fast vs exact mode (layers {args.layers}, last block, pass 0): max|diff| {logit_diff:.3e} "
          f"(max|logit| {logit_scale:.2f})")
    print(f"fast-mode latents bit-identical with capture on and off: {torch.equal(fast_latents, captured_latents)}")
    if args.profile:  # last: the profiler can leave the process slower after it
        kernel_profile(lambda: inference(bf16, torch.bfloat16), device)


if __name__ == "__main__":
    main()
