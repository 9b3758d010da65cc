"""Tests of utils/loading.py: every bad weight file ends in a one-line WeightFileError naming the file
(and the key, where there is one); good files in both torch formats and safetensors load exactly.

Each file is written here in its real format: torch.save (zip and legacy), safetensors' save_file,
pickle.dump, or raw bytes.
"""
import pickle
import re
import zipfile

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from utils.loading import WeightFileError, load_into, read_state_dict
from pipeline.wrappers import load_generator_checkpoint


class Trainer:
    """An object that the weights_only unpickler refuses."""

    def __init__(self):
        self.step = 3


def tensors():
    generator = torch.Generator().manual_seed(0)
    return {"weight": torch.randn(3, 2, generator=generator), "bias": torch.randn(3, generator=generator)}


def refused(path, **kwargs):
    """The message of the WeightFileError that read_state_dict raises for ``path``; one line naming it."""
    with pytest.raises(WeightFileError) as error:
        read_state_dict(path, **kwargs)
    message = str(error.value)
    assert isinstance(error.value, ValueError)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


def assert_same(found, expected):
    assert set(found) == set(expected)
    for key, value in expected.items():
        assert torch.equal(found[key], value), key


def test_good_files_load_exactly_in_every_format(tmp_path):
    state = tensors()
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    save_file(state, str(tmp_path / "w.safetensors"))
    for name in ("zip.pt", "legacy.pth", "w.safetensors"):
        assert_same(read_state_dict(tmp_path / name), state)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    assert "empty file (0 bytes)" in refused(path)


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.pth"
    path.write_bytes(bytes(range(7, 256)) * 3)
    assert "not a torch file" in refused(path)
    assert "not a torch file" in refused(path, allow_pickle=True)


