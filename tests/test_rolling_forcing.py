"""Rolling Forcing (wan/families/rolling_forcing.py, wan/cache_policies/rolling_forcing.py,
wan/modules/rolling_forcing.py, pipeline/rolling_inference.py) against the facts of its release
(../shared/reference/families/rolling-forcing-facts.md), computed here independently: the windows and
per-frame timesteps of each call, each block's five levels, the noise draws, the key sets and RoPE
positions each call attends to (and the keys themselves, recomputed from the frames the facts name),
the checkpoint layout, and the CLI and plot on the tiny config."""
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import experiments.run_extraction_figure4 as cli
import utils.config
from pipeline.pipelines import pipeline_class
from pipeline.rolling_inference import RollingInferencePipeline
from pipeline.wrappers import WanDiffusionWrapper, load_generator_checkpoint
from utils.attention_cache import CACHED, SINK, open_cache
from utils.config import ConfigError
from utils.figure4_plot import make_figure
from utils.figure4_sources import select
from utils.loading import WeightFileError
from wan.families import check_model
from wan.families.rolling_forcing import ROLLING_FORCING
from wan.modules.causal_model import apply_rope
from wan.modules.rolling_forcing import RollingCache

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs/tiny_rolling_forcing.yaml"
P, L, FSL = 3, 5, 16  # frames per block, levels (steps), tokens per tiny latent frame


def load_config(path=TINY, **changes):
    config = utils.config.load_config(path, str(REPO / "configs/default_config.yaml"), check_model=check_model)
    return OmegaConf.merge(config, changes)


def warped_steps(steps=(1000, 800, 600, 400, 200), shift=5.0):
    """The shifted schedule's timestep at index 1000 - t (sigma = shift s / (1 + (shift - 1) s))."""
    def timestep(i):
        s = 1 - i / 1000
        return 1000 * shift * s / (1 + (shift - 1) * s)

    return [timestep(1000 - t) for t in steps]


T = warped_steps()  # T0 .. T4 = 1000, 952.38, 882.35, 769.23, 555.56


def facts_schedule(nb):
    """The facts' windows: w = 0 .. nb + 3 over blocks s = max(0, w - 4) .. e = min(nb - 1, w); the shared
    vector gives block position k the value reversed(steps)[k]; a full window takes it all, a window
    starting at block 0 its last entries, an end window its first. (frames, per-frame timesteps) each."""
    shared = [t for t in reversed(T) for _ in range(P)]
    calls = []
    for w in range(nb + L - 1):
        s, e = max(0, w - 4), min(nb - 1, w)
        n = (e - s + 1) * P
        timesteps = shared if n == L * P else shared[-n:] if s == 0 else shared[:n]
        calls.append((list(range(P * s, P * (e + 1))), timesteps))
    return calls


class Recorder:
    """Spies on a pipeline's generator: each call's frames, per-frame timesteps, whether it is a cache
    call, its input and its x0."""

    def __init__(self, pipeline):
        self.calls = []
        self.pipeline = pipeline
        generator = pipeline.generator
        inner = generator.forward

        def spy(x, conditional_dict, timestep, kv_cache, crossattn_cache, current_start):
            flow, x0 = inner(x, conditional_dict, timestep, kv_cache, crossattn_cache, current_start)
            first = current_start // FSL
            self.calls.append(dict(frames=list(range(first, first + x.shape[1])), timesteps=timestep[0].tolist(),
                                   cache=kv_cache[0].cache_pass, x=x.clone(), x0=x0.clone()))
            return flow, x0

        generator.forward = spy


