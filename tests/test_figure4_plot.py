"""Tests of the Figure 4 cache reader (utils/attention_cache.py) and plot command
(experiments/plot_figure4.py) on small synthetic caches built here.

Expected numbers are computed in this file with plain loops and an explicit softmax, never with the
project's reductions.
"""
import math
import os

import pytest
import torch

from experiments.plot_figure4 import layer_values, main, make_figure, sweep_values
from utils.attention_cache import CacheFileError, open_cache

B, N, FSL, FQ, FK = 1, 2, 4, 3, 5
LAYERS = [0, 2]
QUERY_FRAMES = [2, 3, 4]  # the last block, inside the key range so the shading shows


def make_logits(seed, b=B, fk=FK):
    """Known logits per layer, [b, N, FQ*FSL, fk*FSL], rounded through fp16 so the full cache
    stores them exactly."""
    gen = torch.Generator().manual_seed(seed)
    return {layer: (3 * torch.randn(b, N, FQ * FSL, fk * FSL, generator=gen)).half().float() for layer in LAYERS}


def expected_reductions(logits):
    """The three reductions of [b, N, Q, K] logits, by plain loops."""
    b, n, q_len, k_len = logits.shape
    fq, fk = q_len // FSL, k_len // FSL
    query_mean = torch.zeros(b, n, k_len)
    frame_mean = torch.zeros(b, n, fq, fk)
    frame_mass = torch.zeros(b, n, fq, fk)
    for bi in range(b):
        for h in range(n):
            for k in range(k_len):
                query_mean[bi, h, k] = sum(logits[bi, h, q, k].item() for q in range(q_len)) / q_len
            for q in range(q_len):
                row = [logits[bi, h, q, k].item() for k in range(k_len)]
                top = max(row)
                exps = [math.exp(x - top) for x in row]
                total = sum(exps)
                for k in range(k_len):
                    frame_mean[bi, h, q // FSL, k // FSL] += row[k] / (FSL * FSL)
                    frame_mass[bi, h, q // FSL, k // FSL] += exps[k] / total / FSL
    return {"query_mean_logits": query_mean, "frame_mean_logits": frame_mean, "frame_attention_mass": frame_mass}


def write_cache(path, logits, mode="full", query_frames=QUERY_FRAMES, **overrides):
    """Save a cache in the format of experiments/run_extraction_figure4.py; ``overrides`` replace
    top-level keys (a value of None removes the key)."""
    b, n, q_len, k_len = next(iter(logits.values())).shape
    entries = []
    for layer in sorted(logits):
        entry = {"layer_idx": layer, "is_logits": True, "num_frames": k_len // FSL, "frame_seq_length": FSL,
                 "num_heads": n, "num_query_frames": q_len // FSL, "num_key_frames": k_len // FSL}
        if mode == "full":
            entry["attn_logits"] = logits[layer].half()
        else:
            entry.update(expected_reductions(logits[layer]))
        entries.append(entry)
    data = {
        "attention_weights": entries, "prompt": "a cat surfing", "num_frames": k_len // FSL,
        "frame_seq_length": FSL, "num_frame_per_block": 3, "layer_indices": sorted(logits), "is_logits": True,
        "capture_method": "native_inference_capture", "query_frames": list(query_frames),
        "key_frames": list(range(k_len // FSL)),
        "metadata": {"format": "figure4-attention-cache", "format_version": 1, "save_mode": mode, "seed": 0,
                     "checkpoint_path": "none", "use_ema": False, "capture_step": 0, "timestep": 1000.0,
                     "model": {"num_layers": 3, "num_heads": n, "dim": 8}},
    }
    for key, value in overrides.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    torch.save(data, path)
    return path


@pytest.fixture
def logits():
    return make_logits(seed=0)


@pytest.fixture
def full_cache(tmp_path, logits):
    return write_cache(tmp_path / "full.pt", logits)


# ---------------------------------------------------------------------------------------------
# reader


def test_reader_exposes_format_fields(full_cache):
    cache = open_cache(full_cache)
    assert cache.save_mode == "full"
    assert cache.layer_indices == LAYERS
    assert (cache.num_heads, cache.batch_size, cache.frame_seq_length) == (N, B, FSL)
    assert (cache.num_query_frames, cache.num_key_frames) == (FQ, FK)
    assert cache.query_frames == QUERY_FRAMES and cache.prompt == "a cat surfing"
    assert cache.metadata["timestep"] == 1000.0


def test_full_cache_summary_matches_hand_computation(full_cache, logits):
    cache = open_cache(full_cache)
    for layer in LAYERS:
        got = cache.summary(layer)
        want = expected_reductions(logits[layer])
        for key in want:
            assert got[key].dtype == torch.float32
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=f"layer {layer} {key}")
    # masses are per-query-row distributions averaged over a frame: each [Fq] row sums to 1
    torch.testing.assert_close(cache.summary(2)["frame_attention_mass"].sum(-1), torch.ones(B, N, FQ))


def test_summary_cache_matches_full_cache(tmp_path):
    exact = {layer: 3 * torch.randn(B, N, FQ * FSL, FK * FSL, generator=torch.Generator().manual_seed(layer))
             for layer in LAYERS}  # fp32 logits, not fp16-representable
    full = open_cache(write_cache(tmp_path / "full.pt", exact, mode="full"))
    summary = open_cache(write_cache(tmp_path / "summary.pt", exact, mode="summary"))
    assert summary.save_mode == "summary"
    for layer in LAYERS:
        for key, value in summary.summary(layer).items():
            # |logit| ~ 10 stored in fp16 (relative step 2^-11): errors of a few 1e-3 at most
            torch.testing.assert_close(full.summary(layer)[key], value, rtol=0, atol=1e-2, msg=f"{layer} {key}")


def test_reader_selects_batch_sample(tmp_path):
    two = make_logits(seed=3, b=2)
    cache = open_cache(write_cache(tmp_path / "b2.pt", two))
    assert cache.batch_size == 2
    want = expected_reductions(two[2])
    torch.testing.assert_close(layer_values(cache, 2, "token_logits", 1), want["query_mean_logits"][1])
    frame_logits = want["frame_mean_logits"][1].mean(dim=1)  # over query frames
    torch.testing.assert_close(layer_values(cache, 2, "frame_logits", 1), frame_logits)


def test_reader_unknown_layer(full_cache):
    with pytest.raises(ValueError, match=r"no layer 1; layers stored: \[0, 2\]"):
        open_cache(full_cache).summary(1)


@pytest.mark.parametrize(
    "make_file, message",
    [
        (lambda p: None, "file not found"),
        (lambda p: torch.save({"a": 1}, p), "not a Figure 4 attention cache"),
        (lambda p: p.write_bytes(os.urandom(512)), "not a torch file"),
        (lambda p: p.write_bytes(b""), "not a torch file"),
        (lambda p: torch.save({"a": torch.nn.Identity()}, p), "objects beyond tensors"),
    ],
    ids=["missing", "foreign-torch-file", "random-bytes", "empty", "pickled-object"],
)
def test_reader_rejects_non_caches(tmp_path, make_file, message):
    path = tmp_path / "x.pt"
    make_file(path)
    with pytest.raises(CacheFileError, match=message) as err:
        open_cache(path)
    assert str(path) in str(err.value)


def test_reader_rejects_truncated_file(full_cache):
    data = full_cache.read_bytes()
    full_cache.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheFileError, match="truncated or corrupt"):
        open_cache(full_cache)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"metadata": {"format": "something-else", "format_version": 1, "save_mode": "full"}},
         "metadata.format is 'something-else'"),
        ({"metadata": {"format": "figure4-attention-cache", "format_version": 2, "save_mode": "full"}},
         "format_version is 2"),
        ({"prompt": None}, "the top level lacks prompt"),
        ({"is_logits": False}, "is_logits"),
        ({"layer_indices": [0, 1]}, "do not match the layers stored"),
        ({"frame_seq_length": 5}, "frame_seq_length is 4, expected 5"),
        ({"key_frames": [1, 2, 3, 4, 5]}, "expected 0..num_key_frames-1"),
    ],
    ids=["format", "version", "missing-key", "not-logits", "layers", "fsl", "key-frames"],
)
def test_reader_rejects_malformed_caches(tmp_path, logits, overrides, message):
    path = write_cache(tmp_path / "bad.pt", logits, **overrides)
    with pytest.raises(CacheFileError, match=message):
        open_cache(path)


