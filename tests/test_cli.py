"""experiments/run_extraction_figure4.py end to end on the tiny config (CPU)."""
import argparse
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import experiments.plot_figure4 as plot_figure4
import experiments.run_extraction_figure4 as cli
import utils.attention_cache as attention_cache
from utils.attention_cache import SUMMARY_KEYS, open_cache
from utils.output import Interrupted
from pipeline.wrappers import WanDiffusionWrapper

SPEC_TOP_KEYS = {
    "attention_weights", "prompt", "num_frames", "frame_seq_length", "num_frame_per_block", "layer_indices",
    "is_logits", "capture_method", "query_frames", "key_frames",
}
SPEC_ENTRY_KEYS = {
    "layer_idx", "is_logits", "num_frames", "frame_seq_length", "num_heads", "num_query_frames", "num_key_frames",
}
V5_ENTRY_KEYS = {  # cache format version 5 (utils/attention_cache.py)
    "block", "pass", "timestep", "query_frames", "key_frame_indices", "nonfinite", "logit_min", "logit_max",
    "key_video_frames", "key_rope_frames", "key_roles", "sink_updates", "window", "query_levels",
}
FSL = 16  # tokens per 8x8 latent frame with 2x2 patches
HEADS = 4


def extract(tmp_path, *extra, name="out.pt", frames=6):
    out = tmp_path / name
    argv = ["--config_path", "configs/tiny.yaml", "--no_checkpoint", "--device", "cpu", "--quiet",
            "--num_frames", str(frames), "--output_path", str(out), *extra]
    return cli.main(argv), out


