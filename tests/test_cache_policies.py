"""The cache-policy registry (wan/cache_policies): how the config's model_kwargs choose a policy, what
each policy tells the pre-flight and the header, the key roles its caches label, and that a new policy
is one module plus one registry line: ``SinkOnly`` below, a policy this project does not ship, runs
through the config checks, the model and the capture like the built-in ones and matches a dense
masked computation written here."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import wan.modules.causal_model as cm
from utils.attention_cache import CACHED, SINK, TOP_C
from utils.config import load_config
from wan import cache_policies
from wan.cache_policies import POLICIES, CachePolicy, Option, PolicyError, policy_from_kwargs
from wan.cache_policies.base import CacheLayout, is_int
from wan.families import check_model
from wan.modules.attention import ATTENTION_WEIGHT_CAPTURE
from wan.modules.causal_model import CausalWanModel

REPO = Path(__file__).resolve().parents[1]
TINY = dict(patch_size=(1, 2, 2), text_len=8, in_dim=4, dim=32, ffn_dim=64, freq_dim=16, text_dim=16, out_dim=4,
            num_heads=2, num_layers=2)
PER_BLOCK = 3


# ------------------------------------------------------------------------------------------------
# A policy of the tests' own: one module's worth of code and one registry line.


class SinkOnlyCache:
    """Keeps the first ``sink_frames`` frames of the video and nothing else from earlier blocks: a
    block attends to the sink and to itself."""

    def __init__(self, layout, sink_frames):
        self.fsl = layout.frame_seq_length
        self.sink_frames = sink_frames
        self.batch = layout.batch
        self.k = torch.zeros(layout.batch, sink_frames * self.fsl, layout.num_heads, layout.head_dim,
                             dtype=layout.dtype, device=layout.device)
        self.v = torch.zeros_like(self.k)
        self.frames = []
        self.held = 0

    def update(self, k, v, current_start, queries=None):
        first = current_start // self.fsl
        block_frames = list(range(first, first + k.shape[1] // self.fsl))
        inside = min(max(self.sink_frames - first, 0), len(block_frames)) * self.fsl  # this block's sink tokens
        self.k[:, current_start : current_start + inside] = k[:, :inside]
        self.v[:, current_start : current_start + inside] = v[:, :inside]
        self.held = min(first, self.sink_frames)  # sink frames of earlier blocks
        self.frames = [*range(self.held), *block_frames]
        tokens = self.held * self.fsl
        return torch.cat([self.k[:, :tokens], k], dim=1), torch.cat([self.v[:, :tokens], v], dim=1)

    def key_frames(self):
        return list(self.frames)

    def key_positions(self):
        video = torch.tensor(self.frames).repeat_interleave(self.fsl).expand(self.batch, -1)
        return video.clone(), video.clone()

    def key_roles(self):
        """The sink frames held from earlier blocks, then the block's own frames."""
        roles = torch.full((self.batch, len(self.frames) * self.fsl), CACHED, dtype=torch.int8)
        roles[:, : self.held * self.fsl] = SINK
        return roles


class SinkOnly(CachePolicy):
    name = "sink_only"
    options = {"sink_size": Option(1, lambda value, settings, per_block: None if is_int(value) and value > 0
                                   else "an int > 0 (the frames kept from the start of the video)")}

    def cache_frames(self, num_frames):
        return self.settings["sink_size"]

    def describe(self):
        return f"sink_only: the first {self.settings['sink_size']} frames and the current block"

    def new_cache(self, layout):
        return SinkOnlyCache(layout, self.settings["sink_size"])


@pytest.fixture
def sink_only(monkeypatch):
    monkeypatch.setitem(POLICIES, SinkOnly.name, SinkOnly)  # the registry line
    return SinkOnly


