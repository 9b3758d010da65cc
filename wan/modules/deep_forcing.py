"""Deep Forcing's bounded KV caches: Deep Sink and Participative Compression (arXiv 2512.05081).

Both caches have ``KVCache``'s interface (``update(k, v, current_start)`` returns the keys and values
to attend to; ``key_frames()``) and label every cached token with the video frame it came from and
the temporal RoPE position its key is rotated at (``key_positions()``; sink shifts and compression
make the two differ) and with what it is kept as (``key_roles()``: sink, top-C or plain). Their
policies, with the settings' checks, are wan/cache_policies/deep_sink.py and
participative_compression.py. Sizes are in latent frames of ``frame_seq_length`` tokens; cs is the first frame
of the block being written. Behaviour follows the code release (Nizben/Spectral_C @ ea9961a), not the
paper where the two differ:

``DeepSinkCache`` (mode ``deep_sink``): the window cache of upstream Self-Forcing (``sink_size`` = S
sink frames at the front of a ``local_attn_size`` = W frame buffer, FIFO eviction of the rest), plus
on every evicting pass (the first pass of a block that does not fit) the sink keys' temporal RoPE is
shifted so that sink frame i sits at position cs - W + i.
- The paper's Eq. 5 would make the sink end where the tail starts; the release targets cs - W, which
  leaves a hole of 3 positions (one block) between the last sink position cs - W + S - 1 and the first
  tail frame cs + 3 - (W - S).
- The shift is applied incrementally and in place to the stored, already rotated keys: the product is
  computed in float64 and stored back in the cache dtype, so bf16 rounding accumulates over the
  blocks, as in the release. Only the temporal channel pairs change; height/width pairs, values and
  queries are untouched.
- The release stores a per-layer base at the first eviction (Δ = 0 there, because the first eviction
  of W = 21 with 3-frame blocks is at cs = 21 = W); here Δ = (cs - W) - (current sink position), which
  is the same for that setting and keeps sink frame i at cs - W + i for any W.

``ParticipativeCompressionCache`` (mode ``participative_compression``): the same buffer of W frames,
but a block that does not fit triggers a compression instead of an eviction, on the block's first
pass only. The working set is [cached keys | this block's keys]; its first S frames (sink) and last
``recent`` = R frames are kept, and from the tokens in between the top C = min(N, W) - S - R frames'
worth of tokens (N = ``budget``), scored per layer by the logits of the last R frames of this layer's
queries summed over those queries and over all heads (Eq. 7; no softmax), are kept in their original
order. Keys and values move together into [sink | top-C | recent], N frames; the next block is
appended while it fits. With N = 16, W = 21 the cache alternates 16 <-> 19 frames (blocks 7, 9, 11, ...
compress), not 21 <-> 16 as the paper's App. E says.
- R counts frames that include the current block: with R = 4 and 3-frame blocks only one earlier frame
  is protected. The recent queries are the last R frames' worth of queries over every pass of this
  layer (at a block's first pass: the last clean frame of the previous block's cache pass and this
  block's own queries), the paper's "Both" setting.
- A token already selected ``topc_max_reuse`` (7) times is no longer a candidate; this cap is not in
  the paper.
- Only the sink is re-rotated, and only on compressing passes, to start at cs - N (the release
  hard-codes the first shift as 21 - N, which is this rule when the first compression is at cs = 21).
  The top-C keys keep their original RoPE positions: the paper's Top-C RoPE realignment (Eq. 10-11,
  Alg. 1 lines 15-17) is dead code in the release and is not done here.
- If fewer than C candidates are eligible (the reuse cap), fewer are kept; the release cannot reach
  that case with its sizes.
"""
import torch

from utils.attention_cache import CACHED, SINK, TOP_C
from wan.modules.kv_cache import KVCache, token_frames


def shift_time(keys, delta, rope):
    """Multiply, in place, the temporal complex pairs of rotated keys [B, L, N, D] by exp(i ω_t Δ),
    i.e. move them Δ frames; the product is computed in float64 and stored in the keys' dtype."""
    pairs = rope.split[0]
    omega = rope.theta ** -(torch.arange(pairs, dtype=torch.float64, device=keys.device) * 2 / (2 * pairs))
    rotation = torch.polar(torch.ones_like(omega), omega * delta)  # [D_t/2]
    time = keys[..., : 2 * pairs]
    time_pairs = torch.view_as_complex(time.to(torch.float64).unflatten(-1, (-1, 2)))  # [B, L, N, D_t/2]
    time.copy_(torch.view_as_real(time_pairs * rotation).flatten(-2))


