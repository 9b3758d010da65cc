"""Tests of utils/config.py: every rule of load_config on small YAML files written here (model_kwargs
checked by their owners, wan.families and wan.cache_policies), the shipped configs, model_sizes, and
that neither the module nor the owners of model_kwargs import torch."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import utils.config
from utils.config import ConfigError, model_sizes
from utils.wan21 import BYTE_TOKENIZER_VOCAB, WAN_T2V_1_3B
from wan.families import check_model, family_and_variant

CONFIGS = sorted(str(p) for p in Path("configs").glob("*.yaml") if p.name != "default_config.yaml")


def load_config(path, *args, **kwargs):
    return utils.config.load_config(path, *args, check_model=check_model, **kwargs)


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def tiny_with(tmp_path, **changes):
    """configs/tiny.yaml with top-level keys replaced by YAML values given as text."""
    config = yaml.safe_load(Path("configs/tiny.yaml").read_text())
    config.update({key: yaml.safe_load(value) for key, value in changes.items()})
    return write(tmp_path, yaml.safe_dump(config))


def refused(path, **kwargs):
    with pytest.raises(ConfigError) as error:
        load_config(path, **kwargs)
    message = str(error.value)
    assert isinstance(error.value, ValueError) and "\n" not in message
    return message


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_configs_validate(path):
    config = load_config(path)
    _, variant = family_and_variant(config)
    assert list(config.denoising_step_list) == list(variant.schedule.denoising_steps)
    assert config.num_frame_per_block == variant.schedule.num_frame_per_block


def test_import_is_light():
    code = "import sys, utils.config, wan.families; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_byte_tokenizer_vocab_matches_the_tokenizer():
    from utils.text_encoder import byte_tokenizer

    assert len(byte_tokenizer()) == BYTE_TOKENIZER_VOCAB


@pytest.mark.parametrize(
    "changes, key, value, expected",
    [
        ({"num_frame_per_block": "0"}, "num_frame_per_block", "0", "a positive int"),
        ({"num_frame_per_block": "-3"}, "num_frame_per_block", "-3", "a positive int"),
        ({"num_frame_per_block": "2.5"}, "num_frame_per_block", "2.5", "a positive int"),
        ({"height": "60"}, "height", "60", "a positive multiple of 16 pixels"),
        ({"width": "0"}, "width", "0", "a positive multiple of 16 pixels"),
        ({"denoising_step_list": "[]"}, "denoising_step_list", "[]", "non-empty list"),
        ({"denoising_step_list": "[1000, 1500]"}, "denoising_step_list", "[1000, 1500]", "integers in [1, 1000]"),
        ({"denoising_step_list": "[1000, 937.5]"}, "denoising_step_list", "[1000, 937.5]", "indexes 1000 - t"),
        ({"denoising_step_list": "[1000, 0]", "warp_denoising_step": "false"}, "denoising_step_list", "[1000, 0]", "numbers in (0, 1000]"),
        ({"denoising_step_list": "1000"}, "denoising_step_list", "1000", "non-empty list"),
        ({"warp_denoising_step": "'yes'"}, "warp_denoising_step", "'yes'", "true or false"),
        ({"context_noise": "-1"}, "context_noise", "-1", "[0, 1000]"),
        ({"independent_first_frame": "true"}, "independent_first_frame", "True", "not supported"),
        ({"random_init": "1"}, "random_init", "1", "true or false"),
        ({"init_seed": "-2"}, "init_seed", "-2", "an int in [0, 2**64)"),
    ],
)
def test_bad_top_level_values_name_file_key_value_and_expectation(tmp_path, changes, key, value, expected):
    path = tiny_with(tmp_path, **changes)
    message = refused(path)
    assert message.startswith(f"{path}: {key} = {value}; expected ") and expected in message


@pytest.mark.parametrize(
    "kwargs, key, expected",
    [
        ("{local_attn_size: 2}", "model_kwargs.local_attn_size = 2", "num_frame_per_block + sink_size = 3 + 0"),
        ("{local_attn_size: 3, sink_size: 1}", "model_kwargs.local_attn_size = 3", "overwrite the sink"),
        ("{local_attn_size: 0}", "model_kwargs.local_attn_size = 0", "-1 (global attention)"),
        ("{sink_size: 1}", "model_kwargs.sink_size = 1", "a sink needs a local window"),
        ("{local_attn_size: 6, sink_size: -1}", "model_kwargs.sink_size = -1", "an int >= 0"),
        ("{timestep_shift: 0}", "model_kwargs.timestep_shift = 0", "a number > 0"),
        ("{timestep_shift: 1.0e308}", "model_kwargs.timestep_shift = 1e+308", "a number > 0 and at most 1000"),
        ("{timestep_shift: 1000.5}", "model_kwargs.timestep_shift = 1000.5", "a number > 0 and at most 1000"),
        ("{timestep_shift: .inf}", "model_kwargs.timestep_shift = inf", "a number > 0"),
        ("{attn_window: 3}", "model_kwargs.attn_window = 3", "one of the known model_kwargs ['attention_mode', "
         "'attention_size', 'budget', 'cache_size', 'ema_precision', 'global_sink', 'local_attn_size', 'recent', 'sink_size', "
         "'timestep_shift', 'topc_max_reuse']"),
        ("{attention_mode: deep_sink}", "model_kwargs.local_attn_size = missing", "an int >= num_frame_per_block + sink_size"),
        ("{attention_mode: deep_sink, local_attn_size: 4, sink_size: 4}", "model_kwargs.local_attn_size = 4",
         "an int >= num_frame_per_block + sink_size = 3 + 4"),
        ("{attention_mode: participative_compression, local_attn_size: 21, sink_size: 10}",
         "model_kwargs.budget = missing", "a positive int (frames)"),
        ("{attention_mode: participative_compression, local_attn_size: 21, sink_size: 10, budget: 12, recent: 4}",
         "model_kwargs.budget = 12", "sink_size + recent <= budget <= local_attn_size, here 10 + 4 <= budget <= 21"),
        ("{attention_mode: rolling}", "model_kwargs.attention_mode = 'rolling'",
         "one of ['global', 'window', 'deep_sink', 'participative_compression', 'longlive', "
         "'reward_forcing', 'infinite_forcing', 'rolling_forcing']"),
        ("{attention_mode: global, local_attn_size: 5}", "model_kwargs.local_attn_size = 5", "-1 (global attention)"),
        ("{budget: 0}", "model_kwargs.budget = 0", "absent with attention_mode 'global'"),
        ("{local_attn_size: 6, budget: 4}", "model_kwargs.budget = 4", "absent with attention_mode 'window'"),
        ("{attention_mode: participative_compression, local_attn_size: 21, sink_size: 10, budget: 16, recent: 2}",
         "model_kwargs.recent = 2", "an int >= num_frame_per_block (3)"),
        ("{attention_mode: participative_compression, local_attn_size: 21, sink_size: 10, budget: 16, recent: 4, "
         "topc_max_reuse: 0}", "model_kwargs.topc_max_reuse = 0", "a positive int"),
        ("[1, 2]", "model_kwargs = [1, 2]", "a mapping"),
    ],
)
def test_bad_model_kwargs(tmp_path, kwargs, key, expected):
    path = tiny_with(tmp_path, model_kwargs=kwargs)
    message = refused(path)
    assert message.startswith(f"{path}: {key}; expected ") and expected in message


def test_valid_local_window_with_sink(tmp_path):
    config = load_config(tiny_with(tmp_path, model_kwargs="{local_attn_size: 4, sink_size: 1, timestep_shift: 3}"))
    assert config.model_kwargs.local_attn_size == 4


@pytest.mark.parametrize(
    "edit, key, expected",
    [
        (lambda c: c["model_config"].pop("dim"), "model_config.dim = missing", "a positive int"),
        (lambda c: c["model_config"].update(patch_size=[1, 2]), "model_config.patch_size = [1, 2]", "a list of 3 positive ints"),
        (lambda c: c["model_config"].update(num_heads=5), "model_config.dim = 64", "a multiple of model_config.num_heads (5)"),
        (lambda c: c["model_config"].update(num_heads=64), "model_config.dim = 64", "head dim, here 1) even"),
        (lambda c: c["model_config"].update(eps=0), "model_config.eps = 0", "a number > 0"),
        (lambda c: c["model_config"].update(layers=3), "model_config.layers = 3", "one of the CausalWanModel sizes"),
        (lambda c: c["model_config"].update(out_dim=8), "model_config.out_dim = 8", "equal to model_config.in_dim (16)"),
        (lambda c: c.pop("text_encoder_config"), "text_encoder_config = missing", "a mapping of UMT5 sizes"),
        (lambda c: c["text_encoder_config"].update(d_ff=0), "text_encoder_config.d_ff = 0", "a positive int"),
        (lambda c: c["text_encoder_config"].update(d_model=16), "text_encoder_config.d_model = 16", "model_config.text_dim (32)"),
        (lambda c: c["text_encoder_config"].update(vocab_size=100), "text_encoder_config.vocab_size = 100", "259"),
        (lambda c: c["text_encoder_config"].update(hidden=3), "text_encoder_config.hidden = 3", "one of ['text_len'"),
        (lambda c: c.update(random_init=False, model_dir=None), "model_dir = None", "a folder path"),
    ],
)
def test_bad_model_sizes(tmp_path, edit, key, expected):
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load("configs/tiny.yaml"))
    edit(config)
    path = write(tmp_path, OmegaConf.to_yaml(OmegaConf.create(config)))
    message = refused(path)
    assert message.startswith(f"{path}: {key}; expected ") and expected in message


def test_bad_value_from_the_defaults_names_the_default_file(tmp_path):
    text = Path("configs/default_config.yaml").read_text()
    assert "\ncontext_noise: 0\n" in text
    default = write(tmp_path, text.replace("\ncontext_noise: 0\n", "\ncontext_noise: 2000\n"), "default.yaml")
    tiny = yaml.safe_load(Path("configs/tiny.yaml").read_text())
    del tiny["context_noise"]
    message = refused(write(tmp_path, yaml.safe_dump(tiny)), default_path=default)
    assert message.startswith(f"{default}: context_noise = 2000; expected ")


def test_interpolations_are_resolved_and_a_broken_one_names_the_key(tmp_path):
    good = tiny_with(tmp_path, block="3", num_frame_per_block="${block}")
    assert load_config(good).num_frame_per_block == 3
    broken = tiny_with(tmp_path, num_frame_per_block="${blocks}")
    message = refused(broken)
    assert message.startswith(f"{broken}: num_frame_per_block = '${{blocks}}': the interpolation cannot be resolved")
    assert "blocks" in message


def test_model_dir_argument_replaces_the_config_value(tmp_path):
    assert load_config("configs/self_forcing_dmd.yaml", model_dir="elsewhere/wan").model_dir == "elsewhere/wan"


def test_unreadable_files(tmp_path):
    assert refused(tmp_path / "none.yaml") == f"{tmp_path / 'none.yaml'}: config file not found"
    bad = write(tmp_path, "a: [1, 2\n")
    assert refused(bad).startswith(f"{bad}: not a readable YAML config (")
    listed = write(tmp_path, "- 1\n- 2\n")
    assert refused(listed) == f"{listed}: holds a list at the top level; expected a mapping of keys"


def test_unknown_top_level_keys_are_kept(tmp_path):
    assert load_config(tiny_with(tmp_path, lr_critic="4.0e-07", trainer="score_distillation")).trainer == "score_distillation"


def test_model_sizes_from_model_config_and_from_config_json(tmp_path):
    tiny = model_sizes(load_config("configs/tiny.yaml"))
    assert tiny["dim"] == 64 and tiny["num_layers"] == 6 and tiny["patch_size"] == (1, 2, 2)
    folder = tmp_path / "wan"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t2v", **{k: WAN_T2V_1_3B[k] for k in (
        "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "out_dim", "num_heads", "num_layers", "eps")}, "num_layers": 2}))
    sizes = model_sizes(load_config("configs/self_forcing_dmd.yaml", model_dir=str(folder)))
    assert sizes == dict(WAN_T2V_1_3B, num_layers=2)


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "model config file not found"),
        ("{not json", "not a readable JSON model config"),
        ("[1]", "holds a list; expected a JSON object"),
        ('{"dim": 1536}', "text_len = 'missing'; expected a positive int"),
    ],
)
def test_model_sizes_bad_config_json_names_the_file(tmp_path, content, expected):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'config.json'}: {expected}")):
        model_sizes(load_config("configs/self_forcing_dmd.yaml", model_dir=str(tmp_path)))


@pytest.mark.parametrize(
    "key, value, expected",
    [("precision", "turbo", "one of ('exact', 'fast')"), ("compile", "2", "true, false or null")],
)
def test_bad_numerics_keys(tmp_path, key, value, expected):
    path = tiny_with(tmp_path, **{key: value})
    message = refused(path)
    assert message.startswith(f"{path}: {key} = ") and expected in message


def test_deep_forcing_modes_validate(tmp_path):
    kwargs = "{attention_mode: participative_compression, local_attn_size: 21, sink_size: 10, budget: 16, recent: 4}"
    config = load_config(tiny_with(tmp_path, model_kwargs=kwargs, precision="fast"))
    assert config.model_kwargs.budget == 16 and config.precision == "fast"


HUGE = 10**9


@pytest.mark.parametrize("section, key", [
    *(("model_config", key) for key in ("text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim",
                                         "num_heads", "num_layers")),
    *(("text_encoder_config", key) for key in ("text_len", "vocab_size", "d_model", "d_kv", "d_ff", "num_layers",
                                                "num_heads", "relative_attention_num_buckets",
                                                "relative_attention_max_distance")),
])
@pytest.mark.parametrize("value", [HUGE, 10**10])
def test_every_model_and_text_encoder_size_is_range_checked(tmp_path, section, key, value):
    """A size far past the official UMT5-XXL / Wan ones is refused when the config is loaded (before
    anything is built), naming it, instead of a MemoryError or minutes of building."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load("configs/tiny.yaml"))
    config[section][key] = value
    path = write(tmp_path, OmegaConf.to_yaml(OmegaConf.create(config)))
    message = refused(path)
    assert message.startswith(f"{path}: {section}.{key} = {value}; expected a positive int <= "), message


