"""Readers validate every field they read, through the file formats' owners (utils/attention_cache.py,
utils/sweep_stats.py): crafted caches and statistics files are refused with one line naming the file
and the field, exit status 2 from the plot and the aggregator, never a traceback."""
from pathlib import Path

import pytest
import torch

import experiments.aggregate_figure4 as aggregate
import experiments.plot_figure4 as plot
import experiments.run_extraction_figure4 as cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A real cache of the tiny model (two seeds) and their statistics file."""
    folder = tmp_path_factory.mktemp("made")
    for seed in (0, 1):
        assert cli.main(["--config_path", "configs/tiny.yaml", "--no_checkpoint", "--device", "cpu", "--quiet",
                         "--num_frames", "6", "--save_mode", "summary", "--seed", str(seed),
                         "--output_path", str(folder / f"c{seed}.pt")]) == 0
    assert aggregate.main([str(folder / "c0.pt"), str(folder / "c1.pt"), "--out", str(folder / "stats.pt")]) == 0
    return folder


def crafted(source, tmp_path, change):
    """A copy of the file ``source`` in ``tmp_path``, its dict altered by ``change``."""
    data = torch.load(source, weights_only=True)
    change(data)
    path = tmp_path / f"crafted_{source.name}"
    torch.save(data, path)
    return path


def _set(mapping, key, value):
    mapping[key] = value


CACHES = {  # id: (change, words of the error)
    "model-tensor": (lambda d: _set(d["metadata"], "model", torch.tensor([1, 2])), "metadata['model'] is tensor"),
    "family-list": (lambda d: _set(d["metadata"], "family", ["x"]), "metadata.family is ['x'] (list), expected a str"),
    "query-block-not-in-keys": (lambda d: [_set(e, "key_frame_indices", [0, 1, 2, 3, 4, 4]) or
                                           _set(e, "key_video_frames", torch.tensor([[0] * 16 + [1] * 16 + [2] * 16 + [3] * 16 + [4] * 32],
                                                                                    dtype=torch.int32))
                                           for e in d["attention_weights"]],
                                "do not include its query frames [3, 4, 5]"),
}


@pytest.mark.parametrize("case", CACHES)
def test_crafted_caches_are_refused_by_plot_and_aggregator(made, tmp_path, capsys, case):
    change, words = CACHES[case]
    path = crafted(made / "c0.pt", tmp_path, change)
    assert plot.main(["--cache", str(path), "--out", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and words in err and "Traceback" not in err
    assert aggregate.main([str(path), str(made / "c1.pt"), "--out", str(tmp_path / "s.pt")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and words in err and "Traceback" not in err


STATS = {
    "no-n-items": (lambda s: s.pop("n_items"), "n_items is missing, expected an int >= 1"),
    "heads-str": (lambda s: _set(s, "num_heads", "4"), "num_heads is '4' (str), expected an int >= 1"),
    "no-layer": (lambda s: s["groups"][0].pop("layer_idx"), "groups[0].layer_idx is missing, expected an int >= 0"),
    "mean-shape": (lambda s: _set(s["groups"][0]["mass"], "mean", torch.zeros(3)),
                   "groups[0].mass.mean has shape [3], expected [4, 6]"),
    "frames-str": (lambda s: _set(s["groups"][0], "key_frame_indices", "0-5"), "groups[0].key_frame_indices is '0-5'"),
}


@pytest.mark.parametrize("case", STATS)
def test_crafted_statistics_are_refused_by_the_plot(made, tmp_path, capsys, case):
    change, words = STATS[case]
    path = crafted(made / "stats.pt", tmp_path, change)
    assert plot.main(["--stats", str(path), "--out", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and words in err and "Traceback" not in err


def test_the_made_files_still_plot(made, tmp_path):
    assert plot.main(["--stats", str(made / "stats.pt"), "--out", str(tmp_path / "s.png")]) == 0
    assert plot.main(["--cache", str(made / "c0.pt"), "--out", str(tmp_path / "c.png")]) == 0


def test_a_cache_holding_objects_is_refused_in_one_line_without_torchs_advice(tmp_path, capsys):
    path = tmp_path / "pickled.pt"
    torch.save({"attention_weights": [], "trainer": torch.nn.Identity()}, path)
    assert plot.main(["--cache", str(path), "--out", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds objects beyond tensors" in err
    assert "Re-running" not in err and "trust the source" not in err  # torch's advice is not repeated


def test_the_same_item_in_two_files_counts_once(made, tmp_path, capsys):
    copy = tmp_path / "copy_of_c0.pt"
    copy.write_bytes((made / "c0.pt").read_bytes())
    out = tmp_path / "stats.pt"
    assert aggregate.main([str(made / "c0.pt"), str(made / "c1.pt"), str(copy), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"note: {copy} repeats the item of {made / 'c0.pt'} (same prompt, seed and settings, or the same bytes); counted once" in captured.err
    assert torch.load(out, weights_only=True)["n_items"] == 2 and "2 items" in captured.out
