"""utils/sweep_stats.py and experiments/aggregate_figure4.py against statistics computed here with
numpy, on synthetic summary caches with known random tensors."""
import csv
import json
import math

import numpy as np
import pytest
import torch

import experiments.aggregate_figure4 as aggregate
from utils.attention_cache import CacheEntry, build_cache, open_cache, save_cache
from utils.sweep_stats import (MixedCachesError, distinct_items, load_statistics, save_statistics, student_t_quantile,
                               sweep_statistics)

FSL, PER_BLOCK, HEADS = 2, 3, 3
T_975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 30: 2.042272}  # two-sided 95% table values
LABELS = [(0, 0), (1, 0), (1, "cache")]  # (block, pass)


def make_cache(path, seed, num_frames=6, layers=(0, 2), labels=LABELS, model_dim=64, metadata=None):
    """A summary cache of known random reductions (``metadata``: more metadata fields); returns its
    {(layer, block, pass): tensors} too."""
    generator = torch.Generator().manual_seed(seed)
    entries, known = [], {}
    for layer in layers:
        for block, pass_ in labels:
            query_frames = list(range(block * PER_BLOCK, (block + 1) * PER_BLOCK))
            keys = list(range((block + 1) * PER_BLOCK))
            fk = len(keys)
            tensors = {
                "query_mean_logits": torch.randn(1, HEADS, fk * FSL, generator=generator),
                "frame_mean_logits": torch.randn(1, HEADS, PER_BLOCK, fk, generator=generator),
                "frame_attention_mass": torch.rand(1, HEADS, PER_BLOCK, fk, generator=generator).softmax(-1),
            }
            frames = torch.tensor(keys, dtype=torch.int32).repeat_interleave(FSL)[None]
            entries.append(CacheEntry(
                layer_idx=layer, block=block, pass_=pass_, timestep=0.0 if pass_ == "cache" else 1000.0,
                query_frames=query_frames, key_frame_indices=keys, num_heads=HEADS, nonfinite=0, logit_min=-1.0,
                logit_max=1.0, tensors=tensors, key_video_frames=frames, key_rope_frames=frames.clone(),
                key_roles=torch.zeros_like(frames, dtype=torch.int8),
            ))
            known[(layer, block, pass_)] = {k: v.double().numpy()[0] for k, v in tensors.items()}
    metadata = {"seed": seed, "model": {"dim": model_dim, "num_heads": HEADS}, "checkpoint_path": None,
                "checkpoint_key": None, "dtype": "float32", **(metadata or {})}
    data = build_cache(prompt=f"prompt {seed}", num_frames=num_frames, frame_seq_length=FSL,
                       num_frame_per_block=PER_BLOCK, layer_indices=list(layers), save_mode="summary", entries=entries,
                       metadata=metadata)
    save_cache(path, data)
    return known


def direct(values):
    """values [n, ...] -> mean, sample std, 95% CI with the table t value (numpy, float64)."""
    n = len(values)
    mean, std = values.mean(axis=0), values.std(axis=0, ddof=1)
    half = T_975[n - 1] * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def direct_quantities(known, block):
    """Per head, from one item's tensors: the curve, frame logit, mass and the two sink scores."""
    frame_logit = known["frame_mean_logits"].mean(axis=1)  # [N, Fk]
    mass = known["frame_attention_mass"].mean(axis=1)
    middle = list(range(1, block * PER_BLOCK))  # after the first frame, before the query block
    if middle:
        ratio = np.array([mass[h, 0] / np.mean([mass[h, j] for j in middle]) for h in range(HEADS)])
        gap = np.array([frame_logit[h, 0] - np.mean([frame_logit[h, j] for j in middle]) for h in range(HEADS)])
    else:
        ratio = gap = np.full(HEADS, np.nan)
    return {"curve": known["query_mean_logits"], "frame_logit": frame_logit, "mass": mass, "sink_ratio": ratio,
            "sink_logit_gap": gap}


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    folder = tmp_path_factory.mktemp("agg")
    known = [make_cache(folder / f"p0000_s{seed:04d}.pt", seed) for seed in range(4)]
    return folder, known


@pytest.mark.parametrize("df", sorted(T_975))
def test_student_t_quantile_matches_the_table(df):
    assert student_t_quantile(0.975, df) == pytest.approx(T_975[df], abs=1e-5)


