"""Comparisons in experiments/plot_figure4.py: several statistics files side by side or on shared axes
(--overlay), labelled by their settings, never averaged; caches of different lengths (21 and 126
frames) drawn together on the true-frame key axis."""
import pytest
import torch

import experiments.run_extraction_figure4 as extraction
from experiments.plot_figure4 import main as plot_main
from utils.attention_cache import CACHED, SINK, TOP_C, CacheEntry, build_cache, open_cache, save_cache
from utils.figure4_plot import make_figure, plt
from utils.figure4_sources import cache_sources, stats_sources
from utils.sweep_stats import load_statistics, save_statistics, sweep_statistics

FSL, FQ, HEADS = 2, 3, 2
GLOBAL6 = {"frames": list(range(6)), "roles": {}, "num_frames": 6, "policy": "global: every block attends"}
WINDOW12 = {"frames": [0, 6, 7, 8, 9, 10, 11], "roles": {0: SINK}, "num_frames": 12,
            "policy": "window: 7 frames (sink 1)"}


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def write_item(path, seed, layout, tokens=None):
    """A summary cache of the last block of ``layout`` with random reductions; ``tokens`` overrides the
    per-token video frames (and marks them top-C), as a compression that keeps other tokens per item."""
    gen = torch.Generator().manual_seed(seed)
    frames, n = layout["frames"], layout["num_frames"]
    video = torch.tensor(frames, dtype=torch.int32).repeat_interleave(FSL)
    roles = torch.tensor([layout["roles"].get(f, CACHED) for f in frames], dtype=torch.int8).repeat_interleave(FSL)
    if tokens is not None:
        video, roles = tokens.to(torch.int32), torch.where(tokens != video, TOP_C, roles).to(torch.int8)
    entries = []
    for layer in (0, 1):
        fk = len(frames)
        mass = torch.rand(1, HEADS, FQ, fk, generator=gen)
        entries.append(CacheEntry(
            layer_idx=layer, block=n // FQ - 1, pass_=0, timestep=1000.0, query_frames=list(range(n - FQ, n)),
            key_frame_indices=frames, num_heads=HEADS, nonfinite=0, logit_min=-1.0, logit_max=1.0,
            tensors={"query_mean_logits": torch.randn(1, HEADS, fk * FSL, generator=gen),
                     "frame_mean_logits": torch.randn(1, HEADS, FQ, fk, generator=gen),
                     "frame_attention_mass": mass / mass.sum(-1, keepdim=True)},
            key_video_frames=video[None].clone(), key_rope_frames=video[None].clone(), key_roles=roles[None].clone()))
    metadata = {"seed": seed, "family": "self_forcing", "variant": "dmd", "cache_policy": layout["policy"],
                "config": {"random_init": True, "model_kwargs": {"mode": layout["policy"]}}, "dtype": "float32"}
    save_cache(path, build_cache(prompt="p", num_frames=n, frame_seq_length=FSL, num_frame_per_block=FQ,
                                 layer_indices=[0, 1], save_mode="summary", entries=entries, metadata=metadata))
    return open_cache(path)


def write_stats(folder, name, layout, tokens_of_item=None):
    caches = [write_item(folder / f"{name}{i}.pt", i, layout, None if tokens_of_item is None else tokens_of_item(i))
              for i in range(3)]
    path = folder / f"{name}.pt"
    save_statistics(sweep_statistics(caches), path)
    return path


def step_lines(ax):
    return [line for line in ax.lines if line.get_drawstyle() == "steps-post"]


def test_two_statistics_files_of_different_lengths_side_by_side_and_overlaid(tmp_path, capsys):
    short, long = write_stats(tmp_path, "global6", GLOBAL6), write_stats(tmp_path, "window12", WINDOW12)
    assert load_statistics(long)["groups"][0]["key_labels"]["key_roles"][:FSL] == [SINK] * FSL
    sources, panels = stats_sources([short, long], None, None, [(1, 1)], 0)
    assert [s.model for s in sources] == ["self_forcing, dmd, global", "self_forcing, dmd, window"]
    tiled = make_figure(sources, panels, "curve", False, 0, "frames")
    left, right = tiled.axes
    assert left.get_shared_y_axes().joined(left, right)  # one y scale to compare
    assert "self_forcing, dmd, window (n = 3): block 3 (frames 9-11)" in right.get_title().replace("\n", " ")
    # the window's keys at their video frames (sink frame 0, frames 1-5 evicted), the mean of the file
    edges = [x for line in step_lines(right) for x in line.get_xdata()[:-1]]
    assert edges == [0, 0.5] + [6 + i / FSL for i in range(6 * FSL)] and right.get_xlim() == (0, 12)
    mean = load_statistics(long)["groups"][1]["curve"]["mean"][1]
    assert [y for line in step_lines(right) for y in line.get_ydata()[:-1]] == pytest.approx(mean.tolist())

    overlay = make_figure(sources, panels, "curve", False, 0, "frames", overlay=True)
    (ax,) = overlay.axes
    lines = step_lines(ax)
    assert [line.get_label() for line in lines if not line.get_label().startswith("_")] == [
        "self_forcing, dmd, global (n = 3): block 1 (frames 3-5), pass 0 (95% CI)",
        "self_forcing, dmd, window (n = 3): block 3 (frames 9-11), pass 0 (95% CI)"]
    assert lines[0].get_xdata()[0] == 0 and lines[0].get_xdata()[-1] == 6  # the 6-frame file on frames 0..6
    assert ax.get_xlim() == (0, 12) and "never averaged together" in overlay._suptitle.get_text()
    assert "RANDOM WEIGHTS" in overlay._suptitle.get_text()

    out = tmp_path / "cmp.png"
    for extra in ([], ["--overlay"], ["--overlay", "--softmax"], ["--overlay", "--x", "slots"]):
        assert plot_main(["--stats", str(short), str(long), "--panels", "1:1", "--out", str(out), *extra]) == 0
        assert out.read_bytes().startswith(b"\x89PNG")
    assert plot_main(["--stats", str(tmp_path / "*6.pt"), str(long), "--overlay", "--view", "frames", "--out",
                      str(out)]) == 2
    assert "--overlay draws curves on shared axes" in capsys.readouterr().err


