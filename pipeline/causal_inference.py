"""Block-wise, few-step, KV-cached text-to-video inference (Self-Forcing's ``CausalInferencePipeline``).

Per block of ``num_frame_per_block`` latent frames: the warped denoising steps (4 forwards at
t = 1000, 937.5, 833.33, 625 for the Self-Forcing config; the first block may have steps of its own,
``denoising_step_list_first_chunk``, as Causal Forcing++ does), re-noising x0 with one ``randn_like`` draw
after every step but the last, then one more forward on the clean x0 at t = ``context_noise`` that
rewrites the block's KV-cache slots. The draw order equals upstream's, so a seed gives upstream's noise.
The last block's cache update writes keys and values that nothing reads: it is skipped unless the
model's attention observer wants that pass (the latents are the same either way). Every forward is
labelled for the observer with its block and pass.

Numerics come from the config: ``precision`` ("exact", upstream's arithmetic, or "fast") and
``compile`` (fast mode through ``torch.compile``; null: on for fast on CUDA, off elsewhere).
"""
import torch
from torch import nn
from tqdm import tqdm

from pipeline.wrappers import WanDiffusionWrapper, WanTextEncoder
from utils.passes import CACHE_PASS
from utils.wan21 import VAE_STRIDE


class CausalInferencePipeline(nn.Module):
    def __init__(self, args, device, generator=None, text_encoder=None, vae=None, dtype=None):
        """``args``: the merged config. Parts not given are built from it: the generator now, the text
        encoder when prompts are first encoded, the VAE when something decodes. Parts built here are
        loaded straight onto ``device`` (in ``dtype``, if given); parts passed in are moved there."""
        super().__init__()
        self.args = args
        self.generator = generator if generator is not None else WanDiffusionWrapper.from_config(args, device, dtype)
        self.text_encoder = text_encoder
        self.vae = vae
        self.scheduler = self.generator.get_scheduler()
        self.denoising_steps = self._timesteps(args.get("denoising_step_list"))
        first = args.get("denoising_step_list_first_chunk")
        self.first_block_steps = self.denoising_steps if first is None else self._timesteps(first)
        self.num_frame_per_block = int(args.get("num_frame_per_block", 1))
        self.context_noise = float(args.get("context_noise", 0))
        if args.get("independent_first_frame"):
            raise ValueError("independent_first_frame: true is not supported (text-to-video uses equal blocks)")
        self.to(device=device, dtype=dtype)
        precision = args.get("precision", "exact")
        compile = args.get("compile")
        if compile is None:
            compile = precision == "fast" and torch.device(device).type == "cuda"
        self.generator.model.set_numerics(precision, compile=compile)

    def _timesteps(self, steps):
        """The config's step list as timesteps: warped onto the shifted schedule, or as given."""
        steps = list(steps)
        return self.scheduler.warp(steps) if self.args.get("warp_denoising_step") else [float(s) for s in steps]

    def steps_of(self, block):
        """The denoising timesteps of temporal block ``block``: the first block's own where the config
        gives them (``denoising_step_list_first_chunk``, Causal Forcing++), else the schedule's."""
        return self.first_block_steps if block == 0 else self.denoising_steps

    def latent_shape(self, num_frames):
        """[F, C, H, W] of the latent video for the config's pixel height and width."""
        return (num_frames, self.generator.model.config["in_dim"], self.args.height // VAE_STRIDE, self.args.width // VAE_STRIDE)

    def _decoder(self, like):
        if self.vae is None:
            from utils.vae import WanVAEWrapper  # diffusers takes seconds to import: only when decoding

            self.vae = WanVAEWrapper.from_config(self.args, like.device, like.dtype)
        return self.vae

    @torch.no_grad()
    def encode_prompts(self, text_prompts):
        """Prompts -> text context [B, text_len, text_dim], building the text encoder on first use on
        the generator's device and in its dtype."""
        if self.text_encoder is None:
            parameter = next(self.generator.parameters())
            self.text_encoder = WanTextEncoder.from_config(self.args, parameter.device, parameter.dtype)
        return self.text_encoder(text_prompts=list(text_prompts))["prompt_embeds"]

    @torch.no_grad()
    def inference(self, noise, text_prompts=None, return_latents=False, progress=False, prompt_embeds=None,
                  prompt_switches=()):
        """noise [B, F, C, H, W] -> latents [B, F, C, H, W] if ``return_latents`` (no VAE is built),
        else the decoded video [B, 1 + 4(F-1), 3, 8H, 8W] in [0, 1]. The text comes as B prompts, or
        already encoded (``prompt_embeds`` [B, text_len, text_dim], e.g. from ``encode_prompts``).
        ``prompt_switches``: (frame, encoded prompt) pairs, for a cache policy with prompt switches
        (LongLive's): from the first block that starts at or after the frame, the new prompt, after a
        recache of the cache with it (``_switch_prompt``)."""
        per_block = self.num_frame_per_block
        model = self.generator.model
        conditional_dict, frame_seq_length, kv_cache, crossattn_cache = self._setup(noise, text_prompts, prompt_embeds)
        output = torch.zeros_like(noise)
        num_blocks = noise.shape[1] // per_block
        observer = model.observer if model.observer is not None and model.observer.enabled else None
        last_cache_pass = observer is not None and observer.wants(num_blocks - 1, num_blocks, CACHE_PASS)
        passes = sum(len(self.steps_of(block)) + 1 for block in range(num_blocks)) - (not last_cache_pass)
        bar = tqdm(total=passes, desc="inference", unit="pass", disable=not progress)
        switches = sorted(prompt_switches, key=lambda switch: switch[0])
        if switches and model.cache_policy.recache_frames() is None:
            raise ValueError(f"prompt switches need a cache policy that re-encodes its cache (longlive), not "
                             f"{model.cache_policy.name}")
        for block in range(num_blocks):
            first = block * per_block
            current_start = first * frame_seq_length
            while switches and switches[0][0] <= first:
                conditional_dict = {"prompt_embeds": switches.pop(0)[1].to(device=noise.device, dtype=noise.dtype)}
                if block > 0:
                    self._switch_prompt(output, first, conditional_dict, kv_cache, crossattn_cache, frame_seq_length)
            noisy = noise[:, first : first + per_block]
            bar.set_postfix_str(f"block {block + 1}/{num_blocks}")
            steps = self.steps_of(block)
            for step, t in enumerate(steps):
                x0 = self._forward(noisy, conditional_dict, t, kv_cache, crossattn_cache, current_start, observer,
                                   dict(block=block, num_blocks=num_blocks, step=step))
                if step + 1 < len(steps):
                    flat = x0.flatten(0, 1)
                    t_next = torch.full((flat.shape[0],), steps[step + 1], device=noise.device)
                    noisy = self.scheduler.add_noise(flat, torch.randn_like(flat), t_next).unflatten(0, x0.shape[:2])
                bar.update()
            output[:, first : first + per_block] = x0
            if block == num_blocks - 1 and not last_cache_pass:
                break
            self._forward(x0, conditional_dict, self.context_noise, kv_cache, crossattn_cache, current_start, observer,
                          dict(block=block, num_blocks=num_blocks, step=CACHE_PASS))
            bar.update()
        bar.close()
        return self._finish(output, return_latents)

    def _finish(self, latents, return_latents):
        """The loop's result: ``latents`` [B, F, C, H, W] as they are, or decoded into pixels in [0, 1]."""
        if return_latents:
            return latents
        video = self._decoder(latents).decode_to_pixel(latents)
        return (video * 0.5 + 0.5).clamp(0, 1)

    def _setup(self, noise, text_prompts, prompt_embeds):
        """The checks of ``inference``'s inputs, then (the text as a conditional dict on the noise's
        device and dtype, tokens per latent frame, empty self- and cross-attention caches)."""
        batch, num_frames, _, height, width = noise.shape
        per_block = self.num_frame_per_block
        if num_frames <= 0 or num_frames % per_block:
            raise ValueError(f"number of frames {num_frames} is not a positive multiple of num_frame_per_block {per_block}")
        if (text_prompts is None) == (prompt_embeds is None):
            raise ValueError("give either text_prompts or prompt_embeds")
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompts(text_prompts)
        if prompt_embeds.shape[0] != batch:
            raise ValueError(f"{prompt_embeds.shape[0]} prompts for a batch of {batch}")
        model = self.generator.model
        conditional_dict = {"prompt_embeds": prompt_embeds.to(device=noise.device, dtype=noise.dtype)}
        frame_seq_length = model.frame_seq_length(height, width)
        kv_cache, crossattn_cache = model.new_caches(batch, num_frames, frame_seq_length, noise.dtype, noise.device)
        return conditional_dict, frame_seq_length, kv_cache, crossattn_cache

    def _switch_prompt(self, output, first, conditional_dict, kv_cache, crossattn_cache, frame_seq_length):
        """LongLive's KV recache at a prompt switch before the block starting at frame ``first``: the
        text caches cleared, one clean pass (t = 0) with the new prompt over the last n = min(W, first)
        generated frames at their own positions, written by the caches in recache mode (see
        wan/modules/longlive.py), the text caches cleared again. Not shown to the observer."""
        start = first - min(self.generator.model.cache_policy.recache_frames(), first)
        for cache in crossattn_cache:
            cache.k = cache.v = None
        for cache in kv_cache:
            cache.begin_recache()
        self._forward(output[:, start:first], conditional_dict, 0.0, kv_cache, crossattn_cache, start * frame_seq_length,
                      None, None)
        for cache in kv_cache:
            cache.end_recache()
        for cache in crossattn_cache:
            cache.k = cache.v = None

    def _forward(self, noisy, conditional_dict, t, kv_cache, crossattn_cache, current_start, observer, place):
        """One generator forward at timestep t for every frame; returns x0. ``place``: block, number of
        blocks and pass, the labels the ``observer`` (None: off) records the forward's calls under."""
        timestep = torch.full(noisy.shape[:2], t, device=noisy.device)
        if observer is None:
            return self.generator(noisy, conditional_dict, timestep, kv_cache, crossattn_cache, current_start)[1]
        observer.annotate(**place, timestep=t)
        try:
            return self.generator(noisy, conditional_dict, timestep, kv_cache, crossattn_cache, current_start)[1]
        finally:
            observer.annotate()
