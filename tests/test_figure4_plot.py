"""Tests of the Figure 4 cache reader (utils/attention_cache.py) and plot command
(experiments/plot_figure4.py, its library utils/figure4_sources.py and utils/figure4_plot.py) on small
synthetic caches built here.

Expected numbers are computed in this file with plain loops and an explicit softmax, never with the
project's reductions.
"""
import math
import os
import shlex
from pathlib import Path

import pytest
import torch
from matplotlib.container import BarContainer

from experiments.aggregate_figure4 import main as aggregate_main
from experiments.plot_figure4 import main
from utils.attention_cache import (
    CACHED,
    SINK,
    TOP_C,
    CacheEntry,
    CacheFileError,
    build_cache,
    describe,
    open_cache,
    save_cache,
)
from utils.figure4_plot import make_figure, true_frame_tokens
from utils.figure4_sources import StatsFile, column_band, layer_values, select, select_columns, sweep_values
from utils.sweep_stats import save_statistics, sweep_statistics

B, N, FSL, FQ, FK = 1, 2, 4, 3, 5
LAYERS = [0, 2]
NUM_FRAMES = 6  # two blocks of FQ frames; the second block's queries see a window of FK key frames:
QUERY_FRAMES = [3, 4, 5]
KEY_FRAME_INDICES = [0, 2, 3, 4, 5]  # the sink frame 0, then the latest frames


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


def make_entry(layer, logits, mode, pass_=0, nonfinite=0):
    """One build_cache entry of the last block for ``logits`` [b, N, Q, K]."""
    fk = logits.shape[-1] // FSL
    key_frames = KEY_FRAME_INDICES if fk == FK else list(range(NUM_FRAMES))
    per_token = torch.tensor(key_frames, dtype=torch.int32).repeat_interleave(FSL).expand(logits.shape[0], -1)
    tensors = {"attn_logits": logits.half()} if mode == "full" else expected_reductions(logits)
    return CacheEntry(layer_idx=layer, block=1, pass_=pass_, timestep=0.0 if pass_ == "cache" else 1000.0,
                      query_frames=QUERY_FRAMES, key_frame_indices=key_frames, num_heads=logits.shape[1],
                      nonfinite=nonfinite, logit_min=logits.min().item(), logit_max=logits.max().item(), tensors=tensors,
                      key_video_frames=per_token.clone(), key_rope_frames=per_token.clone(),
                      key_roles=torch.zeros_like(per_token, dtype=torch.int8))


def build(logits_by_pass, mode="full", prompt="a cat surfing", layer_indices=LAYERS, nonfinite=0, random_init=False,
          family=None):
    """A cache dict through build_cache; ``logits_by_pass`` maps a pass to {layer: logits}."""
    entries = [make_entry(layer, by_layer[layer], mode, pass_, nonfinite)
               for pass_, by_layer in logits_by_pass.items() for layer in layer_indices]
    metadata = {"seed": 0, "capture_step": "0", "config": {"random_init": random_init}}
    if family is not None:
        metadata["family"] = family
    return build_cache(prompt=prompt, num_frames=NUM_FRAMES, frame_seq_length=FSL, num_frame_per_block=FQ,
                       layer_indices=layer_indices, save_mode=mode, entries=entries, metadata=metadata)


def write_cache(path, logits, mode="full", **options):
    """Save a one-pass cache of ``logits`` {layer: [b, N, Q, K]} with save_cache."""
    save_cache(path, build({0: logits}, mode, **options))
    return path


def craft(path, logits, change):
    """Save, bypassing save_cache's checks, a cache dict altered in place by ``change(data)``."""
    data = build({0: logits})
    change(data)
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
    assert cache.query_frames == QUERY_FRAMES and cache.key_frames == list(range(FK))
    assert cache.prompt == "a cat surfing" and cache.labels == [(1, 0)]
    assert cache.metadata["format_version"] == 5 and cache.metadata["capture_step"] == "0"
    entry = cache.entry(2)
    assert (entry.layer_idx, entry.block, entry.pass_, entry.timestep, entry.nonfinite) == (2, 1, 0, 1000.0, 0)
    assert (entry.num_query_frames, entry.num_key_frames) == (FQ, FK)
    assert entry.key_frame_indices == KEY_FRAME_INDICES and entry.query_frames == QUERY_FRAMES


