"""Wan2.1's umT5-XXL text encoder, run by transformers' ``UMT5EncoderModel``.

``WanTextEncoder`` turns prompts into the context the transformer cross-attends to, as Wan and
Self-Forcing do: clean the text, tokenize to a fixed length with EOS appended, encode with the padding
mask, and zero the rows after each prompt's tokens. ``from_model_dir`` loads the official
``models_t5_umt5-xxl-enc-bf16.pth`` (Wan's own key names) into a model built on the meta device;
``random`` builds a tiny randomly initialised encoder with a built-in byte-level tokenizer, for tests.
"""

import html
import re
from pathlib import Path
from typing import Mapping

import ftfy
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from utils.loading import WeightFileError, load_into, read_state_dict
from utils.misc import seeded
from utils.wan21 import T5_FILE, T5_TOKENIZER_DIR, UMT5_XXL


# Wan ``blocks.{i}.<key>`` -> UMT5 ``encoder.block.{i}.<value>``.
_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # the GELU branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # the linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def _umt5_names(key):
    """UMT5EncoderModel names of one Wan T5 key; empty if Wan's encoder has no such key."""
    if key == "token_embedding.weight":
        return ("shared.weight", "encoder.embed_tokens.weight")
    if key == "norm.weight":
        return ("encoder.final_layer_norm.weight",)
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if match is None or match[2] not in _BLOCK_KEYS:
        return ()
    return (f"encoder.block.{match[1]}.{_BLOCK_KEYS[match[2]]}",)


def t5_key_map(wan_state_dict: Mapping[str, torch.Tensor], source) -> dict:
    """Rename Wan ``T5Encoder`` keys to ``UMT5EncoderModel`` keys (same tensors, no copies).

    The token embedding goes to both ``shared.weight`` and ``encoder.embed_tokens.weight``.
    Raises ``WeightFileError`` naming ``source`` and the key for a key Wan's encoder does not have.
    """
    mapped = {}
    for key, tensor in wan_state_dict.items():
        names = _umt5_names(key)
        if not names:
            raise WeightFileError(f"{source}: unexpected key {key!r}: not a key of Wan's umT5 encoder")
        for name in names:
            mapped[name] = tensor
    return mapped


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: fix broken unicode, unescape HTML twice, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer made in code: one id per UTF-8 byte, so any prompt tokenizes without <unk>.

    Ids: <pad> 0, </s> 1, <unk> 2, then the 256 bytes (259 in all). Like T5's, it appends </s>.
    """
    specials = ["<pad>", "</s>", "<unk>"]
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(specials + byte_symbols)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def _load_tokenizer(folder: Path):
    if not folder.is_dir():
        raise WeightFileError(f"{folder}: tokenizer folder not found")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as err:
        raise WeightFileError(f"{folder}: cannot load the tokenizer ({err})") from err


class WanTextEncoder(nn.Module):
    """Prompts -> umT5 context [B, text_len, d_model], zero after each prompt's tokens. Frozen."""

    def __init__(self, encoder: UMT5EncoderModel, tokenizer, text_len: int):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len

    def forward(self, text_prompts: list[str]) -> dict:
        """Returns {"prompt_embeds": [B, text_len, d_model]} in the encoder's dtype and on its device."""
        tokens = self.tokenizer(
            [clean_prompt(text) for text in text_prompts],
            padding="max_length",
            padding_side="right",
            max_length=self.text_len,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = self.encoder.device
        ids = tokens["input_ids"].to(device)  # [B, text_len]
        mask = tokens["attention_mask"].to(device)  # [B, text_len], 1 for each prompt's tokens (EOS included)
        context = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, text_len, d_model]
        context = context.masked_fill(mask[..., None] == 0, 0.0)
        return {"prompt_embeds": context.to(self.encoder.dtype)}

    def count_tokens(self, text_prompts: list[str]) -> list[int]:
        """Tokens of each prompt as ``forward`` tokenizes it (EOS included) before truncation to
        ``text_len``: a count above ``text_len`` means the prompt's end is cut off."""
        tokens = self.tokenizer([clean_prompt(text) for text in text_prompts], add_special_tokens=True)
        return [len(ids) for ids in tokens["input_ids"]]

    @classmethod
    def from_model_dir(cls, model_dir, text_len: int = 512, config: Mapping = UMT5_XXL, device="cpu", dtype=None):
        """Load the official encoder file and the ``google/umt5-xxl`` tokenizer from ``model_dir``.

        Weights go to ``device`` and keep the file's dtype (bf16 for the official file) unless ``dtype``
        is given; ``config`` gives the UMT5Config.
        """
        model_dir = Path(model_dir)
        tokenizer = _load_tokenizer(model_dir / T5_TOKENIZER_DIR)
        path = model_dir / T5_FILE
        state_dict = t5_key_map(read_state_dict(path, device=device), path)
        with torch.device("meta"):
            encoder = UMT5EncoderModel(UMT5Config(**config))
        load_into(encoder, state_dict, f"{path} (keys renamed to UMT5EncoderModel names)", dtype=dtype)
        encoder.tie_weights()  # assign=True left two Parameters on one tensor; make them one again
        return cls(encoder, tokenizer, text_len)

    @classmethod
    def random(cls, config: Mapping):
        """A randomly initialised encoder with the built-in ``byte_tokenizer``.

        ``config`` holds ``text_len``, optionally ``init_seed`` (default 0), and UMT5Config fields
        overriding ``UMT5_XXL`` (``vocab_size`` defaults to the tokenizer's 259). The same config gives
        the same weights, whatever the global RNG state, which is left untouched.
        """
        fields = dict(config)
        text_len = fields.pop("text_len")
        seed = fields.pop("init_seed", 0)
        unknown = sorted(set(fields) - set(UMT5_XXL))
        if unknown:
            allowed = ["text_len", "init_seed", *UMT5_XXL]
            raise ValueError(f"text encoder config: unknown keys {unknown}; allowed: {allowed}")
        tokenizer = byte_tokenizer()
        umt5_config = UMT5Config(**{**UMT5_XXL, "vocab_size": len(tokenizer), **fields})
        if umt5_config.vocab_size < len(tokenizer):
            size = umt5_config.vocab_size
            raise ValueError(f"text encoder config: vocab_size {size} is below the tokenizer's {len(tokenizer)}")
        return cls(seeded(lambda: UMT5EncoderModel(umt5_config), seed), tokenizer, text_len)

    @classmethod
    def from_config(cls, cfg: Mapping, device="cpu", dtype=None):
        """``random(cfg.text_encoder_config)`` if ``cfg.random_init``, else ``from_model_dir(cfg.model_dir)``,
        on ``device`` and in ``dtype`` (if given).

        The random weights' seed is the sub-config's ``init_seed``, else ``cfg.init_seed``, else 0.
        """
        if cfg.get("random_init"):
            encoder = cls.random({"init_seed": cfg.get("init_seed", 0), **cfg["text_encoder_config"]})
            return encoder.to(device=device, dtype=dtype)
        return cls.from_model_dir(cfg["model_dir"], device=device, dtype=dtype)