def test_reader_rejects_wrong_tensor_shape(tmp_path, logits):
    path = write_cache(tmp_path / "bad.pt", {0: logits[0][..., :-1], 2: logits[2][..., :-1]})
    with pytest.raises(CacheFileError, match="attn_logits is"):
        open_cache(path)


# ---------------------------------------------------------------------------------------------
# plot command


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "name, magic",
    [("fig.png", b"\x89PNG\r\n\x1a\n"), ("fig.pdf", b"%PDF"), ("fig.svg", b"<?xml")],
)
def test_plot_writes_format_by_extension(tmp_path, capsys, full_cache, name, magic):
    out = tmp_path / "plots" / name
    out.parent.mkdir()
    code, stdout, _ = run(capsys, "--cache", full_cache, "--panels", "0:0", "2:1", "--out", out)
    assert code == 0
    assert out.read_bytes().startswith(magic) and out.stat().st_size > 1000
    assert str(full_cache) in stdout
    assert os.listdir(out.parent) == [name]  # no temporary file left behind
    if name.endswith(".svg"):
        assert "<svg" in out.read_text()


@pytest.mark.parametrize("extra", [["--view", "heatmap"], ["--view", "frames"], ["--softmax"],
                                   ["--view", "heatmap", "--softmax"], ["--view", "frames", "--softmax"]])
