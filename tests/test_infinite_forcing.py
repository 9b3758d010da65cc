"""Infinite-Forcing (wan/families/infinite_forcing.py, wan/cache_policies/infinite_forcing.py,
wan/modules/infinite_forcing.py) against the facts of its release
(shared/reference/families/infinite-forcing-facts.md).

Independent references written here: the replay of facts §3 (which frames each block attends to, at
which RoPE positions, the queries' position); a dense attention over the whole video with the replay's
key sets (tests/test_reward_forcing.py's); checkpoint files in the release's layout (FSDP names,
``generator_ema``).
"""
import random
import re
from pathlib import Path

import pytest
import torch

import experiments.run_extraction_figure4 as cli
from pipeline import plan as plan_module
from pipeline.plan import UsageError
from pipeline.wrappers import WanDiffusionWrapper, load_generator_checkpoint
from tests.test_families import load_config
from tests.test_reward_forcing import drive, extract, run_against_dense, zeroed
from utils.attention_cache import CACHED, SINK, open_cache
from utils.loading import WeightFileError
from wan.cache_policies import policy_from_kwargs
from wan.cache_policies.base import CacheLayout
from wan.families import FAMILIES

REPO = Path(__file__).resolve().parents[1]
PER_BLOCK = 3
RELEASE = dict(attention_mode="infinite_forcing", local_attn_size=6, sink_size=1)


def infinite_forcing_replay(block):
    """Facts §3 for block ``block`` of 3-frame blocks, W 6, S 1: ([(video frame, RoPE position)] of the
    attended keys in order, the queries' first RoPE position, 0 sink blends, []). Block 0 attends to
    itself at 0-2, block 1 to frames 0-5 at 0-5; from block 2 on, frame 0 at 0, the two frames before
    the block at 1-2 and the block at 3-5."""
    cs = PER_BLOCK * block
    if block < 2:
        return [(f, f) for f in range(cs + PER_BLOCK)], cs, 0, []
    return [(0, 0), *((f, 1 + i) for i, f in enumerate(range(cs - 2, cs + 3)))], 3, 0, []


@pytest.mark.parametrize("frames, window", [(21, [16, 17, 18, 19, 20]), (33, [28, 29, 30, 31, 32]),
                                            (120, [115, 116, 117, 118, 119])])