def test_compressed_items_with_other_tokens_keep_no_token_frames(tmp_path, capsys):
    layout = {**WINDOW12, "frames": [0, 2, 7, 8, 9, 10, 11]}

    def tokens(i):  # the slot of frame 2 holds top-C tokens of frames 2 and 3 + i: other tokens per item
        video = torch.tensor(layout["frames"]).repeat_interleave(FSL)
        video[3] = 3 + i
        return video

    path = write_stats(tmp_path, "pc", layout, tokens)
    assert all(g["key_labels"] is None for g in load_statistics(path)["groups"])
    out = tmp_path / "pc.png"
    code = plot_main(["--stats", str(path), str(write_stats(tmp_path, "g", GLOBAL6)), "--overlay", "--out", str(out)])
    assert code == 2 and "mix video frames" in capsys.readouterr().err and not out.exists()
    assert plot_main(["--stats", str(path), str(tmp_path / "g.pt"), "--overlay", "--x", "slots", "--out", str(out)]) == 0


def test_one_model_at_two_lengths_is_two_labelled_columns(tmp_path):
    paths = [str(tmp_path / f"tiny{n}.pt") for n in (6, 12)]
    for n, path in zip((6, 12), paths):
        assert extraction.main(["--config_path", "configs/tiny.yaml", "--device", "cpu", "--quiet",
                                "--num_frames", str(n), "--save_mode", "summary", "--output_path", path]) == 0
    sources, panels = cache_sources(paths, None, None, [(0, 0)], 0, "frames", "curve", False, by_model=True)
    assert [s.model for s in sources] == ["self_forcing, dmd, global (6 frames)", "self_forcing, dmd, global (12 frames)"]
    assert len(make_figure(sources, panels, "curve", False, 0, "frames").axes) == 2


def test_caches_of_21_and_126_frames_on_one_true_frame_axis(tmp_path):
    """A 21-frame global-attention cache and a 126-frame Deep Forcing cache (sink and compression) of the
    tiny model, overlaid: each key token at its video frame, up to frame 126."""
    paths = {21: tmp_path / "sf21.pt", 126: tmp_path / "df126.pt"}
    for (n, path), config in zip(paths.items(), ("tiny", "tiny_deep_forcing")):
        assert extraction.main(["--config_path", f"configs/{config}.yaml", "--device", "cpu",
                                "--quiet", "--num_frames", str(n), "--save_mode", "summary", "--output_path", str(path)]) == 0
    sources, panels = cache_sources([str(p) for p in paths.values()], None, None, [(4, 3)], 0, "frames", "curve",
                                       False, by_model=True)
    (ax,) = make_figure(sources, panels, "curve", False, 0, "frames", overlay=True).axes
    assert ax.get_xlim() == (0, 126)
    deep = open_cache(paths[126]).entries[-1]
    video = deep.key_video_frames[0]
    lines = step_lines(ax)
    colours = {}
    for line in lines:
        colours.setdefault(line.get_color(), []).append(line)
    global_lines, deep_lines = colours.values()
    assert global_lines[0].get_xdata()[0] == 0 and global_lines[-1].get_xdata()[-1] == 21
    starts = sorted(float(line.get_xdata()[0]) for line in deep_lines)
    assert starts[0] == 0 and float(deep_lines[-1].get_xdata()[-1]) == 126
    assert set(int(x) for line in deep_lines for x in line.get_xdata()[:-1]) == set(video.tolist())


def test_one_model_in_exact_and_fast_mode_is_two_labelled_columns():
    """The precision tells two settings apart (their caches are never averaged: utils.sweep_stats.compare_key)."""
    from utils.figure4_sources import setting_labels

    base = {"family": "self_forcing", "variant": "dmd", "cache_policy": "global", "num_frames": 6, "dtype": "bfloat16",
            "config_path": "configs/tiny.yaml", "checkpoint_path": None}
    labels = setting_labels([{**base, "precision": "exact"}, {**base, "precision": "fast"}])
    assert labels == ["self_forcing, dmd, global (exact)", "self_forcing, dmd, global (fast)"]