def test_layer_order_and_several_passes(tmp_path):
    by_pass = {0: make_logits(seed=4), "cache": make_logits(seed=5)}
    path = tmp_path / "passes.pt"
    save_cache(path, build(by_pass, layer_indices=[2, 0]))
    cache = open_cache(path)
    assert cache.layer_indices == [2, 0]  # as the run was given them
    assert [(e.layer_idx, e.pass_) for e in cache.entries] == [(2, 0), (0, 0), (2, "cache"), (0, "cache")]
    assert cache.labels == [(1, 0), (1, "cache")]
    with pytest.raises(ValueError, match=r"holds several; .* it holds block 1 pass 0, block 1 pass 'cache'"):
        cache.summary(0)
    with pytest.raises(ValueError, match="pass 3: the file holds no such entry"):
        cache.summary(0, pass_=3)
    for pass_, by_layer in by_pass.items():
        want = expected_reductions(by_layer[0])["query_mean_logits"]
        torch.testing.assert_close(cache.summary(0, pass_=pass_, block=1)["query_mean_logits"], want)
    assert cache.entry(0, pass_="cache").timestep == 0.0
    info = describe(path)
    assert info["labels"] == cache.labels and info["layer_indices"] == [2, 0] and info["save_mode"] == "full"


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
    source = select(cache)
    torch.testing.assert_close(layer_values(source, 2, "token_logits", 1), want["query_mean_logits"][1])
    frame_logits = want["frame_mean_logits"][1].mean(dim=1)  # over query frames
    torch.testing.assert_close(layer_values(source, 2, "frame_logits", 1), frame_logits)


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


def _entry(data, key, value, i=0):
    data["attention_weights"][i][key] = value


def _metadata(data, key, value):
    data["metadata"][key] = value


