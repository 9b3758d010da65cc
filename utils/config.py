"""The inference config: loaded, merged and checked before anything heavy is imported.

``load_config`` merges the chosen YAML file onto the defaults (as upstream Self-Forcing does), resolves
every ``${...}`` interpolation, and checks every value the inference reads, so that a bad value is
reported at once, in one line naming the file, the key, the value and what was expected, instead of
as a traceback minutes later. ``model_sizes`` gives the transformer sizes for a pre-flight estimate.
Only the standard library and omegaconf are imported here (no torch).
"""
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from utils.output import one_line
from utils.wan21 import (BYTE_TOKENIZER_VOCAB, MODEL_SIZE_LIMITS, ROPE_MAX_LEN, UMT5_SIZE_LIMITS, UMT5_XXL, VAE_STRIDE,
                         WAN_T2V_1_3B, ModelConfigError, read_model_config)

DEFAULT_CONFIG = "configs/default_config.yaml"
NUM_TRAIN_TIMESTEPS = 1000
MODEL_DIR_SOURCE = "the model_dir argument"  # how errors name a model_dir given beside the config


class ConfigError(ValueError):
    """A config file is missing, unreadable, or holds a value the inference cannot run with."""


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _positive_int(value):
    return _is_int(value) and value > 0


PRECISIONS = ("exact", "fast")

# CausalWanModel arguments that model_config may hold with random_init -> what each must be. Sizes are
# capped (utils.wan21.MODEL_SIZE_LIMITS), so that nothing absurd is built or estimated.
MODEL_CONFIG = {
    **{key: f"a positive int <= {MODEL_SIZE_LIMITS[key]}"
       for key in ("text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim", "num_heads", "num_layers")},
    "patch_size": f"a list of 3 positive ints <= {MODEL_SIZE_LIMITS['patch_size']} (frames, rows, columns)",
    "eps": "a number > 0",
    "qk_norm": "true or false",
    "cross_attn_norm": "true or false",
}
REQUIRED_MODEL_CONFIG = [key for key in MODEL_CONFIG if key not in ("qk_norm", "cross_attn_norm")]


def _size_ok(value, limit):
    return _positive_int(value) and value <= limit


def _model_config_value_ok(key, value):
    if key == "patch_size":
        return isinstance(value, list) and len(value) == 3 and all(_size_ok(v, MODEL_SIZE_LIMITS[key]) for v in value)
    if key == "eps":
        return _is_number(value) and value > 0
    if key in ("qk_norm", "cross_attn_norm"):
        return isinstance(value, bool)
    return _size_ok(value, MODEL_SIZE_LIMITS[key])