def run_rolling(nb, seed=0, observer=None, config=None):
    config = config or load_config()
    generator = WanDiffusionWrapper.from_config(config)
    pipeline = RollingInferencePipeline(config, "cpu", generator=generator)
    recorder = Recorder(pipeline)
    if observer is not None:
        generator.model.set_observer(observer)
    noise = torch.randn(1, nb * P, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    context = torch.randn(1, 128, 32, generator=torch.Generator().manual_seed(seed + 1))
    torch.manual_seed(seed + 2)
    with torch.no_grad():
        output = pipeline.inference(noise, prompt_embeds=context, return_latents=True)
    return recorder.calls, noise, output, pipeline


def test_family_selects_the_rolling_pipeline_and_policy():
    config = load_config()
    assert pipeline_class(config) is RollingInferencePipeline
    assert pipeline_class(load_config(REPO / "configs/tiny.yaml")).__name__ == "CausalInferencePipeline"
    assert ROLLING_FORCING.variant().schedule.denoising_steps == (1000, 800, 600, 400, 200)


@pytest.mark.parametrize("nb", [3, 5, 8])  # short (fewer than 5 blocks), exact fit, long
def test_calls_follow_the_facts_schedule(nb):
    calls, _, output, _ = run_rolling(nb)
    denoising = [c for c in calls if not c["cache"]]
    expected = facts_schedule(nb)
    assert [(c["frames"], c["timesteps"]) for c in denoising] == [(f, pytest.approx(t, rel=1e-6)) for f, t in expected]
    # a cache call follows each denoising call but the last: block s's first 3 frames at t = 0
    cache = [c for c in calls if c["cache"]]
    assert [c["frames"] for c in cache] == [f[:P] for f, _ in expected[:-1]]
    assert all(c["timesteps"] == [0.0] * P for c in cache)
    assert [c["cache"] for c in calls] == [False, True] * (len(expected) - 1) + [False]
    for c, d in zip(cache, denoising):  # the cache call writes the x0 its window's call just made
        assert torch.equal(c["x"], d["x0"][:, :P])
    if nb >= L:  # each block finished after exactly its 5 levels; its output is the x0 of the last
        for block in range(nb):
            frames = list(range(block * P, (block + 1) * P))
            seen = [(c, c["timesteps"][c["frames"].index(frames[0])]) for c in denoising if frames[0] in c["frames"]]
            assert [t for _, t in seen] == pytest.approx(T, rel=1e-6)
            last = seen[-1][0]
            i = last["frames"].index(frames[0])
            assert torch.equal(output[:, frames[0] : frames[-1] + 1], last["x0"][:, i : i + P])


def test_noise_draws_follow_the_release_order():
    """Block b enters at level 0 with its slice of the noise; after each call each block not at its last
    level gets one fresh draw of the whole window's shape (oldest block first), and its slice of
    add_noise(x0, draw, its next level) is its input to the next call."""
    nb = 6
    calls, noise, _, pipeline = run_rolling(nb, seed=3)
    denoising = [c for c in calls if not c["cache"]]
    torch.manual_seed(5)  # run_rolling seeds the draws with seed + 2
    expected_input = {}  # block -> its noisy frames for the next call
    for c in denoising:
        frames = c["frames"]
        for i in range(0, len(frames), P):
            block = frames[i] // P
            wanted = expected_input.pop(block, noise[:, frames[i] : frames[i] + P])
            assert torch.equal(c["x"][:, i : i + P], wanted), (frames, block)
        for i in range(0, len(frames), P):
            level = T.index(pytest.approx(c["timesteps"][i], rel=1e-6))
            if level == L - 1:
                continue
            flat = c["x0"].flatten(0, 1)
            draw = torch.randn(flat.shape)
            t_next = torch.full((flat.shape[0],), pipeline.denoising_steps[level + 1])
            renoised = pipeline.scheduler.add_noise(flat, draw, t_next).unflatten(0, c["x0"].shape[:2])
            expected_input[frames[i] // P] = renoised[:, i : i + P]


class FrameSlots:
    """The facts' cache arithmetic, frame by frame: slots hold video frames; each call writes the
    first block of its input; indices advance when the block ends past the frames written; FIFO after
    the anchor when 24 frames are exceeded. Returns the (video, RoPE) frame of each key frame read."""

    def __init__(self, cache=24, attend=21):
        self.slots, self.end, self.cache, self.attend = [], 0, cache, attend

    def call(self, first, frames, cache_call):
        if first + P > self.end:
            self.end = first + P
            if len(self.slots) + P > self.cache:
                del self.slots[P : 2 * P]
            self.slots += list(range(first, first + P))
            slot = len(self.slots) - P
        else:
            slot = len(self.slots) - P
            self.slots[slot:] = range(first, first + P)
        if slot == 0:
            return [(f, f) for f in range(first, first + frames)]
        if cache_call:
            start = max(0, len(self.slots) - self.attend)
            return [(f, f) for f in self.slots[start:]]
        start = max(P, slot - (self.attend - frames - P))
        working = self.slots[start:slot]
        anchor = first - len(working) - P
        return ([(f, anchor + f) for f in self.slots[:P]] + [(f, f) for f in working]
                + [(f, f) for f in range(first, first + frames)])


def drive_cache(nb, heads=1, dim=2):
    """A RollingCache driven through the windows of ``nb`` blocks with keys that name their frame; yields
    (window, cache call, its (video, RoPE, role) per key frame) for each call."""
    cache = RollingCache(1, 24, FSL, heads, dim, P, 21, torch.float32, "cpu")
    for w in range(nb + L - 1):
        s, e = max(0, w - 4), min(nb - 1, w)
        for cache_call in (False, True):
            frames = P if cache_call else (e - s + 1) * P
            k = torch.zeros(1, frames * FSL, heads, dim)
            cache.set_cache_pass(cache_call)
            keys, _ = cache.update(k, k, s * P * FSL)
            video, rope = cache.key_positions()
            first_key = rope[0, 0].item()  # the model rotates the keys read at consecutive frames from here
            assert cache.rope_starts() == (s * P, first_key)
            assert rope[0, ::FSL].tolist() == list(range(first_key, first_key + rope.shape[1] // FSL))
            roles = cache.key_roles()
            assert keys.shape[1] == video.shape[1] == roles.shape[1]
            labels = list(zip(video[0, ::FSL].tolist(), rope[0, ::FSL].tolist(), roles[0, ::FSL].tolist()))
            assert cache.key_frames() == [v for v, _, _ in labels]
            yield w, cache_call, labels


def spans(labels):
    """'f0-2@12-14' style strings of runs of consecutive (video, RoPE) frames."""
    runs = []
    for video, rope, _ in labels:
        if runs and video == runs[-1][1] + 1 and rope == runs[-1][3] + 1:
            runs[-1][1], runs[-1][3] = video, rope
        else:
            runs.append([video, video, rope, rope])
    return [f"f{a}-{b}@{c}-{d}" for a, b, c, d in runs]


@pytest.mark.parametrize("nb", [3, 5, 7, 11, 40])
def test_key_sets_and_positions_replay_the_facts(nb):
    slots = FrameSlots()
    for w, cache_call, labels in drive_cache(nb):
        s, e = max(0, w - 4), min(nb - 1, w)
        expected = slots.call(s * P, P if cache_call else (e - s + 1) * P, cache_call)
        assert [(v, r) for v, r, _ in labels] == expected, (w, cache_call)
        anchor_read = not cache_call and s > 0 or cache_call and s > 0 and labels[0][0] == 0
        assert [role for _, _, role in labels] == [SINK] * (P if anchor_read else 0) + [CACHED] * (len(labels) - (P if anchor_read else 0))


def test_key_sets_named_in_the_facts():
    """The facts file's replayed key sets, literally."""
    def reads(nb):
        return {(w, c): spans(labels) for w, c, labels in drive_cache(nb)}

    r7 = reads(7)  # 21 frames
    assert r7[5, False] == ["f0-17@0-17"]  # anchor f0-2@0-2 next to the window f3-17
    assert r7[6, False] == ["f0-20@0-20"]  # anchor, block 1, window f6-20
    assert r7[10, False] == ["f0-20@0-20"]  # the last block's final call
    r11 = reads(11)  # 33 frames
    assert r11[14, False] == ["f0-2@12-14", "f15-32@15-32"]
    r40 = reads(40)  # 120 frames
    assert r40[43, False] == ["f0-2@99-101", "f102-119@102-119"]
    assert r40[12, False] == ["f0-2@18-20", "f21-38@21-38"]  # block 7 (clean) and the window f24-38
    assert r40[43, True] == ["f99-119@99-119"]  # the cache call past 21 frames: no sink


def layer0_keys(model, frames, timestep, start):
    """Layer 0's keys of latent ``frames`` [1, F, C, H, W] at ``timestep``, rotated at temporal frames
    ``start``.., from a forward without cache (layer 0's keys depend on its own frames only)."""
    raw = []
    hook = model.blocks[0].self_attn.norm_k.register_forward_hook(lambda m, i, out: raw.append(out))
    with torch.no_grad():
        model(frames.permute(0, 2, 1, 3, 4), torch.full(frames.shape[:2], float(timestep)), CONTEXT)
    hook.remove()
    keys = raw[0].unflatten(2, (model.num_heads, -1))
    return apply_rope(keys, model.rope.freqs((frames.shape[1], 4, 4), start, keys.device))


CONTEXT = torch.randn(1, 128, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("nb, block, level", [(11, 10, 4), (11, 8, 0), (11, 7, "cache"), (11, 2, 2), (6, 0, 4)])
def test_captured_keys_equal_those_computed_from_the_frames_the_facts_name(nb, block, level):
    """The captured call of (block, level): its window and query labels, and its layer-0 keys equal keys
    recomputed from the frames each key token should come from, rotated at the facts' positions."""
    from wan.modules.attention import AttentionWeightCapture

    observer = AttentionWeightCapture()
    observer.enable([0], passes=(level,), blocks=(block,))
    calls, _, _, pipeline = run_rolling(nb, observer=observer)
    model = pipeline.generator.model
    (record,) = observer.kept_calls
    denoising = [c for c in calls if not c["cache"]]
    cache_calls = [c for c in calls if c["cache"]]
    window = block + (L - 1 if level == "cache" else level)
    assert record.labels["window"] == window
    s, e = max(0, window - 4), min(nb - 1, window)
    if level == "cache":
        assert record.labels["query_frames"] == list(range(s * P, s * P + P)) and s == block
    else:
        assert record.labels["query_frames"] == list(range(s * P, (e + 1) * P))
        levels = record.labels["query_levels"]
        assert levels[(block - s) * P : (block - s + 1) * P] == [level] * P
        assert record.labels["timestep"] == pytest.approx(T[level], rel=1e-6)
    # the facts' frames: clean keys of a block come from the cache call of its last window, at t = 0
    clean = {c["frames"][0] // P: c["x"] for c in cache_calls}  # later windows overwrite: the last call
    video, rope = (t[0, ::FSL].tolist() for t in record.key_positions)
    slots = FrameSlots()
    order = [(w, cache_call) for w in range(window + 1) for cache_call in (False, True)]
    for w, cache_call in order[: order.index((window, level == "cache")) + 1]:
        ws, we = max(0, w - 4), min(nb - 1, w)
        expected = slots.call(ws * P, P if cache_call else (we - ws + 1) * P, cache_call)
    assert list(zip(video, rope)) == expected
    call = (cache_calls if level == "cache" else denoising)[window]
    own = set(call["frames"])
    pieces = []
    for j, (v, r) in enumerate(expected):
        if v in own:  # the call's own frames: its input, at its timesteps
            i = call["frames"].index(v)
            frame, t = call["x"][:, i : i + 1], call["timesteps"][i]
        else:
            frame, t = clean[v // P][:, v % P : v % P + 1], 0.0
        pieces.append(layer0_keys(model, frame, t, r))
    assert torch.allclose(record.k, torch.cat(pieces, dim=1), atol=1e-5, rtol=1e-5)


def test_checkpoint_layout_loads_and_malformed_is_refused(tmp_path):
    config = load_config()
    generator = WanDiffusionWrapper.from_config(config)
    spec = ROLLING_FORCING.variant().checkpoint
    assert spec.default_path == "checkpoints/rolling_forcing_dmd.pt" and spec.use_ema
    state = generator.state_dict()
    fsdp = {name.replace("blocks.", "blocks._fsdp_wrapped_module.", 1).replace("model.", "model._fsdp_wrapped_module.", 1):
            value.clone() + 1 for name, value in state.items()}
    path = tmp_path / "rolling_forcing_dmd.pt"
    torch.save({"generator_ema": fsdp, "generator": {n: v.clone() + 2 for n, v in state.items()}}, path)
    target = WanDiffusionWrapper.from_config(config)
    assert load_generator_checkpoint(target, path, use_ema=True, spec=spec) == "generator_ema"
    for name, value in state.items():
        assert torch.equal(target.state_dict()[name], value + 1), name
    assert load_generator_checkpoint(target, path, use_ema=False, spec=spec) == "generator"
    assert torch.equal(target.state_dict()["model.head.head.bias"], state["model.head.head.bias"] + 2)
    torch.save({"generator": fsdp}, path)  # FSDP names are removed from the plain state dict too (README)
    assert load_generator_checkpoint(target, path, use_ema=False, spec=spec) == "generator"
    assert torch.equal(target.state_dict()["model.head.head.bias"], state["model.head.head.bias"] + 1)
    partial = {n: v for n, v in fsdp.items() if n != "model._fsdp_wrapped_module.head.head.bias"}
    torch.save({"generator_ema": partial}, path)
    with pytest.raises(WeightFileError, match=re.escape(f"{path} ['generator_ema']") + ".*model.head.head.bias"):
        load_generator_checkpoint(target, path, use_ema=True, spec=spec)


def test_policy_and_loop_must_match(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"base: {REPO / 'configs/tiny.yaml'}\nfamily: rolling_forcing\n")
    with pytest.raises(ConfigError, match=re.escape("model_kwargs.attention_mode = missing; expected one of "
                                                    "['rolling_forcing']: family rolling_forcing runs the rolling loop")):
        load_config(path)
    path.write_text(f"base: {REPO / 'configs/tiny.yaml'}\nmodel_kwargs:\n  attention_mode: rolling_forcing\n")
    with pytest.raises(ConfigError, match=re.escape("model_kwargs.attention_mode = 'rolling_forcing'; expected one of "
                                                    "['global', 'window', 'deep_sink'")):
        load_config(path)
    path.write_text(f"base: {REPO / 'configs/tiny.yaml'}\nfamily: rolling_forcing\nmodel_kwargs:\n"
                    "  attention_mode: rolling_forcing\n  attention_size: 4\n")
    with pytest.raises(ConfigError, match=re.escape("model_kwargs.attention_size = 4; expected a multiple of "
                                                    "num_frame_per_block (3) >= 6")):
        load_config(path)


def test_cli_captures_windows_and_the_plot_draws_them(tmp_path, capsys):
    import experiments.plot_figure4 as plot

    out = tmp_path / "rolling.pt"
    base = ["--config_path", str(TINY), "--no_checkpoint", "--device", "cpu", "--quiet", "--layer_indices", "0", "4"]
    assert cli.main([*base, "--num_frames", "21", "--capture_blocks", "2", "last", "--capture_step", "all",
                     "--save_mode", "summary", "--output_path", str(out)]) == 0
    cache = open_cache(out)
    assert cache.metadata["format_version"] == 5 and cache.metadata["family"] == "rolling_forcing"
    labels = {(e.block, e.pass_): e for e in cache.entries if e.layer_idx == 0}
    assert sorted(labels, key=str) == sorted([(b, p) for b in (2, 6) for p in (0, 1, 2, 3, 4, "cache")], key=str)
    last = labels[6, 4]  # the last window: block 6 alone at its last level
    assert (last.window, last.query_frames, last.levels) == (10, [18, 19, 20], [4, 4, 4])
    assert last.key_frame_indices == list(range(21)) and last.timestep == pytest.approx(T[4], rel=1e-6)
    middle = labels[2, 2]  # window 4: blocks 0..4 at levels 4..0
    assert middle.window == 4 and middle.query_frames == list(range(15))
    assert middle.levels == [4] * 3 + [3] * 3 + [2] * 3 + [1] * 3 + [0] * 3
    assert (labels[2, "cache"].window, labels[2, "cache"].query_frames, labels[2, "cache"].timestep) == (6, [6, 7, 8], 0.0)
    anchor = labels[6, 0]  # window 6: anchor f0-2 @ 0-2, block 1, the window f6-20
    assert anchor.key_roles[0, : 3 * FSL].eq(SINK).all() and anchor.key_roles[0, 3 * FSL :].eq(CACHED).all()
    figure = tmp_path / "rolling.png"
    assert plot.main(["--cache", str(out), "--block", "6", "--pass", "4", "--panels", "0:0", "--out", str(figure)]) == 0
    assert figure.stat().st_size > 0
    fig = make_figure([select(cache, pass_=0, block=6)], [(0, 0)], "curve", softmax=False, batch_index=0)
    assert "query window 6 (frames 6-20, levels 4 to 0)" in {p.get_label() for p in fig.axes[0].patches}
    capsys.readouterr()


def test_cli_refuses_labels_no_call_has(tmp_path, capsys):
    base = ["--config_path", str(TINY), "--no_checkpoint", "--device", "cpu", "--quiet",
            "--output_path", str(tmp_path / "x.pt")]
    assert cli.main([*base, "--num_frames", "9", "--capture_blocks", "0", "--capture_step", "4"]) == 2
    err = capsys.readouterr().err
    assert "no call of rolling_forcing's rolling loop has block 0 at pass 4 in a video of 3 blocks" in err
    assert "block 0 is at levels [0, 1, 2]" in err and not (tmp_path / "x.pt").exists()
    assert cli.main([*base, "--num_frames", "9", "--capture_blocks", "last", "--capture_step", "0"]) == 0
    assert "fewer than the 5 of a full window" in capsys.readouterr().err


def test_after_another_family_in_one_process_equals_one_process_alone(tmp_path):
    """Self-Forcing then Rolling Forcing in this process, and Rolling Forcing alone in a fresh one: the
    same tensors and labels."""
    import os
    import subprocess
    import sys

    def argv(config, out):
        return ["--config_path", config, "--no_checkpoint", "--device", "cpu", "--quiet", "--num_frames", "18",
                "--capture_step", "all", "--capture_blocks", "1", "--save_mode", "summary", "--output_path", str(out)]

    assert cli.main(argv("configs/tiny.yaml", tmp_path / "sf.pt")) == 0
    assert cli.main(argv(str(TINY), tmp_path / "together.pt")) == 0
    subprocess.run([sys.executable, "experiments/run_extraction_figure4.py", *argv(str(TINY), tmp_path / "alone.pt")],
                   cwd=REPO, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    together = torch.load(tmp_path / "together.pt", weights_only=True)["attention_weights"]
    alone = torch.load(tmp_path / "alone.pt", weights_only=True)["attention_weights"]
    assert len(together) == len(alone) == 2 * 6
    for a, b in zip(together, alone):
        for key, value in a.items():
            assert torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key], key


def test_capture_does_not_change_the_latents():
    from wan.modules.attention import AttentionWeightCapture

    observer = AttentionWeightCapture()
    observer.enable([0, 3], passes=(0, 1, 2, 3, 4, "cache"), blocks=tuple(range(6)))
    _, _, captured, _ = run_rolling(6, seed=4, observer=observer)
    assert observer.calls_kept == 2 * 6 * 6
    _, _, plain, _ = run_rolling(6, seed=4)
    assert torch.equal(captured, plain)


def test_version_4_files_read_as_block_wise_and_windows_checked(tmp_path):
    out = tmp_path / "v5.pt"
    assert cli.main(["--config_path", "configs/tiny.yaml", "--no_checkpoint", "--device", "cpu", "--quiet", "--num_frames",
                     "6", "--save_mode", "summary", "--output_path", str(out)]) == 0
    data = torch.load(out, weights_only=True)
    assert all(e["window"] is None and e["query_levels"] is None for e in data["attention_weights"])
    data["metadata"]["format_version"] = 4
    for entry in data["attention_weights"]:
        del entry["window"], entry["query_levels"]
    torch.save(data, tmp_path / "v4.pt")
    assert all(e.window is None and e.levels == [0, 0, 0] for e in open_cache(tmp_path / "v4.pt").entries)
    data = torch.load(out, weights_only=True)
    data["attention_weights"][0]["query_levels"] = [0, 0, 0]  # a block-wise entry stores none
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"attention_weights\[0\]\.query_levels is \[0, 0, 0\] \(list\), expected None"):
        open_cache(tmp_path / "bad.pt")
    rolling = tmp_path / "rolling.pt"
    assert cli.main(["--config_path", str(TINY), "--no_checkpoint", "--device", "cpu", "--quiet", "--num_frames", "18",
                     "--capture_blocks", "2", "--capture_step", "1", "--save_mode", "summary", "--output_path",
                     str(rolling)]) == 0
    data = torch.load(rolling, weights_only=True)
    assert data["attention_weights"][0]["query_levels"] == [3, 3, 3, 2, 2, 2, 1, 1, 1, 0, 0, 0]  # window 3: blocks 0..3
    data["attention_weights"][0]["query_levels"] = [3, 3, 3, 2, 2, 2, 0, 0, 0, 0, 0, 0]
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"query_levels gives block 2 the levels \[0, 0, 0\], expected its pass 1"):
        open_cache(tmp_path / "bad.pt")