def tiny_model(policy, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CausalWanModel(**TINY, cache_policy=policy).eval()


def dense_attention(visible):
    """A self-attention replacement for one pass over all frames: query frame i sees key frame j iff
    ``visible(i, j)``, by an explicit masked softmax (q, k, v [B, L, N, D], 4 tokens a frame)."""

    def attention(q, k, v, kernel=None):
        frames = q.shape[1] // 4
        mask = torch.tensor([[visible(i, j) for j in range(frames)] for i in range(frames)])
        mask = mask.repeat_interleave(4, 0).repeat_interleave(4, 1)
        logits = torch.einsum("blnd,bmnd->bnlm", q, k) * q.shape[-1] ** -0.5
        return torch.einsum("bnlm,bmnd->blnd", logits.masked_fill(~mask, float("-inf")).softmax(-1), v)

    return attention


# ------------------------------------------------------------------------------------------------


def test_registry_names_and_defaults():
    assert list(POLICIES) == ["global", "window", "deep_sink", "participative_compression", "longlive", "reward_forcing",
                             "infinite_forcing", "rolling_forcing"]
    assert all(POLICIES[name].name == name for name in POLICIES)
    assert type(policy_from_kwargs({})).name == "global"
    assert type(policy_from_kwargs({"local_attn_size": -1})).name == "global"
    assert policy_from_kwargs({"local_attn_size": 9, "sink_size": 2}, 3).settings == {"local_attn_size": 9, "sink_size": 2}
    pc = policy_from_kwargs(dict(attention_mode="participative_compression", local_attn_size=21, sink_size=10, budget=16,
                                 recent=4), 3)
    assert pc.settings["topc_max_reuse"] == 7  # the default
    with pytest.raises(PolicyError, match=r"model_kwargs.recent = 2; expected an int >= num_frame_per_block \(3\)"):
        policy_from_kwargs(dict(attention_mode="participative_compression", local_attn_size=21, sink_size=10, budget=16,
                                recent=2), 3)


def test_policies_import_no_torch():
    code = "import sys, wan.cache_policies, wan.families; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize("kwargs, frames, described", [
    ({}, 30, "global: every block attends to all earlier frames"),
    ({"local_attn_size": 12, "sink_size": 3}, 12, "window: the last 12 frames, the first 3 kept as a sink"),
    ({"attention_mode": "deep_sink", "local_attn_size": 21, "sink_size": 10}, 21, "deep_sink: a 21-frame window"),
    ({"attention_mode": "participative_compression", "local_attn_size": 21, "sink_size": 10, "budget": 16, "recent": 4},
     21, "participative_compression: a 21-frame window compressed to 16 frames"),
])
def test_cache_frames_and_description(kwargs, frames, described):
    policy = policy_from_kwargs(kwargs, PER_BLOCK)
    assert policy.cache_frames(30) == frames and policy.describe().startswith(described)
    layout = CacheLayout(2, 30, 4, 2, 8, torch.float32, "cpu", CausalWanModel(**TINY).rope)
    assert policy.new_cache(layout).k.shape == (2, frames * 4, 2, 8)  # what the pre-flight counts


def roles_after(policy, blocks, fsl=2):
    """The key roles a policy's cache labels after writing ``blocks`` blocks of random keys."""
    layout = CacheLayout(1, 60, fsl, 1, 16, torch.float32, "cpu", CausalWanModel(**TINY).rope)  # head dim 16
    cache = policy.new_cache(layout)
    gen = torch.Generator().manual_seed(0)
    for b in range(blocks):
        k = torch.randn(1, PER_BLOCK * fsl, 1, 16, generator=gen)
        cache.update(k, torch.randn(k.shape, generator=gen), b * PER_BLOCK * fsl, queries=k)
    return cache.key_roles()[0].tolist()


def per_frame(*runs, fsl=2):
    """[(role, frames), ...] -> the per-token roles."""
    return [role for role, frames in runs for _ in range(frames * fsl)]


