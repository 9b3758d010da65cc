"""Record the pre-softmax self-attention logits of chosen layers for the last temporal block.

Runs the real block-wise, KV-cached inference with ``ATTENTION_WEIGHT_CAPTURE`` on and saves, per
requested transformer block, the chosen pass of the last block: its queries against every cached key
(Deep Forcing, Figure 4). The capture does not change the generated video. One prompt and seed give
one ``--output_path`` file (the spec's run); several prompts and/or seeds are a sweep into
``--output_dir``, one file per item, resumable, and shared across processes under torchrun. See
README.md for the output layout.

Arguments and the config are checked before torch and the models are imported: a mistake is
reported within a second or two.
"""
import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from utils.config import ConfigError, load_config, model_sizes
from utils.output import OutputPathError, check_output_path, exit_status
from utils.preflight import PreflightError, check_fits, estimate, host_available_bytes
from utils.wan21 import MODEL_FILES
from wan.families import check_model_kwargs

DEFAULT_CONFIG = "configs/default_config.yaml"
DEFAULT_PROMPT = "A majestic eagle soaring through a cloudy sky, cinematic lighting"
DEFAULT_OUTPUT = "cache/attention_cache_figure4.pt"
MANIFEST = "manifest.jsonl"
SWEEP_SETTINGS = "sweep.json"


class UsageError(ValueError):
    """Bad input from the command line or the files it names."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option; the examples kept as written."""