def test_plot_other_views(tmp_path, capsys, full_cache, extra):
    out = tmp_path / "fig.png"
    code, _, err = run(capsys, "--cache", full_cache, "--panels", "0:1", "2:0", "--out", out, *extra)
    assert code == 0, err
    assert out.read_bytes().startswith(b"\x89PNG")


def test_curve_panel_plots_the_named_head(full_cache, logits):
    cache = open_cache(full_cache)
    fig = make_figure([cache], [(2, 1)], "curve", softmax=False, batch_index=0)
    ax = fig.axes[0]
    assert ax.get_title() == "L3H2"
    assert ax.get_xlabel() == "Key Frame Index" and ax.get_ylabel() == "Average Attention Weight"
    assert ax.get_xlim() == (0, FK)
    (curve,) = [line for line in ax.lines if len(line.get_xdata()) == FK * FSL + 1]
    want = expected_reductions(logits[2])["query_mean_logits"][0, 1]
    torch.testing.assert_close(torch.as_tensor(curve.get_ydata()[:-1]), want)
    torch.testing.assert_close(torch.as_tensor(curve.get_xdata()), torch.arange(FK * FSL + 1) / FSL)


@pytest.mark.parametrize("panel, message", [("1:0", "layer 1 is not in"), ("2:2", "head 2 out of range")])
def test_plot_missing_layer_or_head(tmp_path, capsys, full_cache, panel, message):
    out = tmp_path / "fig.png"
    code, _, err = run(capsys, "--cache", full_cache, "--panels", panel, "--out", out)
    assert code == 2
    assert message in err
    assert "[0, 2]" in err or "0..1" in err
    assert not out.exists()


@pytest.mark.parametrize("make_file, message", [
    (lambda p: torch.save({"a": 1}, p), "not a Figure 4 attention cache"),
    (lambda p: p.write_bytes(os.urandom(256)), "not a torch file"),
])
def test_plot_rejects_non_cache(tmp_path, capsys, make_file, message):
    path, out = tmp_path / "x.pt", tmp_path / "fig.png"
    make_file(path)
    code, _, err = run(capsys, "--cache", path, "--out", out)
    assert code == 2 and message in err and str(path) in err
    assert not out.exists()


