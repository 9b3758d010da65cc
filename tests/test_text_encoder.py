"""Tests for utils/text_encoder.py: the Wan -> UMT5 key map, loading a Wan-format file, numerics.

Expected key names and shapes are written out here from the reference key map and checked against the
official manifest; numerics are compared with a plain ``UMT5EncoderModel`` run by the test.
"""

import re
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from utils.loading import WeightFileError
from utils.text_encoder import WanTextEncoder, clean_prompt, t5_key_map
from utils.wan21 import T5_FILE as T5_CHECKPOINT, UMT5_XXL


# Tiny sizes; inner attention width 3 * 4 = 12 differs from d_model, so q and o have distinct shapes.
TINY_FILE = dict(
    vocab_size=40,
    d_model=16,
    d_kv=3,
    d_ff=24,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
)
TINY_RANDOM = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, text_len=32)

# Wan block key -> UMT5 block key, from the reference key map (key-maps.md, section 1).
BLOCK_NAMES = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def expected_names(wan_key):
    if wan_key == "token_embedding.weight":
        return ["shared.weight", "encoder.embed_tokens.weight"]
    if wan_key == "norm.weight":
        return ["encoder.final_layer_norm.weight"]
    _, index, rest = wan_key.split(".", 2)
    return [f"encoder.block.{index}.{BLOCK_NAMES[rest]}"]


def wan_t5_shapes(c):
    """Key -> shape of Wan's T5Encoder state dict for UMT5Config-style sizes ``c``."""
    d, inner, ff = c["d_model"], c["d_kv"] * c["num_heads"], c["d_ff"]
    shapes = {"token_embedding.weight": (c["vocab_size"], d)}
    for i in range(c["num_layers"]):
        shapes |= {
            f"blocks.{i}.norm1.weight": (d,),
            f"blocks.{i}.attn.q.weight": (inner, d),
            f"blocks.{i}.attn.k.weight": (inner, d),
            f"blocks.{i}.attn.v.weight": (inner, d),
            f"blocks.{i}.attn.o.weight": (d, inner),
            f"blocks.{i}.norm2.weight": (d,),
            f"blocks.{i}.ffn.gate.0.weight": (ff, d),
            f"blocks.{i}.ffn.fc1.weight": (ff, d),
            f"blocks.{i}.ffn.fc2.weight": (d, ff),
            f"blocks.{i}.pos_embedding.embedding.weight": (c["relative_attention_num_buckets"], c["num_heads"]),
        }
    shapes["norm.weight"] = (d,)
    return shapes


def umt5(sizes):
    return UMT5EncoderModel(UMT5Config(**{**UMT5_XXL, **sizes})).eval()