EPILOG = """examples:
  # tiny random-weights model, no files, CPU
  PYTHONPATH=. python experiments/run_extraction_figure4.py --config_path configs/tiny.yaml --no_checkpoint --device cpu
  # Self-Forcing checkpoint (wan_models/Wan2.1-T2V-1.3B + checkpoints/self_forcing_dmd.pt), one GPU
  PYTHONPATH=. python experiments/run_extraction_figure4.py --output_path cache/self_forcing.pt
  # base Wan2.1, 4 layers, exact summaries only
  PYTHONPATH=. python experiments/run_extraction_figure4.py --no_checkpoint --layer_indices 0 4 8 12 --save_mode summary
  # a sweep: 2 prompts x 3 seeds, every pass of the last block, one file per item (re-run to resume)
  PYTHONPATH=. python experiments/run_extraction_figure4.py --prompt "a cat" --prompt "a dog" --seeds 0-2 \\
      --capture_step all --save_mode summary --output_dir cache/sweep
  # the same sweep on 4 GPUs
  PYTHONPATH=. torchrun --nproc_per_node 4 experiments/run_extraction_figure4.py --prompts_file prompts.txt \\
      --seeds 0-63 --save_mode summary --output_dir cache/sweep
exit status: 0 done; 1 failed while running (e.g. no space left); 2 bad input (nothing written);
129 SIGHUP, 130 Ctrl-C, 143 SIGTERM (the file being written is left as it was, no temporary file)"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Capture the last block's pre-softmax self-attention logits of chosen layers during real "
        "causal inference (Deep Forcing Figure 4).",
        formatter_class=HelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--config_path", default="configs/self_forcing_dmd.yaml",
                        help=f"inference config, merged onto {DEFAULT_CONFIG}; configs/tiny.yaml runs anywhere with random weights")
    parser.add_argument("--checkpoint_path", default="checkpoints/self_forcing_dmd.pt",
                        help="Self-Forcing checkpoint (a dict with 'generator' / 'generator_ema')")
    parser.add_argument("--output_path", default=None,
                        help=f"where the .pt cache of a single run is written, atomically (default {DEFAULT_OUTPUT}); "
                        "a symlink is followed and its target replaced; devices, FIFOs and folders are refused")
    parser.add_argument("--prompt", action="append", default=None,
                        help=f"text prompt; repeat for several (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--prompts_file", default=None,
                        help="UTF-8 text file, one prompt per line; blank lines and lines starting with # are skipped")
    parser.add_argument("--num_frames", type=int, default=21, help="latent frames to generate; a multiple of num_frame_per_block")
    parser.add_argument("--layer_indices", nargs="+", default=["0", "4"],
                        help="transformer blocks whose self-attention is captured, 0-based (0 4 = the paper's L1 and L5), "
                        "in the order given; 'all' for every layer")
    parser.add_argument("--no_checkpoint", action="store_true", default=False,
                        help="do not load a checkpoint: use the base Wan2.1 weights from the model folder")
    parser.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True,
                        help="load the checkpoint's 'generator_ema' (--no-use_ema: 'generator')")
    parser.add_argument("--seed", type=int, default=None, help="seed of the noise (default 42)")
    parser.add_argument("--seeds", nargs="+", default=None,
                        help="several seeds for a sweep: integers and ranges, e.g. 0 1 2 or 0-63 (replaces --seed)")
    parser.add_argument("--output_dir", default=None,
                        help=f"folder of a sweep: one cache per item named p<prompt>_s<seed>.pt (e.g. p0003_s0001.pt, "
                        f"0-based prompt index), {MANIFEST} (a line per finished item) and {SWEEP_SETTINGS}; "
                        "re-running the same command skips the items already complete")
    parser.add_argument("--overwrite", action="store_true",
                        help="in an --output_dir made with other settings: redo every item with the new settings")
    parser.add_argument("--gpu_id", type=int, default=0)
    parser.add_argument("--device", default=None,
                        help="cpu or cuda[:N]; default cuda:{gpu_id} (under torchrun, cuda:LOCAL_RANK). 'cpu' works with configs/tiny.yaml")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--capture_step", default="0",
                        help="which pass of the last block is kept: 0..3 the denoising passes (t = 1000, 937.5, 833.33, 625), "
                        "'cache' the clean cache-update pass, 'all' every one of them (one entry per layer and pass)")
    parser.add_argument("--capture_blocks", nargs="+", default=["last"],
                        help="temporal blocks whose pass is kept, 0-based block indices and/or 'last' (e.g. 6 20 40 last); "
                        "one entry per layer, block and pass")
    parser.add_argument("--precision", choices=("exact", "fast"), default=None,
                        help="exact: upstream Self-Forcing's arithmetic (bit-identical bf16 latents); fast: the same model "
                        "with fp32 RoPE tables, fused norms and torch.compile (default: fast on a GPU, exact on the CPU)")
    parser.add_argument("--model_dir", default=None, help="overrides the config's model_dir (folder of the official Wan2.1 files)")
    parser.add_argument("--save_mode", choices=("full", "summary"), default="full",
                        help="full: fp16 logits [B, N, Q, K] per layer and pass (3.7 GB each at full size); summary: exact fp32 "
                        "query-averaged logits, frame-level means and attention mass (kilobytes)")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="load a checkpoint that holds more than tensors by full unpickling (runs code from the file; "
                        "only for files you trust)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch; default: 1 for small models on the CPU (fastest for them, also on a "
                        "busy machine), torch's own choice otherwise")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and a shorter report (one line per item)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# the plan: everything checked before torch is imported


@dataclass
class Plan:
    config: object
    prompts: list
    seeds: list
    layers: list
    passes: list
    blocks: list
    num_layers: int
    device: str
    rank: int = 0
    world_size: int = 1
    items: list = field(default_factory=list)  # (prompt index, seed), all ranks

    @property
    def sweep(self):
        return len(self.items) > 1

    def my_items(self):
        """This process's share: every world_size-th item from its rank (none dropped, none twice)."""
        return self.items[self.rank :: self.world_size]


def parse_seeds(words):
    """'0 1 2', '0-63', '5 10-12' -> a list of distinct seeds in the order given."""
    seeds = []
    for word in words:
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", word)
        if not match:
            raise UsageError(f"--seeds: {word!r} is not a seed (an integer >= 0) or a range like 0-63")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise UsageError(f"--seeds: range {word!r} runs backwards")
        seeds.extend(range(first, last + 1))
    duplicates = sorted({s for s in seeds if seeds.count(s) > 1})
    if duplicates:
        raise UsageError(f"--seeds: {duplicates} given more than once")
    return seeds