def test_truncated_zip_file(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(tensors(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = refused(path)
    assert "truncated or corrupt zip-format torch file" in message and "central directory" in message


def test_truncated_legacy_file(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(tensors(), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    assert "truncated or corrupt legacy-format torch file" in refused(path)


def test_legacy_file_with_an_object_is_refused_and_loads_with_allow_pickle(tmp_path, capsys):
    path = tmp_path / "legacy.pth"
    state = tensors()
    torch.save({**state, "trainer": Trainer()}, path, _use_new_zipfile_serialization=False)
    message = refused(path)
    assert "holds objects beyond tensors" in message and "Trainer" in message
    assert "--allow_pickle" not in message and "opt in" not in message
    assert capsys.readouterr().err == ""  # no warning without allow_pickle
    loaded = read_state_dict(path, allow_pickle=True, pickle_flag="--allow_pickle")
    assert_same({k: v for k, v in loaded.items() if k != "trainer"}, state)
    assert loaded["trainer"].step == 3
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and str(path) in warning and "fully unpickling" in warning and "--allow_pickle" in warning


def test_raw_pickle_is_refused_even_with_allow_pickle(tmp_path):
    path = tmp_path / "state.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"weight": [1.0, 2.0]}, handle)
    for allow in (False, True):
        assert "a plain pickle, not a file written by torch.save" in refused(path, allow_pickle=allow)


def test_not_a_dict_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.ones(2)], path)
    assert "holds a list; expected a dict of tensors" in refused(path)


def test_non_string_keys_are_refused(tmp_path):
    path = tmp_path / "ints.pt"
    torch.save({0: torch.ones(2), "bias": torch.ones(2)}, path)
    message = refused(path)
    assert "keys must be strings" in message and "0 (int)" in message


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_rezipped_file_with_compressed_records_is_refused(tmp_path, method):
    """The same records re-zipped compressed: torch would memory-map the compressed bytes as tensors
    (deflate: garbage read silently), so the file is refused, naming it and a record."""
    path, rezipped = tmp_path / "w.pt", tmp_path / "rezipped.pt"
    torch.save(tensors(), path)
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(rezipped, "w", compression=method) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    message = refused(rezipped)
    name = zipfile.compressor_names[method]
    assert re.search(rf"zip record '[^']+' is {name}-compressed \(as are \d+ more\)", message), message
    assert "stored uncompressed" in message


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "meta"])
def test_tensors_that_are_not_plain_are_refused_naming_the_key(tmp_path, kind):
    odd = {"sparse_coo": torch.Tensor.to_sparse, "sparse_csr": torch.Tensor.to_sparse_csr, "meta": lambda t: t.to("meta")}[kind](torch.eye(3))
    path = tmp_path / "w.pt"
    torch.save({**tensors(), "odd": odd}, path)
    why = "on the meta device" if kind == "meta" else f"layout torch.{kind}, not torch.strided"
    assert refused(path).startswith(f"{path}: 'odd' is not a plain tensor ({why}")
    torch.save({"generator_ema": {"blocks": [{"weight": odd}]}}, path)  # nested: the containers are named
    assert refused(path).startswith(f"{path}: 'weight' in ['generator_ema']['blocks'][0] is not a plain tensor ({why}")
    with pytest.raises(WeightFileError, match=re.escape(f"src: 'weight' is not a plain tensor ({why}")):
        load_into(nn.Linear(3, 3, bias=False), {"weight": odd}, "src")


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(tensors(), str(path))
    path.write_bytes(path.read_bytes()[:30])
    assert "not a readable safetensors file" in refused(path)


@pytest.mark.parametrize("save", ["torch", "safetensors"])
def test_int8_weights_for_float_parameters_name_file_and_key(tmp_path, save):
    state = {key: value.to(torch.int8) if key == "weight" else value for key, value in tensors().items()}
    path = tmp_path / ("w.pt" if save == "torch" else "w.safetensors")
    torch.save(state, path) if save == "torch" else save_file(state, str(path))
    module = nn.Linear(2, 3)
    before = module.weight.detach().clone()
    with pytest.raises(WeightFileError, match=re.escape(f"{path}: does not fit the model: wrong dtypes: weight (file torch.int8, model floating point)")):
        load_into(module, read_state_dict(path), path)
    assert torch.equal(module.weight, before)  # nothing was loaded


def test_non_tensor_values_and_nested_non_string_keys_name_file_and_key(tmp_path):
    module = nn.Linear(2, 3)
    with pytest.raises(WeightFileError, match=re.escape("src: values that are not tensors: bias (int)")):
        load_into(module, {"weight": torch.zeros(3, 2), "bias": 0}, "src")
    with pytest.raises(WeightFileError, match=re.escape("src: keys must be strings, found 1 (int)")):
        load_into(module, {"weight": torch.zeros(3, 2), 1: torch.zeros(3)}, "src")


def generator_and_states():
    from omegaconf import OmegaConf

    from pipeline.wrappers import WanDiffusionWrapper

    config = OmegaConf.merge(OmegaConf.load("configs/default_config.yaml"), OmegaConf.load("configs/tiny.yaml"))
    config.model_config.num_layers = 1
    generator = WanDiffusionWrapper.from_config(config)
    return generator, {k: v + 1 for k, v in generator.state_dict().items()}


def test_generator_checkpoint_with_an_object_suggests_allow_pickle(tmp_path, capsys):
    generator, state = generator_and_states()
    path = tmp_path / "sf.pt"
    torch.save({"generator_ema": state, "trainer": Trainer()}, path)
    with pytest.raises(WeightFileError) as error:
        load_generator_checkpoint(generator, path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: holds objects beyond tensors")
    assert "opt in with --allow_pickle" in message
    assert load_generator_checkpoint(generator, path, allow_pickle=True) == "generator_ema"
    assert "fully unpickling" in capsys.readouterr().err
    assert_same(generator.state_dict(), state)


def test_generator_checkpoint_with_int8_weights_names_file_and_key(tmp_path):
    generator, state = generator_and_states()
    key = "model.blocks.0.self_attn.q.weight"
    state[key] = state[key].to(torch.int8)
    path = tmp_path / "sf.pt"
    torch.save({"generator_ema": state}, path)
    with pytest.raises(WeightFileError, match=re.escape(f"{path} ['generator_ema']: does not fit the model: wrong dtypes: {key} (file torch.int8")):
        load_generator_checkpoint(generator, path)


def test_generator_checkpoint_in_legacy_format_loads(tmp_path):
    generator, state = generator_and_states()
    path = tmp_path / "sf.pt"
    torch.save({"generator_ema": state}, path, _use_new_zipfile_serialization=False)
    assert load_generator_checkpoint(generator, path) == "generator_ema"
    assert_same(generator.state_dict(), state)
