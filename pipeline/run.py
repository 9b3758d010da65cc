"""A Figure 4 extraction run: the plan checked (pipeline/plan.py), then torch imported, the models
loaded once (pipeline/extraction.py), and each of this process's (prompt, seed) items captured, saved
(utils/attention_cache.py) and, in a sweep, recorded in the folder's manifest (pipeline/sweep.py),
with the report printed along the way.

Importing this module imports no torch: ``run`` imports it once the plan has passed.
"""
import sys
import time
from pathlib import Path

from pipeline.plan import UsageError, plan_run, preflight
from pipeline.sweep import (MANIFEST, append_manifest, check_lock_holder, check_sweep_settings, is_complete, item_name,
                            open_sweep, write_manifest)
from utils.cli import command
from utils.compile_cache import use_compile_cache
from utils.config import model_sizes


def settings_of(options, plan):
    """Everything that decides an item's tensors besides its prompt and seed: a sweep folder holds
    files of one setting only."""
    from omegaconf import OmegaConf

    return {
        "config": OmegaConf.to_container(plan.config, resolve=True),
        "num_frames": options.num_frames,
        "layer_indices": plan.layers,
        "capture_step": options.capture_step,
        "capture_blocks": plan.blocks,
        "save_mode": options.save_mode,
        "checkpoint_path": None if plan.checkpoint_path is None else str(Path(plan.checkpoint_path).resolve()),
        "use_ema": plan.use_ema,
        "lora_path": None if plan.lora_path is None else str(Path(plan.lora_path).resolve()),
        "prompt_switches": [[frame, switch] for frame, switch in plan.switches],
        "dtype": plan.dtype,
        "device_type": plan.device.split(":")[0],
    }


def run(options, show_next=True):
    """The whole run of ``options`` (an ``Options``): plan, preflight, the items, the manifest and
    the report, ending with the next command (``next_step``) unless ``show_next`` is False (a caller
    that goes on itself: the report). Returns the exit status (0); bad input raises UsageError or
    SweepFolderError."""
    t_start = time.perf_counter()
    plan = plan_run(options)
    if plan.rank == 0:
        for note in plan.notes:
            print(f"note: {note}", file=sys.stderr)
        for warning in plan.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    preflight(options, plan)
    folder = plan.output_dir
    item_paths = [] if folder is None else [folder / item_name(p, s) for p, s in plan.items]
    with open_sweep(folder, item_paths, plan.rank):  # locked, checked and cleaned before any item runs
        return run_items(options, plan, t_start, show_next)