def read_prompts_file(path):
    """Prompts of a UTF-8 file, one a line; blank lines and '#' lines skipped."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"--prompts_file: {path} not found") from None
    except IsADirectoryError:
        raise UsageError(f"--prompts_file: {path} is a folder; expected a text file") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UsageError(f"--prompts_file: {path} is not UTF-8 text (line {line}: {err.reason})") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UsageError(f"--prompts_file: {path} holds no prompt (blank and # lines are skipped)")
    return prompts


def parse_layers(words, num_layers):
    if words == ["all"]:
        return list(range(num_layers))
    layers = []
    for word in words:
        try:
            layers.append(int(word))
        except ValueError:
            raise UsageError(f"--layer_indices: {word!r} is not a layer index (0..{num_layers - 1}) or 'all'") from None
    duplicates = sorted({i for i in layers if layers.count(i) > 1})
    if duplicates:
        raise UsageError(f"--layer_indices: {duplicates} given more than once")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise UsageError(f"--layer_indices: {bad} out of range; the model has {num_layers} layers (0..{num_layers - 1})")
    return layers


def parse_passes(text, num_steps):
    if text == "all":
        return [*range(num_steps), "cache"]
    if text == "cache":
        return ["cache"]
    if text not in {str(i) for i in range(num_steps)}:
        raise UsageError(f"--capture_step: {text!r}; expected 0..{num_steps - 1}, 'cache' or 'all'")
    return [int(text)]


def parse_blocks(words, num_blocks):
    """Block indices and/or 'last' -> distinct labels in block order ('last' after the numbers unless
    it names one of them)."""
    blocks = []
    for word in words:
        if word == "last":
            block = num_blocks - 1
        elif word.isdigit() and int(word) < num_blocks:
            block = int(word)
        else:
            raise UsageError(f"--capture_blocks: {word!r}; expected a block index 0..{num_blocks - 1} (num_frames / "
                             "num_frame_per_block blocks) or 'last'")
        if block in blocks:
            raise UsageError(f"--capture_blocks: block {block} given more than once")
        blocks.append(block)
    return sorted(blocks)


def parse_device(args):
    """'cpu' or 'cuda:N' from --device / --gpu_id / LOCAL_RANK, checked without importing torch."""
    local_rank = os.environ.get("LOCAL_RANK")
    name = args.device or (f"cuda:{local_rank}" if local_rank is not None else f"cuda:{args.gpu_id}")
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", name)
    if not match or (match[1] == "cpu" and match[2] is not None):
        raise UsageError(f"--device: {name!r} is not supported; expected cpu or cuda[:N] (e.g. cuda:0)")
    if match[1] == "cuda" and not any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia")):
        raise UsageError(f"--device: {name} asked for, but CUDA is not available here (no NVIDIA GPU found); use --device cpu with configs/tiny.yaml")
    return "cpu" if match[1] == "cpu" else f"cuda:{match[2] or 0}"


def plan_run(args):
    """Every check that needs no torch: config, arguments, files, the output. Returns the Plan."""
    try:
        config = load_config(args.config_path, DEFAULT_CONFIG, args.model_dir, check_model_kwargs=check_model_kwargs)
    except ConfigError as err:
        raise UsageError(f"--config_path: {err}") from err
    if not config.get("random_init"):
        model_dir = Path(config.model_dir)
        missing = [name for name in MODEL_FILES if not (model_dir / name).exists()]
        if missing:
            raise UsageError(f"--model_dir: {model_dir} lacks {', '.join(missing)}; it must hold {', '.join(MODEL_FILES)} "
                             "(the official Wan2.1-T2V-1.3B files); configs/tiny.yaml needs none")
    try:
        sizes = model_sizes(config)
    except ConfigError as err:
        raise UsageError(f"--model_dir: {err}") from err
    per_block = int(config.num_frame_per_block)
    if args.num_frames <= 0 or args.num_frames % per_block:
        raise UsageError(f"--num_frames: {args.num_frames} is not a positive multiple of num_frame_per_block ({per_block})")
    num_layers = sizes["num_layers"]
    layers = parse_layers(args.layer_indices, num_layers)
    passes = parse_passes(args.capture_step, len(config.denoising_step_list))
    blocks = parse_blocks(args.capture_blocks, args.num_frames // per_block)
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        prompts += read_prompts_file(args.prompts_file)
    if not prompts:
        prompts = [DEFAULT_PROMPT]
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise UsageError(f"--prompt: prompt {empty[0]} is empty")
    if args.seeds is not None and args.seed is not None:
        raise UsageError("--seed and --seeds given together; use --seeds for several seeds")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else [42 if args.seed is None else args.seed]
    bad = [s for s in seeds if not 0 <= s < 2**32]
    if bad:
        raise UsageError(f"--seed: {bad[0]} is outside [0, 2**32)")
    if not args.no_checkpoint and not Path(args.checkpoint_path).is_file():
        raise UsageError(f"--checkpoint_path: {args.checkpoint_path} not found; pass --no_checkpoint to run the base model without it")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads: {args.threads}; expected a positive number")
    device = parse_device(args)
    config.precision = args.precision or ("exact" if device == "cpu" else "fast")
    plan = Plan(config, prompts, seeds, layers, passes, blocks, num_layers, device,
                rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)))
    plan.items = [(p, s) for p in range(len(prompts)) for s in seeds]
    if plan.sweep or args.output_dir is not None:
        if args.output_path is not None:
            raise UsageError(f"--output_path: {len(plan.items)} items (prompts x seeds) are written to --output_dir, one file each")
        if args.output_dir is None:
            raise UsageError(f"{len(plan.items)} items (prompts x seeds): give --output_dir for their files")
        check_output_dir(Path(args.output_dir))
    else:
        if plan.world_size > 1:
            raise UsageError(f"torchrun with {plan.world_size} processes and one item: give several prompts or seeds and --output_dir")
        args.output_path = args.output_path or DEFAULT_OUTPUT
        try:
            check_output_path(args.output_path)
        except OutputPathError as err:
            raise UsageError(f"--output_path: {err}") from err
    return plan


def check_output_dir(folder):
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--output_dir: {folder} exists and is not a folder")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UsageError(f"--output_dir: {existing} is not a writable folder, so {folder} cannot be written")


def item_name(prompt_index, seed):
    return f"p{prompt_index:04d}_s{seed:04d}.pt"


def preflight(args, plan, device_free_bytes=None):
    """Refuse, with the numbers, what cannot fit the device (when ``device_free_bytes`` is known), the
    host or the output folder. The text encoder is left out: it is freed before diffusion starts."""
    config = plan.config
    sizes = model_sizes(config)
    kwargs = config.get("model_kwargs") or {}
    cpu = plan.device == "cpu"
    dtype_bytes = 4 if (args.dtype == "float32" or (args.dtype is None and cpu)) else 2
    need = estimate(
        sizes, num_frames=args.num_frames, num_frame_per_block=int(config.num_frame_per_block),
        height=int(config.height), width=int(config.width), local_attn_size=int(kwargs.get("local_attn_size", -1)),
        num_captured_layers=len(plan.layers), num_kept_passes=len(plan.passes) * len(plan.blocks), save_mode=args.save_mode,
        dtype_bytes=dtype_bytes,
    )
    folder = Path(args.output_dir) if args.output_dir else Path(args.output_path).parent
    host = host_available_bytes()
    try:
        if cpu:  # the model, caches and the output all live in host memory
            check_fits(need, device_free_bytes=None if host is None else host - need.host_peak, host_available_bytes=host,
                       output_dir=folder, output_files=len(plan.my_items()))
        else:
            check_fits(need, device_free_bytes=device_free_bytes, host_available_bytes=host, output_dir=folder,
                       output_files=len(plan.my_items()))
    except PreflightError as err:
        raise UsageError(f"not enough room for this run: {err}") from err


# ---------------------------------------------------------------------------------------------
# running


def pick_threads(args, plan):
    """1 thread for small models on the CPU: their ops are too small to split, and on a busy 2-core
    machine extra threads only wait for each other (measured: 0.44 s vs 4.3 s for the tiny run)."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif plan.device == "cpu" and model_sizes(plan.config)["dim"] <= 512:
        torch.set_num_threads(1)


