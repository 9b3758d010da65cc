"""The official Wan2.1-T2V-1.3B release as this project reads it: its folder layout, the sizes of its
transformer and text encoder, its ``config.json`` and the geometry of its VAE. Defined here once, for
the config checks, the pre-flight estimate, the loaders and the model; standard library only (no
torch), so that everything is checked before anything heavy is imported.
"""
import json
import math
from pathlib import Path

# The files of the official model folder (wan_models/Wan2.1-T2V-1.3B/).
MODEL_CONFIG_FILE = "config.json"
TRANSFORMER_FILE = "diffusion_pytorch_model.safetensors"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER_DIR = "google/umt5-xxl"
VAE_FILE = "Wan2.1_VAE.pth"
MODEL_FILES = (MODEL_CONFIG_FILE, TRANSFORMER_FILE, T5_FILE, T5_TOKENIZER_DIR + "/")  # what inference reads

VAE_STRIDE = 8  # the VAE downsamples height and width 8x
ROPE_MAX_LEN = 1024  # positions of the RoPE table (wan.modules.causal_model.RoPE3D): latent frames, patch rows, patch columns

# CausalWanModel arguments of Wan2.1-T2V-1.3B. The official config.json holds the sizes in
# CONFIG_JSON_SIZES (and eps); text_dim and patch_size are not in it and come from here.
WAN_T2V_1_3B = dict(
    patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=1536, ffn_dim=8960, freq_dim=256, text_dim=4096,
    out_dim=16, num_heads=12, num_layers=30, qk_norm=True, cross_attn_norm=True, eps=1e-6,
)
CONFIG_JSON_SIZES = ("text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "out_dim", "num_heads", "num_layers")

# UMT5Config of Wan's umt5_xxl(encoder_only=True).
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
)
BYTE_TOKENIZER_VOCAB = 259  # utils.text_encoder.byte_tokenizer: 3 special tokens + 256 bytes

# The largest size accepted for each CausalWanModel / UMT5 size: a few times the official ones (Wan2.1
# 1.3B and 14B: dim 1536 / 5120, ffn_dim 8960 / 13824, 30 / 40 layers; UMT5-XXL above), so that a typo
# (1e10) is refused when the config is read instead of as a MemoryError or minutes of building.
TEXT_LEN_LIMIT = 4096  # prompt tokens
MODEL_SIZE_LIMITS = dict(
    patch_size=16, text_len=TEXT_LEN_LIMIT, in_dim=1024, dim=32768, ffn_dim=131072, freq_dim=8192, text_dim=32768,
    out_dim=1024, num_heads=1024, num_layers=1024,
)
UMT5_SIZE_LIMITS = dict(
    text_len=TEXT_LEN_LIMIT, vocab_size=4 * UMT5_XXL["vocab_size"], d_model=MODEL_SIZE_LIMITS["text_dim"], d_kv=1024,
    d_ff=131072, num_layers=1024, num_heads=1024, relative_attention_num_buckets=4096,
    relative_attention_max_distance=65536,
)


class ModelConfigError(ValueError):
    """The model folder's config.json is missing, unreadable or holds sizes the model cannot take."""


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def latent_frame_tokens(latent_height, latent_width, patch_size):
    """Tokens of one latent frame of ``latent_height`` x ``latent_width``: one per (rows, columns) patch."""
    _, ph, pw = patch_size
    return (latent_height // ph) * (latent_width // pw)


def frame_seq_length(height, width, patch_size):
    """Tokens of one latent frame of a video of ``height`` x ``width`` pixels (the VAE downsamples 8x)."""
    return latent_frame_tokens(height // VAE_STRIDE, width // VAE_STRIDE, patch_size)


def read_model_config(model_dir):
    """The CausalWanModel sizes of ``<model_dir>/config.json`` (patch_size as a tuple): the sizes it
    holds, checked, and the official model's for those it does not (text_dim, patch_size, the norms).
    Raises ``ModelConfigError`` naming the file."""
    path = Path(model_dir) / MODEL_CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ModelConfigError(f"{path}: model config file not found (model_dir = {str(model_dir)!r})") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelConfigError(f"{path}: not a readable JSON model config ({err})") from err
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{path}: holds a {type(raw).__name__}; expected a JSON object of model sizes")
    if raw.get("model_type", "t2v") != "t2v":
        raise ModelConfigError(f"{path}: model_type {raw['model_type']!r}; only 't2v' is supported")
    for key in CONFIG_JSON_SIZES:
        if not _positive_int(raw.get(key)):
            raise ModelConfigError(f"{path}: {key} = {raw.get(key, 'missing')!r}; expected a positive int")
        if raw[key] > MODEL_SIZE_LIMITS[key]:
            raise ModelConfigError(f"{path}: {key} = {raw[key]!r}; expected a positive int <= {MODEL_SIZE_LIMITS[key]}")
    eps = raw.get("eps", WAN_T2V_1_3B["eps"])
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ModelConfigError(f"{path}: eps = {eps!r}; expected a number > 0")
    return dict(WAN_T2V_1_3B, **{key: raw[key] for key in (*CONFIG_JSON_SIZES, "eps") if key in raw})
