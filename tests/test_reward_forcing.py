"""Reward Forcing (wan/families/reward_forcing.py, wan/cache_policies/reward_forcing.py,
wan/modules/reward_forcing.py) against the facts of its release
(shared/reference/families/reward-forcing-facts.md).

Independent references written here: the replay of facts §2-3 (which frames each block attends to,
at which RoPE positions, the queries' position, the blends of the EMA sink); the EMA in bf16 as the
facts reduce it (the decay term rounds away: sink <- bf16(sink + bf16(0.001 * evicted))); a dense
attention over the whole video that attends, per query block, to the replay's frames moved in time to
the replay's positions, with the sink blended by the test from the evicted keys; checkpoint files
written in the release's layout. Helpers shared with tests/test_infinite_forcing.py.
"""
import re
from pathlib import Path

import pytest
import torch

import experiments.run_extraction_figure4 as cli
import wan.modules.causal_model as cm
from pipeline import plan as plan_module
from pipeline.plan import UsageError
from pipeline.wrappers import WanDiffusionWrapper, load_generator_checkpoint
from tests.test_causal_model import check_blocks, inputs, policy, run_blocks, tiny_model
from tests.test_deep_forcing import rotate_time
from tests.test_families import load_config
from utils.attention_cache import CACHED, EMA_SINK, SINK, build_cache, open_cache, save_cache
from utils.loading import WeightFileError
from wan.cache_policies import PolicyError, policy_from_kwargs
from wan.cache_policies.base import CacheLayout
from wan.families import FAMILIES

REPO = Path(__file__).resolve().parents[1]
PER_BLOCK = 3
ALPHA = 0.999  # facts §3: compression_alpha
RELEASE = dict(attention_mode="reward_forcing", local_attn_size=9, sink_size=3)


def reward_forcing_replay(block):
    """Facts §2-3 for block ``block`` of 3-frame blocks, W 9, S 3: ([(video frame, RoPE position)] of
    the attended keys in order, the queries' first RoPE position, the blends of the sink so far, the
    frames blended into it). Blocks 0-2 attend every frame at its own position; from block 3 on, the
    sink (frames 0-2, blended with one evicted block per block) at 0-2, the previous block at 3-5, the
    block itself at 6-8."""
    cs = PER_BLOCK * block
    if block < 3:
        return [(f, f) for f in range(cs + PER_BLOCK)], cs, 0, []
    blends = block - 2
    window = [(f, 3 + i) for i, f in enumerate(range(cs - 3, cs + 3))]
    return [(0, 0), (1, 1), (2, 2), *window], 6, blends, list(range(3, 3 + 3 * blends))