def open_device(plan):
    import torch

    device = torch.device(plan.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device: {device} asked for, but CUDA is not available here; use --device cpu with configs/tiny.yaml")
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"--device: {device} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(device)
    return device


def settings_of(args, plan, dtype):
    """Everything that decides an item's tensors besides its prompt and seed: a sweep folder holds
    files of one setting only."""
    from omegaconf import OmegaConf

    return {
        "config": OmegaConf.to_container(plan.config, resolve=True),
        "num_frames": args.num_frames,
        "layer_indices": plan.layers,
        "capture_step": args.capture_step,
        "capture_blocks": plan.blocks,
        "save_mode": args.save_mode,
        "checkpoint_path": None if args.no_checkpoint else str(Path(args.checkpoint_path).resolve()),
        "use_ema": args.use_ema,
        "dtype": str(dtype).removeprefix("torch."),
        "device_type": plan.device.split(":")[0],
    }


def run(args):
    t_start = time.perf_counter()
    plan = plan_run(args)
    preflight(args, plan)
    say = (lambda *a, **k: None) if (args.quiet or plan.rank) else print

    import torch

    from utils.attention_cache import CacheFileError, describe, save_cache
    from pipeline.extraction import Extractor
    from utils.loading import WeightFileError

    pick_threads(args, plan)
    device = open_device(plan)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        preflight(args, plan, device_free_bytes=torch.cuda.mem_get_info(device)[0])
    distributed = init_distributed(plan)
    if plan.rank == 0:
        print(f"Using device: {device}" + (f" (rank {plan.rank} of {plan.world_size})" if plan.world_size > 1 else ""))
        if device.type == "cuda":
            print(f"GPU: {torch.cuda.get_device_name(device)}")
    torch.set_grad_enabled(False)

    settings = settings_of(args, plan, dtype)
    folder = Path(args.output_dir) if args.output_dir else None
    if folder is not None:
        check_sweep_settings(folder, settings, args.overwrite, plan.rank)
        if distributed:
            torch.distributed.barrier()
    todo = []
    for prompt_index, seed in plan.my_items():
        path = folder / item_name(prompt_index, seed) if folder else Path(args.output_path)
        if folder and is_complete(path, settings, plan.prompts[prompt_index], seed, describe, CacheFileError):
            continue
        todo.append((prompt_index, seed, path))
    if folder is not None and plan.rank == 0:
        print(f"{len(plan.items)} items ({len(plan.prompts)} prompts x {len(plan.seeds)} seeds) into {folder}; "
              f"{len(plan.my_items()) - len(todo)} of this process's {len(plan.my_items())} already complete")

    if todo:
        say("Initializing inference pipeline...")
        checkpoint = None if args.no_checkpoint else args.checkpoint_path
        try:
            extractor = Extractor(plan.config, device, dtype, checkpoint, args.use_ema, args.allow_pickle)
            encoded, text_len = extractor.encode([plan.prompts[p] for p, _, _ in todo])
        except WeightFileError as err:
            raise UsageError(str(err)) from err
        if args.allow_pickle and checkpoint is not None:
            print(f"warning: --allow_pickle: {checkpoint} was fully unpickled (it can run code from the file)", file=sys.stderr)
        say("No checkpoint: random weights (config random_init)" if args.no_checkpoint and plan.config.get("random_init")
            else "No checkpoint: base Wan2.1 weights" if args.no_checkpoint else f"Loaded '{extractor.checkpoint_key}' from {checkpoint}")
        for prompt, (_, tokens) in encoded.items():
            if tokens > text_len:
                print(f"warning: prompt of {tokens} tokens is longer than the text encoder's {text_len}; its end is cut off: "
                      f"{prompt[:60]!r}...", file=sys.stderr)
        bar = items_bar(plan, todo, args)
        for prompt_index, seed, path in todo:
            t_item = time.perf_counter()
            prompt = plan.prompts[prompt_index]
            context, tokens = encoded[prompt]
            data, report = extract_item(args, plan, extractor, context, prompt, tokens, text_len, seed, settings,
                                        quiet=args.quiet or plan.sweep, progress=not (args.quiet or plan.sweep))
            report["checkpoint_key"] = extractor.checkpoint_key
            t_save = time.perf_counter()
            size = save_cache(path, data)
            report["seconds"]["save"] = round(time.perf_counter() - t_save, 3)
            report["seconds"]["item"] = round(time.perf_counter() - t_item, 3)
            report["peak_gib"] = peaks_gib(device)
            del data
            if folder is not None:
                append_manifest(folder, prompt_index, prompt, seed, path, size, report, args.save_mode, plan.rank)
                if bar is not None:
                    bar.update()
                elif plan.sweep:
                    print(f"[rank {plan.rank}] {path.name}: prompt {prompt_index}, seed {seed}, "
                          f"inference {report['seconds']['inference']:.1f} s, {size / 1e6:.1f} MB")
            if not plan.sweep:
                print(f"\nSaved to: {path} ({size / 1e6:.1f} MB, written in {report['seconds']['save']:.1f} s)")
        if bar is not None:
            bar.close()
    if distributed:
        torch.distributed.barrier()
    if folder is not None and plan.rank == 0:
        items = {(p, s): folder / item_name(p, s) for p, s in plan.items}
        write_manifest(folder, items, plan.prompts, args.save_mode)
        print(f"Manifest: {folder / MANIFEST} ({len(items)} items)")
    if plan.rank == 0:
        print(f"Total: {time.perf_counter() - t_start:.1f} s")
        if device.type == "cuda":
            print(f"GPU peak: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    if distributed:
        torch.distributed.destroy_process_group()
    return 0


def init_distributed(plan):
    """Under torchrun (WORLD_SIZE > 1): one gloo process group, used only for the processes to wait
    for each other around the shared folder's settings and manifest (no tensor crosses it, so gloo
    serves GPUs too, even several processes on one GPU)."""
    if plan.world_size == 1:
        return False
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return True


def items_bar(plan, todo, args):
    if not plan.sweep or args.quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=len(todo), desc=f"items (rank {plan.rank})" if plan.world_size > 1 else "items", unit="item",
                position=plan.rank)


def extract_item(args, plan, extractor, context, prompt, tokens, text_len, seed, settings, quiet, progress):
    """One (prompt, seed): inference with the capture, the entries, the cache dict and a report."""
    import torch

    from utils.attention_cache import build_cache
    from pipeline.extraction import cache_entry

    say = (lambda *a, **k: None) if quiet else print
    pipeline = extractor.pipeline
    per_block = pipeline.num_frame_per_block
    fsl = extractor.frame_seq_length()
    say(f"\nNum frames: {args.num_frames}\nNum frames per block: {per_block}")
    say(f"Layer indices to capture: {plan.layers}\nPrompt: {prompt}")
    say(f"Capture step: {args.capture_step}  (denoising timesteps {[round(t, 2) for t in pipeline.denoising_steps]}); "
        f"blocks {plan.blocks}; precision {extractor.model.describe_numerics(extractor.device, extractor.dtype)}")
    say("\n" + "=" * 60 + "\nCapturing attention during inference (the model's own attention calls)\n" + "=" * 60)
    say(f"Model layers: {extractor.num_layers}")
    reset_peaks(extractor.device)
    kept, calls_seen, seconds = extractor.capture(context, seed, args.num_frames, plan.layers, plan.passes, plan.blocks,
                                                  progress=progress)
    say(f"Output latent shape: {[1, args.num_frames, *pipeline.latent_shape(1)[1:]]}  (inference {seconds:.2f} s)")
    expected = len(plan.layers) * len(plan.passes) * len(plan.blocks)
    if len(kept) != expected:
        raise RuntimeError(f"captured {len(kept)} calls for {len(plan.layers)} layers x {len(plan.passes)} passes x "
                           f"{len(plan.blocks)} blocks")
    say(f"Self-attention calls seen for layers {plan.layers}: {calls_seen}; kept: {len(kept)}")
    t_reduce = time.perf_counter()
    entries = []
    for record in kept:
        say(f"Layer {record.layer_idx}: selected attention with Q={list(record.q_shape)}, K={list(record.k_shape)} "
            f"(block {record.labels['block']}, pass {record.labels['step']}, t={record.labels['timestep']:.2f})")
        entry, summary = cache_entry(record, fsl, per_block, args.save_mode)
        entries.append(entry)
        if not plan.sweep:  # a sweep reports one line per item
            report_entry(entry, summary, fsl, per_block, quiet)
    del kept, record
    t_reduce = time.perf_counter() - t_reduce
    nonfinite = sum(e["nonfinite"] for e in entries)
    if nonfinite:
        bad = [f"layer {e['layer_idx']} pass {e['pass']}" for e in entries if e["nonfinite"]]
        print(f"warning: {nonfinite} non-finite logits (NaN/Inf) in {', '.join(bad)}; saved as they are", file=sys.stderr)
    last = entries[-1]
    say(f"\nInferred parameters:\n  frame_seq_length: {fsl}\n  num_key_frames: {len(last['key_frame_indices'])}\n"
        f"  num_query_frames: {per_block}")
    metadata = {
        "seed": seed,
        "prompt": prompt,
        "prompt_tokens": tokens,
        "prompt_truncated": tokens > text_len,
        "text_len": text_len,
        "checkpoint_path": settings["checkpoint_path"],
        "checkpoint_key": extractor.checkpoint_key,
        "use_ema": args.use_ema,
        "capture_step": args.capture_step,
        "capture_blocks": plan.blocks,
        "precision": extractor.model.precision,
        "timestep": last["timestep"],
        "calls_seen": calls_seen,
        "calls_kept": len(entries),
        "nonfinite": nonfinite,
        "key_frame_indices": last["key_frame_indices"],
        "device": str(extractor.device),
        "dtype": settings["dtype"],
        "config_path": str(args.config_path),
        "config": settings["config"],
        "model": {name: list(v) if isinstance(v, tuple) else v for name, v in extractor.model.config.items()},
        "torch_version": str(torch.__version__),
        "settings": settings,
    }
    data = build_cache(prompt=prompt, num_frames=args.num_frames, frame_seq_length=fsl, num_frame_per_block=per_block,
                       layer_indices=plan.layers, save_mode=args.save_mode, entries=entries, metadata=metadata)
    report = {"seconds": {"inference": round(seconds, 3), "reduce": round(t_reduce, 3)}}
    return data, report


def report_entry(entry, summary, frame_seq_length, per_block, quiet):
    """The spec's per-layer line (logit range) and, unless quiet, the per-head sink table: the mean logit
    of the first key frame, of the middle key frames and their difference (``sink_logit_gap`` of
    utils/sweep_stats.py)."""
    shape = [1, entry["num_heads"], per_block * frame_seq_length, len(entry["key_frame_indices"]) * frame_seq_length]
    print(f"Layer {entry['layer_idx']} pass {entry['pass']}: logits {shape} min {entry['logit_min']:.3f} max {entry['logit_max']:.3f}")
    if quiet:
        return
    from utils.sweep_stats import item_quantities

    sink = item_quantities(summary, entry["key_frame_indices"], entry["query_frames"])
    first, gap = sink["frame_logit"][0, :, 0], sink["sink_logit_gap"][0]  # [N] each
    if not gap.isnan().any():  # there are middle key frames
        print("  head  first-frame  middle-frames  first-middle   (query-averaged logits)")
        for head, (f, g) in enumerate(zip(first.tolist(), gap.tolist())):
            print(f"  {head:4d}  {f:11.3f}  {f - g:13.3f}  {g:12.3f}")


def peaks_gib(device):
    """Peak host (resident) and device memory since the last ``reset_peaks``, in GiB (device: None on the CPU)."""
    import torch

    from utils.misc import host_peak_gib

    gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"host": round(host_peak_gib(), 3), "gpu": None if gpu is None else round(gpu, 3)}


