"""Tests of utils/preflight.py: the estimate against formulas written out here for the full-size
Wan2.1-T2V-1.3B run (21 latent frames, 480x832), the parameter count against the real model, and the
refusals of check_fits."""
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from utils.wan21 import WAN_T2V_1_3B
from utils.preflight import (
    PreflightError, check_fits, disk_free_bytes, estimate, host_available_bytes, parameter_count,
)
from wan.modules.causal_model import CausalWanModel

FULL_RUN = dict(num_frames=21, num_frame_per_block=3, height=480, width=832, cache_frames=21,
                num_captured_layers=2, num_kept_passes=1, save_mode="full", dtype_bytes=2)


def test_import_is_stdlib_only():
    code = "import sys, utils.preflight; assert not {'torch', 'omegaconf'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("overrides", [{}, dict(dim=64, ffn_dim=96, num_heads=4, num_layers=2, text_dim=32, qk_norm=False, cross_attn_norm=False)])
def test_parameter_count_equals_the_model(overrides):
    sizes = dict(WAN_T2V_1_3B, **overrides)
    with torch.device("meta"):
        model = CausalWanModel(**sizes)
    assert parameter_count(sizes) == sum(p.numel() for p in model.parameters())


def test_full_size_estimate_matches_the_formulas():
    e = estimate(WAN_T2V_1_3B, **FULL_RUN)
    assert e.frame_seq_length == (480 // 16) * (832 // 16) == 1560
    assert e.query_tokens == 4680 and e.key_tokens == 32760
    assert e.kv_cache == 30 * 2 * 32760 * 1536 * 2
    per_layer = 12 * 4680 * 32760 * 2
    assert round(per_layer / 1e9, 2) == 3.68
    assert e.output_file == e.host_peak == 2 * per_layer
    assert e.capture_device == 2 * (4680 + 32760) * 1536 * 2 + 1560 * 32760 * 4
    assert e.weights == parameter_count(WAN_T2V_1_3B) * 2
    assert e.activations == 4680 * (10 * 1536 + 2 * 8960) * 2
    assert e.device_total == e.weights + e.kv_cache + e.activations + e.capture_device
    summary = estimate(WAN_T2V_1_3B, **dict(FULL_RUN, save_mode="summary"))
    assert summary.output_file == 2 * 4 * (12 * 32760 + 2 * 12 * 3 * 21)
    windowed = estimate(WAN_T2V_1_3B, **dict(FULL_RUN, cache_frames=6, batch=2, text_encoder_bytes=10))
    assert windowed.key_tokens == 6 * 1560 and windowed.kv_cache == 30 * 2 * 2 * 6 * 1560 * 1536 * 2
    assert windowed.weights == e.weights + 10


def test_bad_save_mode():
    with pytest.raises(ValueError, match="save_mode 'half'"):
        estimate(WAN_T2V_1_3B, **dict(FULL_RUN, save_mode="half"))


def test_check_fits_refuses_with_the_numbers_and_what_to_change(tmp_path):
    e = estimate(WAN_T2V_1_3B, **FULL_RUN)
    plenty = 10**15
    check_fits(e, device_free_bytes=plenty, host_available_bytes=plenty, output_dir=tmp_path)
    check_fits(e, device_free_bytes=None, host_available_bytes=None, output_dir=tmp_path / "new" / "deeper")
    with pytest.raises(PreflightError) as error:
        check_fits(e, device_free_bytes=8e9, host_available_bytes=plenty, output_dir=tmp_path)
    message = str(error.value)
    assert isinstance(error.value, ValueError) and "\n" not in message
    assert f"about {e.device_total / 1e9:.1f} GB of device memory" in message and "8.0 GB are free" in message
    assert "--layer_indices" in message and "--num_frames" in message
    with pytest.raises(PreflightError, match=re.escape("the output needs about 7.4 GB of host memory but 4.0 GB are available")) as error:
        check_fits(e, device_free_bytes=plenty, host_available_bytes=4e9, output_dir=tmp_path)
    assert "--save_mode summary" in str(error.value)


def test_check_fits_refuses_a_full_disk(tmp_path, monkeypatch):
    e = estimate(WAN_T2V_1_3B, **FULL_RUN)
    seen = []
    monkeypatch.setattr("utils.preflight.shutil.disk_usage", lambda p: seen.append(p) or SimpleNamespace(total=10**9, used=0, free=10**9))
    with pytest.raises(PreflightError, match=re.escape("the output file needs about 7.4 GB but 1.0 GB are free for")) as error:
        check_fits(e, device_free_bytes=None, host_available_bytes=None, output_dir=tmp_path / "a" / "b")
    assert "--save_mode summary" in str(error.value)
    assert seen == [tmp_path]  # the nearest existing parent


def test_host_available_bytes_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    5000000 kB\n")
    assert host_available_bytes(meminfo) == 5000000 * 1024
    meminfo.write_text("MemTotal:       16000000 kB\n")
    assert host_available_bytes(meminfo) is None
    assert host_available_bytes(tmp_path / "absent") is None


def test_disk_free_bytes_of_a_folder_not_yet_made(tmp_path):
    assert disk_free_bytes(tmp_path / "x" / "y") == disk_free_bytes(tmp_path) > 0