def test_replay_states_the_facts_last_blocks(frames, window):
    keys, query_start, _, _ = infinite_forcing_replay(frames // 3 - 1)
    assert keys == [(0, 0), *zip(window, range(1, 6))] and query_start == 3


@pytest.mark.parametrize("frames", [21, 33, 120])
def test_cache_key_sets_and_positions_per_pass(frames):
    fsl = 2
    cache = policy_from_kwargs(RELEASE, PER_BLOCK).new_cache(CacheLayout(1, frames, fsl, 2, 16, torch.bfloat16, "cpu", None))
    state = random.getstate()

    def check(block, step, cache, keys, values, clean, k, v):
        expected, query_start, _, _ = infinite_forcing_replay(block)
        cs = PER_BLOCK * block
        assert cache.key_frames() == [f for f, _ in expected]
        video, rope = cache.key_positions()
        assert video[0, ::fsl].tolist() == [f for f, _ in expected] and rope[0, ::fsl].tolist() == [p for _, p in expected]
        assert cache.rope_starts() == (query_start, 0)
        assert cache.key_roles()[0, ::fsl].tolist() == [SINK] + [CACHED] * (len(expected) - 1)
        current = {cs + i: (k[:, i * fsl : (i + 1) * fsl], v[:, i * fsl : (i + 1) * fsl]) for i in range(3)}
        for slot, (frame, _) in enumerate(expected):  # raw keys as written: the V-sink is frame 0's clean key
            tokens = slice(slot * fsl, (slot + 1) * fsl)
            want_k, want_v = current[frame] if frame >= cs else clean[frame]
            assert torch.equal(keys[:, tokens], want_k) and torch.equal(values[:, tokens], want_v), (block, step, frame)

    drive(cache, frames, fsl, torch.bfloat16, check)
    assert random.getstate() == state  # no random sink frame drawn (facts §3: the branch cannot run at inference)


def test_model_equals_dense_attention_with_the_replay(monkeypatch):
    def absolute(block):  # Self-Forcing's positions: every key at its own frame, the queries at cs
        keys, _, _, _ = infinite_forcing_replay(block)
        return [(f, f) for f, _ in keys], PER_BLOCK * block, 0, []

    run_against_dense(monkeypatch, RELEASE, infinite_forcing_replay, 21, 0, absolute)


# ------------------------------------------------------------------------------------------------
# Checkpoint layout


@pytest.fixture(scope="module")
def generator():
    return WanDiffusionWrapper.from_config(load_config(REPO / "configs/tiny_infinite_forcing.yaml"))


def fsdp_names(state):
    """Keys as FSDP-wrapped training names them: the wrapper's name after ``model.`` and after each
    transformer block (facts §1: the release deletes every ``._fsdp_wrapped_module``)."""
    named = {}
    for name, value in state.items():
        name = name.replace("model.", "model._fsdp_wrapped_module.", 1)
        name = re.sub(r"(blocks\.\d+)\.", r"\1._fsdp_wrapped_module.", name)
        named[name] = value.clone()
    return named


def test_checkpoint_ema_with_fsdp_names_loads_strictly(tmp_path, generator):
    spec = FAMILIES["infinite_forcing"].variant().checkpoint
    assert spec.default_path == "checkpoints/ema_model.pt" and spec.use_ema
    path = tmp_path / "ema_model.pt"
    torch.save({"generator_ema": fsdp_names(generator.state_dict())}, path)
    assert "model._fsdp_wrapped_module.blocks.0._fsdp_wrapped_module.self_attn.q.weight" in torch.load(path)["generator_ema"]
    target = zeroed("configs/tiny_infinite_forcing.yaml")
    assert load_generator_checkpoint(target, path, use_ema=True, spec=spec) == "generator_ema"
    for (name, value), (_, loaded) in zip(generator.state_dict().items(), target.state_dict().items()):
        assert torch.equal(value, loaded), name
    plain = tmp_path / "plain.pt"  # without EMA: refused, not silently the other state dict (the release's fallback)
    torch.save({"generator": fsdp_names(generator.state_dict())}, plain)
    with pytest.raises(WeightFileError, match=re.escape(f"{plain}: no 'generator_ema' state dict (use --no-use_ema for "
                                                        "'generator')")):
        load_generator_checkpoint(target, plain, use_ema=True, spec=spec)
    assert load_generator_checkpoint(target, plain, use_ema=False, spec=spec) == "generator"
    other = tmp_path / "other.pt"
    torch.save({"generator_ema": {n.replace("model.", "module.", 1): v for n, v in generator.state_dict().items()}}, other)
    with pytest.raises(WeightFileError, match=re.escape(f"{other} ['generator_ema']") + ".*missing keys: model.patch_embedding"):
        load_generator_checkpoint(target, other, use_ema=True, spec=spec)


def test_cli_capture_labels_each_key_token(tmp_path, capsys):
    # a config of random weights loads no checkpoint; real weights default to the release's file
    options = plan_module.options_from_args(cli.parse_args([]))
    family = FAMILIES["infinite_forcing"]
    with pytest.raises(UsageError, match=re.escape("--checkpoint_path: checkpoints/ema_model.pt not found")):
        plan_module._checkpoint(options, family, family.variant("vsink1"))
    out = extract(tmp_path, "tiny_infinite_forcing", 21, "inf.pt", "--capture_step", "all", "--capture_blocks", "1", "last")
    cache = open_cache(out)
    assert cache.metadata["family"] == "infinite_forcing" and cache.metadata["use_ema"] is True
    fsl = cache.frame_seq_length
    for entry in cache.entries:
        expected, _, _, _ = infinite_forcing_replay(entry.block)
        assert entry.key_video_frames[0].tolist() == [f for f, _ in expected for _ in range(fsl)]
        assert entry.key_rope_frames[0].tolist() == [p for _, p in expected for _ in range(fsl)]
        assert entry.key_roles[0, ::fsl].tolist() == [SINK] + [CACHED] * (len(expected) - 1)
        assert entry.sink_updates == 0

    from utils.figure4_plot import true_frame_axis

    axis = true_frame_axis(cache.entry(0, pass_=0, block=6), 0, fsl)
    assert axis.sink_label == "sink (frame 0)" and axis.span(axis.sink) == (0.0, 1.0)
