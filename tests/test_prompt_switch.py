"""LongLive's prompt switch with KV recache (wan/modules/longlive.py, pipeline/causal_inference.py): the
recache re-encodes exactly the release's frames into the release's slots, keeps or re-encodes the sink
as ``global_sink`` says, a switch at frame f leaves everything before the block starting at or after f
as a run without it, and the CLI's --switch."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import experiments.run_extraction_figure4 as cli
import utils.config
from pipeline.causal_inference import CausalInferencePipeline
from utils.attention_cache import open_cache
from wan.families import check_model
from wan.modules.attention import ATTENTION_WEIGHT_CAPTURE
from wan.modules.longlive import LongLiveCache

REPO = Path(__file__).resolve().parents[1]
FSL = 2


def filled_cache(global_sink, blocks=14):
    """A 12-frame cache with a 3-frame sink after ``blocks`` blocks of 3 frames, each frame's keys equal
    to its frame index (values: minus that)."""
    cache = LongLiveCache(1, 12, FSL, 1, 4, 3, torch.float32, "cpu", global_sink)
    for block in range(blocks):
        frames = torch.arange(3 * block, 3 * block + 3, dtype=torch.float32).repeat_interleave(FSL)
        k = frames.view(1, -1, 1, 1).expand(1, -1, 1, 4).clone()
        cache.update(k, -k, 3 * block * FSL)
    return cache


@pytest.mark.parametrize("global_sink, frames", [(True, [0, 1, 2, *range(33, 42)]), (False, list(range(30, 42)))])
def test_recache_writes_the_release_frames_into_the_release_slots(global_sink, frames):
    """Switch at block start 42: one pass over frames 30-41 at their positions, into slots 0-11; the
    sink slots keep frames 0-2 with global_sink, the new keys of 30-32 are dropped; pointers unchanged."""
    cache = filled_cache(global_sink)
    assert cache.key_frames() == [0, 1, 2, *range(33, 42)] and cache.local_end == 12 * FSL
    pointers = (cache.global_end, cache.local_end)
    new = 100 + torch.arange(30, 42, dtype=torch.float32).repeat_interleave(FSL).view(1, -1, 1, 1).expand(1, -1, 1, 4)
    cache.begin_recache()
    keys, values = cache.update(new.clone(), -new, 30 * FSL)
    cache.end_recache()
    assert cache.key_frames() == frames and (cache.global_end, cache.local_end) == pointers
    held = [int(key) for key in keys[0, ::FSL, 0, 0].tolist()]
    assert held == [f if f < 3 else 100 + f for f in frames]  # old sink keys, else the recache's
    assert torch.equal(values, -keys) and keys.shape[1] == 12 * FSL
    video, rope = cache.key_positions()
    assert torch.equal(video, rope) and video[0, ::FSL].tolist() == frames
    k = torch.full((1, 3 * FSL, 1, 4), 7.0)
    cache.update(k, -k, 42 * FSL)  # the next block evicts the oldest non-sink frames, as before the switch
    assert cache.key_frames() == frames[:3] + list(range(36, 45))


def pipeline(global_sink):
    config = utils.config.load_config(REPO / "configs/tiny_longlive.yaml", str(REPO / "configs/default_config.yaml"),
                                      check_model=check_model)
    return CausalInferencePipeline(OmegaConf.merge(config, {"model_kwargs": {"global_sink": global_sink}}), "cpu")


@pytest.mark.parametrize("global_sink, keys", [(True, [0, 1, 2, *range(36, 45)]), (False, [30, 31, 32, *range(36, 45)])])
def test_switch_leaves_the_past_alone_and_changes_what_follows(global_sink, keys):
    pipe = pipeline(global_sink)
    noise = torch.randn(1, 48, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    first, second = (torch.randn(1, 128, 32, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    with torch.no_grad():
        torch.manual_seed(3)
        plain = pipe.inference(noise, prompt_embeds=first, return_latents=True)
        ATTENTION_WEIGHT_CAPTURE.enable([0], passes=[0], blocks=[13, 14])
        try:
            torch.manual_seed(3)
            switched = pipe.inference(noise, prompt_embeds=first, return_latents=True, prompt_switches=[(40, second)])
            before, after = ATTENTION_WEIGHT_CAPTURE.kept_calls
        finally:
            ATTENTION_WEIGHT_CAPTURE.disable()
    assert torch.equal(plain[:, :42], switched[:, :42])  # the switch at 40 applies at the block starting at 42
    assert not torch.allclose(plain[:, 42:], switched[:, 42:])
    assert before.key_frames == [0, 1, 2, *range(33, 42)] and after.key_frames == keys
    assert after.key_roles[0].tolist() == [1] * 3 * 16 + [0] * 9 * 16


def test_cli_switch(tmp_path, capsys):
    out = tmp_path / "ll.pt"
    base = ["--device", "cpu", "--no_checkpoint", "--num_frames", "24", "--save_mode", "summary", "--output_path", str(out)]
    assert cli.main(["--config_path", "configs/tiny.yaml", *base, "--switch", "12", "a dog"]) == 2
    assert "--switch: the cache policy global does not re-encode its cache" in capsys.readouterr().err
    assert cli.main(["--config_path", "configs/tiny_longlive.yaml", *base, "--switch", "24", "a dog"]) == 2
    assert "--switch: frame '24'; expected a latent frame 1..23" in capsys.readouterr().err
    assert cli.main(["--config_path", "configs/tiny_longlive.yaml", *base, "--switch", "12", "a dog",
                     "--capture_blocks", "3", "4"]) == 0
    assert "Prompt from frame 12 (the first block starting there or later): a dog" in capsys.readouterr().out
    cache = open_cache(out)
    assert cache.metadata["prompt_switches"] == [[12, "a dog"]] and cache.labels == [(3, 0), (4, 0)]
    assert cache.metadata["cache_policy"].startswith("longlive: the last 12 frames, the first 3 kept as a sink")