@pytest.fixture(scope="module")
def full_and_summary(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    code_full, full = extract(folder, "--seed", "7", name="full.pt")
    code_summary, summary = extract(folder, "--seed", "7", "--save_mode", "summary", name="summary.pt")
    assert code_full == 0 and code_summary == 0
    return torch.load(full, weights_only=True), torch.load(summary, weights_only=True), full, summary


def test_full_file_has_the_spec_layout(full_and_summary):
    data, _, _, _ = full_and_summary
    assert set(data) == SPEC_TOP_KEYS | {"metadata"}
    assert data["layer_indices"] == [0, 4] and data["num_frames"] == 6
    assert data["frame_seq_length"] == FSL and data["num_frame_per_block"] == 3
    assert data["query_frames"] == [3, 4, 5] and data["key_frames"] == list(range(6))
    assert data["is_logits"] is True and data["capture_method"] == "native_inference_capture"
    assert [e["layer_idx"] for e in data["attention_weights"]] == [0, 4]
    for entry in data["attention_weights"]:
        assert set(entry) == SPEC_ENTRY_KEYS | V5_ENTRY_KEYS | {"attn_logits"}
        assert (entry["block"], entry["pass"], entry["timestep"]) == (1, 0, 1000.0)
        assert entry["query_frames"] == [3, 4, 5] and entry["key_frame_indices"] == list(range(6))
        assert entry["nonfinite"] == 0
        extremes = torch.tensor([entry["logit_min"], entry["logit_max"]])  # of the fp32 logits, stored in fp16
        torch.testing.assert_close(extremes, torch.stack([entry["attn_logits"].min(), entry["attn_logits"].max()]).float(),
                                   rtol=0, atol=1e-2)
        logits = entry["attn_logits"]
        assert logits.dtype == torch.float16 and logits.shape == (1, HEADS, 3 * FSL, 6 * FSL)
        assert torch.isfinite(logits).all() and logits.std() > 0
        assert (entry["num_heads"], entry["num_query_frames"], entry["num_key_frames"]) == (HEADS, 3, 6)
    meta = data["metadata"]
    assert meta["save_mode"] == "full" and meta["seed"] == 7 and meta["use_ema"] is True
    assert meta["checkpoint_path"] is None and meta["capture_step"] == "0" and meta["timestep"] == 1000.0
    assert meta["calls_seen"] == 2 * 9 and meta["calls_kept"] == 2  # the last block's cache pass is skipped
    assert meta["model"]["num_layers"] == 6 and meta["model"]["num_heads"] == HEADS
    assert meta["config"]["num_frame_per_block"] == 3
    assert meta["format_version"] == 5
    assert meta["cache_policy"] == "global: every block attends to all earlier frames"


def test_summary_equals_means_of_the_full_file(full_and_summary):
    full, summary, full_path, summary_path = full_and_summary
    assert summary["metadata"]["save_mode"] == "summary"
    assert summary_path.stat().st_size * 2 < full_path.stat().st_size
    for entry_full, entry_sum in zip(full["attention_weights"], summary["attention_weights"]):
        assert "attn_logits" not in entry_sum
        logits = entry_full["attn_logits"].double()  # [1, N, Q, K]
        tiles = logits.unflatten(3, (6, FSL)).unflatten(2, (3, FSL))  # [1, N, Fq, fsl, Fk, fsl]
        probs = logits.softmax(-1).unflatten(3, (6, FSL)).unflatten(2, (3, FSL))
        # fp16 storage of the full file bounds the agreement.
        torch.testing.assert_close(entry_sum["query_mean_logits"].double(), logits.mean(2), rtol=0, atol=2e-3)
        torch.testing.assert_close(entry_sum["frame_mean_logits"].double(), tiles.mean((3, 5)), rtol=0, atol=2e-3)
        torch.testing.assert_close(entry_sum["frame_attention_mass"].double(), probs.sum(5).mean(3), rtol=0, atol=2e-3)


def test_same_seed_same_file_other_seed_other_logits(tmp_path, full_and_summary):
    first, _, _, _ = full_and_summary
    code, again = extract(tmp_path, "--seed", "7")
    code_other, other = extract(tmp_path, "--seed", "8", name="other.pt")
    assert code == code_other == 0
    again, other = torch.load(again, weights_only=True), torch.load(other, weights_only=True)
    for a, b, c in zip(first["attention_weights"], again["attention_weights"], other["attention_weights"]):
        assert torch.equal(a["attn_logits"], b["attn_logits"])
        assert not torch.equal(a["attn_logits"], c["attn_logits"])
    assert first["metadata"] == again["metadata"]


def test_capture_step_cache_keeps_the_cache_update_pass(tmp_path):
    code, out = extract(tmp_path, "--capture_step", "cache", "--layer_indices", "2")
    assert code == 0
    (entry,) = torch.load(out, weights_only=True)["attention_weights"]
    assert (entry["layer_idx"], entry["block"], entry["pass"], entry["timestep"]) == (2, 1, "cache", 0.0)


def write_checkpoint(path, **entries):
    torch.save(entries, path)
    return path


def tiny_state_dict(seed):
    config = OmegaConf.merge(OmegaConf.load("configs/default_config.yaml"), OmegaConf.load("configs/tiny.yaml"))
    config.init_seed = seed
    return WanDiffusionWrapper.from_config(config).state_dict()


def test_checkpoint_generator_or_ema_is_loaded(tmp_path):
    ckpt = write_checkpoint(tmp_path / "sf.pt", generator=tiny_state_dict(1), generator_ema=tiny_state_dict(2))
    runs = {}
    for flag in ("--use_ema", "--no-use_ema"):
        out = tmp_path / f"{flag}.pt"
        argv = ["--config_path", "configs/tiny.yaml", "--checkpoint_path", str(ckpt), flag, "--device", "cpu",
                "--quiet", "--num_frames", "3", "--output_path", str(out)]
        assert cli.main(argv) == 0
        runs[flag] = torch.load(out, weights_only=True)
    assert runs["--use_ema"]["metadata"]["checkpoint_key"] == "generator_ema"
    assert runs["--no-use_ema"]["metadata"]["checkpoint_key"] == "generator"
    a, b = (runs[f]["attention_weights"][0]["attn_logits"] for f in runs)
    assert not torch.equal(a, b)


def bad_checkpoints(tmp_path):
    good = tiny_state_dict(1)
    wrong = dict(good)
    wrong["model.blocks.0.bogus"] = wrong.pop("model.blocks.0.self_attn.q.weight")
    return {
        "no_generator": (write_checkpoint(tmp_path / "a.pt", critic=good), "generator_ema"),
        "wrong_key": (write_checkpoint(tmp_path / "b.pt", generator_ema=wrong), "model.blocks.0.bogus"),
        "pickled": (write_checkpoint(tmp_path / "c.pt", generator_ema=good, args=argparse.Namespace(a=1)), "allow_pickle"),
    }


@pytest.mark.parametrize(
    "case, argv, words",
    [
        ("missing checkpoint", ["--checkpoint_path", "nowhere/x.pt"], ["--checkpoint_path", "--no_checkpoint"]),
        ("layer out of range", ["--no_checkpoint", "--layer_indices", "0", "6"], ["--layer_indices", "6"]),
        ("negative layer", ["--no_checkpoint", "--layer_indices", "-1"], ["--layer_indices"]),
        ("frames not a multiple", ["--no_checkpoint", "--num_frames", "7"], ["--num_frames", "7"]),
        ("zero frames", ["--no_checkpoint", "--num_frames", "0"], ["--num_frames"]),
        ("bad capture step", ["--no_checkpoint", "--capture_step", "4"], ["--capture_step"]),
        ("missing config", ["--no_checkpoint", "--config_path", "configs/none.yaml"], ["--config_path", "none.yaml"]),
        ("missing model folder", ["--no_checkpoint", "--config_path", "configs/self_forcing_dmd.yaml", "--model_dir", "nowhere/wan"],
         ["--model_dir", "diffusion_pytorch_model.safetensors", "models_t5_umt5-xxl-enc-bf16.pth"]),
        ("no cuda", ["--no_checkpoint", "--device", "cuda:0"], ["--device", "CUDA"]),
    ],
)
def test_bad_input_exits_nonzero_names_it_and_writes_nothing(tmp_path, capsys, case, argv, words):
    if case == "no cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "new_folder" / "out.pt"  # not created either when the input is refused
    base = ["--config_path", "configs/tiny.yaml", "--device", "cpu", "--quiet", "--num_frames", "6", "--output_path", str(out)]
    assert cli.main(base + argv) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (case, err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["no_generator", "wrong_key", "pickled"])
def test_bad_checkpoint_is_refused(tmp_path, capsys, case):
    path, word = bad_checkpoints(tmp_path)[case]
    out = tmp_path / "out" / "x.pt"
    argv = ["--config_path", "configs/tiny.yaml", "--checkpoint_path", str(path), "--device", "cpu", "--quiet",
            "--num_frames", "3", "--output_path", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert str(path) in err and word in err
    assert not out.exists()


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, out = extract(tmp_path, name="file/sub/out.pt")
    assert code == 2 and "--output_path" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("failure, code", [(RuntimeError("disk full"), None), (Interrupted(signal.SIGINT), 130),
                                           (Interrupted(signal.SIGTERM), 143), (Interrupted(signal.SIGHUP), 129)])
def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch, failure, code):
    out = tmp_path / "out.pt"
    out.write_bytes(b"previous result")

    def broken_save(obj, handle):
        handle.write(b"half a file")
        raise failure

    monkeypatch.setattr(attention_cache.torch, "save", broken_save)
    if code is None:
        with pytest.raises(RuntimeError, match="disk full"):
            extract(tmp_path)
    else:
        assert extract(tmp_path)[0] == code
    assert out.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]


