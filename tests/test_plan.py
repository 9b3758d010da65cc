"""pipeline/plan.py: torch-free, the options taken from the command line once and never changed, the
loaded config left as it was, resolved values in the Plan."""
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import experiments.run_extraction_figure4 as cli
import pipeline.plan as plan_module
from pipeline.plan import DEFAULT_OUTPUT, UsageError, options_from_args, parse_layers, parse_seeds, plan_run

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config_path", "configs/tiny.yaml", "--no_checkpoint", "--device", "cpu", "--num_frames", "6"]


def test_importing_the_plan_imports_no_torch():
    code = ("import sys, pipeline.plan; assert 'torch' not in sys.modules, 'pipeline.plan'; "
            "import pipeline.sweep, pipeline.run, experiments.run_extraction_figure4; "
            "assert 'torch' not in sys.modules, 'the script'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_options_hold_every_option_frozen():
    args = cli.parse_args([*TINY, "--layer_indices", "4", "0", "--prompt", "a", "--prompt", "b"])
    options = options_from_args(args)
    assert {f.name for f in dataclasses.fields(options)} == set(vars(args))
    assert options.layer_indices == ("4", "0") and options.prompt == ("a", "b") and options.output_path is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.output_path = "x.pt"


def test_plan_resolves_without_changing_options_or_the_loaded_config(monkeypatch):
    real_load_config, loaded = plan_module.load_config, []

    def load_config(*args, **kwargs):
        loaded.append(real_load_config(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(plan_module, "load_config", load_config)
    options = options_from_args(cli.parse_args([*TINY, "--precision", "fast"]))
    before = dataclasses.replace(options)
    plan = plan_run(options, environ={})
    assert options == before and options.output_path is None and options.precision == "fast"
    assert plan.output_path == DEFAULT_OUTPUT and plan.output_dir is None and plan.dtype == "float32"
    assert plan.config.precision == "fast" and plan.precision == "fast"
    assert loaded[0].precision == "exact"  # the loaded config is not the plan's and was left as it was
    assert plan.items == ((0, 42),) and not plan.sweep and plan.passes == [0] and plan.blocks == [1]


def test_plan_of_a_sweep_and_the_share_of_each_rank(tmp_path):
    options = options_from_args(cli.parse_args([*TINY, "--seeds", "0-2", "--prompt", "a", "--prompt", "b",
                                                "--output_dir", str(tmp_path / "sweep")]))
    plans = [plan_run(options, environ={"RANK": str(r), "WORLD_SIZE": "2"}) for r in (0, 1)]
    assert plans[0].sweep and plans[0].output_dir == tmp_path / "sweep" and plans[0].output_path is None
    assert [len(p.my_items()) for p in plans] == [3, 3]
    assert sorted(plans[0].my_items() + plans[1].my_items()) == sorted(plans[0].items)


@pytest.mark.parametrize("extra, message", [
    (["--capture_step", "4"], "--capture_step: '4'; expected 0..3, 'cache' or 'all'"),
    (["--capture_blocks", "2"], "--capture_blocks: '2'; expected a block index 0..1 (num_frames / num_frame_per_block "
                                "blocks) or 'last'"),
    (["--capture_blocks", "1", "last"], "--capture_blocks: block 1 given more than once"),
    (["--seeds", "0", "--output_dir", ""], "--output_dir: an empty name; give the sweep's folder"),
])
def test_plan_refusals_keep_their_messages(extra, message):
    with pytest.raises(UsageError) as err:
        plan_run(options_from_args(cli.parse_args([*TINY, *extra])), environ={})
    assert str(err.value) == message


def test_seeds_and_layers():
    assert parse_seeds(["5", "0-2"]) == [5, 0, 1, 2]
    assert parse_layers(("all",), 3) == [0, 1, 2] and parse_layers(("2", "0"), 3) == [2, 0]
    for words, text in [(["2-1"], "runs backwards"), (["1", "0-1"], "[1] given more than once"), (["x"], "'x' is not a seed")]:
        with pytest.raises(UsageError, match=text.replace("[", r"\[").replace("]", r"\]")):
            parse_seeds(words)


# Issue 23: checks that used to happen at run time (a traceback, exit 1) or never, and unbounded
# inputs; each refused by the plan with exit 2 naming the option, in well under a second.

def refused_by_cli(capsys, *argv):
    start = time.perf_counter()
    code = cli.main([*TINY, "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert time.perf_counter() - start < 2, argv
    return err


@pytest.mark.parametrize("argv, words", [
    (["--num_frames", "1026"], ["--num_frames", "1026", "1024"]),
    (["--num_frames", "3000000"], ["--num_frames", "1024"]),
    (["--capture_blocks", "\u00b2"], ["--capture_blocks"]),
    (["--capture_blocks", "\uff11"], ["--capture_blocks"]),  # a full-width digit 1
    (["--capture_blocks", "\u0661"], ["--capture_blocks"]),  # an Arabic-Indic digit 1
    (["--threads", "2147483648"], ["--threads", "2147483648"]),
    (["--threads", "1000000"], ["--threads", "1000000"]),
    (["--threads", "0"], ["--threads"]),
    (["--seeds", "0-100000000", "--output_dir", "o"], ["--seeds", "1000000"]),
    (["--seeds", "0-4294967295", "--output_dir", "o"], ["--seeds", "1000000"]),
    (["--seeds", "0-600000", "600001-1200000", "--output_dir", "o"], ["--seeds", "1000000"]),
    (["--seeds", "0-599999", "--prompt", "a", "--prompt", "b", "--output_dir", "o"], ["1200000 items", "1000000"]),
    (["--prompts_file", "/dev/zero"], ["--prompts_file", "/dev/zero", "not a regular file"]),
    (["--prompts_file", "/dev/null"], ["--prompts_file", "/dev/null", "not a regular file"]),
    (["--prompts_file", "."], ["--prompts_file", "is a folder"]),
])
def test_run_time_and_unbounded_inputs_are_refused_by_the_plan(tmp_path, capsys, argv, words):
    (tmp_path / "folder").mkdir()
    names = {"o": str(tmp_path / "o"), ".": str(tmp_path / "folder")}
    err = refused_by_cli(capsys, *(names.get(a, a) for a in argv))
    for word in words:
        assert word in err, (argv, err)
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


def test_the_longest_video_the_rope_table_covers_is_planned():
    from utils.wan21 import ROPE_MAX_LEN

    options = options_from_args(cli.parse_args([*TINY, "--num_frames", str(ROPE_MAX_LEN // 3 * 3)]))
    assert plan_run(options, environ={}).blocks == [ROPE_MAX_LEN // 3 - 1]


def test_threads_are_capped_by_the_cpus():
    limit = plan_module.max_threads()
    assert 1 <= limit <= 1024
    assert plan_run(options_from_args(cli.parse_args([*TINY, "--threads", str(limit)])), environ={})
    with pytest.raises(UsageError, match=f"--threads: {limit + 1}; expected 1..{limit}"):
        plan_run(options_from_args(cli.parse_args([*TINY, "--threads", str(limit + 1)])), environ={})


def test_seeds_are_parsed_in_linear_time():
    start = time.perf_counter()
    assert len(parse_seeds(["0-999999"])) == 1_000_000
    with pytest.raises(UsageError, match=r"\[5\] given more than once"):
        parse_seeds(["0-499999", "5", "500000-999990"])
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("kind", ["fifo", "folder", "char device", "too large", "symlink to a fifo", "socket"])
def test_prompts_file_must_be_a_regular_file_of_bounded_size(tmp_path, kind):
    """A FIFO is never opened (opening one for reading waits for a writer forever); a device is not
    read (/dev/zero never ends); a file past the size limit is refused before it is read."""
    import socket

    path = tmp_path / "prompts"
    if kind in ("fifo", "symlink to a fifo"):
        os.mkfifo(tmp_path / "fifo")
        path = tmp_path / "fifo"
        if kind == "symlink to a fifo":
            (tmp_path / "link").symlink_to(path)
            path = tmp_path / "link"
    elif kind == "folder":
        path.mkdir()
    elif kind == "char device":
        path = Path("/dev/zero")
    elif kind == "too large":
        with open(path, "wb") as f:
            f.truncate(plan_module.MAX_PROMPTS_FILE_BYTES + 1)
    elif kind == "socket":
        path = tmp_path / "s"
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
    code = (f"import sys; from pipeline.plan import read_prompts_file, UsageError\n"
            f"try: read_prompts_file({str(path)!r})\n"
            f"except UsageError as err: print(err); sys.exit(2)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 2, result
    assert result.stdout.startswith(f"--prompts_file: {path}") and "\n" not in result.stdout.strip()
    if kind == "too large":
        assert "64 MiB" in result.stdout
    elif kind != "folder":
        assert "not a regular file" in result.stdout


def test_prompts_file_bom_and_line_breaks(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeff# a comment\nfirst\u2028still first\r\nsecond\x85still second\x0cand\x1c\x1d\x1e\x0b end\n\n# c\r\n"
                     "\ufeffthird\n".encode())
    assert plan_module.read_prompts_file(path) == [
        "first\u2028still first", "second\x85still second\x0cand\x1c\x1d\x1e\x0b end", "\ufeffthird"]
    path.write_bytes("\ufeffonly\r\n".encode())
    assert plan_module.read_prompts_file(path) == ["only"]


def test_duplicate_items_are_run_once_with_a_warning(tmp_path, monkeypatch, capsys):
    path = tmp_path / "prompts.txt"
    path.write_text("a\nb\na\n")
    argv = [*TINY, "--prompt", "b", "--prompts_file", str(path), "--seeds", "0", "1", "--output_dir", str(tmp_path / "o")]
    plan = plan_run(options_from_args(cli.parse_args(argv)), environ={})
    assert plan.prompts == ["b", "a", "b", "a"]  # indices (file names) stay those of the prompts as given
    assert plan.items == ((0, 0), (0, 1), (1, 0), (1, 1))
    assert len(plan.warnings) == 1
    assert "duplicate" in plan.warnings[0] and "'b'" in plan.warnings[0] and "'a'" in plan.warnings[0]
    assert "prompt 2" in plan.warnings[0] and "prompt 3" in plan.warnings[0]

    import pipeline.run

    def stop(*args, **kwargs):
        raise UsageError("stopped after the plan")

    monkeypatch.setattr(pipeline.run, "preflight", stop)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "warning: " in err and plan.warnings[0] in err and not (tmp_path / "o").exists()
    one = plan_run(options_from_args(cli.parse_args([*TINY, "--seeds", "0", "1", "--output_dir", str(tmp_path / "o")])),
                   environ={})
    assert one.warnings == ()


def test_preflight_counts_the_random_text_encoder(tmp_path, monkeypatch):
    """The random text encoder is built in host memory (fp32) before anything else: one too big for it
    is refused with the numbers, naming text_encoder_config, before it is built."""
    import yaml

    config = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
    config["text_encoder_config"].update(vocab_size=1_000_000, num_layers=2)  # 32 M parameters: 128 MB in fp32
    path = tmp_path / "big_vocab.yaml"
    path.write_text(yaml.safe_dump(config))
    options = options_from_args(cli.parse_args([*TINY, "--config_path", str(path), "--output_path", str(tmp_path / "x.pt")]))
    plan = plan_run(options, environ={})
    monkeypatch.setattr(plan_module, "host_available_bytes", lambda: 100 * 10**6)
    with pytest.raises(UsageError, match=r"not enough room for this run: the text encoder needs about 0\.1 GB of host "
                                         r"memory .* but 0\.1 GB are available.*text_encoder_config"):
        plan_module.preflight(options, plan)
    small = options_from_args(cli.parse_args([*TINY, "--output_path", str(tmp_path / "x.pt")]))
    plan_module.preflight(small, plan_run(small, environ={}))  # the tiny encoder fits in 100 MB


def test_umt5_parameter_count_matches_the_model():
    from transformers import UMT5Config, UMT5EncoderModel

    from utils.preflight import umt5_parameter_count
    from utils.wan21 import UMT5_XXL

    sizes = dict(UMT5_XXL, vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    model = UMT5EncoderModel(UMT5Config(**sizes))
    assert umt5_parameter_count(sizes) == sum(p.numel() for p in model.parameters())


def test_too_many_prompts_are_refused_before_the_items_are_built(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"p{i}\n" for i in range(plan_module.MAX_ITEMS + 1)))
    with pytest.raises(UsageError, match=f"--prompt/--prompts_file: {plan_module.MAX_ITEMS + 1} prompts; a run takes at most"):
        plan_run(options_from_args(cli.parse_args([*TINY, "--prompts_file", str(path), "--output_dir", str(tmp_path / "o")])),
                 environ={})


def test_prompts_file_that_cannot_be_read_is_refused(tmp_path):
    (tmp_path / "file").write_text("a\n")
    with pytest.raises(UsageError, match="--prompts_file: .*file/prompts.txt cannot be read"):
        plan_module.read_prompts_file(tmp_path / "file" / "prompts.txt")  # a path through a file
    with pytest.raises(UsageError, match="--prompts_file: .*nowhere.txt not found"):
        plan_module.read_prompts_file(tmp_path / "nowhere.txt")


@pytest.mark.parametrize("word", ["\u0663", "1-\u0663", "\uff11", "\u00b2"])
def test_seeds_are_ascii_digits(word):
    with pytest.raises(UsageError, match="is not a seed"):
        parse_seeds([word])