def expected_stats(known_items):
    out = {}
    for layer in (0, 2):
        for block, pass_ in LABELS:
            per_item = [direct_quantities(k[(layer, block, pass_)], block) for k in known_items]
            out[(layer, block, pass_)] = {q: direct(np.stack([item[q] for item in per_item])) for q in per_item[0]}
    return out


def test_statistics_equal_the_direct_computation(items):
    folder, known = items
    caches = [open_cache(folder / f"p0000_s{seed:04d}.pt") for seed in range(4)]
    stats = sweep_statistics(caches)
    assert stats["n_items"] == 4 and stats["seeds"] == [0, 1, 2, 3] and stats["num_heads"] == HEADS
    expected = expected_stats(known)
    assert [(g["layer_idx"], g["block"], g["pass"]) for g in stats["groups"]] == list(expected)
    for group in stats["groups"]:
        want = expected[(group["layer_idx"], group["block"], group["pass"])]
        for quantity, fields in want.items():
            for field, value in fields.items():
                got = group[quantity][field].double().numpy()
                assert got.shape == value.shape, (quantity, field)
                np.testing.assert_allclose(got, value, rtol=1e-4, atol=1e-5, equal_nan=True, err_msg=f"{quantity} {field}")
    # block 0 has no middle key frames: no sink score; block 1 has frames 1 and 2
    assert torch.isnan(stats["groups"][0]["sink_ratio"]["mean"]).all()
    assert torch.isfinite(stats["groups"][1]["sink_ratio"]["ci_high"]).all()


def test_one_item_has_no_spread(items):
    folder, known = items
    stats = sweep_statistics([open_cache(folder / "p0000_s0002.pt")])
    group = stats["groups"][1]
    np.testing.assert_allclose(group["mass"]["mean"].double().numpy(), known[2][(0, 1, 0)]["frame_attention_mass"].mean(1),
                               rtol=1e-6)
    assert all(torch.isnan(group["mass"][f]).all() for f in ("std", "ci_low", "ci_high"))


def cell(text):
    """A CSV number; an empty cell (no statistic: one item, or no middle key frames) as NaN."""
    return math.nan if text == "" else float(text)