def test_reader_and_plot_on_the_tiny_run(full_and_summary, tmp_path):
    _, _, full_path, summary_path = full_and_summary
    full, summary = open_cache(full_path), open_cache(summary_path)
    assert (full.save_mode, summary.save_mode) == ("full", "summary")
    for layer in (0, 4):
        from_full, stored = full.summary(layer), summary.summary(layer)
        for key in SUMMARY_KEYS:  # the full file holds fp16 logits, the summary exact fp32 reductions
            torch.testing.assert_close(from_full[key], stored[key], rtol=0, atol=2e-3)
    out = tmp_path / "figure4.png"
    assert plot_figure4.main(["--cache", str(full_path), "--panels", "0:0", "4:3", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


# ------------------------------------------------------------------------------------------------
# Issue "Trustworthy under any input": the CLI end to end


def test_layer_order_follows_the_command_line(tmp_path):
    code, out = extract(tmp_path, "--layer_indices", "4", "0", "--save_mode", "summary")
    assert code == 0
    data = torch.load(out, weights_only=True)
    assert data["layer_indices"] == [4, 0]
    assert [e["layer_idx"] for e in data["attention_weights"]] == [4, 0]


def test_output_path_fifo_refused_symlink_followed(tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code, _ = extract(tmp_path, name="pipe")
    assert code == 2 and "FIFO" in capsys.readouterr().err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]
    target = tmp_path / "real.pt"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    (tmp_path / "link.pt").symlink_to(target)
    code, _ = extract(tmp_path, "--save_mode", "summary", name="link.pt")
    assert code == 0 and (tmp_path / "link.pt").is_symlink()
    assert torch.load(target, weights_only=True)["layer_indices"] == [0, 4]
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640


def test_preflight_refuses_what_cannot_fit_before_building_anything(tmp_path, capsys, monkeypatch):
    import pipeline.extraction

    def never(*args, **kwargs):
        raise AssertionError("no model may be built for a run that cannot fit")

    monkeypatch.setattr(pipeline.extraction, "Extractor", never)
    argv = ["--config_path", "configs/random_1_3b.yaml", "--no_checkpoint", "--device", "cpu", "--quiet",
            "--num_frames", "1020", "--output_path", str(tmp_path / "big.pt")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "not enough room" in err and "GB" in err and ("--num_frames" in err or "--layer_indices" in err)
    assert list(tmp_path.iterdir()) == []


def test_long_prompt_warns_and_records_its_token_count(tmp_path, capsys):
    long_prompt = "a slow pan over a mountain lake at dawn " * 8  # 320 bytes: over the tiny encoder's 128 tokens
    code, out = extract(tmp_path, "--prompt", long_prompt, "--save_mode", "summary")
    assert code == 0
    assert "longer than the text encoder's 128" in capsys.readouterr().err
    meta = torch.load(out, weights_only=True)["metadata"]
    assert meta["prompt_tokens"] == len(long_prompt.strip()) + 1 and meta["prompt_truncated"] is True
    code, out = extract(tmp_path, "--prompt", "a cat", "--save_mode", "summary", name="short.pt")
    meta = torch.load(out, weights_only=True)["metadata"]
    assert code == 0 and meta["prompt_tokens"] == 6 and meta["prompt_truncated"] is False


def test_nonfinite_logits_warn_and_are_recorded(tmp_path, capsys):
    state = tiny_state_dict(1)
    state["model.blocks.4.self_attn.q.weight"][0, 0] = float("nan")
    ckpt = write_checkpoint(tmp_path / "nan.pt", generator_ema=state)
    argv = ["--config_path", "configs/tiny.yaml", "--checkpoint_path", str(ckpt), "--device", "cpu", "--quiet",
            "--num_frames", "3", "--save_mode", "summary", "--output_path", str(tmp_path / "out.pt")]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "non-finite logits" in err and "layer 4" in err and "layer 0" not in err
    data = torch.load(tmp_path / "out.pt", weights_only=True)
    by_layer = {e["layer_idx"]: e["nonfinite"] for e in data["attention_weights"]}
    assert by_layer[0] == 0 and by_layer[4] == 4 * 48 * 48  # every logit of layer 4: 4 heads, 48 queries, 48 keys
    assert data["metadata"]["nonfinite"] == by_layer[4]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signal_during_a_slow_save_exits_cleanly(tmp_path, signum, code):
    """The CLI in a subprocess, signalled while it writes a ~60 MB full cache (frames of 256 tokens):
    the exit code is the signal's, the previous file is intact and no temporary file is left."""
    config = tmp_path / "big.yaml"
    config.write_text(Path("configs/tiny.yaml").read_text().replace("height: 64", "height: 256").replace("width: 64", "width: 256"))
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "cache.pt"
    out.write_bytes(b"previous cache")
    argv = [sys.executable, "experiments/run_extraction_figure4.py", "--config_path", str(config), "--no_checkpoint",
            "--device", "cpu", "--quiet", "--num_frames", "6", "--layer_indices", "all", "--output_path", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": "."})
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".tmp") for p in folder.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, f"the CLI ended before saving: {proc.stderr.read()}"
        time.sleep(0.002)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert out.read_bytes() == b"previous cache"
    assert [p.name for p in folder.iterdir()] == ["cache.pt"]


def test_deep_forcing_rollout_captures_chosen_blocks_with_true_frames(tmp_path):
    """126 frames with Deep Sink + participative compression (S=10, W=21, N=16, R=4), blocks 6, 20 and
    the last: each entry's per-token labels follow the release's rules, written out here."""
    out = tmp_path / "df.pt"
    argv = ["--config_path", "configs/tiny_deep_forcing.yaml", "--no_checkpoint", "--device", "cpu", "--quiet",
            "--num_frames", "126", "--capture_blocks", "6", "20", "last", "--save_mode", "summary", "--output_path", str(out)]
    assert cli.main(argv) == 0
    cache = open_cache(out)
    assert [(e.layer_idx, e.block) for e in cache.entries] == [(layer, b) for layer in (0, 4) for b in (6, 20, 41)]
    for entry in cache.entries:
        video, rope = entry.key_video_frames[0].tolist(), entry.key_rope_frames[0].tolist()
        start = 3 * entry.block  # the block's first frame
        if entry.block == 6:  # the 21-frame window is not full yet: every frame, unshifted
            assert entry.key_frame_indices == list(range(21)) and video == rope
            continue
        # Blocks 7, 9, ... compress to N = 16 frames and move the sink to start at cs - N; block 20 is
        # between compressions (19 frames: the 16 kept at block 19 and its own 3), its sink still where
        # block 19 put it.
        last_compression = start if entry.block % 2 else start - 3
        assert entry.num_key_frames == (16 if entry.block % 2 else 19)
        sink = [i for i, frame in enumerate(video) if frame < 10]
        assert sink == list(range(10 * FSL))
        assert [rope[i] - video[i] for i in sink] == [last_compression - 16] * len(sink)
        recent = list(range(last_compression - 1, start + 3))
        assert sorted(set(video[-len(recent) * FSL:])) == recent
        middle = video[10 * FSL : -len(recent) * FSL]
        assert len(middle) == 2 * FSL and middle == sorted(middle) and all(10 <= f < recent[0] for f in middle)
        assert all(v == r for v, r in zip(video[10 * FSL :], rope[10 * FSL :]))


@pytest.mark.parametrize("option", ["--output_path", "--output_dir"])
def test_an_empty_output_name_is_refused(tmp_path, capsys, monkeypatch, option):
    """An empty --output_path is not taken for the default cache/attention_cache_figure4.pt (issue 23)."""
    import pipeline.plan
    monkeypatch.setattr(pipeline.plan, "DEFAULT_OUTPUT", str(tmp_path / "default.pt"))  # not the checkout's cache
    argv = ["--config_path", "configs/tiny.yaml", "--no_checkpoint", "--device", "cpu", "--quiet", "--num_frames", "6", option, ""]
    try:
        code = cli.main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2 and "empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