CRAFTED = {  # id: (change to a valid cache dict, words the one-line error must hold)
    "version-1": (lambda d: _metadata(d, "format_version", 1), "metadata.format_version is 1 (int); this reader "
                                                               "reads versions 3, 4, 5"),
    "format": (lambda d: _metadata(d, "format", "other"), "metadata.format is 'other' (str)"),
    "metadata-list": (lambda d: d.update(metadata=[1]), "metadata is [1] (list), expected a dict"),
    "config-str": (lambda d: _metadata(d, "config", "x"), "metadata.config is 'x' (str), expected a dict"),
    "random-init-int": (lambda d: _metadata(d, "config", {"random_init": 1}), "metadata.config.random_init is 1"),
    "prompt-bytes": (lambda d: d.update(prompt=b"a cat"), "prompt is b'a cat' (bytes), expected a str"),
    "missing-key": (lambda d: d.pop("prompt"), "the top level lacks 'prompt'"),
    "extra-key": (lambda d: d.update(extra=1), "unexpected keys ['extra']"),
    "not-logits": (lambda d: d.update(is_logits=1), "is_logits is 1 (int), expected True"),
    "frames-bool": (lambda d: d.update(num_frames=True), "num_frames is True (bool), expected an int >= 1"),
    "frames-tensor": (lambda d: d.update(num_frames=torch.tensor(6)), "num_frames is tensor(6) (Tensor)"),
    "layers-non-int": (lambda d: d.update(layer_indices=[0, "2"]), "layer_indices is [0, '2'] (list)"),
    "layers-mismatch": (lambda d: d.update(layer_indices=[0, 1]), "layer_idx is 2, which is not in layer_indices"),
    "top-query-frames": (lambda d: d.update(query_frames=[2, 3, 4]), "query_frames is [2, 3, 4] (list), expected "
                                                                     "[3, 4, 5]"),
    "top-key-frames": (lambda d: d.update(key_frames=[1, 2]), "key_frames is [1, 2] (list), expected 0..4"),
    "entries-dict": (lambda d: d.update(attention_weights={}), "attention_weights is {} (dict)"),
    "entry-missing": (lambda d: d["attention_weights"][0].pop("block"), "attention_weights[0] lacks 'block'"),
    "heads-str": (lambda d: _entry(d, "num_heads", "2"), "attention_weights[0].num_heads is '2' (str)"),
    "layer-float": (lambda d: _entry(d, "layer_idx", 0.0), "attention_weights[0].layer_idx is 0.0 (float)"),
    "block-bool": (lambda d: _entry(d, "block", True), "attention_weights[0].block is True (bool)"),
    "block-range": (lambda d: _entry(d, "block", 2), "attention_weights[0].block is 2, expected < 2"),
    "pass-str": (lambda d: _entry(d, "pass", "2"), "attention_weights[0].pass is '2' (str), expected an int >= 0 "
                                                   "or 'cache'"),
    "pass-negative": (lambda d: _entry(d, "pass", -1), "attention_weights[0].pass is -1 (int)"),
    "timestep-int": (lambda d: _entry(d, "timestep", 1000), "attention_weights[0].timestep is 1000 (int), "
                                                            "expected a float"),
    "nonfinite-bool": (lambda d: _entry(d, "nonfinite", False), "attention_weights[0].nonfinite is False (bool)"),
    "logit-max-str": (lambda d: _entry(d, "logit_max", "9"), "attention_weights[0].logit_max is '9' (str)"),
    "query-frames-float": (lambda d: _entry(d, "query_frames", [3.0, 4, 5]), "attention_weights[0].query_frames is "
                                                                             "[3.0, 4, 5]"),
    "key-frames-str": (lambda d: _entry(d, "key_frame_indices", ["0", 2, 3, 4, 5]), "key_frame_indices is ['0', 2"),
    "key-frames-order": (lambda d: _entry(d, "key_frame_indices", [0, 3, 2, 4, 5]), "non-decreasing list of ints in "
                                                                                    "[0, 6)"),
    "num-key-frames": (lambda d: _entry(d, "num_key_frames", 6), "attention_weights[0].num_key_frames is 6 (int), "
                                                                 "expected 5"),
    "fsl": (lambda d: _entry(d, "frame_seq_length", 5), "attention_weights[0].frame_seq_length is 5 (int), "
                                                        "expected 4"),
    "dtype": (lambda d: _entry(d, "attn_logits", d["attention_weights"][0]["attn_logits"].float()),
              "attention_weights[0].attn_logits is torch.float32 [1, 2, 12, 20], expected a torch.float16 tensor"),
    "rank": (lambda d: _entry(d, "attn_logits", d["attention_weights"][0]["attn_logits"][0]),
             "attn_logits is torch.float16 [2, 12, 20], expected a torch.float16 tensor of shape [B, 2, 12, 20]"),
    "not-a-tensor": (lambda d: _entry(d, "attn_logits", [1.0]), "attn_logits is [1.0] (list)"),
    "summary-tensor-in-full": (lambda d: _entry(d, "query_mean_logits", torch.zeros(1)),
                               "unexpected keys ['query_mean_logits']"),
    "duplicate-label": (lambda d: _entry(d, "layer_idx", 2), "layer 2 has two entries for block 1, pass 0"),
    "missing-pass": (lambda d: _entry(d, "pass", "cache"), "every layer must hold the same captured passes"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_reader_rejects_crafted_caches(tmp_path, logits, case):
    change, words = CRAFTED[case]
    path = craft(tmp_path / "bad.pt", logits, change)
    with pytest.raises(CacheFileError) as err:
        open_cache(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert words in message


def test_build_cache_refuses_programming_errors(logits):
    with pytest.raises(ValueError, match=r"build_cache: metadata\['t'\] is tensor\(1.\) \(Tensor\)"):
        build_cache(prompt="p", num_frames=6, frame_seq_length=FSL, num_frame_per_block=FQ, layer_indices=[0],
                    save_mode="full", entries=[make_entry(0, logits[0], "full")], metadata={"t": torch.tensor(1.0)})
    with pytest.raises(ValueError, match=r"metadata may not set \['format_version'\]"):
        build_cache(prompt="p", num_frames=6, frame_seq_length=FSL, num_frame_per_block=FQ, layer_indices=[0],
                    save_mode="full", entries=[make_entry(0, logits[0], "full")], metadata={"format_version": 4})
    with pytest.raises(ValueError, match=r"build_cache: attention_weights\[0\] lacks 'query_mean_logits'"):
        build_cache(prompt="p", num_frames=6, frame_seq_length=FSL, num_frame_per_block=FQ, layer_indices=[0],
                    save_mode="summary", entries=[make_entry(0, logits[0], "full")], metadata={})
    with pytest.raises(ValueError, match=r"build_cache: entries\[0\] is \{'layer_idx': 0\} \(dict\), expected a CacheEntry"):
        build_cache(prompt="p", num_frames=6, frame_seq_length=FSL, num_frame_per_block=FQ, layer_indices=[0],
                    save_mode="full", entries=[{"layer_idx": 0}], metadata={})
    with pytest.raises(ValueError, match="build_cache: layer 2 holds .* every layer must hold the same"):
        build_cache(prompt="p", num_frames=6, frame_seq_length=FSL, num_frame_per_block=FQ, layer_indices=[0, 2],
                    save_mode="full", entries=[make_entry(0, logits[0], "full"), make_entry(2, logits[2], "full"),
                                               make_entry(0, logits[0], "full", pass_=1)], metadata={})


def test_saved_file_keeps_the_given_values(tmp_path, logits):
    path = write_cache(tmp_path / "c.pt", logits, nonfinite=3)
    data = torch.load(path, weights_only=True)
    entry = data["attention_weights"][1]
    assert entry["nonfinite"] == 3 and entry["layer_idx"] == 2 and entry["pass"] == 0
    assert entry["logit_min"] == logits[2].min().item() and entry["logit_max"] == logits[2].max().item()
    assert torch.equal(entry["attn_logits"].float(), logits[2])
    assert data["key_frames"] == list(range(FK)) and data["query_frames"] == QUERY_FRAMES


def test_reader_rejects_wrong_tensor_shape(tmp_path, logits):
    path = craft(tmp_path / "bad.pt", logits, lambda d: _entry(d, "attn_logits", d["attention_weights"][0]
                                                                ["attn_logits"][..., :-1]))
    with pytest.raises(CacheFileError, match=r"attn_logits is torch.float16 \[1, 2, 12, 19\]"):
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
    fig = make_figure([select(open_cache(full_cache))], [(2, 1)], "curve", softmax=False, batch_index=0)
    ax = fig.axes[0]
    assert ax.get_title() == "layer 2 head 1 (L3H2)"  # the numbering of --panels 2:1, the paper's name beside it
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
    caches = [select(open_cache(tmp_path / f"sweep_{i}.pt")) for i in range(3)]

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


def test_shading_marks_the_query_frames_slots_in_a_window(full_cache):
    fig = make_figure([select(open_cache(full_cache))], [(0, 0)], "curve", softmax=False, batch_index=0)
    (shade,) = [p for p in fig.axes[0].patches if p.get_label().startswith("query block")]
    assert shade.get_label() == "query block (frames 3-5)"
    assert (shade.get_x(), shade.get_width()) == (2, 3)  # key slots 2..4 hold video frames 3..5


def test_plot_chooses_a_pass(tmp_path, capsys):
    by_pass = {0: make_logits(seed=6), "cache": make_logits(seed=7)}
    path, out = tmp_path / "passes.pt", tmp_path / "fig.png"
    save_cache(path, build(by_pass))
    code, _, err = run(capsys, "--cache", path, "--panels", "0:0", "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "block 1 pass 0, block 1 pass 'cache'" in err and "--pass" in err and not out.exists()
    code, stdout, err = run(capsys, "--cache", path, "--panels", "0:0", "--pass", "cache", "--block", "1", "--out", out)
    assert code == 0, err
    assert "pass cache, timestep 0" in stdout and out.read_bytes().startswith(b"\x89PNG")
    fig = make_figure([select(open_cache(path), "cache")], [(0, 1)], "curve", softmax=False, batch_index=0)
    (curve,) = [line for line in fig.axes[0].lines if len(line.get_xdata()) == FK * FSL + 1]
    want = expected_reductions(by_pass["cache"][0])["query_mean_logits"][0, 1]
    torch.testing.assert_close(torch.as_tensor(curve.get_ydata()[:-1]), want)
    code, _, err = run(capsys, "--cache", path, "--pass", "2", "--out", out)
    assert code == 2 and "pass 2: the file holds no such entry" in err


def test_plot_rejects_a_bad_pass_flag(capsys, full_cache):
    with pytest.raises(SystemExit):
        main(["--cache", str(full_cache), "--pass", "first"])
    assert "is not an int >= 0, 'cache' or 'all'" in capsys.readouterr().err


def test_plot_warns_about_nonfinite_logits(tmp_path, capsys, logits):
    path = write_cache(tmp_path / "nan.pt", logits, nonfinite=3)
    code, _, err = run(capsys, "--cache", path, "--panels", "2:0", "--out", tmp_path / "fig.png")
    assert code == 0
    assert err.count("warning: non-finite logits") == 1 and f"{path} layer 2: 3" in err


def test_default_panels_fall_back_to_existing_ones(tmp_path, capsys, full_cache):
    out = tmp_path / "fig.png"
    code, stdout, err = run(capsys, "--cache", full_cache, "--out", out)
    assert code == 0, err
    assert "lacks" not in stdout + err and out.exists()  # a small model's panels are chosen without a note
    code, _, err = run(capsys, "--cache", full_cache, "--panels", "4:9", "--out", out)
    assert code == 2 and "layer 4 is not in" in err


def test_title_of_a_prompt_with_invalid_utf8_and_dollars(tmp_path, capsys, logits):
    prompt = os.fsdecode(b"caf\xe9 costs $5 and $x$")  # invalid UTF-8, as argv gives it: a lone surrogate
    path = write_cache(tmp_path / "odd.pt", logits, prompt=prompt)
    assert open_cache(path).prompt == prompt
    fig = make_figure([select(open_cache(path))], [(0, 0)], "curve", softmax=False, batch_index=0)
    assert fig._suptitle.get_text().startswith(r"caf\udce9 costs \$5 and \$x\$")
    for name in ("fig.svg", "fig.png"):
        code, _, err = run(capsys, "--cache", path, "--panels", "0:0", "--out", tmp_path / name)
        assert code == 0, err


def test_random_weights_are_flagged_in_the_title(tmp_path, logits):
    path = write_cache(tmp_path / "random.pt", logits, random_init=True)
    fig = make_figure([select(open_cache(path))], [(0, 0)], "curve", softmax=False, batch_index=0)
    assert "RANDOM WEIGHTS" in fig._suptitle.get_text()


@pytest.mark.parametrize("case", ["heads-str", "prompt-bytes", "pass-str", "dtype", "metadata-list"])
def test_plot_gives_one_line_on_crafted_caches(tmp_path, capsys, logits, case):
    path = craft(tmp_path / "bad.pt", logits, CRAFTED[case][0])
    code, _, err = run(capsys, "--cache", path, "--panels", "0:0", "--out", tmp_path / "fig.png")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(path) in err and CRAFTED[case][1] in err


def test_plot_refuses_non_regular_outputs(tmp_path, capsys, full_cache):
    fifo = tmp_path / "fig.png"
    os.mkfifo(fifo)
    code, _, err = run(capsys, "--cache", full_cache, "--panels", "0:0", "--out", fifo)
    assert code == 2 and "is a FIFO, not a regular file" in err
    link = tmp_path / "null.png"
    link.symlink_to("/dev/null")  # only checked, never written
    code, _, err = run(capsys, "--cache", full_cache, "--panels", "0:0", "--out", link)
    assert code == 2 and "(a symlink to /dev/null) is a character device" in err


def test_plot_writes_through_a_symlink(tmp_path, capsys, full_cache):
    target = tmp_path / "real.png"
    link = tmp_path / "link.png"
    link.symlink_to(target)
    code, _, err = run(capsys, "--cache", full_cache, "--panels", "0:0", "--out", link)
    assert code == 0, err
    assert link.is_symlink() and target.read_bytes().startswith(b"\x89PNG")


# ---------------------------------------------------------------------------------------------
# statistics files, mixed caches, the true-frame axis, several blocks


def tokens_of(frames):
    """Per key token, the frame of each whole frame in ``frames``: [len(frames) * FSL]."""
    return torch.tensor(frames).repeat_interleave(FSL)


def layout_cache(path, layouts, *, num_frames=12, pass_=0, model_kwargs=None, model=None, seed=0, layers=LAYERS,
                 heads=N):
    """Save a summary cache with known logits whose blocks have the given key tokens: ``layouts`` maps a
    block to (video frame, RoPE frame[, role]) per key token, each [K] (roles default to plain cached
    keys). Returns the logits by (block, layer)."""
    gen = torch.Generator().manual_seed(seed)
    entries, logits = [], {}
    for block, (video, rope, *roles) in layouts.items():
        roles = roles[0] if roles else torch.full_like(video, CACHED)
        for layer in layers:
            lg = 3 * torch.randn(B, heads, FQ * FSL, len(video), generator=gen)
            logits[block, layer] = lg
            entries.append(CacheEntry(
                layer_idx=layer, block=block, pass_=pass_, timestep=1000.0,
                query_frames=list(range(block * FQ, block * FQ + FQ)), key_frame_indices=video[::FSL].tolist(),
                num_heads=heads, nonfinite=0, logit_min=lg.min().item(), logit_max=lg.max().item(),
                tensors=expected_reductions(lg), key_video_frames=video.to(torch.int32).expand(B, -1).clone(),
                key_rope_frames=rope.to(torch.int32).expand(B, -1).clone(),
                key_roles=roles.to(torch.int8).expand(B, -1).clone()))
    metadata = {"seed": seed, "model": model or {"dim": 64}, "config": {"model_kwargs": model_kwargs or {}}}
    save_cache(path, build_cache(prompt="p", num_frames=num_frames, frame_seq_length=FSL, num_frame_per_block=FQ,
                                 layer_indices=layers, save_mode="summary", entries=entries, metadata=metadata))
    return logits


def plotted_token_edges(ax):
    """The left edges of the key tokens the step curves of ``ax`` draw, in drawing order."""
    return [x for line in ax.lines if line.get_drawstyle() == "steps-post" for x in line.get_xdata()[:-1]]


def plotted_values(ax):
    return [y for line in ax.lines if line.get_drawstyle() == "steps-post" for y in line.get_ydata()[:-1]]


def spans(ax):
    """{label: (x start, x end)} of the labelled shadings of ``ax``."""
    found = {}
    for patch in ax.patches:
        found[patch.get_label()] = (patch.get_x(), patch.get_x() + patch.get_width())
    return found


def roles_of(sink, top_c, total):
    """Key roles [total]: ``sink`` sink tokens, then ``top_c`` top-C tokens, then plain cached keys."""
    return torch.tensor([SINK] * sink + [TOP_C] * top_c + [CACHED] * (total - sink - top_c))


WINDOW = (*(tokens_of([0, 6, 7, 8, 9, 10, 11]),) * 2, roles_of(FSL, 0, 7 * FSL))  # sink frame 0, 1..5 evicted
DEEP_SINK = (tokens_of([0, 6, 7, 8, 9, 10, 11]), tokens_of([2, 6, 7, 8, 9, 10, 11]),  # sink moved to RoPE 2
             roles_of(FSL, 0, 7 * FSL))
COMPRESSED = (  # [sink 0, 1 | top-C tokens of frames 3, 3, 5, 7 | recent 9..11]; the sink moved to RoPE 3, 4
    torch.cat([tokens_of([0, 1]), torch.tensor([3, 3, 5, 7]), tokens_of([9, 10, 11])]),
    torch.cat([tokens_of([3, 4]), torch.tensor([3, 3, 5, 7]), tokens_of([9, 10, 11])]),
    roles_of(2 * FSL, 4, 5 * FSL + 4),
)
PC_KWARGS = {"attention_mode": "participative_compression", "local_attn_size": 7, "sink_size": 2, "budget": 6,
             "recent": 3}


@pytest.mark.parametrize("layout, kwargs, edges, sink, topc", [
    (WINDOW, {"attention_mode": "window", "local_attn_size": 7, "sink_size": 1},
     [0, 0.25, 0.5, 0.75] + [6 + i / FSL for i in range(6 * FSL)], ("sink (frame 0)", (0, 1)), None),
    (DEEP_SINK, {"attention_mode": "deep_sink", "local_attn_size": 7, "sink_size": 0},
     [0, 0.25, 0.5, 0.75] + [6 + i / FSL for i in range(6 * FSL)], ("sink (frame 0, RoPE frame 2)", (0, 1)), None),
    (COMPRESSED, PC_KWARGS, [i / FSL for i in range(2 * FSL)] + [3, 3.25, 5, 7] + [9 + i / FSL for i in range(3 * FSL)],
     ("sink (frames 0-1, RoPE frames 3-4)", (0, 2)), ("top-C (4 tokens of frames 3-7)", (3, 7.25))),
], ids=["window-with-sink", "deep-sink-shifted-rope", "compressed-top-c"])
def test_true_frame_axis_puts_tokens_at_their_video_frames(tmp_path, layout, kwargs, edges, sink, topc):
    path = tmp_path / "c.pt"
    logits = layout_cache(path, {3: layout}, model_kwargs=kwargs)
    source = select(open_cache(path))
    assert true_frame_tokens(layout[0], FSL).div(FSL).tolist() == edges
    fig = make_figure([source], [(2, 1)], "curve", softmax=False, batch_index=0, x_axis="frames")
    ax = fig.axes[0]
    assert plotted_token_edges(ax) == edges and ax.get_xlabel() == "Key Video Frame"
    assert ax.get_xlim() == (0, 12)
    want = expected_reductions(logits[3, 2])["query_mean_logits"][0, 1]  # in key token order
    torch.testing.assert_close(torch.tensor(plotted_values(ax)), want)
    shaded = spans(ax)
    assert shaded[sink[0]] == sink[1] and shaded["query block (frames 9-11)"] == (9, 12)
    assert len(shaded) == 2 + (topc is not None)
    if topc:
        assert shaded[topc[0]] == topc[1]
    slots = make_figure([source], [(2, 1)], "curve", softmax=False, batch_index=0, x_axis="slots").axes[0]
    assert plotted_token_edges(slots) == [i / FSL for i in range(len(edges))]  # --x slots: today's axis


def test_true_frame_axis_keeps_global_caches_on_slots(tmp_path):
    path = tmp_path / "global.pt"
    layout_cache(path, {1: (tokens_of(range(6)),) * 2})
    ax = make_figure([select(open_cache(path))], [(0, 0)], "curve", softmax=False, batch_index=0,
                     x_axis="frames").axes[0]
    assert plotted_token_edges(ax) == [i / FSL for i in range(6 * FSL)] and ax.get_xlabel() == "Key Frame Index"


def test_true_frame_axis_refuses_averaging_other_top_c_tokens(tmp_path, capsys):
    other = tuple(labels.clone() for labels in COMPRESSED)
    other[0][FSL * 2 + 2] = other[1][FSL * 2 + 2] = 6  # one top-C token from frame 6 instead of 5
    a, b, out = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "fig.png"
    layout_cache(a, {3: COMPRESSED}, model_kwargs=PC_KWARGS)
    layout_cache(b, {3: other}, model_kwargs=PC_KWARGS, seed=1)
    code, _, err = run(capsys, "--cache", a, b, "--panels", "0:0", "--out", out)
    assert code == 2 and str(a) in err and str(b) in err and "key_video_frames of layer 0, block 3 differs" in err
    assert not out.exists()
    code, _, err = run(capsys, "--cache", a, b, "--panels", "0:0", "--x", "slots", "--out", out)
    assert code == 0, err


@pytest.mark.parametrize("change, field", [
    (dict(model={"dim": 128}), "model differs"),
    (dict(model_kwargs={"attention_mode": "window", "local_attn_size": 7, "sink_size": 1}), "model_kwargs differs"),
    (dict(pass_=1), "pass differs (0 vs 1)"),
    (dict(layouts={1: (tokens_of([0, 2, 3, 4, 5, 5]),) * 2}), "key_frame_indices differs ([0, 1, 2, 3, 4, 5] vs "
                                                                "[0, 2, 3, 4, 5, 5])"),
], ids=["model", "model-kwargs", "pass", "frames"])
def test_averaging_refuses_mixed_caches(tmp_path, capsys, change, field):
    a, b, out = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "fig.png"
    layout_cache(a, {1: (tokens_of(range(6)),) * 2})
    layouts = change.pop("layouts", {1: (tokens_of(range(6)),) * 2})
    layout_cache(b, layouts, seed=1, **change)
    code, _, err = run(capsys, "--cache", a, b, "--panels", "0:0", "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"cannot average {a} and {b}: {field}" in err
    assert not out.exists()


def test_stats_plot_draws_the_mean_and_its_confidence_interval(tmp_path, capsys):
    paths = [tmp_path / f"s{i}.pt" for i in range(3)]
    for i, path in enumerate(paths):
        layout_cache(path, {1: (tokens_of(range(6)),) * 2}, seed=i)
    stats_path = tmp_path / "stats.pt"
    save_statistics(sweep_statistics([open_cache(p) for p in paths]), stats_path)
    stored = {g["layer_idx"]: g for g in torch.load(stats_path, weights_only=True)["groups"]}
    stats = StatsFile(stats_path)
    assert stats.n_items == 3 and stats.layer_indices == LAYERS
    sources = select_columns(stats)

    mean, low, high, label = column_band(sources, 2, "token_logits", 0)
    assert label == "95% CI"
    assert torch.equal(low, stored[2]["curve"]["ci_low"]) and torch.equal(high, stored[2]["curve"]["ci_high"])
    assert torch.equal(mean, stored[2]["curve"]["mean"])

    fig = make_figure(sources, [(2, 1)], "frames", softmax=False, batch_index=0)
    ax = fig.axes[0]
    assert fig._suptitle.get_text().startswith("mean over 3 items, 95% CI  (block 1, pass 0")
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    frame_logit = {k: v[1].tolist() for k, v in stored[2]["frame_logit"].items()}  # head 1
    assert [b.get_height() for b in bars] == pytest.approx(frame_logit["mean"])
    segments = bars.errorbar.lines[2][0].get_segments()  # per bar [[x, low], [x, high]]
    assert [s[0][1] for s in segments] == pytest.approx(frame_logit["ci_low"])
    assert [s[1][1] for s in segments] == pytest.approx(frame_logit["ci_high"])

    out = tmp_path / "ci.png"
    for extra in ([], ["--view", "heatmap"], ["--softmax"]):
        code, stdout, err = run(capsys, "--stats", stats_path, "--panels", "2:1", "--out", out, *extra)
        assert code == 0, err
        assert "statistics over 3 items" in stdout
    code, _, err = run(capsys, "--stats", stats_path, "--cache", paths[0], "--out", out)
    assert code == 2 and "statistics files are drawn without caches" in err
    code, _, err = run(capsys, "--stats", stats_path, "--block", "4", "--out", out)
    assert code == 2 and "block 4: the file holds no such entry" in err


def test_several_blocks_side_by_side(tmp_path, capsys):
    path, out = tmp_path / "blocks.pt", tmp_path / "fig.png"
    layout_cache(path, {b: (tokens_of(range(3 * b + 3)),) * 2 for b in range(4)})
    cache = open_cache(path)
    sources = select_columns(cache, blocks=["all"])
    assert [s.block for s in sources] == [0, 1, 2, 3]
    fig = make_figure(sources, [(0, 0), (2, 1)], "curve", softmax=False, batch_index=0)
    axes = fig.axes
    assert len(axes) == 2 * 4
    # the column's name above its first row
    assert [ax.get_title() for ax in axes[:4]] == [f"block {b} (frames {3 * b}-{3 * b + 2}), pass 0\nlayer 0 head 0 (L1H1)"
                                                   for b in range(4)]
    assert axes[7].get_title() == "layer 2 head 1 (L3H2)" and axes[7].get_xlim() == (0, 12)
    assert "(blocks 0, 1, 2, 3, pass 0" in fig._suptitle.get_text()
    chosen = make_figure(select_columns(cache, blocks=[3, 1]), [(0, 0)], "heatmap", softmax=False, batch_index=0)
    assert [ax.get_title() for ax in chosen.axes if ax.get_title()] == [
        "block 3 (frames 9-11), pass 0\nlayer 0 (L1), all heads", "block 1 (frames 3-5), pass 0\nlayer 0 (L1), all heads"]
    code, stdout, err = run(capsys, "--cache", path, "--panels", "0:0", "--block", "all", "--out", out)
    assert code == 0, err
    code, _, err = run(capsys, "--cache", path, "--panels", "0:0", "--out", out)
    assert code == 2 and "holds several" in err
    code, _, err = run(capsys, "--cache", path, "--panels", "0:0", "--block", "all", "2", "--out", out)
    assert code == 2 and "'all' alone" in err


def test_every_pass_side_by_side_is_figure_11(tmp_path, capsys, logits):
    """--pass all draws one column per captured pass, in pass order, each the curve of its own entry."""
    passes = {"cache": make_logits(seed=3), 0: logits, 2: make_logits(seed=2)}
    path, out = tmp_path / "passes.pt", tmp_path / "fig11.png"
    save_cache(path, build(passes))
    sources = select_columns(open_cache(path), passes=["all"])
    assert [s.pass_ for s in sources] == [0, 2, "cache"]
    fig = make_figure(sources, [(2, 1)], "frames", softmax=False, batch_index=0)
    assert [ax.get_title() for ax in fig.axes] == [f"block 1 (frames 3-5), pass {p}\nlayer 2 head 1 (L3H2)"
                                                   for p in (0, 2, "cache")]
    for ax, pass_ in zip(fig.axes, (0, 2, "cache")):
        expected = expected_reductions(passes[pass_][2])["frame_mean_logits"][0, 1].mean(0)  # [Fk]
        heights = torch.tensor([bar.get_height() for bar in ax.patches[: len(expected)]], dtype=torch.float32)
        torch.testing.assert_close(heights, expected, rtol=0, atol=1e-5)
    code, _, err = run(capsys, "--cache", path, "--panels", "2:1", "--pass", "all", "--out", out)
    assert code == 0 and out.stat().st_size > 0, err
    code, _, err = run(capsys, "--cache", path, "--panels", "2:1", "--pass", "0", "0", "--out", out)
    assert code == 2 and "more than once" in err


def test_readme_plot_commands_run_as_written(tmp_path, monkeypatch, capsys, logits):
    """The README's plot commands, run in a folder holding caches at the paths they name (the statistics
    file made by the README's aggregate command)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    prefix = "python experiments/plot_figure4.py "
    commands = [line for line in readme.splitlines() if line.startswith(prefix)]
    assert len(commands) == 11
    aggregate_prefix = "python experiments/aggregate_figure4.py "
    aggregates = [line.split("#")[0].strip() for line in readme.splitlines() if line.startswith(aggregate_prefix)]
    assert len(aggregates) == 2
    import experiments.run_extraction_figure4 as cli  # the README's Rolling Forcing run, made for real

    (tmp_path / "cache").mkdir()
    assert cli.main(["--config_path", "configs/tiny_rolling_forcing.yaml", "--no_checkpoint", "--device", "cpu", "--quiet",
                     "--num_frames", "21", "--capture_blocks", "last", "--capture_step", "all", "--save_mode", "summary",
                     "--output_path", str(tmp_path / "cache/rolling_tiny.pt")]) == 0
    monkeypatch.chdir(tmp_path)
    Path("docs").mkdir()
    write_cache(Path("cache/attention_cache_self_forcing.pt"), logits)
    four_heads = torch.randn(1, 4, FQ * FSL, FK * FSL).half().float()  # the tiny model's 4 heads, layers 0 and 4
    write_cache(Path("cache/tiny_figure4.pt"), {0: four_heads, 4: four_heads}, layer_indices=[0, 4])
    for seed in range(2):
        write_cache(Path(f"cache/sweep_seed{seed}.pt"), make_logits(seed=seed), mode="summary")
    Path("stats").mkdir()
    Path("cache/sweep_tiny").mkdir()
    for seed in range(2):  # like the tiny model's: 4 heads, layers 0 and 4
        item = torch.randn(1, 4, FQ * FSL, FK * FSL, generator=torch.Generator().manual_seed(seed))
        write_cache(Path(f"cache/sweep_tiny/p0000_s{seed:04d}.pt"), {0: item, 4: item}, mode="summary", layer_indices=[0, 4])
    for aggregate in aggregates:
        assert aggregate_main(shlex.split(aggregate[len(aggregate_prefix):])) == 0, aggregate
    layout_cache(Path("cache/tiny_df.pt"), {1: (tokens_of(range(6)),) * 2, 3: COMPRESSED}, model_kwargs=PC_KWARGS,
                 layers=[0, 4], heads=4)
    for i, model in enumerate(("tiny", "tiny_causal_forcing_framewise_2step", "tiny_causvid_dmd_3step", "tiny_longlive",
                               "tiny_reward_forcing", "tiny_infinite_forcing", "tiny_rolling_forcing")):
        write_cache(Path(f"cache/{model}.pt"), make_logits(seed=i), mode="summary", family=model)
    for command in commands:
        code, _, err = run(capsys, *shlex.split(command[len(prefix):]))
        assert code == 0, (command, err)


# ---------------------------------------------------------------------------------------------
# issue 23: an empty --out, an --out that is an input


def test_plot_refuses_an_empty_out(tmp_path, capsys, monkeypatch, full_cache):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["--cache", str(full_cache), "--panels", "0:0", "--out", ""])
    assert exit_info.value.code == 2 and "empty" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["full.pt"]


@pytest.mark.parametrize("option, case", [("--cache", "same"), ("--cache", "symlink"), ("--cache", "glob"),
                                          ("--stats", "same"), ("--stats", "symlink")])
def test_plot_refuses_an_out_that_is_an_input(tmp_path, capsys, full_cache, option, case):
    source = full_cache
    if option == "--stats":
        source = tmp_path / "stats.pt"
        save_statistics(sweep_statistics([open_cache(full_cache)]), source)
    data = tmp_path / "input.svg"  # an input whose name could be a figure's
    data.write_bytes(source.read_bytes())
    out = {"same": data, "symlink": tmp_path / "link.svg", "glob": data}[case]
    if case == "symlink":
        out.symlink_to(data)
    given = str(tmp_path / "input.sv?") if case == "glob" else str(data)
    code, _, err = run(capsys, option, given, "--panels", "0:0", "--out", out)
    assert code == 2 and "is the input" in err
    assert data.read_bytes() == source.read_bytes()
