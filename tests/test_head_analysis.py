"""utils/head_analysis.py against numpy on synthetic summary caches with planted sink, local and spread
heads: the masses per region, their confidence intervals, the classes and their thresholds."""
import math
import re

import numpy as np
import pytest
import torch

from utils.attention_cache import CACHED, EMA_SINK, SINK, CacheEntry, build_cache, open_cache, save_cache
from utils.head_analysis import class_rows, head_rows, head_statistics, slot_regions
from utils.head_classes import HeadThresholds

FSL, PER_BLOCK, HEADS, BLOCK = 2, 3, 4, 2
QUERY = [6, 7, 8]
T_975 = {3: 3.182446}  # two-sided 95%, 3 degrees of freedom (4 items)
GLOBAL = list(range(9))  # key frames 0..8, no sink role
WINDOW = [0, 4, 5, 6, 7, 8]  # frame 0 kept as the sink (role), 1..3 evicted
# per head, the planted share of mass: (on the first key frame, on the current block); the rest is spread
PLANTED = [(0.7, 0.2), (0.05, 0.9), (0.1, 0.3), (0.45, 0.5)]  # sink, local, spread, spread (under both thresholds)


def planted_mass(generator, frames, sink_slots):
    """[1, N, Fq, Fk] masses: each head's planted shares on the sink slots and the current block, the rest
    uniform over the other slots, jittered per query frame, each row summing to 1."""
    fk = len(frames)
    current = [j for j, f in enumerate(frames) if f in QUERY]
    rest = [j for j in range(fk) if j not in current and j not in sink_slots]
    mass = torch.zeros(1, HEADS, PER_BLOCK, fk, dtype=torch.float64)
    for head, (sink, local) in enumerate(PLANTED):
        for q in range(PER_BLOCK):
            jitter = 0.04 * (torch.rand(3, generator=generator, dtype=torch.float64) - 0.5)
            shares = torch.tensor([sink, local, 1 - sink - local], dtype=torch.float64) + jitter
            shares = shares.clamp(min=0.001) / shares.clamp(min=0.001).sum()
            for slots, share in zip((sink_slots, current, rest), shares):
                weights = torch.rand(len(slots), generator=generator, dtype=torch.float64) + 0.5
                mass[0, head, q, slots] = share * weights / weights.sum()
    return mass.float()


def make_cache(path, seed, frames, roles_of_frame):
    generator = torch.Generator().manual_seed(seed)
    sink_slots = [j for j, f in enumerate(frames) if roles_of_frame.get(f) == SINK] or [0]
    entries = []
    for layer in (0, 3):
        mass = planted_mass(generator, frames, sink_slots)
        video = torch.tensor(frames, dtype=torch.int32).repeat_interleave(FSL)[None]
        roles = torch.tensor([roles_of_frame.get(f, CACHED) for f in frames], dtype=torch.int8).repeat_interleave(FSL)[None]
        entries.append(CacheEntry(
            layer_idx=layer, block=BLOCK, pass_=0, timestep=1000.0, query_frames=QUERY, key_frame_indices=frames,
            num_heads=HEADS, nonfinite=0, logit_min=-1.0, logit_max=1.0,
            tensors={"query_mean_logits": torch.randn(1, HEADS, len(frames) * FSL, generator=generator),
                     "frame_mean_logits": torch.randn(1, HEADS, PER_BLOCK, len(frames), generator=generator),
                     "frame_attention_mass": mass},
            key_video_frames=video, key_rope_frames=video.clone(), key_roles=roles))
    save_cache(path, build_cache(prompt=f"p{seed}", num_frames=9, frame_seq_length=FSL, num_frame_per_block=PER_BLOCK,
                                 layer_indices=[0, 3], save_mode="summary", entries=entries, metadata={"seed": seed}))
    return open_cache(path)


@pytest.fixture(params=["global", "window-sink"])
def caches(request, tmp_path):
    frames, roles = (GLOBAL, {}) if request.param == "global" else (WINDOW, {0: SINK})
    return [make_cache(tmp_path / f"c{seed}.pt", seed, frames, roles) for seed in range(4)], frames


def numpy_regions(cache, layer, frames, sink_frames=1):
    """Per head [N, 3]: mass on the sink (role, else the first sink_frames frames), current block, rest."""
    entry = cache.entries[[e.layer_idx for e in cache.entries].index(layer)]
    mass = entry.tensors["frame_attention_mass"].double().numpy()[0].mean(axis=1)  # [N, Fk]
    roles = entry.key_roles.numpy()[0][::FSL]
    current = np.array([f in QUERY for f in frames])
    sink = roles == SINK if (roles == SINK).any() else (np.array(frames) < sink_frames) & ~current
    rest = ~current & ~sink
    return np.stack([mass[:, sink].sum(1), mass[:, current].sum(1), mass[:, rest].sum(1)], axis=1)


