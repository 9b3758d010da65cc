"""The plan of a Figure 4 extraction run: every check that needs no torch, done before torch and the
models are imported, so that a mistake is reported within a second or two.

``options_from_args`` turns the command line's values into ``Options`` once; ``plan_run`` checks them
against the config, the files and the output and resolves what they leave open (device, dtype,
precision, output path) into a ``Plan``; ``preflight`` refuses a run that cannot fit. Neither the
options nor the loaded config are changed: resolved values live in the Plan (its config is a new one
holding the resolved precision).

Standard library, omegaconf, utils/ and the torch-free parts of wan/ (the model family and cache
policy registries) only: importing this module never imports torch.
"""
import os
import re
import stat
from dataclasses import dataclass, fields
from pathlib import Path

from omegaconf import OmegaConf

from utils.cli import REPO, repo_file
from utils.config import ConfigError, load_config, model_sizes
from utils.output import OutputPathError, check_output_path
from utils.passes import CACHE_PASS, parse_blocks, parse_passes
from utils.preflight import GB, PreflightError, check_fits, estimate, host_available_bytes, umt5_parameter_count
from utils.wan21 import BYTE_TOKENIZER_VOCAB, MODEL_FILES, ROPE_MAX_LEN, UMT5_XXL
from wan import families

DEFAULT_CONFIG = "configs/default_config.yaml"
DEFAULT_PROMPT = "A majestic eagle soaring through a cloudy sky, cinematic lighting"
DEFAULT_OUTPUT = "cache/attention_cache_figure4.pt"
DEFAULT_SEED = 42
MAX_ITEMS = 1_000_000  # (prompt, seed) items of one run
MAX_PROMPTS_FILE_BYTES = 64 * 2**20
MAX_THREADS = 1024  # --threads: at most this, and at most 4 per CPU (more only crash: SIGSEGV at 10**6)


def max_threads():
    """The largest --threads accepted here: 4 per CPU, at most MAX_THREADS."""
    return min(MAX_THREADS, 4 * (os.cpu_count() or 1))


class UsageError(ValueError):
    """Bad input from the command line or the files it names."""


@dataclass(frozen=True)
class Options:
    """The run's options as given (one field per command-line option, lists as tuples); what they
    leave open is resolved by ``plan_run``."""

    config_path: str
    checkpoint_path: str | None
    output_path: str | None
    prompt: tuple | None
    prompts_file: str | None
    num_frames: int
    layer_indices: tuple
    no_checkpoint: bool
    use_ema: bool | None
    seed: int | None
    seeds: tuple | None
    output_dir: str | None
    overwrite: bool
    gpu_id: int
    device: str | None
    dtype: str | None
    capture_step: str
    capture_blocks: tuple
    precision: str | None
    model_dir: str | None
    save_mode: str
    switch: tuple | None
    lora_path: str | None
    allow_pickle: bool
    threads: int | None
    quiet: bool


def options_from_args(args):
    """``Options`` of an argparse namespace (every option, nothing else; lists become tuples)."""
    values = vars(args)
    names = {f.name for f in fields(Options)}
    if set(values) != names:
        raise TypeError(f"options and arguments differ: {sorted(set(values) ^ names)}")
    return Options(**{name: tuple(value) if isinstance(value, list) else value for name, value in values.items()})