@pytest.mark.parametrize("patch", [[1, 2, HUGE], [HUGE, 2, 2], [1, 100, 2]])
def test_patch_size_is_range_checked(tmp_path, patch):
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load("configs/tiny.yaml"))
    config["model_config"]["patch_size"] = patch
    path = write(tmp_path, OmegaConf.to_yaml(OmegaConf.create(config)))
    assert refused(path).startswith(f"{path}: model_config.patch_size = {patch}; expected a list of 3 positive ints")


def test_official_sizes_are_within_the_limits():
    from utils.wan21 import MODEL_SIZE_LIMITS, UMT5_XXL, UMT5_SIZE_LIMITS

    assert all(WAN_T2V_1_3B[k] <= limit for k, limit in MODEL_SIZE_LIMITS.items() if k != "patch_size")
    assert all(UMT5_XXL[k] <= limit for k, limit in UMT5_SIZE_LIMITS.items() if k in UMT5_XXL)
    # Wan2.1-T2V-14B
    assert 5120 <= MODEL_SIZE_LIMITS["dim"] and 13824 <= MODEL_SIZE_LIMITS["ffn_dim"] and 40 <= MODEL_SIZE_LIMITS["num_layers"]


def test_config_json_sizes_are_range_checked(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t2v", **{k: WAN_T2V_1_3B[k] for k in (
        "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "out_dim", "num_heads", "num_layers")}, "num_layers": HUGE}))
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'config.json'}: num_layers = {HUGE}; expected a positive int <= ")):
        model_sizes(load_config("configs/self_forcing_dmd.yaml", model_dir=str(tmp_path)))


@pytest.mark.parametrize("key", ["height", "width"])
def test_frame_past_the_rope_grid_is_refused(tmp_path, key):
    """Rows or columns of latent patches past the RoPE table (1024 positions) fail at run time."""
    from utils.wan21 import ROPE_MAX_LEN

    too_big = 16 * (ROPE_MAX_LEN + 1)  # tiny: VAE stride 8 x patch 2
    message = refused(tiny_with(tmp_path, **{key: str(too_big)}))
    assert f"{key} = {too_big}; expected a positive multiple of 16 pixels" in message and f"{16 * ROPE_MAX_LEN}" in message
    assert load_config(tiny_with(tmp_path, **{key: str(16 * ROPE_MAX_LEN)}))[key] == 16 * ROPE_MAX_LEN