def numpy_classes(sink, current, sink_threshold, local_threshold):
    return ["sink" if s >= sink_threshold else "local" if c >= local_threshold else "spread" for s, c in zip(sink, current)]


def test_masses_intervals_and_classes_equal_numpy(caches):
    caches, frames = caches
    groups = head_statistics(caches, HeadThresholds())
    assert [(g["layer_idx"], g["block"], g["pass"], g["n"]) for g in groups] == [(0, BLOCK, 0, 4), (3, BLOCK, 0, 4)]
    for g in groups:
        items = np.stack([numpy_regions(c, g["layer_idx"], frames) for c in caches])  # [n, N, 3]
        np.testing.assert_allclose(items.sum(axis=2), 1, atol=1e-5)
        for r, region in enumerate(("sink", "current", "rest")):
            mean, std = items[..., r].mean(0), items[..., r].std(0, ddof=1)
            half = T_975[3] * std / math.sqrt(4)
            got = g["heads"][region]
            np.testing.assert_allclose(got["mean"].numpy(), mean, rtol=1e-6)
            np.testing.assert_allclose(got["ci_low"].numpy(), mean - half, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(got["ci_high"].numpy(), mean + half, rtol=1e-4, atol=1e-6)
        means = items.mean(0)
        assert g["classes"] == numpy_classes(means[:, 0], means[:, 1], 0.5, 0.8) == ["sink", "local", "spread", "spread"]
        looser = head_statistics(caches, HeadThresholds(sink=0.4, local=0.45))
        want = numpy_classes(means[:, 0], means[:, 1], 0.4, 0.45)
        assert looser[groups.index(g)]["classes"] == want == ["sink", "local", "spread", "sink"]


def test_rows_and_class_counts(caches):
    caches, _ = caches
    groups = head_statistics(caches, HeadThresholds())
    rows = head_rows("s", "m", groups)
    assert len(rows) == 2 * HEADS and [r[-1] for r in rows[:HEADS]] == ["sink", "local", "spread", "spread"]
    assert [float(x) for x in rows[1][7:10]] == pytest.approx(
        [float(groups[0]["heads"]["sink"][f][1]) for f in ("mean", "ci_low", "ci_high")], rel=1e-5)
    (summary,) = class_rows("s", "m", groups)
    assert summary[:10] == ["s", "m", str(BLOCK), "0", "0 3", "8", "2", "2", "4", "0.25"]
    assert summary[10:13] == ["0.25", "0.25", "0.25"]  # every item: 2 of 8 heads above 80% on the current block


def test_one_item_writes_a_mean_and_no_interval(tmp_path):
    """n = 1: the report's rows hold the mean and leave the interval cells empty, as the statistics CSV does."""
    groups = head_statistics([make_cache(tmp_path / "c.pt", 0, WINDOW, {0: SINK})], HeadThresholds())
    row = head_rows("s", "m", groups)[0]
    assert row[6] == "1" and row[7] != "" and row[8:10] == ["", ""]


def test_sink_frames_of_a_cache_without_a_sink_role(tmp_path):
    cache = make_cache(tmp_path / "c.pt", 0, GLOBAL, {})
    entry = cache.entries[0]
    assert slot_regions(entry, 0, FSL, 1).tolist() == [0, 2, 2, 2, 2, 2, 1, 1, 1]
    assert slot_regions(entry, 0, FSL, 2).tolist() == [0, 0, 2, 2, 2, 2, 1, 1, 1]
    assert slot_regions(entry, 0, FSL, 9).tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]  # the query block is never the sink


def test_an_ema_sink_is_the_sink(tmp_path):
    """Reward Forcing's blended sink (role ema_sink) is the sink region, whatever ``sink_frames`` says."""
    entry = make_cache(tmp_path / "c.pt", 0, WINDOW, {0: EMA_SINK}).entries[0]
    assert slot_regions(entry, 0, FSL, 1).tolist() == [0, 2, 2, 1, 1, 1]
    assert slot_regions(entry, 0, FSL, 5).tolist() == [0, 2, 2, 1, 1, 1]  # the role, not the first 5 frames


@pytest.mark.parametrize("kwargs, message", [
    (dict(sink=0), "sink threshold 0: expected a number in (0, 1]"),
    (dict(local=1.5), "local threshold 1.5: expected a number in (0, 1]"),
    (dict(sink_frames=0), "sink_frames 0: expected an int >= 1"),
])
def test_thresholds_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        HeadThresholds(**kwargs)
    assert "sink head: mean mass on the sink frames >= 0.5" in HeadThresholds().describe()