@dataclass(frozen=True)
class Plan:
    """A checked run: the config (precision resolved) and its cache policy, prompts, seeds, captured
    layers, passes and blocks, the device, dtype and outputs, and this process's place among torchrun's."""

    config: object
    cache_policy: object  # a wan.cache_policies policy
    family: object  # the config's wan.families ModelFamily and Variant
    variant: object
    checkpoint_path: str | None  # the generator checkpoint to load; None: the base weights
    use_ema: bool  # whether its EMA state dict is loaded
    lora_path: str | None  # the variant's LoRA adapter, loaded on the checkpoint; None: none
    switches: tuple  # (latent frame, prompt) of each prompt switch, by frame
    beyond_release: list  # where the run differs from the variant's release (schedule, length)
    prompts: list
    seeds: list
    layers: list
    passes: list
    blocks: list
    num_layers: int
    device: str  # 'cpu' or 'cuda:N'
    dtype: str  # 'bfloat16' or 'float32'
    output_path: str | None  # the file of a single run
    output_dir: Path | None  # the folder of a sweep
    rank: int = 0
    world_size: int = 1
    items: tuple = ()  # (prompt index, seed), all ranks; a prompt given again is run once, at its first index
    warnings: tuple = ()  # what the run reports before it starts (e.g. duplicate items)
    notes: tuple = ()  # what the run says it chose (e.g. the CPU on a machine without a GPU)

    @property
    def sweep(self):
        return len(self.items) > 1

    @property
    def precision(self):
        return self.config.precision

    def my_items(self):
        """This process's share: every world_size-th item from its rank (none dropped, none twice)."""
        return self.items[self.rank :: self.world_size]


def parse_seeds(words):
    """'0 1 2', '0-63', '5 10-12' -> a list of distinct seeds in the order given; at most MAX_ITEMS,
    counted before any range is expanded."""
    ranges = []
    for word in words:
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", word, flags=re.ASCII)
        if not match:
            raise UsageError(f"--seeds: {word!r} is not a seed (an integer >= 0) or a range like 0-63")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise UsageError(f"--seeds: range {word!r} runs backwards")
        ranges.append(range(first, last + 1))
    count = sum(len(r) for r in ranges)
    if count > MAX_ITEMS:
        raise UsageError(f"--seeds: {count} seeds; a run takes at most {MAX_ITEMS} items (prompts x seeds): split the sweep")
    seeds = [seed for r in ranges for seed in r]
    seen, duplicates = set(), set()
    for seed in seeds:
        (duplicates if seed in seen else seen).add(seed)
    duplicates = sorted(duplicates)
    if duplicates:
        raise UsageError(f"--seeds: {duplicates} given more than once")
    return seeds


