"""Record the pre-softmax self-attention logits of chosen layers for the last temporal block.

Runs the real block-wise, KV-cached inference with ``ATTENTION_WEIGHT_CAPTURE`` on and saves, per
requested transformer block, the kept self-attention call's (q . k^T) / sqrt(d): the last block's
queries against every key of the video (Deep Forcing, Figure 4). The capture does not change the
generated video. See README.md for the output layout.

    PYTHONPATH=. python experiments/run_extraction_figure4.py --config_path configs/tiny.yaml \\
        --no_checkpoint --device cpu --output_path cache/tiny.pt
"""
import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pipeline.causal_inference import CausalInferencePipeline
from utils.attention_cache import CACHE_FORMAT, CACHE_FORMAT_VERSION, SUMMARY_KEYS
from utils.loading import WeightFileError
from utils.misc import host_peak_gib, reset_host_peak, set_seed, write_atomically
from utils.wan_wrapper import WanDiffusionWrapper, load_generator_checkpoint
from wan.modules.attention import ATTENTION_WEIGHT_CAPTURE

DEFAULT_CONFIG = "configs/default_config.yaml"
MODEL_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl/")


class UsageError(ValueError):
    """Bad input from the command line or the files it names."""


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C so that clean-up runs."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option; the examples kept as written."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Capture the last block's pre-softmax self-attention logits of chosen layers during real "
        "causal inference (Deep Forcing Figure 4).",
        formatter_class=HelpFormatter,
        epilog="examples:\n"
        "  # tiny random-weights model, no files, CPU\n"
        "  PYTHONPATH=. python experiments/run_extraction_figure4.py --config_path configs/tiny.yaml --no_checkpoint --device cpu\n"
        "  # Self-Forcing checkpoint (wan_models/Wan2.1-T2V-1.3B + checkpoints/self_forcing_dmd.pt), one GPU\n"
        "  PYTHONPATH=. python experiments/run_extraction_figure4.py --output_path cache/self_forcing.pt\n"
        "  # base Wan2.1, 4 layers, exact summaries only\n"
        "  PYTHONPATH=. python experiments/run_extraction_figure4.py --no_checkpoint --layer_indices 0 4 8 12 --save_mode summary\n"
        "exit status: 0 saved; 2 bad input (nothing written); 130 Ctrl-C; 143 SIGTERM",
    )
    parser.add_argument("--config_path", default="configs/self_forcing_dmd.yaml",
                        help=f"inference config, merged onto {DEFAULT_CONFIG}; configs/tiny.yaml runs anywhere with random weights")
    parser.add_argument("--checkpoint_path", default="checkpoints/self_forcing_dmd.pt",
                        help="Self-Forcing checkpoint (a dict with 'generator' / 'generator_ema')")
    parser.add_argument("--output_path", default="cache/attention_cache_figure4.pt", help="where the .pt cache is written (atomically)")
    parser.add_argument("--prompt", default="A majestic eagle soaring through a cloudy sky, cinematic lighting")
    parser.add_argument("--num_frames", type=int, default=21, help="latent frames to generate; a multiple of num_frame_per_block")
    parser.add_argument("--layer_indices", type=int, nargs="+", default=[0, 4],
                        help="transformer blocks whose self-attention is captured, 0-based (0 4 = the paper's L1 and L5)")
    parser.add_argument("--no_checkpoint", action="store_true", default=False,
                        help="do not load a checkpoint: use the base Wan2.1 weights from the model folder")
    parser.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True,
                        help="load the checkpoint's 'generator_ema' (--no-use_ema: 'generator')")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--gpu_id", type=int, default=0)
    parser.add_argument("--device", default=None, help="torch device; default cuda:{gpu_id}. 'cpu' works with configs/tiny.yaml")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--capture_step", default="0",
                        help="which pass of the last block is kept: 0..3 the denoising passes (t = 1000, 937.5, 833.33, 625), "
                        "'cache' the clean cache-update pass")
    parser.add_argument("--model_dir", default=None, help="overrides the config's model_dir (folder of the official Wan2.1 files)")
    parser.add_argument("--save_mode", choices=("full", "summary"), default="full",
                        help="full: fp16 logits [B, N, Q, K] per layer (3.7 GB per layer at full size); summary: exact fp32 "
                        "query-averaged logits, frame-level means and attention mass (kilobytes)")
    parser.add_argument("--allow_pickle", action="store_true", help="load a checkpoint that holds more than tensors by full unpickling (runs code from the file; only for files you trust)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and a shorter report (for shell loops)")
    return parser.parse_args(argv)