def test_plot_rejects_bad_output(tmp_path, capsys, full_cache):
    code, _, err = run(capsys, "--cache", full_cache, "--panels", "0:0", "--out", tmp_path / "fig.jpg")
    assert code == 2 and "'.jpg' not supported" in err
    code, _, err = run(capsys, "--cache", full_cache, "--panels", "0:0", "--out", tmp_path / "nope" / "fig.png")
    assert code == 2 and "does not exist" in err
    assert os.listdir(tmp_path) == ["full.pt"]


def test_plot_rejects_malformed_panel(capsys, full_cache):
    with pytest.raises(SystemExit) as exit_info:
        main(["--cache", str(full_cache), "--panels", "L1H1"])
    assert exit_info.value.code != 0
    assert "LAYER:HEAD" in capsys.readouterr().err


def test_help_explains_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--cache", "--panels", "--out", "--view", "--softmax", "--batch_index", "layer:head", "glob"):
        assert flag in text


def test_sweep_rejects_mismatched_frame_counts(tmp_path, capsys, logits):
    a = write_cache(tmp_path / "a.pt", logits)
    b = write_cache(tmp_path / "b.pt", make_logits(seed=1, fk=FK + 1))
    out = tmp_path / "fig.png"
    code, _, err = run(capsys, "--cache", a, b, "--panels", "0:0", "--out", out)
    assert code == 2
    assert str(a) in err and str(b) in err and "num_key_frames differs (5 vs 6)" in err
    assert not out.exists()


def test_sweep_glob_matching_nothing(tmp_path, capsys):
    code, _, err = run(capsys, "--cache", tmp_path / "none_*.pt", "--out", tmp_path / "fig.png")
    assert code == 2 and "matches no file" in err


def test_sweep_mean_and_std_over_three_caches(tmp_path, capsys):
    per_file = [make_logits(seed=s) for s in (10, 11, 12)]
    modes = ["full", "summary", "full"]  # save modes may be mixed
    for i, (lg, mode) in enumerate(zip(per_file, modes)):
        write_cache(tmp_path / f"sweep_{i}.pt", lg, mode=mode)
    caches = [open_cache(tmp_path / f"sweep_{i}.pt") for i in range(3)]

    curves = torch.stack([expected_reductions(lg[2])["query_mean_logits"][0] for lg in per_file])  # [3, N, K]
    mean, std = sweep_values(caches, 2, "token_logits", 0)
    torch.testing.assert_close(mean, torch.mean(curves, dim=0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(std, torch.std(curves, dim=0), rtol=1e-3, atol=1e-4)
    by_hand = ((curves - curves.mean(0)) ** 2).sum(0).div(2).sqrt()  # sample std, n - 1 = 2
    torch.testing.assert_close(std, by_hand, rtol=1e-3, atol=1e-4)

    masses = torch.stack([expected_reductions(lg[0])["frame_attention_mass"][0].mean(1) for lg in per_file])
    mean, std = sweep_values(caches, 0, "frame_mass", 0)
    torch.testing.assert_close(mean, masses.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(std, masses.std(0), rtol=1e-3, atol=1e-5)

    assert sweep_values(caches[:1], 2, "token_logits", 0)[1] is None  # one file: no band

    out = tmp_path / "sweep.svg"
    code, stdout, err = run(capsys, "--cache", tmp_path / "sweep_*.pt", "--panels", "2:1", "--out", out)
    assert code == 0, err
    assert "using 3 cache file(s)" in stdout and all(f"sweep_{i}.pt" in stdout for i in range(3))
    assert out.read_text().count("<svg") == 1


def test_sweep_rejects_same_file_twice(tmp_path, capsys, full_cache):
    code, _, err = run(capsys, "--cache", full_cache, tmp_path / "*.pt", "--out", tmp_path / "fig.png")
    assert code == 2 and "more than once" in err