class DeepSinkCache(KVCache):
    """A window cache whose S sink frames are moved to temporal positions cs - W, ..., cs - W + S - 1 on
    every evicting pass (module docstring). ``rope``: the model's ``RoPE3D``."""

    def __init__(self, batch, frames, frame_seq_length, num_heads, head_dim, sink_frames, dtype, device, rope):
        super().__init__(batch, frames, frame_seq_length, num_heads, head_dim, sink_frames, dtype, device)
        self.window = frames
        self.sink_frames = sink_frames
        self.rope = rope
        self.sink_start = 0  # temporal RoPE position of sink frame 0

    def update(self, k, v, current_start, queries=None):
        num_new = k.shape[1]
        if self.sink_tokens + num_new > self.k.shape[1]:
            raise ValueError(f"a {self.window}-frame window cannot hold {self.sink_frames} sink frames and a block of {num_new // self.frame_seq_length}")
        evicting = current_start + num_new > self.global_end and self.local_end + num_new > self.k.shape[1]
        keys, values = super().update(k, v, current_start)
        if evicting:
            target = current_start // self.frame_seq_length - self.window
            shift_time(self.k[:, : self.sink_tokens], target - self.sink_start, self.rope)
            self.sink_start = target
        return keys, values

    def key_positions(self):
        """(video frame, temporal RoPE frame) of each cached token, int64 [B, local_end] each."""
        video = token_frames(self.frames, self.frame_seq_length, self.k.device)
        rope = torch.where(torch.arange(len(video), device=video.device) < self.sink_tokens, video + self.sink_start, video)
        batch = self.k.shape[0]
        return video.expand(batch, -1).clone(), rope.expand(batch, -1).clone()

    def key_tokens(self):
        """The video token index of each cached token, int64 [B, local_end]."""
        video, _ = self.key_positions()
        return video * self.frame_seq_length + torch.arange(video.shape[1], device=video.device) % self.frame_seq_length