def load_config(args):
    for path in (DEFAULT_CONFIG, args.config_path):
        if not Path(path).is_file():
            raise UsageError(f"--config_path: config file {path} not found")
    try:
        config = OmegaConf.merge(OmegaConf.load(DEFAULT_CONFIG), OmegaConf.load(args.config_path))
    except Exception as err:
        raise UsageError(f"--config_path: cannot read {args.config_path}: {err}") from err
    if args.model_dir is not None:
        config.model_dir = args.model_dir
    for key in ("denoising_step_list", "num_frame_per_block"):
        if config.get(key) is None:
            raise UsageError(f"--config_path: {args.config_path} has no '{key}'")
    return config


def check_inputs(args, config):
    """Everything that can be checked before a model is built."""
    per_block = int(config.num_frame_per_block)
    if args.num_frames <= 0 or args.num_frames % per_block:
        raise UsageError(f"--num_frames: {args.num_frames} is not a positive multiple of num_frame_per_block ({per_block})")
    duplicates = sorted({i for i in args.layer_indices if args.layer_indices.count(i) > 1})
    if duplicates:
        raise UsageError(f"--layer_indices: {duplicates} given more than once")
    if any(i < 0 for i in args.layer_indices):
        raise UsageError(f"--layer_indices: {args.layer_indices} has a negative index; expected 0 <= index < num_layers")
    num_steps = len(config.denoising_step_list)
    if args.capture_step != "cache" and args.capture_step not in {str(i) for i in range(num_steps)}:
        raise UsageError(f"--capture_step: {args.capture_step!r}; expected 0..{num_steps - 1} or 'cache'")
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed: {args.seed} is outside [0, 2**32)")
    if not args.prompt.strip():
        raise UsageError("--prompt: empty")
    if not args.no_checkpoint and not Path(args.checkpoint_path).is_file():
        raise UsageError(f"--checkpoint_path: {args.checkpoint_path} not found; pass --no_checkpoint to run the base model without it")
    if not config.get("random_init"):
        model_dir = Path(config.model_dir)
        missing = [name for name in MODEL_FILES if not (model_dir / name).exists()]
        if missing:
            raise UsageError(f"--model_dir: {model_dir} lacks {', '.join(missing)}; it must hold {', '.join(MODEL_FILES)} "
                             "(the official Wan2.1-T2V-1.3B files); configs/tiny.yaml needs none")
    output = Path(args.output_path)
    if output.is_dir():
        raise UsageError(f"--output_path: {output} is a folder; expected a file path")
    existing = next(p for p in (output.parent, *output.parent.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--output_path: {existing} is not a folder, so {output.parent} cannot be created")
    if not os.access(existing, os.W_OK):
        raise UsageError(f"--output_path: folder {existing} is not writable")


def pick_device(args):
    name = args.device or f"cuda:{args.gpu_id}"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device: {name!r} is not a torch device ({err})") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device: {name} asked for, but CUDA is not available here; use --device cpu with configs/tiny.yaml")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device: {name} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
        device = torch.device("cuda", index)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return device, dtype


def sink_table(summary, frame_seq_length, num_query_frames):
    """Per head: mean query-averaged logit over the first key frame, over the middle key frames (between
    the first and the query block), and their difference. None when there are no middle frames."""
    curve = summary["query_mean_logits"][0].unflatten(-1, (-1, frame_seq_length)).mean(-1)  # [N, Fk]
    middle = curve[:, 1 : curve.shape[1] - num_query_frames]
    if middle.shape[1] == 0:
        return None
    first, mid = curve[:, 0], middle.mean(-1)
    return torch.stack([first, mid, first - mid], dim=1)  # [N, 3]


def build_pipeline(args, config, device, dtype, say):
    """The pipeline on ``device``, with the checkpoint's generator loaded unless --no_checkpoint.
    Returns (pipeline, the checkpoint entry used or None)."""
    say("Initializing inference pipeline...")
    # With a checkpoint, the base transformer weights would be overwritten at once: never read them.
    generator = WanDiffusionWrapper.from_config(config, device, dtype, load_weights=args.no_checkpoint)
    num_layers = len(generator.model.blocks)
    bad = [i for i in args.layer_indices if i >= num_layers]
    if bad:
        raise UsageError(f"--layer_indices: {bad} out of range; the model has {num_layers} layers (0..{num_layers - 1})")
    checkpoint_key = None
    if args.no_checkpoint:
        say("No checkpoint: random weights (config random_init)" if config.get("random_init") else "No checkpoint: base Wan2.1 weights")
    else:
        checkpoint_key = load_generator_checkpoint(generator, args.checkpoint_path, args.use_ema, args.allow_pickle, device, dtype)
        say(f"Loaded '{checkpoint_key}' from {args.checkpoint_path}")
    return CausalInferencePipeline(config, device, generator=generator, dtype=dtype).eval(), checkpoint_key


def capture_inference(args, pipeline, device, dtype, say):
    """Run the inference with the capture on; returns (kept calls, calls seen)."""
    num_layers = len(pipeline.generator.model.blocks)
    step = "cache" if args.capture_step == "cache" else int(args.capture_step)
    say(f"\nNum frames: {args.num_frames}\nNum frames per block: {pipeline.num_frame_per_block}")
    say(f"Layer indices to capture: {args.layer_indices}\nPrompt: {args.prompt}")
    say(f"Capture step: {args.capture_step}  (denoising timesteps {[round(t, 2) for t in pipeline.denoising_steps]})")
    say("\n" + "=" * 60 + "\nCapturing attention during inference (the model's own attention calls)\n" + "=" * 60)
    say(f"Model layers: {num_layers}")
    noise = torch.randn((1, *pipeline.latent_shape(args.num_frames)), device=device, dtype=dtype)
    ATTENTION_WEIGHT_CAPTURE.enable(args.layer_indices, capture_logits=True, num_layers=num_layers, keep="pass", passes=[step])
    try:
        start = time.perf_counter()
        latents = pipeline.inference(noise, [args.prompt], return_latents=True, progress=not args.quiet)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        print(f"Output latent shape: {list(latents.shape)}  (inference {time.perf_counter() - start:.2f} s)")
        return ATTENTION_WEIGHT_CAPTURE.kept_calls, ATTENTION_WEIGHT_CAPTURE.calls_seen
    finally:
        ATTENTION_WEIGHT_CAPTURE.disable()


def layer_entry(args, record, frame_seq_length, num_key_frames, per_block, quiet):
    """The saved entry of one kept call and its metadata; prints its logit range and sink table."""
    summary = {name: value.cpu() for name, value in record.summary(frame_seq_length).items()}
    entry = {
        "layer_idx": record.layer_idx,
        "is_logits": True,
        "num_frames": args.num_frames,
        "frame_seq_length": frame_seq_length,
        "num_heads": record.num_heads,
        "num_query_frames": per_block,
        "num_key_frames": num_key_frames,
    }
    if args.save_mode == "full":
        entry["attn_logits"] = record.to_host(torch.float16, frame_seq_length=frame_seq_length)
    else:
        entry.update({name: summary[name] for name in SUMMARY_KEYS})
    low, high = summary["logit_min"].min().item(), summary["logit_max"].max().item()
    meta = {
        "call_idx": record.call_idx, "block": record.labels["block"], "step": record.labels["step"],
        "timestep": record.labels["timestep"], "q_shape": list(record.q_shape), "k_shape": list(record.k_shape),
        "logit_min": low, "logit_max": high,
    }
    shape = [record.q_shape[0], record.num_heads, record.q_shape[1], record.k_shape[1]]
    print(f"Layer {record.layer_idx}: logits {shape} min {low:.3f} max {high:.3f}")
    table = sink_table(summary, frame_seq_length, per_block)
    if table is not None and not quiet:
        print("  head  first-frame  middle-frames  first-middle   (query-averaged logits)")
        for head, (first, middle, delta) in enumerate(table.tolist()):
            print(f"  {head:4d}  {first:11.3f}  {middle:13.3f}  {delta:12.3f}")
    return entry, meta


def run(args):
    t_start = time.perf_counter()
    config = load_config(args)
    check_inputs(args, config)
    device, dtype = pick_device(args)
    say = (lambda *a, **k: None) if args.quiet else print
    print(f"Using device: {device}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    set_seed(args.seed)
    torch.set_grad_enabled(False)
    pipeline, checkpoint_key = build_pipeline(args, config, device, dtype, say)
    model = pipeline.generator.model

    reset_host_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    kept, calls_seen = capture_inference(args, pipeline, device, dtype, say)
    print(f"Self-attention calls seen for layers {args.layer_indices}: {calls_seen}; kept: {len(kept)} (one per layer)")
    if len(kept) != len(args.layer_indices):
        raise RuntimeError(f"captured {len(kept)} calls for {len(args.layer_indices)} layers")
    per_block = pipeline.num_frame_per_block
    first = kept[0]  # every kept call comes from the same pass
    frame_seq_length = first.q_shape[1] // per_block
    num_key_frames = first.k_shape[1] // frame_seq_length
    key_frames_in_video = first.key_frames
    timestep = first.labels["timestep"]
    for record in kept:
        say(f"Layer {record.layer_idx}: selected attention with Q={list(record.q_shape)}, K={list(record.k_shape)} "
            f"(block {record.labels['block']}, pass {record.labels['step']}, t={record.labels['timestep']:.2f}, call {record.call_idx})")
    print(f"\nInferred parameters:\n  frame_seq_length: {frame_seq_length}\n  num_key_frames: {num_key_frames}\n  num_query_frames: {per_block}")

    t_reduce = time.perf_counter()
    entries, layers_meta = [], {}
    for record in kept:
        entry, layers_meta[record.layer_idx] = layer_entry(args, record, frame_seq_length, num_key_frames, per_block, args.quiet)
        entries.append(entry)
    t_reduce = time.perf_counter() - t_reduce
    del kept, first  # frees the kept q and keys on the device

    save_data = {
        "attention_weights": entries,
        "prompt": args.prompt,
        "num_frames": args.num_frames,
        "frame_seq_length": frame_seq_length,
        "num_frame_per_block": per_block,
        "layer_indices": list(args.layer_indices),
        "is_logits": True,
        "capture_method": "native_inference_capture",
        "query_frames": list(range(args.num_frames - per_block, args.num_frames)),
        "key_frames": list(range(num_key_frames)),
        "metadata": {
            "format": CACHE_FORMAT,
            "format_version": CACHE_FORMAT_VERSION,
            "save_mode": args.save_mode,
            "seed": args.seed,
            "prompt": args.prompt,
            "checkpoint_path": None if args.no_checkpoint else str(args.checkpoint_path),
            "checkpoint_key": checkpoint_key,
            "use_ema": args.use_ema,
            "capture_step": args.capture_step,
            "timestep": timestep,
            "calls_seen": calls_seen,
            "calls_kept": len(entries),
            "layers": layers_meta,
            "key_frame_indices": key_frames_in_video,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "config_path": str(args.config_path),
            "config": OmegaConf.to_container(config, resolve=True),
            "model": {name: list(v) if isinstance(v, tuple) else v for name, v in model.config.items()},
            "torch_version": str(torch.__version__),
        },
    }
    t_save = time.perf_counter()
    Path(args.output_path).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(args.output_path, lambda handle: torch.save(save_data, handle))
    t_save = time.perf_counter() - t_save
    size = Path(args.output_path).stat().st_size
    print(f"\nSaved to: {args.output_path} ({size / 1e6:.1f} MB, written in {t_save:.1f} s, {size / 1e9 / max(t_save, 1e-9):.2f} GB/s)")
    print(f"Reductions and host copies: {t_reduce:.2f} s; total: {time.perf_counter() - t_start:.1f} s")
    gpu_peak = f"; GPU {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
    print(f"Peak memory after loading the models: host {host_peak_gib():.2f} GiB (output file {size / 2**30:.2f} GiB){gpu_peak}")


def main(argv=None):
    args = parse_args(argv)

    def on_sigterm(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        run(args)
        return 0
    except (UsageError, WeightFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated; nothing was written", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
