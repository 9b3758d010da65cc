"""Deep Sink and Participative Compression caches (wan/modules/deep_forcing.py).

Independent references written here: a temporal RoPE rotation by cos/sin on real channel pairs; a
brute-force top-C over dense logits (every recent query, every head) with its own reuse counter; a
dense attention over the whole video that attends, per query block, to the token sets and RoPE
positions the cache reports; the block cadence and positions of the release (facts §1-2); an observer
in front of the capture that copies each call's q, k, labels and key positions at the time of the call.
"""
import pytest
import torch
from omegaconf import OmegaConf

import wan.modules.causal_model as cm
from pipeline.causal_inference import CausalInferencePipeline
from tests.test_capture import FixedTextEncoder, Tee, all_heads, dense_logits
from tests.test_causal_model import CallObserver, check_blocks, inputs, observing, policy, tiny_model
from pipeline.wrappers import WanDiffusionWrapper
from wan.cache_policies import PolicyError
from wan.modules.attention import ATTENTION_WEIGHT_CAPTURE
from wan.modules.causal_model import RoPE3D, apply_rope
from wan.modules.deep_forcing import DeepSinkCache, ParticipativeCompressionCache

HEAD_DIM = 16  # 8 pairs: 4 temporal (real channels 0-7), 2 row, 2 column
TIME_CHANNELS = 8
PER_BLOCK = 3