def word_tokenizer():
    """A small whitespace word tokenizer with T5's special ids, standing in for google/umt5-xxl."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4, "sat": 5}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture
def model_dir(tmp_path):
    """A model folder with a tiny Wan-format bf16 encoder file and a tokenizer folder."""
    generator = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=generator).bfloat16() for k, s in wan_t5_shapes(TINY_FILE).items()}
    torch.save(weights, tmp_path / T5_CHECKPOINT)
    word_tokenizer().save_pretrained(tmp_path / "google" / "umt5-xxl")
    return tmp_path


def test_key_map_covers_the_official_file(official_manifest):
    manifest = official_manifest("umt5_xxl_encoder.json")
    config = manifest["config"]
    ours = {
        "vocab": UMT5_XXL["vocab_size"],
        "dim": UMT5_XXL["d_model"],
        "dim_attn": UMT5_XXL["d_kv"] * UMT5_XXL["num_heads"],
        "dim_ffn": UMT5_XXL["d_ff"],
        "num_heads": UMT5_XXL["num_heads"],
        "num_layers": UMT5_XXL["num_layers"],
        "num_buckets": UMT5_XXL["relative_attention_num_buckets"],
    }
    assert ours == {k: config[k] for k in ours}

    wan = {
        k: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
        for k, (shape, dtype) in manifest["keys"].items()
    }
    assert {k: v.shape for k, v in wan.items()} == {k: torch.Size(s) for k, s in wan_t5_shapes(UMT5_XXL).items()}
    mapped = t5_key_map(wan, "manifest")
    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert (len(wan), len(mapped)) == (242, 243)
    for key, tensor in wan.items():
        for name in expected_names(key):
            assert mapped[name] is tensor, (key, name)


def test_key_map_rejects_unknown_key():
    with pytest.raises(WeightFileError, match=r"some\.pth.*blocks\.0\.attn\.qkv\.weight"):
        t5_key_map({"blocks.0.attn.qkv.weight": torch.zeros(1)}, "some.pth")


def test_from_model_dir_loads_every_weight_bit_exactly(model_dir):
    encoder = WanTextEncoder.from_model_dir(model_dir, text_len=8, config=TINY_FILE)
    weights = torch.load(model_dir / T5_CHECKPOINT)
    loaded = encoder.encoder.state_dict()
    assert len(loaded) == len(weights) + 1
    for key, tensor in weights.items():
        for name in expected_names(key):
            assert loaded[name].dtype == torch.bfloat16
            assert torch.equal(loaded[name], tensor), (key, name)
    model = encoder.encoder
    assert model.shared.weight is model.encoder.embed_tokens.weight
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert not model.training

    assert encoder.tokenizer("a cat sat")["input_ids"] == [3, 4, 5, 1]
    with torch.no_grad():
        embeds = encoder(["a cat", "sat"])["prompt_embeds"]
    assert embeds.shape == (2, 8, 16) and embeds.dtype == torch.bfloat16
    assert (embeds[0, 3:] == 0).all() and (embeds[1, 2:] == 0).all() and (embeds[:, 0] != 0).any(dim=-1).all()


def _replace(model_dir, change):
    path = model_dir / T5_CHECKPOINT
    weights = torch.load(path)
    change(weights)
    torch.save(weights, path)
    return path


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda w: w.update({"blocks.1.attn.qkv.weight": torch.zeros(3)}), "blocks.1.attn.qkv.weight"),
        (
            lambda w: w.update({"blocks.1.attn.q.weight": torch.zeros(16, 16)}),
            "encoder.block.1.layer.0.SelfAttention.q.weight",
        ),
        (lambda w: w.pop("norm.weight"), "encoder.final_layer_norm.weight"),
    ],
    ids=["unknown key", "wrong shape", "missing key"],
)
def test_from_model_dir_errors_name_file_and_key(model_dir, change, key):
    path = _replace(model_dir, change)
    with pytest.raises(WeightFileError) as error:
        WanTextEncoder.from_model_dir(model_dir, text_len=8, config=TINY_FILE)
    assert str(path) in str(error.value) and key in str(error.value)


class Step:
    """An object that the weights_only unpickler refuses."""


def test_from_model_dir_refuses_a_file_with_an_object_without_the_allow_pickle_hint(model_dir, capsys):
    path = _replace(model_dir, lambda w: w.update({"step": Step()}))
    with pytest.raises(WeightFileError) as error:
        WanTextEncoder.from_model_dir(model_dir, text_len=8, config=TINY_FILE)
    message = str(error.value)
    assert message.startswith(f"{path}: holds objects beyond tensors") and "Step" in message and "\n" not in message
    assert "allow_pickle" not in message and "opt in" not in message  # no option loads it: none is suggested
    assert capsys.readouterr().err == ""


def test_from_model_dir_refuses_non_string_keys(model_dir):
    path = _replace(model_dir, lambda w: w.update({7: torch.zeros(2)}))
    with pytest.raises(WeightFileError, match=re.escape(f"{path}: keys must be strings, found 7 (int)")):
        WanTextEncoder.from_model_dir(model_dir, text_len=8, config=TINY_FILE)


@pytest.mark.parametrize("missing", [T5_CHECKPOINT, "google/umt5-xxl"])
def test_from_model_dir_missing_file(model_dir, missing):
    path = model_dir / missing
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    with pytest.raises(WeightFileError, match="not found") as error:
        WanTextEncoder.from_model_dir(model_dir, text_len=8, config=TINY_FILE)
    assert str(path) in str(error.value)


def test_output_equals_plain_umt5_on_valid_rows_and_zero_after():
    encoder = WanTextEncoder.random(TINY_RANDOM)
    prompts = ["a red fox  jumps over the dog", "x", "a very long prompt that runs past the thirty-two tokens"]
    with torch.no_grad():
        embeds = encoder(prompts)["prompt_embeds"]

    tokens = encoder.tokenizer(
        [clean_prompt(p) for p in prompts],
        padding="max_length",
        max_length=32,
        truncation=True,
        return_tensors="pt",
    )
    lengths = tokens["attention_mask"].sum(dim=1).tolist()
    assert lengths == [29, 2, 32]  # UTF-8 bytes of the cleaned prompt + EOS, cut to 32
    reference = umt5({k: v for k, v in TINY_RANDOM.items() if k != "text_len"} | {"vocab_size": 259})
    reference.load_state_dict(encoder.encoder.state_dict())
    with torch.no_grad():
        expected = reference(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).last_hidden_state

    assert embeds.shape == (3, 32, 32) and embeds.dtype == torch.float32
    for row, length in enumerate(lengths):
        torch.testing.assert_close(embeds[row, :length], expected[row, :length], rtol=1e-5, atol=1e-6)
        assert (embeds[row, length:] == 0).all()
        assert (expected[row, length:] != 0).any() or length == 32  # the zeros are ours, not UMT5's


def test_padding_does_not_change_a_prompt():
    encoder = WanTextEncoder.random(TINY_RANDOM)
    with torch.no_grad():
        alone = encoder(["x"])["prompt_embeds"]
        batched = encoder(["x", "something else entirely"])["prompt_embeds"]
    torch.testing.assert_close(batched[:1], alone, rtol=1e-5, atol=1e-6)


def test_bf16_encoder():
    encoder = WanTextEncoder.random(TINY_RANDOM)
    with torch.no_grad():
        fp32 = encoder(["a cat", "x"])["prompt_embeds"]
        bf16 = encoder.to(torch.bfloat16)(["a cat", "x"])["prompt_embeds"]
    assert bf16.dtype == torch.bfloat16
    assert (bf16[0, 6:] == 0).all() and (bf16[1, 2:] == 0).all()
    torch.testing.assert_close(bf16.float(), fp32, rtol=0.05, atol=0.05)


def test_byte_tokenizer_appends_eos_and_pads():
    tokenizer = WanTextEncoder.random(TINY_RANDOM).tokenizer
    text = "héllo 日本"
    n = len(text.encode("utf-8"))  # 13: one token per byte
    ids = tokenizer([text], padding="max_length", max_length=16, return_tensors="pt")["input_ids"][0]
    assert ids[:n].min() >= 3 and ids[n] == 1 and (ids[n + 1 :] == 0).all()
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)


@pytest.mark.parametrize(
    "raw, clean",
    [("a&amp;b   c", "a&b c"), ("  x\n\t y  ", "x y"), ("&amp;amp;lt;", "<"), ("cafÃ©", "café")],
)
def test_clean_prompt(raw, clean):
    assert clean_prompt(raw) == clean


def test_random_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    first = WanTextEncoder.random(TINY_RANDOM).encoder.state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(123)
    second = WanTextEncoder.random(TINY_RANDOM).encoder.state_dict()
    other = WanTextEncoder.random(TINY_RANDOM | {"init_seed": 1}).encoder.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["shared.weight"], other["shared.weight"])


@pytest.mark.parametrize(
    "change, message",
    [({"d_modle": 32}, "unknown keys ['d_modle']"), ({"vocab_size": 100}, "vocab_size 100 is below")],
)
def test_random_rejects_bad_config(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        WanTextEncoder.random(TINY_RANDOM | change)


def test_from_config(tmp_path):
    def embedding(encoder):
        return encoder.encoder.shared.weight

    cfg = OmegaConf.create({"random_init": True, "text_encoder_config": TINY_RANDOM, "model_dir": str(tmp_path)})
    encoder = WanTextEncoder.from_config(cfg)
    assert encoder.text_len == 32 and encoder.encoder.config.d_model == 32
    assert torch.equal(embedding(encoder), embedding(WanTextEncoder.random(TINY_RANDOM)))
    cfg.init_seed = 1  # the top-level seed is used when the sub-config has none
    seeded = WanTextEncoder.random(TINY_RANDOM | {"init_seed": 1})
    assert torch.equal(embedding(WanTextEncoder.from_config(cfg)), embedding(seeded))
    cfg.random_init = False
    with pytest.raises(WeightFileError, match=re.escape(str(tmp_path / "google" / "umt5-xxl"))):
        WanTextEncoder.from_config(cfg)