def reset_peaks(device):
    import torch

    from utils.misc import reset_host_peak

    reset_host_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------------------------
# the sweep folder: settings, resume, manifest


def check_sweep_settings(folder, settings, overwrite, rank):
    """A folder holds one setting: the first run writes it; a later run with other settings is refused
    unless --overwrite (which makes every item be redone)."""
    from utils.output import write_atomically

    path = folder / SWEEP_SETTINGS
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UsageError(f"--output_dir: {path} is unreadable ({err}); remove it or use another folder") from err
        if stored != settings and not overwrite:
            changed = sorted(k for k in settings.keys() | stored.keys() if stored.get(k) != settings.get(k))
            raise UsageError(f"--output_dir: {folder} holds a sweep made with other settings ({', '.join(changed)} differ); "
                             "use another folder, or --overwrite to redo every item with the new settings")
        if stored == settings:
            return
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: f.write(json.dumps(settings, indent=1, sort_keys=True).encode()))


def is_complete(path, settings, prompt, seed, describe_cache, error):
    """Whether ``path`` is a complete, valid cache of this item made with these settings (checked, not
    trusted by name)."""
    if not path.is_file():
        return False
    try:
        meta = describe_cache(path)["metadata"]
    except error:
        return False
    return meta.get("settings") == settings and meta.get("prompt") == prompt and meta.get("seed") == seed