def rotate_time(x, positions, theta=10000.0):
    """Rotate the temporal pairs (channels 0..7, interleaved re/im) of x [B, L, N, D] by angle
    position * theta^(-2k/8), in float64; other channels unchanged. positions: [L]."""
    x = x.double().clone()
    k = torch.arange(TIME_CHANNELS // 2, dtype=torch.float64)
    angle = positions.double()[:, None] * theta ** (-2 * k / TIME_CHANNELS)  # [L, 4]
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
    re, im = x[..., 0:TIME_CHANNELS:2].clone(), x[..., 1:TIME_CHANNELS:2].clone()
    x[..., 0:TIME_CHANNELS:2] = re * cos - im * sin
    x[..., 1:TIME_CHANNELS:2] = re * sin + im * cos
    return x


def written_block(raw, cs, rope, fsl):
    """Keys of frames cs..cs+2 as the model writes them: raw [B, 3 * fsl, N, D] rotated at absolute
    frames (grid 3 x 1 x fsl)."""
    return apply_rope(raw, rope.freqs((PER_BLOCK, 1, fsl), cs, raw.device))


# ------------------------------------------------------------------------------------------------
# Deep Sink


@pytest.mark.parametrize("window,sink,fsl", [(7, 2, 2), (21, 10, 1), (21, 14, 1)])
def test_sink_shift_equals_rotating_unrotated_keys_at_shifted_positions(window, sink, fsl):
    rope = RoPE3D(HEAD_DIM)
    cache = DeepSinkCache(1, window, fsl, 2, HEAD_DIM, sink, torch.float32, "cpu", rope)
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(1, 45 * fsl, 2, HEAD_DIM, generator=gen)  # un-rotated keys of 45 frames
    written = torch.cat([written_block(raw[:, f * fsl : (f + 3) * fsl], f, rope, fsl) for f in range(0, 45, 3)], dim=1)
    filled = 0
    for cs in range(0, 45, 3):
        new = slice(cs * fsl, (cs + 3) * fsl)
        for _ in range(2):  # the first pass of the block and one more at the same offset
            cache.update(written[:, new], torch.zeros_like(written[:, new]), cs * fsl)
        filled = min(filled + 3, window)
        evicted = cs + 3 > window
        sink_at = cs - window if evicted else 0  # release: sink frame i at cs - W + i once evicting
        if cs + 3 < sink:
            continue  # the sink is not full yet
        tail = list(range(cs + 3 - (filled - sink), cs + 3))
        video, rope_frame = cache.key_positions()
        expected_video = torch.tensor(list(range(sink)) + tail).repeat_interleave(fsl)
        expected_rope = torch.tensor(list(range(sink_at, sink_at + sink)) + tail).repeat_interleave(fsl)
        assert torch.equal(video[0], expected_video) and torch.equal(rope_frame[0], expected_rope)
        if evicted and window == 21:
            assert tail[0] - (sink_at + sink - 1) == 4  # the 3-position hole of the release
        sink_keys = cache.k[:, : sink * fsl]
        reference = rotate_time(raw[:, : sink * fsl], torch.arange(sink_at, sink_at + sink).repeat_interleave(fsl))
        torch.testing.assert_close(sink_keys[..., :TIME_CHANNELS].double(), reference[..., :TIME_CHANNELS], rtol=0, atol=2e-6)
        assert torch.equal(sink_keys[..., TIME_CHANNELS:], written[:, : sink * fsl, :, TIME_CHANNELS:])
        tail_tokens = torch.tensor(tail).repeat_interleave(fsl) * fsl + torch.arange(len(tail) * fsl) % fsl
        assert torch.equal(cache.k[:, sink * fsl : cache.local_end], written[:, tail_tokens])
    assert sink_at > 0  # the sink did move
    # The check can fail: the keys left at their original positions are far from the reference.
    unshifted = written[:, : sink * fsl, :, :TIME_CHANNELS].double()
    assert (unshifted - reference[..., :TIME_CHANNELS]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------
# Participative Compression on the cache alone


def drive(cache, frames, fsl, seed=0, magnet=None):
    """Feed blocks of random keys, values and queries (3 passes each: two denoising passes and the
    cache pass) and check every compression against a brute-force top-C. Returns the per-block
    (compressed on this block, local_end) and the number of times the ``magnet`` token was selected."""
    gen = torch.Generator().manual_seed(seed)
    heads, sink, recent, cap = 2, cache.sink_tokens, cache.recent_tokens, cache.topc_max_reuse
    raw = torch.randn(1, frames * fsl, heads, HEAD_DIM, generator=gen)
    values = torch.randn(1, frames * fsl, heads, HEAD_DIM, generator=gen)
    direction = torch.randn(heads, HEAD_DIM, generator=gen)
    if magnet is not None:
        raw[0, magnet] = 20 * direction  # large logits against queries that lean towards it
    keys = torch.cat([written_block(raw[:, f * fsl : (f + 3) * fsl], f, cache.rope, fsl) for f in range(0, frames, 3)], dim=1)
    queries_seen = []  # every pass's queries, in order
    counts = torch.zeros(frames * fsl, dtype=torch.long)  # this test's own top-C selection counter
    history, magnet_picks = [], 0
    for cs in range(0, frames, 3):
        new = slice(cs * fsl, (cs + 3) * fsl)
        before_k, before_tokens = cache.k[:, : cache.local_end].clone(), cache.key_tokens()
        compressions = cache.compressions
        for step in range(3):
            q = torch.randn(1, 3 * fsl, heads, HEAD_DIM, generator=gen) + direction
            queries_seen.append(q)
            cache.update(keys[:, new], values[:, new], cs * fsl, queries=q)
            if step == 0 and cache.compressions > compressions:
                k_aug = torch.cat([before_k, keys[:, new]], dim=1)[0]  # [La, N, D]
                tokens = torch.cat([before_tokens[0], torch.arange(new.start, new.stop)])
                recent_q = torch.cat(queries_seen, dim=1)[0, -recent:]  # [R*fsl, N, D]
                logits = torch.einsum("rnd,jnd->nrj", recent_q.double(), k_aug.double())  # dense, every head
                score = logits.sum((0, 1))
                excluded = torch.zeros(len(tokens), dtype=torch.bool)
                excluded[:sink] = excluded[len(tokens) - recent :] = True
                excluded |= counts[tokens] >= cap
                top = tokens[score.masked_fill(excluded, float("-inf")).topk(cache.topc_tokens).indices.sort().values]
                counts[top] += 1
                magnet_picks += int(magnet in top.tolist()) if magnet is not None else 0
                expected = torch.cat([tokens[:sink], top, tokens[len(tokens) - recent :]])
                assert torch.equal(cache.key_tokens()[0], expected), f"block at frame {cs}"
                # Layout: values moved with their keys; top-C and recent keys keep their positions.
                assert torch.equal(cache.v[0, : cache.local_end], values[0, expected])
                assert torch.equal(cache.k[0, sink : cache.local_end], keys[0, expected[sink:]])
                video, rope_frame = cache.key_positions()
                assert torch.equal(video[0], expected // fsl)
                assert torch.equal(rope_frame[0, sink:], expected[sink:] // fsl)
                assert torch.equal(rope_frame[0, :sink], torch.arange(sink) // fsl + cs - cache.budget)
        history.append((cache.compressions > compressions, cache.local_end // fsl))
    return history, magnet_picks


def test_compression_keeps_the_brute_force_top_c_and_caps_reuse():
    fsl = 2
    cache = ParticipativeCompressionCache(1, 8, fsl, 2, HEAD_DIM, 1, torch.float32, "cpu", RoPE3D(HEAD_DIM),
                                          budget=5, recent=3, topc_max_reuse=7)
    history, magnet_picks = drive(cache, 60, fsl, magnet=3 * fsl + 1)
    assert sum(c for c, _ in history) >= 9
    assert magnet_picks == 7  # selected until the cap, then dropped
    assert 3 * fsl + 1 not in cache.key_tokens()[0].tolist()


def test_compression_cadence_of_the_release():
    """N=16, R=4, S=10, W=21: blocks 7, 9, 11, ... compress; 16 frames after, 19 in between; the sink
    moves to cs - 16 (first shift 21 - 16 = 5, then +6)."""
    cache = ParticipativeCompressionCache(1, 21, 1, 2, HEAD_DIM, 10, torch.float32, "cpu", RoPE3D(HEAD_DIM),
                                          budget=16, recent=4, topc_max_reuse=7)
    history, _ = drive(cache, 90, 1, seed=3)
    assert [b for b, (compressed, _) in enumerate(history) if compressed] == list(range(7, 30, 2))
    assert [length for _, length in history] == [3, 6, 9, 12, 15, 18, 21] + [16, 19] * 11 + [16]
    assert cache.sink_start == 87 - 16


# ------------------------------------------------------------------------------------------------
# The model over many blocks against a dense pass over the whole video with the same key sets

MODES = {
    "deep_sink": dict(attention_mode="deep_sink", local_attn_size=7, sink_size=2),
    "participative_compression": dict(attention_mode="participative_compression", local_attn_size=8, sink_size=1,
                                      budget=5, recent=3),
}


def dense_with_key_sets(key_sets, fsl, observer):
    """An ``attention`` replacement (self-attention only) for one pass over all frames: query block b of
    layer l attends to the tokens key_sets[l][b] = (video token indices [L], RoPE frames [L]), each key
    moved in time from its own frame to its RoPE frame (``rotate_time``). The layer is the one
    ``observer`` (the model's) saw last: its ``observe`` comes right before the call's attention."""

    def attention(q, k, v, kernel=None):
        outs = []
        for b, (tokens, rope_frame) in enumerate(key_sets[observer.layer]):
            rows = slice(b * PER_BLOCK * fsl, (b + 1) * PER_BLOCK * fsl)
            keys = rotate_time(k[:, tokens], rope_frame - tokens // fsl).to(q.dtype)
            logits = torch.einsum("blnd,bmnd->bnlm", q[:, rows], keys) * q.shape[-1] ** -0.5
            outs.append(torch.einsum("bnlm,bmnd->blnd", logits.softmax(-1), v[:, tokens]))
        return torch.cat(outs, dim=1)

    return attention


@pytest.mark.parametrize("mode", MODES)
def test_bounded_mode_matches_dense_attention_with_the_same_key_sets(monkeypatch, mode):
    model = tiny_model(seed=41, cache_policy=policy(**MODES[mode]))
    frames, fsl = 24, 2
    x, context = inputs(frames=frames, height=2, width=4, seed=7)  # 1 x 2 tokens a frame
    gen = torch.Generator().manual_seed(8)
    t = torch.tensor([1000.0, 937.5, 833.3, 625.0, 0.0])[torch.randint(0, 5, (1, frames), generator=gen)]
    junk = torch.randn(x.shape, generator=gen)
    key_sets = {layer: [] for layer in range(len(model.blocks))}
    record = [False]

    def key_set(layer_idx, q, k, kv_cache):
        if record[0]:
            video, rope_frame = kv_cache.key_positions()
            key_sets[layer_idx].append((kv_cache.key_tokens()[0], rope_frame[0]))

    outs = []
    with torch.no_grad(), monkeypatch.context() as mp, observing(model, CallObserver(key_set)) as observer:
        kv, xattn = model.new_caches(1, frames, fsl, x.dtype, x.device)
        for first in range(0, frames, PER_BLOCK):
            sl = slice(first, first + PER_BLOCK)
            record[0] = False
            model(junk[:, :, sl], torch.full_like(t[:, sl], 1000.0), context, kv, xattn, current_start=first * fsl)
            record[0] = True
            outs.append(model(x[:, :, sl], t[:, sl], context, kv, xattn, current_start=first * fsl))
        record[0] = False
        mp.setattr(cm, "attention", dense_with_key_sets(key_sets, fsl, observer))
        ref = model(x, t, context)
        # The check can fail: the same key sets at their original positions, or without the
        # compressed-away tokens' replacement, give another last block.
        if mode == "deep_sink":
            moved = {l: [(tokens, tokens // fsl) for tokens, _ in sets] for l, sets in key_sets.items()}
        else:
            moved = {l: [(tokens[-6:], rope[-6:]) for tokens, rope in sets] for l, sets in key_sets.items()}
        mp.setattr(cm, "attention", dense_with_key_sets(moved, fsl, observer))
        other = model(x, t, context)
    check_blocks(outs, ref, PER_BLOCK, f"{mode} vs dense with the cache's key sets")
    assert (other[:, :, -3:] - ref[:, :, -3:]).abs().max() > 1e-3
    assert all(c.k.shape[1] == MODES[mode]["local_attn_size"] * fsl for c in kv)  # bounded by the window
    sinks = [rope[: fsl * MODES[mode]["sink_size"]] for _, rope in key_sets[0]]
    assert any((s != torch.arange(len(s)) // fsl).any() for s in sinks)  # the sink was shifted
    if mode == "participative_compression":
        assert kv[0].compressions >= 3


def test_rope_table_refusal():
    model = tiny_model(seed=1, cache_policy=policy(**MODES["deep_sink"]))
    with pytest.raises(ValueError, match="RoPE table covers 1024"):
        model.new_caches(1, 1026, 2, torch.float32, "cpu")
    kv, _ = model.new_caches(1, 240, 2, torch.float32, "cpu")
    assert kv[0].k.shape[1] == 7 * 2


@pytest.mark.parametrize("kwargs,message", [
    (dict(attention_mode="global", local_attn_size=5), r"model_kwargs\.local_attn_size = 5; expected -1 \(global"),
    (dict(attention_mode="deep_sink"), r"model_kwargs\.local_attn_size = missing; expected"),
    (dict(attention_mode="participative_compression", local_attn_size=8, sink_size=1), r"model_kwargs\.budget = missing"),
    (dict(attention_mode="participative_compression", local_attn_size=8, sink_size=1, budget=5), r"model_kwargs\.recent = missing"),
    (dict(attention_mode="participative_compression", local_attn_size=8, sink_size=3, budget=5, recent=3),
     r"model_kwargs\.budget = 5; expected sink_size \+ recent <= budget <= local_attn_size"),
    (dict(attention_mode="sliding"), r"model_kwargs\.attention_mode = 'sliding'; expected one of \["),
])
def test_bad_mode_settings_are_refused(kwargs, message):
    with pytest.raises(PolicyError, match=message):
        policy(**kwargs)


# ------------------------------------------------------------------------------------------------
# Pipeline: state per run, long rollouts, capture labels


@pytest.fixture(scope="module")
def config():
    return OmegaConf.merge(OmegaConf.load("configs/default_config.yaml"), OmegaConf.load("configs/tiny.yaml"),
                           {"height": 16, "width": 32})  # 2 x 4 latent: 1 x 2 tokens a frame


def make_pipeline(config, mode, num_layers=6):
    cfg = OmegaConf.merge(config, {"model_kwargs": MODES[mode], "model_config": {"num_layers": num_layers}})
    sizes = cfg.model_config
    return CausalInferencePipeline(cfg, "cpu", generator=WanDiffusionWrapper.from_config(cfg),
                                   text_encoder=FixedTextEncoder(sizes.text_len, sizes.text_dim))


def run(pipeline, config, frames, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, frames, config.model_config.in_dim, config.height // 8, config.width // 8, generator=gen)
    torch.manual_seed(seed)
    return pipeline.inference(x, [f"prompt {seed}"], return_latents=True)


@pytest.mark.parametrize("mode", MODES)
def test_two_runs_in_one_process_equal_fresh_runs(config, mode):
    pipeline = make_pipeline(config, mode)
    first = run(pipeline, config, 18, seed=1)
    second = run(pipeline, config, 18, seed=2)
    assert torch.equal(second, run(make_pipeline(config, mode), config, 18, seed=2))
    assert torch.equal(first, run(make_pipeline(config, mode), config, 18, seed=1))
    assert not torch.equal(first, second)


@pytest.mark.parametrize("mode", MODES)
def test_long_rollout_runs_in_bounded_caches(config, mode):
    pipeline = make_pipeline(config, mode, num_layers=1)
    lengths = set()
    with observing(pipeline.generator.model, CallObserver(lambda layer_idx, q, k, kv_cache: lengths.add(k.shape[1]))):
        latents = run(pipeline, config, 240, seed=0)
    assert torch.isfinite(latents).all()
    assert max(lengths) <= MODES[mode]["local_attn_size"] * 2


@pytest.mark.parametrize("mode", MODES)
def test_capture_at_chosen_blocks_holds_the_calls_with_right_labels(config, mode):
    """The kept calls of the chosen blocks and passes are the model's calls there, with the q, k, key
    frames and key positions of the time of the call (copied by an observer in front of the capture)."""
    pipeline = make_pipeline(config, mode)
    model = pipeline.generator.model
    frames, fsl, blocks = 21, 2, [1, 4, "last"]
    tee = Tee()
    model.set_observer(tee)
    try:
        ATTENTION_WEIGHT_CAPTURE.enable([1, 4], passes=[0, "cache"], blocks=blocks)
        run(pipeline, config, frames, seed=0)
        kept = ATTENTION_WEIGHT_CAPTURE.kept_calls
    finally:
        model.set_observer(ATTENTION_WEIGHT_CAPTURE)
        ATTENTION_WEIGHT_CAPTURE.disable()
    chosen = [c for c in tee.calls if c["layer"] in (1, 4) and c["labels"]["block"] in (1, 4, 6)
              and c["labels"]["step"] in (0, "cache")]
    assert len(kept) == len(chosen) == 2 * 3 * 2
    by_key = {(c["layer"], c["labels"]["block"], c["labels"]["step"]): c for c in chosen}
    assert sorted(by_key, key=str) == sorted(((r.layer_idx, r.labels["block"], r.labels["step"]) for r in kept), key=str)
    for record in kept:
        entry = by_key[(record.layer_idx, record.labels["block"], record.labels["step"])]
        assert record.labels == entry["labels"]
        assert torch.equal(record.q, entry["q"]) and torch.equal(record.k, entry["k"])
        torch.testing.assert_close(all_heads(record).double(), dense_logits(entry["q"], entry["k"]), rtol=0, atol=1e-5)
        video, rope_frame = record.key_positions
        assert torch.equal(video, entry["key_positions"][0]) and torch.equal(rope_frame, entry["key_positions"][1])
        assert record.key_frames == entry["key_frames"]
        assert video.shape == rope_frame.shape == (1, record.k_shape[1])
        cs = 3 * record.labels["block"]
        video, rope_frame = video[0].tolist(), rope_frame[0].tolist()
        sink = MODES[mode]["sink_size"] * fsl
        assert video[-3 * fsl :] == [f for f in range(cs, cs + 3) for _ in range(fsl)]  # the block itself, last
        assert rope_frame[sink:] == video[sink:]  # only the sink moves
        assert video[:sink] == [f for f in range(sink // fsl) for _ in range(fsl)]
        if mode == "deep_sink":
            window = MODES[mode]["local_attn_size"]
            shift = cs - window if cs + 3 > window else 0
            assert rope_frame[:sink] == [f + shift for f in video[:sink]]
            assert video[sink:] == [f for f in range(cs + 3 - len(video) // fsl + sink // fsl, cs + 3) for _ in range(fsl)]
        else:
            # Blocks 2, 4, 6 compress (8-frame cache, budget 5): the sink sits at cs - 5 of the last one.
            last_compression = max((b for b in (2, 4, 6) if b <= record.labels["block"]), default=None)
            shift = 0 if last_compression is None else 3 * last_compression - MODES[mode]["budget"]
            assert rope_frame[:sink] == [f + shift for f in video[:sink]]
            assert len(video) == {1: 6, 4: 5, 6: 5}[record.labels["block"]] * fsl