def run_items(options, plan, t_start, show_next=True):
    """``run`` once the plan has passed and a sweep's folder is held (by rank 0)."""
    say = (lambda *a, **k: None) if (options.quiet or plan.rank) else print
    if plan.beyond_release and plan.rank == 0:
        print(f"warning: beyond the release of {plan.family.name} {plan.variant.name} "
              f"({options.config_path}): {'; '.join(plan.beyond_release)}", file=sys.stderr)

    compile_cache = use_compile_cache()  # before torch compiles anything
    import torch

    from pipeline.extraction import Extractor
    from utils.attention_cache import save_cache
    from utils.loading import WeightFileError

    pick_threads(options.threads, plan)
    device = open_device(plan.device)
    dtype = getattr(torch, plan.dtype)
    if device.type == "cuda":
        preflight(options, plan, device_free_bytes=torch.cuda.mem_get_info(device)[0])
    distributed = init_distributed(plan.world_size)
    if plan.rank == 0:
        print(f"Using device: {device}" + (f" (rank {plan.rank} of {plan.world_size})" if plan.world_size > 1 else ""))
        if device.type == "cuda":
            print(f"GPU: {torch.cuda.get_device_name(device)}")
            print(compile_cache.describe())
    torch.set_grad_enabled(False)

    settings = settings_of(options, plan)
    folder = plan.output_dir
    if folder is not None:
        check_sweep_settings(folder, settings, options.overwrite, plan.rank)
        if distributed:
            torch.distributed.barrier()
            if plan.rank != 0:
                check_lock_holder(folder)
    todo = []
    for prompt_index, seed in plan.my_items():
        path = folder / item_name(prompt_index, seed) if folder else Path(plan.output_path)
        if folder and is_complete(path, settings, plan.prompts[prompt_index], seed):
            continue
        todo.append((prompt_index, seed, path))
    if folder is not None and plan.rank == 0:
        print(f"{len(plan.items)} items ({len(plan.prompts)} prompts x {len(plan.seeds)} seeds) into {folder}; "
              f"{len(plan.my_items()) - len(todo)} of this process's {len(plan.my_items())} already complete")

    if todo:
        say("Initializing inference pipeline...")
        checkpoint = plan.checkpoint_path
        try:
            extractor = Extractor(plan.config, device, dtype, checkpoint, plan.use_ema, options.allow_pickle, plan.variant,
                                  plan.lora_path)
            encoded, text_len = extractor.encode([*(plan.prompts[p] for p, _, _ in todo), *(p for _, p in plan.switches)])
        except WeightFileError as err:
            raise UsageError(str(err)) from err
        if options.allow_pickle and checkpoint is not None:
            print(f"warning: --allow_pickle: {checkpoint} was fully unpickled (it can run code from the file)", file=sys.stderr)
        say("No checkpoint: random weights (config random_init)" if checkpoint is None and plan.config.get("random_init")
            else "No checkpoint: base Wan2.1 weights" if checkpoint is None
            else f"Loaded {checkpoint} (the whole file)" if extractor.checkpoint_key is None
            else f"Loaded '{extractor.checkpoint_key}' from {checkpoint}")
        if plan.lora_path is not None:
            say(f"Loaded the LoRA adapter {plan.lora_path} on {extractor.lora_layers} layers "
                f"({'merged into the weights' if plan.precision == 'fast' else 'unmerged'})")
        for prompt, (_, tokens) in encoded.items():
            if tokens > text_len:
                print(f"warning: prompt of {tokens} tokens is longer than the text encoder's {text_len}; its end is cut off: "
                      f"{prompt[:60]!r}...", file=sys.stderr)
        bar = items_bar(plan, len(todo), options.quiet)
        for prompt_index, seed, path in todo:
            t_item = time.perf_counter()
            prompt = plan.prompts[prompt_index]
            quiet = options.quiet or plan.sweep
            data, report = extract_item(options, plan, extractor, encoded, text_len, prompt, seed, settings,
                                        quiet=quiet, progress=not quiet)
            report["checkpoint_key"] = extractor.checkpoint_key
            t_save = time.perf_counter()
            size = save_cache(path, data)
            report["seconds"]["save"] = round(time.perf_counter() - t_save, 3)
            report["seconds"]["item"] = round(time.perf_counter() - t_item, 3)
            report["peak_gib"] = peaks_gib(device)
            del data
            if folder is not None:
                append_manifest(folder, prompt_index, prompt, seed, path, size, report, options.save_mode, plan.rank)
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
        write_manifest(folder, items, plan.prompts, options.save_mode)
        print(f"Manifest: {folder / MANIFEST} ({len(items)} items)")
    if plan.rank == 0:
        print(f"Total: {time.perf_counter() - t_start:.1f} s")
        if device.type == "cuda":
            print(f"GPU peak: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
        if show_next:
            print(next_step(plan))
    if distributed:
        torch.distributed.destroy_process_group()
    return 0


def next_step(plan):
    """The run's last line: the command that goes on from its output (statistics of a sweep, the figure of
    a single file)."""
    if plan.output_dir is not None:
        return f"Next: the statistics over its items: {command('aggregate_figure4.py', plan.output_dir)}"
    return f"Next: draw the figure: {command('plot_figure4.py', plan.output_path)}"


def pick_threads(threads, plan):
    """``threads`` CPU threads for torch where given; else 1 for small models on the CPU: their ops are
    too small to split, and on a busy 2-core machine extra threads only wait for each other (measured:
    0.44 s vs 4.3 s for the tiny run)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    elif plan.device == "cpu" and model_sizes(plan.config)["dim"] <= 512:
        torch.set_num_threads(1)


def open_device(name):
    """The torch device ``name`` ('cpu' or 'cuda:N'), made current; UsageError where that GPU is absent."""
    import torch

    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device: {device} asked for, but CUDA is not available here; use --device cpu with configs/tiny.yaml")
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"--device: {device} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(device)
    return device


def init_distributed(world_size):
    """Under torchrun (WORLD_SIZE > 1): one gloo process group, used only for the processes to wait
    for each other around the shared folder's settings and manifest (no tensor crosses it, so gloo
    serves GPUs too, even several processes on one GPU)."""
    if world_size == 1:
        return False
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return True


def items_bar(plan, total, quiet):
    """A sweep's progress bar over this process's ``total`` items to do; None for a single run or quiet."""
    if not plan.sweep or quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"items (rank {plan.rank})" if plan.world_size > 1 else "items", unit="item",
                position=plan.rank)


def extract_item(options, plan, extractor, encoded, text_len, prompt, seed, settings, quiet, progress):
    """One (prompt, seed): inference with the capture, the entries, the cache dict and a report.
    ``encoded``: {prompt: (context, token count)} of the item's prompt and of the prompt switches."""
    import torch

    from pipeline.extraction import cache_entry
    from utils.attention_cache import build_cache

    say = (lambda *a, **k: None) if quiet else print
    pipeline = extractor.pipeline
    per_block = pipeline.num_frame_per_block
    fsl = extractor.frame_seq_length()
    num_frames = options.num_frames
    say(f"\nNum frames: {num_frames}\nNum frames per block: {per_block}")
    say(f"Layer indices to capture: {plan.layers}\nPrompt: {prompt}")
    for frame, switch in plan.switches:
        say(f"Prompt from frame {frame} (the first block starting there or later): {switch}")
    say(f"Capture step: {options.capture_step}  (denoising timesteps {[round(t, 2) for t in pipeline.denoising_steps]}); "
        f"blocks {plan.blocks}; precision {extractor.model.describe_numerics(extractor.device, extractor.dtype)}")
    say(f"Model: {plan.family.description} ({plan.family.name}, variant {plan.variant.name}); attention cache: "
        f"{extractor.model.cache_policy.describe()}")
    say("\n" + "=" * 60 + "\nCapturing attention during inference (the model's own attention calls)\n" + "=" * 60)
    say(f"Model layers: {extractor.num_layers}")
    reset_peaks(extractor.device)
    context, tokens = encoded[prompt]
    switches = [(frame, encoded[switch][0]) for frame, switch in plan.switches]
    kept, calls_seen, seconds = extractor.capture(context, seed, num_frames, plan.layers, plan.passes, plan.blocks,
                                                  progress=progress, switches=switches)
    say(f"Output latent shape: {[1, num_frames, *pipeline.latent_shape(1)[1:]]}  (inference {seconds:.2f} s)")
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
        entry, summary = cache_entry(record, fsl, per_block, options.save_mode)
        entries.append(entry)
        if not plan.sweep:  # a sweep reports one line per item
            report_entry(entry, summary, fsl, per_block, quiet)
    del kept, record
    t_reduce = time.perf_counter() - t_reduce
    nonfinite = sum(e.nonfinite for e in entries)
    if nonfinite:
        bad = [f"layer {e.layer_idx} pass {e.pass_}" for e in entries if e.nonfinite]
        print(f"warning: {nonfinite} non-finite logits (NaN/Inf) in {', '.join(bad)}; saved as they are", file=sys.stderr)
    last = entries[-1]
    say(f"\nInferred parameters:\n  frame_seq_length: {fsl}\n  num_key_frames: {last.num_key_frames}\n"
        f"  num_query_frames: {last.num_query_frames}")
    metadata = {
        "seed": seed,
        "prompt": prompt,
        "prompt_tokens": tokens,
        "prompt_truncated": tokens > text_len,
        "text_len": text_len,
        "checkpoint_path": settings["checkpoint_path"],
        "checkpoint_key": extractor.checkpoint_key,
        "use_ema": plan.use_ema,
        "capture_step": options.capture_step,
        "capture_blocks": plan.blocks,
        "precision": extractor.model.precision,
        "timestep": last.timestep,
        "calls_seen": calls_seen,
        "calls_kept": len(entries),
        "nonfinite": nonfinite,
        "key_frame_indices": last.key_frame_indices,
        "device": str(extractor.device),
        "dtype": settings["dtype"],
        "config_path": str(options.config_path),
        "config": settings["config"],
        "model": {name: list(v) if isinstance(v, tuple) else v for name, v in extractor.model.config.items()},
        "cache_policy": extractor.model.cache_policy.describe(),
        "family": plan.family.name,
        "variant": plan.variant.name,
        "lora_path": settings["lora_path"],
        "lora_merged": plan.lora_path is not None and plan.precision == "fast",
        "prompt_switches": [[frame, switch] for frame, switch in plan.switches],
        "torch_version": str(torch.__version__),
        "settings": settings,
    }
    data = build_cache(prompt=prompt, num_frames=num_frames, frame_seq_length=fsl, num_frame_per_block=per_block,
                       layer_indices=plan.layers, save_mode=options.save_mode, entries=entries, metadata=metadata)
    report = {"seconds": {"inference": round(seconds, 3), "reduce": round(t_reduce, 3)}}
    return data, report


def report_entry(entry, summary, frame_seq_length, per_block, quiet):
    """The spec's per-layer line (logit range) and, unless quiet, the per-head sink table: the mean logit
    of the first key frame, of the middle key frames and their difference (``sink_logit_gap`` of
    utils/sweep_stats.py)."""
    shape = [1, entry.num_heads, entry.num_query_frames * frame_seq_length, entry.num_key_frames * frame_seq_length]
    window = "" if entry.window is None else f" (window {entry.window}, query frames {entry.query_frames[0]}-{entry.query_frames[-1]})"
    print(f"Layer {entry.layer_idx} pass {entry.pass_}: logits {shape} min {entry.logit_min:.3f} max {entry.logit_max:.3f}"
          + window)
    if quiet:
        return
    from utils.sweep_stats import item_quantities

    sink = item_quantities(summary, entry.key_frame_indices, entry.query_frames)
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
    """Start the memory peaks of ``peaks_gib`` anew."""
    import torch

    from utils.misc import reset_host_peak

    reset_host_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