def _lookup(tree, key):
    """(True, value) for a dotted key present in the plain nested dict ``tree``, else (False, None)."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False, None
        tree = tree[part]
    return True, tree


def _origin(sources, key):
    """(name, raw value) of the last of ``sources`` ([(name, plain dict)] in merge order: the defaults,
    a base config, the chosen config, then any override) that sets ``key``; (the chosen config, None)
    if none does."""
    for name, tree in reversed(sources):
        found, value = _lookup(tree, key)
        if found:
            return name, value
    return [name for name, _ in sources if name != MODEL_DIR_SOURCE][-1], None


class _Checker:
    """Checks the plain (resolved) merged config; errors name the file that set the key."""

    def __init__(self, values, sources):
        self.values = values
        self.sources = sources

    def fail(self, key, value, expected):
        shown = repr(value) if _lookup(self.values, key)[0] else "missing"
        raise ConfigError(f"{_origin(self.sources, key)[0]}: {key} = {shown}; expected {expected}")

    def get(self, key, default=None):
        found, value = _lookup(self.values, key)
        return value if found else default

    def require(self, key, ok, expected, default=None):
        value = self.get(key, default)
        if not ok(value):
            self.fail(key, value, expected)
        return value


def _check_schedule(c):
    warp = c.require("warp_denoising_step", lambda v: isinstance(v, bool), "true or false", default=False)
    if warp:
        step_ok = lambda s: _is_int(s) and 1 <= s <= NUM_TRAIN_TIMESTEPS
        expected = ("a non-empty list of integers in [1, 1000]: with warp_denoising_step true each step t "
                    "indexes 1000 - t into the 1000 training timesteps")
    else:
        step_ok = lambda s: _is_number(s) and 0 < s <= NUM_TRAIN_TIMESTEPS
        expected = "a non-empty list of timesteps, numbers in (0, 1000]"
    for key in ("denoising_step_list", "denoising_step_list_first_chunk"):  # the second: the first block's, optional
        c.require(key, lambda v, key=key: (v is None and key != "denoising_step_list")
                  or (isinstance(v, list) and v and all(step_ok(s) for s in v)), expected)
    c.require("context_noise", lambda v: _is_number(v) and 0 <= v <= NUM_TRAIN_TIMESTEPS,
              "a timestep in [0, 1000] (of the clean cache-update pass)", default=0)
    c.require("independent_first_frame", lambda v: v is False,
              "false (an independent first frame is not supported: text-to-video uses equal blocks)", default=False)
    return c.require("num_frame_per_block", _positive_int, "a positive int (latent frames per block)")


def _check_model(c, per_block, check_model):
    c.require("model_kwargs", lambda v: v is None or isinstance(v, dict), "a mapping of model options", default=None)
    problem = check_model(c.values, per_block)
    if problem is not None:
        key, expected = problem
        c.fail(key, c.get(key), expected)


def _check_random_model(c):
    """The model_config and text_encoder_config of a random_init config; returns the patch size."""
    sizes = c.require("model_config", lambda v: isinstance(v, dict), "a mapping of CausalWanModel sizes (random_init is true)")
    unknown = sorted(set(sizes) - set(MODEL_CONFIG))
    if unknown:
        c.fail(f"model_config.{unknown[0]}", sizes[unknown[0]], f"one of the CausalWanModel sizes {sorted(MODEL_CONFIG)}")
    for key in MODEL_CONFIG:
        if key in REQUIRED_MODEL_CONFIG or key in sizes:
            c.require(f"model_config.{key}", lambda v, key=key: _model_config_value_ok(key, v), MODEL_CONFIG[key])
    dim, heads = sizes["dim"], sizes["num_heads"]
    if dim % heads:
        c.fail("model_config.dim", dim, f"a multiple of model_config.num_heads ({heads})")
    if (dim // heads) % 2:
        c.fail("model_config.dim", dim, f"dim / num_heads (the head dim, here {dim // heads}) even, for the rotary embedding")
    if sizes["freq_dim"] % 2:
        c.fail("model_config.freq_dim", sizes["freq_dim"], "an even int (half cosines, half sines)")
    if sizes["out_dim"] != sizes["in_dim"]:
        c.fail("model_config.out_dim", sizes["out_dim"], f"equal to model_config.in_dim ({sizes['in_dim']}): the flow has the latent's channels")
    _check_random_text_encoder(c, sizes["text_dim"])
    return tuple(sizes["patch_size"])


def _check_random_text_encoder(c, text_dim):
    fields = c.require("text_encoder_config", lambda v: isinstance(v, dict), "a mapping of UMT5 sizes (random_init is true)")
    allowed = ["text_len", "init_seed", *UMT5_XXL]
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        c.fail(f"text_encoder_config.{unknown[0]}", fields[unknown[0]], f"one of {allowed}")
    limit = UMT5_SIZE_LIMITS["text_len"]
    c.require("text_encoder_config.text_len", lambda v: _size_ok(v, limit), f"a positive int <= {limit} (prompt tokens)")
    for key, default in UMT5_XXL.items():
        if key in fields and _is_int(default):
            limit = UMT5_SIZE_LIMITS[key]
            c.require(f"text_encoder_config.{key}", lambda v, limit=limit: _size_ok(v, limit), f"a positive int <= {limit}")
    if "init_seed" in fields:
        c.require("text_encoder_config.init_seed", lambda v: _is_int(v) and 0 <= v < 2**64, "an int in [0, 2**64)")
    c.require("text_encoder_config.vocab_size", lambda v: v >= BYTE_TOKENIZER_VOCAB,
              f"at least the built-in tokenizer's {BYTE_TOKENIZER_VOCAB} tokens", default=BYTE_TOKENIZER_VOCAB)
    c.require("text_encoder_config.d_model", lambda v: v == text_dim,
              f"equal to model_config.text_dim ({text_dim}): the transformer reads the encoder's output", default=UMT5_XXL["d_model"])


def _check_frame_size(c, patch_size):
    for key, patch, patches in (("height", patch_size[1], "rows"), ("width", patch_size[2], "columns")):
        step = VAE_STRIDE * patch
        most = step * ROPE_MAX_LEN  # the RoPE table has ROPE_MAX_LEN positions per axis
        c.require(key, lambda v: _positive_int(v) and v % step == 0 and v <= most,
                  f"a positive multiple of {step} pixels (VAE stride {VAE_STRIDE} x patch size {patch}) up to {most} "
                  f"(the RoPE table's {ROPE_MAX_LEN} {patches} of patches)")


def _validate(config, sources, check_model):
    """Raise ``ConfigError`` unless the resolved, merged ``config`` holds valid values for everything
    the inference reads. ``sources``: [(file name, its plain dict)] in merge order, to name the file
    that set a bad key."""
    c = _Checker(OmegaConf.to_container(config, resolve=True), sources)
    per_block = _check_schedule(c)
    _check_model(c, per_block, check_model)
    c.require("init_seed", lambda v: _is_int(v) and 0 <= v < 2**64, "an int in [0, 2**64) (seed of the random weights)", default=0)
    if c.require("random_init", lambda v: isinstance(v, bool), "true or false", default=False):
        patch_size = _check_random_model(c)
    else:
        c.require("model_dir", lambda v: isinstance(v, str) and v.strip(), "a folder path (the official Wan2.1 files)")
        patch_size = WAN_T2V_1_3B["patch_size"]
    _check_frame_size(c, patch_size)
    c.require("precision", lambda v: v in PRECISIONS, f"one of {PRECISIONS}", default="exact")
    c.require("compile", lambda v: v is None or isinstance(v, bool), "true, false or null (null: on for fast on a GPU)",
              default=None)


def _read_yaml(path):
    if not Path(path).is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:
        raise ConfigError(f"{path}: not a readable YAML config ({one_line(err)})") from err
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: holds a list at the top level; expected a mapping of keys")
    return loaded


def _with_base(config_path):
    """[(file name, its config)] of ``config_path`` in merge order: the config named by its ``base`` key
    (a path relative to it; a base has no base of its own), then the config itself without the key. A
    variant of a config states only what differs."""
    chosen = _read_yaml(config_path)
    if "base" not in chosen:
        return [(str(config_path), chosen)]
    base = chosen.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{config_path}: base = {base!r}; expected the path of a config file, relative to this one")
    base_path = Path(config_path).parent / base
    base_config = _read_yaml(base_path)
    if "base" in base_config:
        raise ConfigError(f"{base_path}: base = {base_config.base!r}; a base config (of {config_path}) cannot have a base")
    return [(str(base_path), base_config), (str(config_path), chosen)]


def load_config(config_path, default_path=DEFAULT_CONFIG, model_dir=None, *, check_model) -> DictConfig:
    """``config_path`` merged onto ``default_path`` (OmegaConf.merge; onto its ``base`` config first, when
    it names one), ``model_dir`` (where given)
    replacing the config's, every interpolation resolved, every value the inference reads checked.
    Keys the inference does not read (upstream's training keys) are kept as they are. Raises
    ``ConfigError`` naming the file, the key, the value and what was expected.

    ``family``, ``variant`` and ``model_kwargs`` belong to the model's owners in wan/ (the model family,
    its schedule and the cache policy), which this floor does not import: ``check_model(config,
    num_frame_per_block)`` gets the plain config and returns (dotted key, what was expected) for a bad
    value, else None (``wan.families.check_model``)."""
    layers = [(str(default_path), _read_yaml(default_path)), *_with_base(config_path)]
    try:
        config = OmegaConf.merge(*(layer for _, layer in layers))
    except OmegaConfBaseException as err:
        raise ConfigError(f"{config_path}: cannot be merged onto {default_path} ({one_line(err)})") from err
    sources = [(name, OmegaConf.to_container(layer)) for name, layer in layers]
    if model_dir is not None:
        config.model_dir = model_dir
        sources.append((MODEL_DIR_SOURCE, {"model_dir": model_dir}))
    try:
        OmegaConf.resolve(config)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        where, raw = _origin(sources, key)
        raise ConfigError(f"{where}: {key} = {raw!r}: the interpolation cannot be resolved ({one_line(err)})") from err
    _validate(config, sources, check_model)
    return config


def model_sizes(config) -> dict:
    """The transformer's CausalWanModel sizes (patch_size as a tuple): ``model_config`` with
    ``random_init``, else those of ``<model_dir>/config.json`` (``utils.wan21.read_model_config``).
    Raises ``ConfigError`` naming the file."""
    if config.get("random_init"):
        sizes = dict(WAN_T2V_1_3B, **OmegaConf.to_container(config.model_config))
        return dict(sizes, patch_size=tuple(sizes["patch_size"]))
    try:
        return read_model_config(config.model_dir)
    except ModelConfigError as err:
        raise ConfigError(str(err)) from err