def test_key_roles_follow_each_policy():
    assert roles_after(policy_from_kwargs({}), 3) == per_frame((CACHED, 9))
    assert roles_after(policy_from_kwargs({"local_attn_size": 7, "sink_size": 1}, 3), 4) == per_frame((SINK, 1), (CACHED, 6))
    deep = policy_from_kwargs({"attention_mode": "deep_sink", "local_attn_size": 7, "sink_size": 2}, 3)
    assert roles_after(deep, 4) == per_frame((SINK, 2), (CACHED, 5))
    # W 8, S 1, N 5, R 3, blocks of 3: 3, 6, then block 2 does not fit: [sink 1 | top-C 1 | recent 3] = 5
    # frames, then block 3 appended (8), block 4 compresses again.
    pc = policy_from_kwargs(dict(attention_mode="participative_compression", local_attn_size=8, sink_size=1, budget=5,
                                 recent=3), 3)
    assert roles_after(pc, 2) == per_frame((SINK, 1), (CACHED, 5))  # no compression yet: no top-C
    assert roles_after(pc, 3) == per_frame((SINK, 1), (TOP_C, 1), (CACHED, 3))
    assert roles_after(pc, 4) == per_frame((SINK, 1), (TOP_C, 1), (CACHED, 6))
    assert roles_after(pc, 5) == per_frame((SINK, 1), (TOP_C, 1), (CACHED, 3))


def test_new_policy_passes_the_config_checks(tmp_path, sink_only):
    config = yaml.safe_load(Path(REPO / "configs/tiny.yaml").read_text())
    config["model_kwargs"] = {"attention_mode": "sink_only", "sink_size": 2}
    path = tmp_path / "sink_only.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path, str(REPO / "configs/default_config.yaml"), check_model=check_model)
    assert loaded.model_kwargs.attention_mode == "sink_only"
    assert check_model({"model_kwargs": {"attention_mode": "sink_only", "sink_size": 0}}, 3) == (
        "model_kwargs.sink_size", "an int > 0 (the frames kept from the start of the video)")
    assert check_model({"model_kwargs": {"attention_mode": "sink_only", "budget": 4}}, 3)[0] == "model_kwargs.budget"


def test_new_policy_runs_like_a_dense_mask(monkeypatch, sink_only):
    policy = cache_policies.policy_from_kwargs({"attention_mode": "sink_only", "sink_size": 2}, PER_BLOCK)
    model = tiny_model(policy, seed=3)
    frames = 12
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, frames, 4, 4, generator=gen)  # 2 x 2 tokens a frame
    context = torch.randn(1, 8, 16, generator=gen)
    t = torch.full((1, frames), 500.0)
    kv, xattn = model.new_caches(1, frames, 4, x.dtype, x.device)
    ATTENTION_WEIGHT_CAPTURE.enable([1], passes=[0], blocks=[3])
    try:
        outs = []
        with torch.no_grad():
            for first in range(0, frames, PER_BLOCK):
                sl = slice(first, first + PER_BLOCK)
                ATTENTION_WEIGHT_CAPTURE.annotate(block=first // PER_BLOCK, num_blocks=4, step=0, timestep=500.0)
                outs.append(model(x[:, :, sl], t[:, sl], context, kv, xattn, current_start=first * 4))
                ATTENTION_WEIGHT_CAPTURE.annotate()
        (call,) = ATTENTION_WEIGHT_CAPTURE.kept_calls
        assert call.key_frames == [0, 1, 9, 10, 11]
        assert call.key_roles[0].tolist() == per_frame((SINK, 2), (CACHED, 3), fsl=4)
    finally:
        ATTENTION_WEIGHT_CAPTURE.disable()
    visible = lambda i, j: j // PER_BLOCK == i // PER_BLOCK or (j < 2 and j // PER_BLOCK < i // PER_BLOCK)  # noqa: E731
    monkeypatch.setattr(cm, "attention", dense_attention(visible))
    with torch.no_grad():
        dense = model(x, t, context)
    torch.testing.assert_close(torch.cat(outs, dim=2), dense, rtol=1e-4, atol=1e-5)
