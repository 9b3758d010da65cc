"""Rolling Forcing's denoising loop (TencentARC/RollingForcing, pipeline/rolling_forcing_inference.py):
a window of up to L blocks (L = the schedule's steps) at staggered noise levels in one bidirectional
call, then one cache call; the windows, their levels and the start and end windows are
``wan.families.rolling_forcing.rolling_windows``.

Per window w over blocks s .. e (frames cs .. ce - 1):
1. the input: the noisy blocks s .. e - 1 kept from earlier windows and, when the window is full or
   starts at block 0, block e's own slice of the initial noise (in end windows only the kept ones);
2. one forward at per-frame timesteps (each block at its level), written to the cache as the cache
   says (wan/modules/rolling_forcing.py); its x0 is the output of blocks s .. e;
3. each block not at its last level re-noised to its next level: one ``randn_like`` of the whole
   window's x0 per block, oldest first, and the block's slice kept (the release's draw order, so a seed
   gives its noise);
4. the cache call: block s's x0 at t = ``context_noise`` rewrites block s's cache slot. The last
   window's writes nothing reads: it runs only when the observer wants it.

Shares CausalInferencePipeline's parts (generator, text encoder, VAE, schedule, numerics, checks).
Each forward is labelled for the observer: its window, the (block, level, timestep) of each block in
it (``places``), and each query frame's level; a (block, pass) label names the call where that block is
at that level (pass ``"cache"``: the cache call that writes it).
"""
import torch
from tqdm import tqdm

from pipeline.causal_inference import CausalInferencePipeline
from utils.passes import CACHE_PASS
from wan.families.rolling_forcing import rolling_windows


class RollingInferencePipeline(CausalInferencePipeline):
    @torch.no_grad()
    def inference(self, noise, text_prompts=None, return_latents=False, progress=False, prompt_embeds=None,
                  prompt_switches=()):
        """As ``CausalInferencePipeline.inference`` (noise [B, F, C, H, W] -> latents or the decoded
        video), by the rolling loop (module docstring). No prompt switches."""
        if prompt_switches:
            raise ValueError(f"prompt switches at frames {[frame for frame, _ in prompt_switches]}: the rolling loop has "
                             "none (Rolling Forcing's release has no prompt switch)")
        per_block, steps = self.num_frame_per_block, self.denoising_steps
        model = self.generator.model
        conditional_dict, frame_seq_length, kv_cache, crossattn_cache = self._setup(noise, text_prompts, prompt_embeds)
        batch, num_frames = noise.shape[:2]
        num_blocks = num_frames // per_block
        observer = model.observer if model.observer is not None and model.observer.enabled else None
        windows = rolling_windows(num_blocks, len(steps))
        last_cache_pass = observer is not None and observer.wants(num_blocks - 1, num_blocks, CACHE_PASS)
        bar = tqdm(total=2 * len(windows) - (not last_cache_pass), desc="inference", unit="call", disable=not progress)
        noisy_cache = torch.zeros_like(noise)
        output = torch.zeros_like(noise)
        # The full window's per-frame timesteps, [B, L * P], its oldest block at the last level; every
        # window's are a slice of it (its levels are consecutive). Filled on the device: no host copy.
        window_timesteps = torch.cat([torch.full((batch, per_block), steps[level], dtype=torch.float32, device=noise.device)
                                      for level in range(len(steps) - 1, -1, -1)], dim=1)
        for window in windows:
            first, end = window.start * per_block, (window.end + 1) * per_block  # x: [B, end - first, C, H, W]
            if end - first == len(steps) * per_block or first == 0:
                x = torch.cat([noisy_cache[:, first : end - per_block], noise[:, end - per_block : end]], dim=1)
            else:
                x = noisy_cache[:, first:end]
            frame_levels = [level for level in window.levels for _ in range(per_block)]  # one per query frame
            offset = (len(steps) - 1 - window.levels[0]) * per_block
            timestep = window_timesteps[:, offset : offset + end - first]  # [B, end - first]
            places = [(block, level, steps[level]) for block, level in zip(window.blocks, window.levels)]
            labels = dict(window=window.index, num_blocks=num_blocks, places=places,
                          query_frames=list(range(first, end)), query_levels=frame_levels)
            bar.set_postfix_str(f"window {window.index + 1}/{len(windows)}")
            x0 = self._call(x, conditional_dict, timestep, kv_cache, crossattn_cache, first * frame_seq_length,
                            observer, labels)
            output[:, first:end] = x0
            for i, (block, level) in enumerate(zip(window.blocks, window.levels)):
                if level == len(steps) - 1:
                    continue
                flat = x0.flatten(0, 1)  # [B * (ce - cs), C, H, W]: one draw over the whole window, as released
                t_next = torch.full((flat.shape[0],), steps[level + 1], device=noise.device)
                renoised = self.scheduler.add_noise(flat, torch.randn_like(flat), t_next).unflatten(0, x0.shape[:2])
                noisy_cache[:, block * per_block : (block + 1) * per_block] = renoised[:, i * per_block : (i + 1) * per_block]
            bar.update()
            if window.index == len(windows) - 1 and not last_cache_pass:
                break
            clean = x0[:, :per_block]
            timestep = torch.full((batch, per_block), self.context_noise, dtype=torch.float32, device=noise.device)
            labels = dict(window=window.index, num_blocks=num_blocks,
                          places=[(window.start, CACHE_PASS, self.context_noise)],
                          query_frames=list(range(first, first + per_block)), query_levels=[CACHE_PASS] * per_block)
            for cache in kv_cache:
                cache.set_cache_pass(True)
            try:
                self._call(clean, conditional_dict, timestep, kv_cache, crossattn_cache, first * frame_seq_length,
                           observer, labels)
            finally:
                for cache in kv_cache:
                    cache.set_cache_pass(False)
            bar.update()
        bar.close()
        return self._finish(output, return_latents)

    def _call(self, x, conditional_dict, timestep, kv_cache, crossattn_cache, current_start, observer, labels):
        """One generator forward at per-frame ``timestep`` [B, F]; returns x0. ``labels``: what the
        ``observer`` (None: off) records the forward's calls under."""
        if observer is None:
            return self.generator(x, conditional_dict, timestep, kv_cache, crossattn_cache, current_start)[1]
        observer.annotate(**labels)
        try:
            return self.generator(x, conditional_dict, timestep, kv_cache, crossattn_cache, current_start)[1]
        finally:
            observer.annotate()