def read_prompts_file(path):
    """Prompts of a UTF-8 file, one a line (lines end at "\n" only, an "\r" before it dropped; a byte
    order mark at the start is not part of the first line); blank lines and '#' lines skipped. Only a
    regular file of at most MAX_PROMPTS_FILE_BYTES is read: anything else (a FIFO, a device, a socket) is
    refused before it is opened."""
    data = _read_regular_file(path, "--prompts_file", MAX_PROMPTS_FILE_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UsageError(f"--prompts_file: {path} is not UTF-8 text (line {line}: {err.reason})") from None
    text = text.removeprefix("\ufeff")
    prompts = [line.strip() for line in text.split("\n")]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UsageError(f"--prompts_file: {path} holds no prompt (blank and # lines are skipped)")
    return prompts


def _file_kind(mode):
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def _check_regular(path, option, info, limit):
    if stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{option}: {path} is a folder; expected a text file")
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{option}: {path} is {_file_kind(info.st_mode)}, not a regular file; expected a text file")
    if info.st_size > limit:
        raise UsageError(f"{option}: {path} holds {info.st_size} bytes; expected a text file of at most "
                         f"{limit // 2**20} MiB")


def _read_regular_file(path, option, limit):
    """The bytes of the regular file ``path`` (symlinks followed) of at most ``limit`` bytes. Its kind
    and size are checked with os.stat before it is opened (opening a FIFO waits for a writer), again on
    the open file, and no more than ``limit`` bytes are ever read."""
    try:
        _check_regular(path, option, os.stat(path), limit)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise UsageError(f"{option}: {path} not found") from None
    except OSError as err:
        raise UsageError(f"{option}: {path} cannot be read ({err.strerror or err})") from None
    with os.fdopen(fd, "rb") as file:
        _check_regular(path, option, os.fstat(fd), limit)  # the file opened is the file checked
        try:
            data = file.read(limit + 1)
        except OSError as err:
            raise UsageError(f"{option}: {path} cannot be read ({err.strerror or err})") from None
    if len(data) > limit:
        raise UsageError(f"{option}: {path} holds more than {limit} bytes; expected a text file of at most "
                         f"{limit // 2**20} MiB")
    return data


def parse_layers(words, num_layers):
    """Layer indices in the order given, or 'all' -> every layer."""
    if list(words) == ["all"]:
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


def has_nvidia_gpu():
    """Whether this machine shows an NVIDIA driver and GPU (checked without importing torch)."""
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia"))


def parse_device(device, gpu_id, local_rank=None, gpu=None):
    """('cpu' or 'cuda:N', a note or None) from --device, else torchrun's LOCAL_RANK, else --gpu_id; without
    --device on a machine with no GPU (``gpu``: ``has_nvidia_gpu()`` when None), the CPU with a note that
    says so. Checked without importing torch."""
    gpu = has_nvidia_gpu() if gpu is None else gpu
    if device is None and not gpu:
        return "cpu", "no CUDA GPU found: running on the CPU (--device chooses)"
    name = device or (f"cuda:{local_rank}" if local_rank is not None else f"cuda:{gpu_id}")
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", name)
    if not match or (match[1] == "cpu" and match[2] is not None):
        raise UsageError(f"--device: {name!r} is not supported; expected cpu or cuda[:N] (e.g. cuda:0)")
    if match[1] == "cuda" and not gpu:
        raise UsageError(f"--device: {name} asked for, but CUDA is not available here (no NVIDIA GPU found); leave "
                         "--device out (the CPU) and use a small config such as configs/tiny.yaml")
    return ("cpu" if match[1] == "cpu" else f"cuda:{match[2] or 0}"), None


def _load_config(options):
    try:
        config = load_config(repo_file(options.config_path), str(REPO / DEFAULT_CONFIG), options.model_dir,
                             check_model=families.check_model)
    except ConfigError as err:
        raise UsageError(f"--config_path: {err}") from err
    if not config.get("random_init"):
        config.model_dir = repo_file(config.model_dir)  # the default wan_models/... of the repository from any folder
        model_dir = Path(config.model_dir)
        missing = [name for name in MODEL_FILES if not (model_dir / name).exists()]
        if missing:
            raise UsageError(f"--model_dir: {model_dir} lacks {', '.join(missing)}; it must hold {', '.join(MODEL_FILES)} "
                             "(the official Wan2.1-T2V-1.3B files); configs/tiny.yaml needs none")
    try:
        sizes = model_sizes(config)
    except ConfigError as err:
        raise UsageError(f"--model_dir: {err}") from err
    return config, sizes


def _prompts(options):
    prompts = list(options.prompt or [])
    if options.prompts_file is not None:
        prompts += read_prompts_file(options.prompts_file)
    if not prompts:
        prompts = [DEFAULT_PROMPT]
    if len(prompts) > MAX_ITEMS:
        raise UsageError(f"--prompt/--prompts_file: {len(prompts)} prompts; a run takes at most {MAX_ITEMS} items "
                         "(prompts x seeds): split the sweep")
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise UsageError(f"--prompt: prompt {empty[0]} is empty")
    return prompts


def _seeds(options):
    if options.seeds is not None and options.seed is not None:
        raise UsageError("--seed and --seeds given together; use --seeds for several seeds")
    seeds = parse_seeds(options.seeds) if options.seeds is not None else [DEFAULT_SEED if options.seed is None else options.seed]
    bad = [s for s in seeds if not 0 <= s < 2**32]
    if bad:
        raise UsageError(f"--seed: {bad[0]} is outside [0, 2**32)")
    return seeds


def _items(prompts, seeds):
    """The (prompt index, seed) items, each (prompt, seed) once: a prompt given again is run at its first
    index only; and the warning that says so, if one is."""
    first, again = {}, []
    for index, prompt in enumerate(prompts):
        if prompt in first:
            again.append((index, first[prompt]))
        else:
            first[prompt] = index
    count = len(first) * len(seeds)
    if count > MAX_ITEMS:
        raise UsageError(f"--prompt/--prompts_file x --seeds: {count} items (prompts x seeds); a run takes at most "
                         f"{MAX_ITEMS}: split the sweep")
    items = tuple((p, s) for p in first.values() for s in seeds)
    if not again:
        return items, ()
    shown = ", ".join(f"prompt {index} = prompt {earlier} ({_short(prompts[index])})" for index, earlier in again[:10])
    more = f", ... ({len(again)} in all)" if len(again) > 10 else ""
    return items, (f"duplicate (prompt, seed) items, each run once (at the first prompt's index): {shown}{more}",)


def _short(prompt, size=60):
    return repr(prompt if len(prompt) <= size else prompt[:size] + "...")


def _checkpoint(options, family, variant, random_init=False):
    """(checkpoint path or None, use_ema): the options' where given, else the variant's release's; none
    for a config of random weights (``random_init``) unless --checkpoint_path names one."""
    spec = variant.checkpoint
    if spec is None:
        if options.checkpoint_path is not None and not options.no_checkpoint:
            raise UsageError(f"--checkpoint_path: family {family.name} loads no generator checkpoint (the base weights "
                             "only); leave it out, or choose a family with one in the config")
        return None, True if options.use_ema is None else options.use_ema
    use_ema = spec.use_ema if options.use_ema is None else options.use_ema
    if use_ema and spec.ema_key is None:
        held = "the whole file is one state dict" if spec.key is None else f"only {spec.key!r}"
        raise UsageError(f"--use_ema: the checkpoint of {family.name} {variant.name} holds no EMA state dict ({held}); "
                         "leave --use_ema out")
    if options.no_checkpoint or (random_init and options.checkpoint_path is None):
        return None, use_ema
    path = options.checkpoint_path or (spec.default_path and repo_file(spec.default_path))
    if path is None:
        raise UsageError(f"--checkpoint_path: {family.name} {variant.name} has no released checkpoint; give one, or "
                         "--no_checkpoint for the base weights")
    if not Path(path).is_file():
        raise UsageError(f"--checkpoint_path: {path} not found; pass --no_checkpoint to run the base model without it")
    return path, use_ema


def _lora(options, family, variant, checkpoint_path):
    """The LoRA adapter to load on the checkpoint: the options' where given, else the variant's."""
    if variant.lora is None or checkpoint_path is None:
        if options.lora_path is not None:
            reason = "no LoRA adapter" if variant.lora is None else "no checkpoint here (--no_checkpoint) to adapt"
            raise UsageError(f"--lora_path: {family.name} {variant.name} loads {reason}; leave it out")
        return None
    path = options.lora_path or variant.lora.default_path
    if not Path(path).is_file():
        raise UsageError(f"--lora_path: {path} not found (the LoRA adapter of {family.name} {variant.name})")
    return path


def _switches(options, policy):
    """The prompt switches of --switch FRAME PROMPT, checked, by frame: ((frame, prompt), ...)."""
    if not options.switch:
        return ()
    if policy.recache_frames() is None:
        raise UsageError(f"--switch: the cache policy {policy.name} does not re-encode its cache on a prompt switch; "
                         "LongLive's does (model_kwargs.attention_mode: longlive)")
    switches = []
    for frame, prompt in options.switch:
        if not (frame.isascii() and frame.isdigit() and 0 < int(frame) < options.num_frames):
            raise UsageError(f"--switch: frame {frame!r}; expected a latent frame 1..{options.num_frames - 1}")
        if not prompt.strip():
            raise UsageError(f"--switch: the prompt at frame {frame} is empty")
        switches.append((int(frame), prompt))
    frames = [frame for frame, _ in switches]
    if len(set(frames)) != len(frames):
        raise UsageError(f"--switch: frame {sorted(f for f in frames if frames.count(f) > 1)[0]} given more than once")
    return tuple(sorted(switches))


def _call_labels(family, passes, blocks, num_blocks, num_steps):
    """Refuse a captured (block, pass) that no call of the family's loop carries; return the notes on
    labels that several calls carry (a rolling loop over fewer blocks than steps repeats levels: the
    capture keeps the last such call)."""
    calls = family.pass_calls(num_blocks, num_steps)
    missing = [(block, p) for block in blocks for p in passes if not calls.get((block, p))]
    if missing:
        block, p = missing[0]
        held = sorted(level for (b, level), count in calls.items() if b == block and count and level != CACHE_PASS)
        raise UsageError(f"--capture_blocks / --capture_step: no call of {family.name}'s {family.pipeline} loop has block "
                         f"{block} at pass {p!r} in a video of {num_blocks} blocks; block {block} is at levels {held} "
                         f"(and 'cache')")
    repeated = sorted({block for (block, p), count in calls.items() if count > 1 and p != CACHE_PASS})
    if not repeated:
        return []
    return [f"--num_frames: {num_blocks} blocks, fewer than the {num_steps} of a full window: the release's start windows "
            f"give blocks {repeated} some levels several times and others never (the capture keeps the last call of a "
            "(block, pass))"]


def plan_run(options, environ=os.environ):
    """Every check that needs no torch: config, arguments, files, the output. Returns the Plan.
    ``environ`` gives torchrun's RANK, WORLD_SIZE and LOCAL_RANK where set."""
    config, sizes = _load_config(options)
    per_block = int(config.num_frame_per_block)
    if options.num_frames <= 0 or options.num_frames % per_block:
        raise UsageError(f"--num_frames: {options.num_frames} is not a positive multiple of num_frame_per_block ({per_block})")
    if options.num_frames > ROPE_MAX_LEN:
        raise UsageError(f"--num_frames: {options.num_frames} latent frames; the RoPE table covers at most {ROPE_MAX_LEN}")
    num_layers = sizes["num_layers"]
    layers = parse_layers(options.layer_indices, num_layers)
    try:
        passes = parse_passes(options.capture_step, len(config.denoising_step_list))
    except ValueError as err:
        raise UsageError(f"--capture_step: {err}") from None
    try:
        blocks = parse_blocks(options.capture_blocks, options.num_frames // per_block)
    except ValueError as err:
        raise UsageError(f"--capture_blocks: {err}") from None
    prompts = _prompts(options)
    seeds = _seeds(options)
    family, variant = families.family_and_variant(config)
    checkpoint_path, use_ema = _checkpoint(options, family, variant, bool(config.get("random_init")))
    lora_path = _lora(options, family, variant, checkpoint_path)
    if options.threads is not None and options.threads < 1:
        raise UsageError(f"--threads: {options.threads}; expected a positive number")
    if options.threads is not None and options.threads > max_threads():
        raise UsageError(f"--threads: {options.threads}; expected 1..{max_threads()} (at most 4 per CPU, "
                         f"{MAX_THREADS} in all)")
    device, device_note = parse_device(options.device, options.gpu_id, environ.get("LOCAL_RANK"))
    precision = options.precision or ("exact" if device == "cpu" else "fast")
    dtype = options.dtype or ("float32" if device == "cpu" else "bfloat16")
    rank, world_size = int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1))
    items, warnings = _items(prompts, seeds)
    output_path = output_dir = None
    if len(items) > 1 or options.output_dir is not None:
        if options.output_path is not None:
            raise UsageError(f"--output_path: {len(items)} items (prompts x seeds) are written to --output_dir, one file each")
        if options.output_dir is None:
            raise UsageError(f"{len(items)} items (prompts x seeds): give --output_dir for their files")
        if not options.output_dir:
            raise UsageError("--output_dir: an empty name; give the sweep's folder")
        output_dir = Path(options.output_dir)
        check_output_dir(output_dir)
    else:
        if world_size > 1:
            raise UsageError(f"torchrun with {world_size} processes and one item: give several prompts or seeds and --output_dir")
        output_path = options.output_path or DEFAULT_OUTPUT
        try:
            check_output_path(output_path)
        except OutputPathError as err:
            raise UsageError(f"--output_path: {err}") from err
    kwargs = OmegaConf.to_container(config.get("model_kwargs") or OmegaConf.create({}))
    policy = families.cache_policy(kwargs, per_block)
    differences = families.schedule_differences(OmegaConf.to_container(config, resolve=True), variant)
    if variant.max_frames is not None and options.num_frames > variant.max_frames:
        differences.append(f"--num_frames {options.num_frames}: the release generates at most {variant.max_frames} "
                           "latent frames in one call")
    switches = _switches(options, policy)
    differences += _call_labels(family, passes, blocks, options.num_frames // per_block, len(config.denoising_step_list))
    return Plan(OmegaConf.merge(config, {"precision": precision}), policy, family, variant, checkpoint_path, use_ema,
                lora_path, switches, differences, prompts, seeds, layers, passes, blocks, num_layers, device, dtype, output_path, output_dir,
                rank=rank, world_size=world_size, items=items, warnings=warnings, notes=(device_note,) if device_note else ())


def check_output_dir(folder):
    """A sweep's folder: a folder, or a path whose nearest existing parent is a writable folder."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--output_dir: {folder} exists and is not a folder")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UsageError(f"--output_dir: {existing} is not a writable folder, so {folder} cannot be written")


def preflight(options, plan, device_free_bytes=None):
    """Refuse, with the numbers, what cannot fit the device (when ``device_free_bytes`` is known), the
    host or the output folder. The text encoder is left out of the run's estimate (it is freed before
    diffusion starts), but a random one, built first in host memory in fp32, must fit the host."""
    config = plan.config
    host = host_available_bytes()
    if config.get("random_init") and host is not None:
        fields = OmegaConf.to_container(config.text_encoder_config)
        sizes = {**UMT5_XXL, "vocab_size": BYTE_TOKENIZER_VOCAB, **fields}
        encoder = umt5_parameter_count(sizes) * 4
        if encoder > host:
            raise UsageError(f"not enough room for this run: the text encoder needs about {encoder / GB:.1f} GB of host "
                             f"memory (fp32, {umt5_parameter_count(sizes)} parameters) but {host / GB:.1f} GB are "
                             "available; use smaller text_encoder_config sizes")
    sizes = model_sizes(config)
    cpu = plan.device == "cpu"
    need = estimate(
        sizes, num_frames=options.num_frames,
        num_frame_per_block=plan.family.call_frames(int(config.num_frame_per_block), len(config.denoising_step_list)),
        height=int(config.height), width=int(config.width), cache_frames=plan.cache_policy.cache_frames(options.num_frames),
        num_captured_layers=len(plan.layers), num_kept_passes=len(plan.passes) * len(plan.blocks),
        save_mode=options.save_mode, dtype_bytes=4 if plan.dtype == "float32" else 2,
    )
    folder = plan.output_dir if plan.output_dir is not None else Path(plan.output_path).parent
    try:
        if cpu:  # the model, caches and the output all live in host memory
            check_fits(need, device_free_bytes=None if host is None else host - need.host_peak, host_available_bytes=host,
                       output_dir=folder, output_files=len(plan.my_items()))
        else:
            check_fits(need, device_free_bytes=device_free_bytes, host_available_bytes=host, output_dir=folder,
                       output_files=len(plan.my_items()))
    except PreflightError as err:
        raise UsageError(f"not enough room for this run: {err}") from err