def test_csv_rows(items, tmp_path):
    folder, known = items
    seeds = (0, 1, 3)
    stats = sweep_statistics([open_cache(folder / f"p0000_s{seed:04d}.pt") for seed in seeds], prompt_indices=[0, 0, 0])
    csv_path = save_statistics(stats, tmp_path / "stats.pt")
    assert csv_path == tmp_path / "stats.csv"
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    pooled = [row for row in rows if row["scope"] == "pooled"]
    expected = expected_stats([known[s] for s in seeds])
    per_head = {0: 3 + 3 + 2, 1: 6 + 6 + 2}  # frame_logit and mass per key frame, then the two sink scores
    assert len(pooled) == 2 * HEADS * (per_head[0] + 2 * per_head[1])
    assert len(rows) == len(pooled) * (1 + len(seeds))  # and one row per item beside each pooled row
    for row in pooled:
        pass_ = "cache" if row["pass"] == "cache" else int(row["pass"])
        want = expected[(int(row["layer"]), int(row["block"]), pass_)][row["quantity"]]
        head = int(row["head"])
        slot = None if row["key_slot"] == "" else int(row["key_slot"])
        assert row["video_frame"] == ("" if slot is None else str(slot)) and row["n"] == "3"
        assert float(row["timestep"]) == (0.0 if pass_ == "cache" else 1000.0)
        assert row["prompt"] == row["seed"] == row["prompt_index"] == ""
        for field in ("mean", "std", "ci_low", "ci_high"):
            value = want[field][head] if slot is None else want[field][head, slot]
            np.testing.assert_allclose(cell(row[field]), value, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert {r["quantity"] for r in rows} == {"frame_logit", "mass", "sink_ratio", "sink_logit_gap"}
    assert load_statistics(tmp_path / "stats.pt")["n_items"] == 3


def test_csv_rows_per_item(items, tmp_path):
    """Beside each pooled row, one row per item: its own value (from numpy), prompt index, prompt, seed,
    file, model and settings."""
    folder, known = items
    seeds = (0, 2)
    files = [folder / f"p0000_s{seed:04d}.pt" for seed in seeds]
    stats = sweep_statistics([open_cache(f) for f in files], prompt_indices=[0, 0])
    with open(save_statistics(stats, tmp_path / "stats.pt"), newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["scope"] == "item"]
    assert {(r["seed"], r["prompt"], r["prompt_index"], r["file"]) for r in rows} == {
        (str(s), f"prompt {s}", "0", str(f)) for s, f in zip(seeds, files)}
    for row in rows:
        seed, block = int(row["seed"]), int(row["block"])
        pass_ = "cache" if row["pass"] == "cache" else int(row["pass"])
        want = direct_quantities(known[seed][(int(row["layer"]), block, pass_)], block)[row["quantity"]]
        head, slot = int(row["head"]), None if row["key_slot"] == "" else int(row["key_slot"])
        value = want[head] if slot is None else want[head, slot]
        np.testing.assert_allclose(cell(row["mean"]), value, rtol=1e-5, atol=1e-6, equal_nan=True)
        assert row["n"] == "1" and row["std"] == row["ci_low"] == row["ci_high"] == ""
        assert row["model"] == stats["model"] and row["settings"] == stats["settings"]


@pytest.mark.parametrize("change, field", [
    ({"num_frames": 9}, "num_frames"),
    ({"layers": (0, 3)}, "entries (layer, block, pass, key frames)"),
    ({"labels": [(0, 0), (1, 0), (1, 2)]}, "entries (layer, block, pass, key frames)"),
    ({"model_dim": 128}, "model"),
])
def test_mixed_caches_are_refused(items, tmp_path, change, field):
    folder, _ = items
    odd = tmp_path / "odd.pt"
    make_cache(odd, 9, **change)
    caches = [open_cache(folder / "p0000_s0000.pt"), open_cache(folder / "p0000_s0001.pt"), open_cache(odd)]
    with pytest.raises(MixedCachesError) as info:
        sweep_statistics(caches)
    assert f"differ in {field}" in str(info.value) and str(odd) in str(info.value)


def test_caches_of_two_precisions_are_refused(items, tmp_path):
    """Exact and fast mode of one model are two settings: averaged together, each item would count twice."""
    made = [tmp_path / f"{precision}.pt" for precision in ("exact", "fast")]
    for path in made:
        make_cache(path, 0, metadata={"precision": path.stem})
    with pytest.raises(MixedCachesError) as info:
        sweep_statistics([open_cache(path) for path in made])
    assert "differ in precision" in str(info.value) and str(made[1]) in str(info.value)


def test_an_item_saved_in_two_save_modes_counts_once(tmp_path):
    """The same prompt, seed and settings kept once as fp16 logits and once as summaries is one item."""
    settings = {"config": {"precision": "exact"}, "num_frames": 6, "layer_indices": [0, 2], "capture_step": [0],
                "capture_blocks": ["last"], "dtype": "float32", "device_type": "cpu"}
    made = []
    for save_mode in ("full", "summary"):
        made.append(tmp_path / f"{save_mode}.pt")
        make_cache(made[-1], 0, metadata={"settings": {**settings, "save_mode": save_mode}})
    kept, duplicates = distinct_items([open_cache(path) for path in made])
    assert [c.path for c in kept] == [made[0]] and [(d.path, o.path) for d, o in duplicates] == [(made[1], made[0])]
    other_seed = tmp_path / "seed1.pt"
    make_cache(other_seed, 1, metadata={"settings": {**settings, "save_mode": "summary"}})
    assert len(distinct_items([open_cache(made[0]), open_cache(other_seed)])[0]) == 2


def test_cli_on_a_sweep_folder_follows_its_manifest(items, tmp_path, capsys):
    source, known = items
    folder = tmp_path / "sweep"
    folder.mkdir()
    for seed in range(4):
        (folder / f"p0000_s{seed:04d}.pt").write_bytes((source / f"p0000_s{seed:04d}.pt").read_bytes())
    listed = [0, 2, 3]  # the manifest leaves item 1 out: its file is not counted
    (folder / "manifest.jsonl").write_text("".join(
        json.dumps({"prompt_index": 0, "prompt": f"prompt {s}", "seed": s, "file": f"p0000_s{s:04d}.pt"}) + "\n"
        for s in listed))
    assert aggregate.main([str(folder)]) == 0
    assert "3 items" in capsys.readouterr().out
    stats = load_statistics(folder / "stats" / "statistics.pt")  # the default place: not where folder/*.pt globs
    assert stats["seeds"] == listed and (folder / "stats" / "statistics.csv").is_file()
    assert [item["prompt_index"] for item in stats["items"]] == [0, 0, 0]  # from the item's name
    want = expected_stats([known[s] for s in listed])[(2, 1, "cache")]["sink_logit_gap"]
    got = next(g for g in stats["groups"] if (g["layer_idx"], g["pass"]) == (2, "cache"))["sink_logit_gap"]
    for field in ("mean", "ci_low", "ci_high"):
        np.testing.assert_allclose(got[field].double().numpy(), want[field], rtol=1e-4, atol=1e-5)


def test_cli_on_a_glob(items, tmp_path):
    folder, known = items
    out = tmp_path / "glob_stats.pt"
    assert aggregate.main([str(folder / "p*_s*.pt"), "--out", str(out)]) == 0
    stats = load_statistics(out)
    assert stats["n_items"] == 4 and stats["seeds"] == [0, 1, 2, 3]
    want = expected_stats(known)[(0, 1, 0)]["frame_logit"]["std"]
    np.testing.assert_allclose(stats["groups"][1]["frame_logit"]["std"].double().numpy(), want, rtol=1e-4)


def test_cli_refuses_mixed_caches_and_a_missing_folder(items, tmp_path, capsys):
    folder, _ = items
    odd = tmp_path / "odd.pt"
    make_cache(odd, 9, num_frames=9)
    out = tmp_path / "mixed.pt"
    assert aggregate.main([str(folder / "p0000_s0000.pt"), str(odd), "--out", str(out)]) == 2
    assert "differ in num_frames" in capsys.readouterr().err
    missing = tmp_path / "no_such_sweep"
    assert aggregate.main([str(missing), "--out", str(out)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".csv").exists()


# ---------------------------------------------------------------------------------------------
# issue 23: empty --out, an --out that is an input, the .pt and .csv replaced together


def test_an_empty_out_is_refused(items, tmp_path, monkeypatch, capsys):
    folder, _ = items
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        aggregate.main([str(folder / "p0000_s0000.pt"), "--out", ""])
    assert exit_info.value.code == 2 and "empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["same", "symlink", "csv sibling"])
def test_an_out_that_is_an_input_is_refused(items, tmp_path, capsys, case):
    folder, _ = items
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    for path, seed in ((a, 0), (b, 1)):
        path.write_bytes((folder / f"p0000_s{seed:04d}.pt").read_bytes())
    out = a
    if case == "symlink":
        out = tmp_path / "link.pt"
        out.symlink_to(a)
    elif case == "csv sibling":  # the CSV beside --out would be written over an input
        b = b.rename(tmp_path / "stats.csv")
        out = tmp_path / "stats.pt"
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert aggregate.main([str(a), str(b), "--out", str(out)]) == 2
    assert "is the input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def full_disk_on_the_nth_fsync(monkeypatch, n):
    import errno
    import os
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("nth", [1, 2])
def test_a_full_disk_keeps_both_old_statistics_files(items, tmp_path, monkeypatch, capsys, nth):
    """The .pt and the .csv are replaced together or not at all: a full disk while writing either leaves both old files."""
    folder, _ = items
    out = tmp_path / "stats.pt"
    out.write_bytes(b"old pt")
    out.with_suffix(".csv").write_bytes(b"old csv")
    full_disk_on_the_nth_fsync(monkeypatch, nth)
    assert aggregate.main([str(folder / "p*_s*.pt"), "--out", str(out)]) == 1
    monkeypatch.undo()
    assert "no space left" in capsys.readouterr().err
    assert (out.read_bytes(), out.with_suffix(".csv").read_bytes()) == (b"old pt", b"old csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.csv", "stats.pt"]


def test_save_statistics_replaces_both_files_together(items, tmp_path, monkeypatch):
    folder, _ = items
    stats = sweep_statistics([open_cache(folder / f"p0000_s{seed:04d}.pt") for seed in range(2)])
    out = tmp_path / "stats.pt"
    out.write_bytes(b"old pt")
    out.with_suffix(".csv").write_bytes(b"old csv")
    full_disk_on_the_nth_fsync(monkeypatch, 2)
    with pytest.raises(OSError):
        save_statistics(stats, out)
    monkeypatch.undo()
    assert (out.read_bytes(), out.with_suffix(".csv").read_bytes()) == (b"old pt", b"old csv")
    save_statistics(stats, out)
    assert load_statistics(out)["n_items"] == 2 and out.with_suffix(".csv").read_text().startswith("layer,")