class ParticipativeCompressionCache:
    """Deep Sink's sink plus per-layer top-C token compression when a block does not fit (module
    docstring). ``frames`` = W, ``budget`` = N and ``recent`` = R in frames. Besides keys and values it
    keeps per token (int64 [B, W * frame_seq_length], on the cache's device): the token's index in the
    video (``source``; its frame is source // frame_seq_length), its temporal RoPE frame and how often
    top-C selected it; and the last R frames' worth of this layer's queries."""

    def __init__(self, batch, frames, frame_seq_length, num_heads, head_dim, sink_frames, dtype, device, rope,
                 budget, recent, topc_max_reuse):
        self.frame_seq_length = frame_seq_length
        self.sink_tokens = sink_frames * frame_seq_length
        self.budget_tokens = budget * frame_seq_length
        self.recent_tokens = recent * frame_seq_length
        self.topc_tokens = max(min(budget, frames) * frame_seq_length - self.sink_tokens - self.recent_tokens, 0)
        self.budget = budget
        self.topc_max_reuse = topc_max_reuse
        self.rope = rope
        self.k = torch.zeros(batch, frames * frame_seq_length, num_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        labels = dict(size=(batch, self.k.shape[1]), dtype=torch.long, device=device)
        self.source = torch.zeros(**labels)
        self.rope_frame = torch.zeros(**labels)
        self.selected = torch.zeros(**labels)
        self.queries = None  # [B, <= R * frame_seq_length, N, D]
        self.global_end = 0
        self.local_end = 0
        self.sink_start = 0  # temporal RoPE position of sink frame 0
        self.topc_end = 0  # slot just after the top-C tokens of the last compression (0: none yet)
        self.compressions = 0

    def update(self, k, v, current_start, queries):
        """Remember ``queries`` [B, L, N, D] (this layer's rotated queries of the pass), then write k, v
        [B, L, N, D] at token ``current_start``, compressing first if a new block does not fit; return
        the keys and values to attend to, [B, local_end, N, D] views."""
        num_new = k.shape[1]
        if num_new > self.recent_tokens:
            raise ValueError(f"recent ({self.recent_tokens // self.frame_seq_length} frames) must cover a block of {num_new // self.frame_seq_length}")
        self.queries = queries if self.queries is None else torch.cat([self.queries, queries], dim=1)[:, -self.recent_tokens :]
        current_end = current_start + num_new
        advance = current_end - self.global_end
        source = torch.arange(current_start, current_end, device=k.device).expand(k.shape[0], -1)
        if advance > 0 and self.local_end + num_new > self.k.shape[1]:
            self._compress(k, v, source)
            self._shift_sink(current_start // self.frame_seq_length - self.budget)
        else:
            end = self.local_end + advance
            self._write(slice(end - num_new, end), k, v, source, source // self.frame_seq_length)
            self.local_end = end
        self.global_end = current_end
        return self.k[:, : self.local_end], self.v[:, : self.local_end]

    def _write(self, slots, k, v, source, rope_frame, selected=0):
        self.k[:, slots] = k
        self.v[:, slots] = v
        self.source[:, slots] = source
        self.rope_frame[:, slots] = rope_frame
        self.selected[:, slots] = selected

    def scores(self, keys):
        """φ_j = Σ_r Σ_h q_rh · k_jh / (√D · N) for keys [B, L, N, D] against the recent queries: the
        summed raw logits (up to the constant 1/N), fp32 [B, L]. Σ_r is taken first (linearity)."""
        num_heads, head_dim = keys.shape[2:]
        query_sum = self.queries.float().sum(dim=1)  # [B, N, D]
        return torch.einsum("bnd,bjnd->bj", query_sum, keys.float()) / (head_dim**0.5 * num_heads)

    def _compress(self, k, v, source):
        """Keep [sink | top-C of the candidates, in order | recent] of [cache | block]; N frames."""
        end = self.local_end
        keys = torch.cat([self.k[:, :end], k], dim=1)  # [B, La, N, D], La = local_end + block
        values = torch.cat([self.v[:, :end], v], dim=1)
        sources = torch.cat([self.source[:, :end], source], dim=1)  # [B, La]
        rope_frames = torch.cat([self.rope_frame[:, :end], source // self.frame_seq_length], dim=1)
        selected = torch.cat([self.selected[:, :end], torch.zeros_like(source)], dim=1)
        length = keys.shape[1]
        candidate = torch.zeros(length, dtype=torch.bool, device=keys.device)
        candidate[self.sink_tokens : length - self.recent_tokens] = True
        eligible = candidate & (selected < self.topc_max_reuse)  # [B, La]
        count = min(self.topc_tokens, int(eligible.sum(dim=1).min()))  # one device sync per compression
        top = self.scores(keys).masked_fill(~eligible, float("-inf")).topk(count, dim=1).indices.sort(dim=1).values
        batch = keys.shape[0]
        index = torch.cat(  # [B, kept]
            [
                torch.arange(self.sink_tokens, device=keys.device).expand(batch, -1),
                top,
                torch.arange(length - self.recent_tokens, length, device=keys.device).expand(batch, -1),
            ],
            dim=1,
        )
        token_index = index[:, :, None, None].expand(-1, -1, *keys.shape[2:])  # [B, kept, N, D]
        kept = index.shape[1]
        picked = selected.gather(1, index)
        picked[:, self.sink_tokens : self.sink_tokens + count] += 1
        self._write(slice(0, kept), keys.gather(1, token_index), values.gather(1, token_index),
                    sources.gather(1, index), rope_frames.gather(1, index), picked)
        self.local_end = kept
        self.topc_end = self.sink_tokens + count
        self.compressions += 1

    def _shift_sink(self, target):
        """Move the sink's keys (and labels) so that sink frame i sits at temporal position target + i."""
        delta = target - self.sink_start
        shift_time(self.k[:, : self.sink_tokens], delta, self.rope)
        self.rope_frame[:, : self.sink_tokens] += delta
        self.sink_start = target

    def key_positions(self):
        """(video frame, temporal RoPE frame) of each cached token, int64 [B, local_end] each."""
        return self.source[:, : self.local_end] // self.frame_seq_length, self.rope_frame[:, : self.local_end].clone()

    def key_roles(self):
        """What each cached token is kept as (``utils.attention_cache.KEY_ROLES``), int8 [B, local_end]:
        the sink, then the top-C tokens of the last compression, then plain cached keys."""
        roles = torch.full((self.k.shape[0], self.local_end), CACHED, dtype=torch.int8, device=self.k.device)
        roles[:, self.sink_tokens : self.topc_end] = TOP_C
        roles[:, : self.sink_tokens] = SINK
        return roles

    def key_tokens(self):
        """The video token index of each cached token, int64 [B, local_end]: frame * frame_seq_length
        plus the token's place (row-major) in its frame."""
        return self.source[:, : self.local_end].clone()

    def key_frames(self):
        """Per slot of frame_seq_length cached tokens, in attention order: its video frame when all its
        tokens (in every batch element) come from one frame, else None (a top-C slot mixing frames)."""
        frames = self.source[:, : self.local_end].unflatten(1, (-1, self.frame_seq_length)) // self.frame_seq_length  # [B, slots, F]
        uniform = (frames == frames[:1, :, :1]).all(dim=2).all(dim=0)  # [slots]
        return [frame if same else None for frame, same in zip(frames[0, :, 0].tolist(), uniform.tolist())]
