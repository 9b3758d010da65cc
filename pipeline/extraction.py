"""Attention logits from real inference: the models loaded once, then any number of (prompt, seed)
items, each run with the capture on and turned into the entries of one cache file.

Nothing here parses a command line or writes a file: pipeline/plan.py plans the items and
pipeline/run.py writes each cache through utils/attention_cache.py.
"""
import time

import torch

from pipeline.lora import load_lora
from pipeline.pipelines import pipeline_class
from pipeline.wrappers import WanDiffusionWrapper, load_generator_checkpoint
from utils.attention_cache import SUMMARY_KEYS, CacheEntry
from utils.misc import set_seed
from utils.passes import LAST_BLOCK


class Extractor:
    """The pipeline on one device, with the family's generator checkpoint (Self-Forcing's) loaded if one
    is given (the base transformer weights are then never read)."""

    def __init__(self, config, device, dtype, checkpoint_path=None, use_ema=True, allow_pickle=False, variant=None,
                 lora_path=None):
        """``variant``: the family's ``Variant`` (which state dicts, which prefixes, which LoRA); default
        Self-Forcing's. ``lora_path``: its LoRA adapter, loaded on the checkpoint (merged in fast mode)."""
        generator = WanDiffusionWrapper.from_config(config, device, dtype, load_weights=checkpoint_path is None)
        self.checkpoint_key = None
        if checkpoint_path is not None:
            spec = None if variant is None else variant.checkpoint
            self.checkpoint_key = load_generator_checkpoint(generator, checkpoint_path, use_ema, allow_pickle, device, dtype,
                                                            spec=spec)
        self.lora_layers = 0
        if lora_path is not None:
            self.lora_layers = load_lora(generator.model, lora_path, variant.lora, merge=config.get("precision") == "fast",
                                         allow_pickle=allow_pickle)
        self.pipeline = pipeline_class(config)(config, device, generator=generator, dtype=dtype).eval()
        self.model = generator.model
        self.device, self.dtype = device, dtype

    @property
    def num_layers(self):
        return len(self.model.blocks)

    def frame_seq_length(self):
        """Tokens per latent frame of the config's video size."""
        _, _, height, width = self.pipeline.latent_shape(1)
        return self.model.frame_seq_length(height, width)

    def encode(self, prompts):
        """Each distinct prompt encoded once. Returns ({prompt: (context [1, text_len, text_dim] on the
        device, its token count before truncation)}, the encoder's text_len). The text encoder is
        freed afterwards, so during diffusion the device holds the transformer alone."""
        encoded = {}
        for prompt in dict.fromkeys(prompts):
            context = self.pipeline.encode_prompts([prompt])
            encoded[prompt] = (context, self.pipeline.text_encoder.count_tokens([prompt])[0])
        text_len = self.pipeline.text_encoder.text_len
        self.pipeline.text_encoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return encoded, text_len

    def capture(self, context, seed, num_frames, layers, passes, blocks=(LAST_BLOCK,), progress=False, switches=()):
        """One item: noise from ``seed`` alone (the same whatever ran before in this process), the
        inference with the capture on (``switches``: (frame, encoded prompt) prompt switches). Returns
        (kept calls in the order of ``layers``, then block, then pass; self-attention calls seen for
        those layers; inference seconds). Each kept call's summary starts as soon as it is kept (on a
        CUDA device on a second stream, while the later layers and blocks infer), so the inference
        seconds include what of them did not overlap."""
        set_seed(seed)
        noise = torch.randn((1, *self.pipeline.latent_shape(num_frames)), device=self.device, dtype=self.dtype)
        capture = self.model.observer
        capture.enable(layers, num_layers=self.num_layers, passes=passes, blocks=blocks,
                       summarize=self.frame_seq_length())
        try:
            start = time.perf_counter()
            self.pipeline.inference(noise, prompt_embeds=context, return_latents=True, progress=progress,
                                    prompt_switches=switches)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return capture.kept_calls, capture.calls_seen, time.perf_counter() - start
        finally:
            capture.disable()


def cache_entry(record, frame_seq_length, frames_per_block, save_mode):
    """The ``CacheEntry`` of one kept call, and its exact reductions (on the host).

    The entry carries the call's own labels: layer, block, pass, timestep, the video frames of its
    queries and of each key frame, and per key token its video frame, temporal RoPE position and role
    (from the KV cache), and the blends of an EMA sink; for a call of the rolling loop also its window
    and each query frame's level; then either the fp16 logits [B, N, Q, K] (save_mode 'full') or the
    reductions (SUMMARY_KEYS)."""
    summary = {name: value.cpu() for name, value in record.summary(frame_seq_length).items()}
    labels = record.labels
    block = labels["block"]
    query_frames = labels.get("query_frames") or list(range(block * frames_per_block, (block + 1) * frames_per_block))
    video, rope = (positions.to(device="cpu", dtype=torch.int32) for positions in record.key_positions)  # [B, Lk]
    if save_mode == "full":
        tensors = {"attn_logits": record.to_host(torch.float16, frame_seq_length=frame_seq_length)}
    else:
        tensors = {name: summary[name] for name in SUMMARY_KEYS}
    entry = CacheEntry(
        layer_idx=record.layer_idx,
        block=block,
        pass_=record.labels["step"],
        timestep=float(record.labels["timestep"]),
        query_frames=query_frames,
        key_frame_indices=video[0, ::frame_seq_length].tolist(),
        num_heads=record.num_heads,
        nonfinite=int(summary["nonfinite"].sum()),
        logit_min=float(summary["logit_min"].min()),
        logit_max=float(summary["logit_max"].max()),
        tensors=tensors,
        key_video_frames=video,
        key_rope_frames=rope,
        key_roles=record.key_roles.to(device="cpu", dtype=torch.int8),
        sink_updates=record.sink_updates,
        window=labels.get("window"),
        query_levels=labels.get("query_levels"),
    )
    return entry, summary