@pytest.mark.parametrize("frames, blends, blended, window", [
    (21, 4, (3, 14), [15, 16, 17, 18, 19, 20]),
    (33, 8, (3, 26), [27, 28, 29, 30, 31, 32]),
    (120, 37, (3, 113), [114, 115, 116, 117, 118, 119]),
])
def test_replay_states_the_facts_last_blocks(frames, blends, blended, window):
    keys, query_start, n, frames_in = reward_forcing_replay(frames // 3 - 1)
    assert keys == [(0, 0), (1, 1), (2, 2), *zip(window, range(3, 9))] and query_start == 6
    assert n == blends and (frames_in[0], frames_in[-1]) == blended


def bf16_ema(sink, evicted):
    """The release's EMA step in bf16 as the facts reduce it: bf16(0.999 x) == x for every x, so the
    sink gains only the rounded (1 - 0.999) * evicted term, one rounding per operation (fp32 inside)."""
    assert torch.equal((sink.float() * ALPHA).bfloat16(), sink)  # the decay term rounds away
    term = (evicted.float() * (1 - ALPHA)).bfloat16()
    return (sink.float() + term.float()).bfloat16()


def drive(cache, frames, fsl, dtype, check, seed=0):
    """Run a cache through ``frames`` frames of 3-frame blocks as the pipeline does (4 passes of noisy
    keys, then the clean cache pass), calling ``check(block, cache, keys, values, clean)`` after every
    pass with the returned raw keys and values and the clean keys and values written so far per frame."""
    gen = torch.Generator().manual_seed(seed)
    clean = {}
    for block in range(frames // PER_BLOCK):
        cs = PER_BLOCK * block
        for step in range(5):
            k = torch.randn(1, PER_BLOCK * fsl, 2, 16, generator=gen).to(dtype)
            v = torch.randn(k.shape, generator=gen).to(dtype)
            keys, values = cache.update(k, v, cs * fsl)
            if step == 4:
                for i in range(PER_BLOCK):
                    clean[cs + i] = (k[:, i * fsl : (i + 1) * fsl], v[:, i * fsl : (i + 1) * fsl])
            check(block, step, cache, keys, values, clean, k, v)


@pytest.mark.parametrize("frames", [21, 33, 120])
def test_cache_key_sets_positions_and_bf16_sink_per_pass(frames):
    fsl = 2
    cache = policy_from_kwargs(RELEASE, PER_BLOCK).new_cache(
        CacheLayout(1, frames, fsl, 2, 16, torch.bfloat16, "cpu", None))
    sink = {}

    def check(block, step, cache, keys, values, clean, k, v):
        expected, query_start, blends, blended = reward_forcing_replay(block)
        cs = PER_BLOCK * block
        if block == 1 and step == 0:  # the sink: frames 0-2 as block 0's cache pass wrote them
            sink["k"] = torch.cat([clean[f][0] for f in range(3)], dim=1)
            sink["v"] = torch.cat([clean[f][1] for f in range(3)], dim=1)
        if block >= 3 and step == 0:  # one blend, before the block's first pass attends
            evicted = blended[-3:]
            sink["k"] = bf16_ema(sink["k"], torch.cat([clean[f][0] for f in evicted], dim=1))
            sink["v"] = bf16_ema(sink["v"], torch.cat([clean[f][1] for f in evicted], dim=1))
        assert cache.key_frames() == [f for f, _ in expected]
        video, rope = cache.key_positions()
        assert video[0, ::fsl].tolist() == [f for f, _ in expected] and rope[0, ::fsl].tolist() == [p for _, p in expected]
        assert cache.rope_starts() == (query_start, 0)
        assert cache.sink_updates == blends
        roles = cache.key_roles()[0, ::fsl].tolist()
        assert roles == [EMA_SINK] * 3 + [CACHED] * (len(expected) - 3)
        current = {cs + i: (k[:, i * fsl : (i + 1) * fsl], v[:, i * fsl : (i + 1) * fsl]) for i in range(3)}
        for slot, (frame, _) in enumerate(expected):
            tokens = slice(slot * fsl, (slot + 1) * fsl)
            if block >= 1 and frame < 3:
                want_k, want_v = sink["k"][:, tokens], sink["v"][:, tokens]
            else:
                want_k, want_v = current[frame] if frame >= cs else clean[frame]
            assert torch.equal(keys[:, tokens], want_k) and torch.equal(values[:, tokens], want_v), (block, step, frame)

    drive(cache, frames, fsl, torch.bfloat16, check)
    assert sink["k"].dtype == torch.bfloat16


def test_float32_ema_option_is_the_real_valued_ema():
    fsl, frames = 2, 24
    caches = {precision: policy_from_kwargs(dict(RELEASE, ema_precision=precision), PER_BLOCK).new_cache(
        CacheLayout(1, frames, fsl, 2, 16, torch.bfloat16, "cpu", None)) for precision in ("release", "float32")}
    sinks = {}
    for precision, cache in caches.items():
        def check(block, step, cache, keys, values, clean, k, v):
            if block == frames // 3 - 1 and step == 0:
                sinks[precision] = (keys[:, : 3 * fsl].clone(), clean)
        drive(cache, frames, fsl, torch.bfloat16, check)
    (release, clean), (fp32, _) = sinks["release"], sinks["float32"]
    exact = torch.cat([clean[f][0] for f in range(3)], dim=1).double()
    for j in range(1, frames // 3 - 2):  # blocks 3.. evict frames 3j .. 3j+2
        exact = ALPHA * exact + (1 - ALPHA) * torch.cat([clean[f][0] for f in range(3 * j, 3 * j + 3)], dim=1).double()
    assert torch.equal(fp32, exact.float().bfloat16())
    assert not torch.equal(release, fp32)


@pytest.mark.parametrize("settings, key, expected", [
    (dict(sink_size=1), "sink_size", "an int equal to num_frame_per_block (3)"),
    (dict(local_attn_size=10), "local_attn_size", "sink_size + a multiple of num_frame_per_block (3)"),
    (dict(local_attn_size=5), "local_attn_size", "an int >= num_frame_per_block + sink_size"),
    (dict(ema_precision="bf16"), "ema_precision", "one of ['release', 'float32']"),
])
def test_bad_settings_are_refused(settings, key, expected):
    with pytest.raises(PolicyError, match=re.escape(f"model_kwargs.{key} = ") + ".*" + re.escape(expected)):
        policy_from_kwargs({**RELEASE, **settings}, PER_BLOCK)


# ------------------------------------------------------------------------------------------------
# The model against a dense attention with the replay's key sets


def dense_with_replay(replay, fsl, sink_frames=0, alpha=ALPHA):
    """An ``attention`` replacement for one cache-less pass over all frames (q, k rotated at their own
    frames): query block b attends to ``replay(b)``'s frames, each key moved in time to its replay
    position; its queries moved to the replay's query position; a blended sink (``replay`` gives its
    blends) computed here from the keys and values of the evicted frames, sink frame i blended with
    frame 3j + i of the j-th evicted block, each moved to position i: α s + (1 - α) e in the run's dtype."""

    def attention(q, k, v, kernel=None):
        outs = []
        for b in range(q.shape[1] // (PER_BLOCK * fsl)):
            expected, query_start, blends, _ = replay(b)
            cs = PER_BLOCK * b
            keys, values = [], []
            for frame, position in expected:
                tokens = slice(frame * fsl, (frame + 1) * fsl)
                key, value = rotate_time(k[:, tokens], torch.full((fsl,), position - frame)).to(q.dtype), v[:, tokens]
                if frame < sink_frames:
                    for j in range(1, blends + 1):
                        other = slice((3 * j + frame) * fsl, (3 * j + frame + 1) * fsl)
                        moved = rotate_time(k[:, other], torch.full((fsl,), position - 3 * j - frame)).to(q.dtype)
                        key = alpha * key + (1 - alpha) * moved
                        value = alpha * value + (1 - alpha) * v[:, other]
                keys.append(key)
                values.append(value)
            rows = slice(cs * fsl, (cs + PER_BLOCK) * fsl)
            query = rotate_time(q[:, rows], torch.full((PER_BLOCK * fsl,), query_start - cs)).to(q.dtype)
            logits = torch.einsum("blnd,bmnd->bnlm", query, torch.cat(keys, dim=1)) * q.shape[-1] ** -0.5
            outs.append(torch.einsum("bnlm,bmnd->blnd", logits.softmax(-1), torch.cat(values, dim=1)))
        return torch.cat(outs, dim=1)

    return attention


def run_against_dense(monkeypatch, settings, replay, frames, sink_frames, wrong_replay):
    """Block-wise run of a tiny model with the policy ``settings`` (each block: a pass of other inputs at
    t = 1000, then the pass compared), the same inputs through the dense replay, and the dense replay
    of ``wrong_replay``, which must give another last block (by far more than the run's distance to the
    replay: a sink blend moves the output by about 1e-3)."""
    model = tiny_model(seed=41, cache_policy=policy(**settings))
    fsl = 2
    x, context = inputs(frames=frames, height=2, width=4, seed=7)  # 1 x 2 tokens a frame
    gen = torch.Generator().manual_seed(8)
    t = torch.tensor([1000.0, 937.5, 833.3, 625.0, 0.0])[torch.randint(0, 5, (1, frames), generator=gen)]
    junk = torch.randn(x.shape, generator=gen)
    outs = []
    with torch.no_grad(), monkeypatch.context() as mp:
        kv, xattn = model.new_caches(1, frames, fsl, x.dtype, x.device)
        for first in range(0, frames, PER_BLOCK):
            sl = slice(first, first + PER_BLOCK)
            model(junk[:, :, sl], torch.full_like(t[:, sl], 1000.0), context, kv, xattn, current_start=first * fsl)
            outs.append(model(x[:, :, sl], t[:, sl], context, kv, xattn, current_start=first * fsl))
        mp.setattr(cm, "attention", dense_with_replay(replay, fsl, sink_frames))
        ref = model(x, t, context)
        mp.setattr(cm, "attention", dense_with_replay(wrong_replay, fsl, sink_frames))
        other = model(x, t, context)
    worst = check_blocks(outs, ref, PER_BLOCK, f"{settings['attention_mode']} vs dense with the replay's key sets")
    assert (other[:, :, -3:] - ref[:, :, -3:]).abs().max() > max(100 * worst, 1e-4)  # the check can fail


def test_model_equals_dense_attention_with_the_replay_and_the_blended_sink(monkeypatch):
    def unblended(block):  # the same frames and positions, the sink never blended
        keys, query_start, _, _ = reward_forcing_replay(block)
        return keys, query_start, 0, []

    run_against_dense(monkeypatch, RELEASE, reward_forcing_replay, 21, 3, unblended)


@pytest.mark.parametrize("settings", [RELEASE, dict(attention_mode="infinite_forcing", local_attn_size=6, sink_size=1)])
def test_fast_mode_matches_exact(settings):
    """Fast mode rotates at read in fp32 (the queries and keys rounded before, as the release rounds
    them): within the fidelity gate of exact mode over 7 blocks, the sink blended 4 times."""
    model = tiny_model(seed=23, cache_policy=policy(**settings))
    x, context = inputs(frames=21, seed=7)
    t = torch.tensor([[1000.0, 937.5, 833.3] * 7])
    outs = {}
    with torch.no_grad():
        for precision in ("exact", "fast"):
            model.set_numerics(precision)
            outs[precision] = run_blocks(model, x, t, context, PER_BLOCK)[0]
    for fast, exact in zip(outs["fast"], outs["exact"]):
        scale = exact.abs().max().item()
        assert scale > 0.1 and (fast - exact).abs().max().item() <= 1e-5 * scale


# ------------------------------------------------------------------------------------------------
# Checkpoint layout


@pytest.fixture(scope="module")
def generator():
    return WanDiffusionWrapper.from_config(load_config(REPO / "configs/tiny_reward_forcing.yaml"))


def zeroed(config):
    target = WanDiffusionWrapper.from_config(load_config(REPO / config))
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    return target


def test_checkpoint_is_the_whole_file_loaded_strictly(tmp_path, generator):
    spec = FAMILIES["reward_forcing"].variant().checkpoint
    assert spec.default_path == "checkpoints/Reward-Forcing-T2V-1.3B/rewardforcing.pt" and not spec.use_ema
    path = tmp_path / "rewardforcing.pt"
    torch.save({name: value.clone() for name, value in generator.state_dict().items()}, path)
    target = zeroed("configs/tiny_reward_forcing.yaml")
    assert load_generator_checkpoint(target, path, use_ema=False, spec=spec) is None
    for (name, value), (_, loaded) in zip(generator.state_dict().items(), target.state_dict().items()):
        assert torch.equal(value, loaded), name
    nested = tmp_path / "nested.pt"  # Self-Forcing's layout is not this release's
    torch.save({"generator": generator.state_dict()}, nested)
    with pytest.raises(WeightFileError, match=re.escape(f"{nested}: values that are not tensors: generator (OrderedDict)")):
        load_generator_checkpoint(target, nested, use_ema=False, spec=spec)
    partial = tmp_path / "partial.pt"
    torch.save({n: v for n, v in generator.state_dict().items() if n != "model.head.head.bias"}, partial)
    with pytest.raises(WeightFileError, match=re.escape(str(partial)) + ".*missing keys: model.head.head.bias"):
        load_generator_checkpoint(target, partial, use_ema=False, spec=spec)
    renamed = tmp_path / "renamed.pt"  # no prefix edit: another prefix is refused, naming the key
    torch.save({n.replace("model.", "module.", 1): v for n, v in generator.state_dict().items()}, renamed)
    with pytest.raises(WeightFileError, match=re.escape(str(renamed)) + ".*unexpected keys: module.patch_embedding"):
        load_generator_checkpoint(target, renamed, use_ema=False, spec=spec)


def test_cli_default_checkpoint_and_no_ema(tmp_path, capsys):
    base = ["--config_path", "configs/tiny_reward_forcing.yaml", "--device", "cpu", "--quiet", "--num_frames", "3",
            "--output_path", str(tmp_path / "out.pt")]
    # a config of random weights loads no checkpoint; real weights default to the release's file
    options = plan_module.options_from_args(cli.parse_args([]))
    family = FAMILIES["reward_forcing"]
    with pytest.raises(UsageError, match=re.escape("--checkpoint_path: checkpoints/Reward-Forcing-T2V-1.3B/rewardforcing.pt "
                                                   "not found")):
        plan_module._checkpoint(options, family, family.variant("1.3b"))
    assert cli.main([*base, "--no_checkpoint", "--use_ema"]) == 2
    assert ("--use_ema: the checkpoint of reward_forcing 1.3b holds no EMA state dict (the whole file is one state dict)"
            in capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------
# The CLI with the capture on, the cache file's labels, the plot


def extract(tmp_path, config, frames, name, *extra):
    out = tmp_path / name
    assert cli.main(["--config_path", f"configs/{config}.yaml", "--no_checkpoint", "--device", "cpu", "--quiet",
                     "--num_frames", str(frames), "--output_path", str(out), *extra]) == 0
    return out


def test_cli_capture_labels_each_key_token(tmp_path):
    out = extract(tmp_path, "tiny_reward_forcing", 21, "rf.pt", "--capture_step", "all", "--capture_blocks", "2", "last",
                  "--save_mode", "summary")
    cache = open_cache(out)
    assert cache.metadata["family"] == "reward_forcing" and cache.metadata["cache_policy"].startswith("reward_forcing:")
    fsl = cache.frame_seq_length
    for entry in cache.entries:
        expected, _, blends, _ = reward_forcing_replay(entry.block)
        assert entry.key_video_frames[0].tolist() == [f for f, _ in expected for _ in range(fsl)]
        assert entry.key_rope_frames[0].tolist() == [p for _, p in expected for _ in range(fsl)]
        assert entry.key_roles[0, ::fsl].tolist() == [EMA_SINK] * 3 + [CACHED] * (len(expected) - 3)
        assert entry.sink_updates == blends
    assert {e.sink_updates for e in cache.entries if e.block == 6} == {4}

    from utils.figure4_plot import true_frame_axis

    axis = true_frame_axis(cache.entry(0, pass_=0, block=6), 0, fsl)
    assert axis.sink_label == "EMA sink (frames 0-2, 4 evicted blocks blended in)"
    assert axis.span(axis.sink) == (0.0, 3.0)


def test_version_3_cache_files_are_still_read(tmp_path):
    out = extract(tmp_path, "tiny", 6, "v4.pt", "--save_mode", "summary")
    data = torch.load(out, weights_only=True)
    data["metadata"]["format_version"] = 3
    for entry in data["attention_weights"]:
        for key in ("sink_updates", "window", "query_levels"):  # the fields of versions 4 and 5
            del entry[key]
    old = tmp_path / "v3.pt"
    torch.save(data, old)
    assert [e.sink_updates for e in open_cache(old).entries] == [0] * len(data["attention_weights"])
    data["attention_weights"][0]["sink_updates"] = 0  # a version 3 file has no such field
    torch.save(data, old)
    with pytest.raises(ValueError, match=r"attention_weights\[0\] has unexpected keys \['sink_updates'\]"):
        open_cache(old)
    entries = open_cache(out).entries
    with pytest.raises(ValueError, match="differ in sink_updates"):
        build_cache(prompt="p", num_frames=6, frame_seq_length=16, num_frame_per_block=3, layer_indices=[0, 4],
                    save_mode="summary", entries=[entries[0], type(entries[1])(**{**entries[1].__dict__, "sink_updates": 2})],
                    metadata={})
    assert save_cache(tmp_path / "again.pt", build_cache(prompt="p", num_frames=6, frame_seq_length=16, num_frame_per_block=3,
                                                         layer_indices=[0, 4], save_mode="summary", entries=entries,
                                                         metadata={})) > 0


def test_other_policies_keep_their_roles_and_no_sink_updates(tmp_path):
    out = extract(tmp_path, "tiny_longlive", 6, "ll.pt", "--save_mode", "summary")
    entry = open_cache(out).entries[0]
    assert entry.sink_updates == 0 and set(entry.key_roles[0].tolist()) <= {SINK, CACHED}