def append_manifest(folder, prompt_index, prompt, seed, path, size, report, save_mode, rank):
    """One line for a finished item, appended once its file is in place (a single write: lines of
    several processes do not interleave)."""
    line = manifest_line(prompt_index, prompt, seed, path, size, save_mode)
    line.update(seconds=report["seconds"], peak_gib=report["peak_gib"], rank=rank)
    fd = os.open(folder / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, (json.dumps(line, ensure_ascii=False) + "\n").encode())
    finally:
        os.close(fd)


def manifest_line(prompt_index, prompt, seed, path, size, save_mode):
    line = {"prompt_index": prompt_index, "prompt": prompt, "seed": seed, "file": path.name, "bytes": size}
    if save_mode == "summary":
        line["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return line


def write_manifest(folder, items, prompts, save_mode):
    """At the end: one line per item whose file is in place, in item order, the latest line of each
    (timings kept from the run that made the file)."""
    from utils.output import write_atomically

    path = folder / MANIFEST
    latest = {}
    if path.is_file():
        for text in path.read_text().splitlines():
            try:
                line = json.loads(text)
                latest[(line["prompt_index"], line["seed"])] = line
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    lines = []
    for (prompt_index, seed), file in items.items():
        if not file.is_file():
            continue
        line = latest.get((prompt_index, seed))
        if line is None or line.get("bytes") != file.stat().st_size:
            line = manifest_line(prompt_index, prompts[prompt_index], seed, file, file.stat().st_size, save_mode)
        lines.append(json.dumps(line, ensure_ascii=False))
    write_atomically(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


def main(argv=None):
    args = parse_args(argv)
    return exit_status(lambda: run(args), UsageError)


if __name__ == "__main__":
    sys.exit(main())
