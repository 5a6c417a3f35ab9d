"""Rotary position embedding (RoPE), the reference version (pure PyTorch, any device).

Layout is HF Llama's "rotate_half" (GPT-NeoX) style: within the first ``rotary_dim`` dims of a
head, dim ``i`` pairs with dim ``i + rotary_dim // 2``; dims past ``rotary_dim`` pass through.

Supported ``rope_type`` values and their frequencies follow transformers' ``modeling_rope_utils``:

- ``default``: ``inv_freq[i] = 1 / theta ** (2i / rotary_dim)``.
- ``linear``: ``inv_freq / factor`` (the same as dividing positions by ``factor``).
- ``dynamic`` (dynamic NTK): default while ``max(positions) + 1`` of a call is at most the
  original context length; beyond it the base grows with that length, per call.
- ``llama3``: low frequencies divided by ``factor``, high ones kept, a smooth blend between.
- ``yarn``: a ramp between interpolated and extrapolated frequencies, and cos/sin scaled by
  an attention factor.
- ``longrope`` (Phi-3 / Phi-3.5 / Phi-4-mini, "su" in old configs): ``inv_freq[i] / ext[i]`` with
  per-pair factors ``ext`` = ``short_factor`` or ``long_factor``, and cos/sin scaled by an attention
  factor. The choice is per call, like ``dynamic``: a call whose ``max(positions) + 1`` exceeds
  ``original_max_position_embeddings`` uses the long factors for every token in it (other
  sequences of the same flat batch included), any other call the short ones. This is
  transformers' per-forward switch (vLLM also picks one set per batch). As in both, keys already
  cached stay rotated as they were: a sequence that grows past the original length mixes the two.

Frequencies are computed in float32 with HF's formulas op for op, so the tables agree with
transformers to the last bit or so. For every type but ``dynamic`` and ``longrope`` the cos/sin
table covers positions ``[0, max_position)`` and grows if a larger position arrives; ``longrope``
keeps a short table over ``[0, original_max_position_embeddings)`` and a long one over
``[0, max_position)`` that grows likewise. Rotation runs in float32 and the result is cast back
to the input dtype. The tables are plain attributes, not buffers: they stay float32 when the model
is cast to a half dtype, follow the inputs' device lazily, and never enter a state dict.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dockyard.errors import ConfigError
from dockyard.ops.dispatch import fused_ops_enabled
from dockyard.spec import ROPE_TYPES, RopeSpec


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """``1 / theta ** (2i / dim)`` for ``i`` in ``[0, dim / 2)``, float32."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    return 1.0 / (theta**exponents)


def _llama3_inv_freq(rope: RopeSpec, dim: int, max_position: int) -> torch.Tensor:
    if rope.low_freq_factor is None or rope.high_freq_factor is None:
        raise ConfigError(
            "rope_scaling.low_freq_factor and high_freq_factor are required for rope_type='llama3'"
        )
    inv_freq = _default_inv_freq(rope.theta, dim)
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_len = rope.original_max_position_embeddings or max_position
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are interpolated, short ones kept, the band between blended.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(scale) + 1.0 if scale > 1 else 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_position: int) -> float:
    """The dimension whose wavelength makes ``num_rotations`` turns over ``max_position`` tokens."""
    return dim * math.log(max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def _yarn_inv_freq(rope: RopeSpec, dim: int, max_position: int) -> tuple[torch.Tensor, float]:
    """YaRN frequencies and the attention factor that scales cos/sin."""
    orig_len = rope.original_max_position_embeddings or max_position
    # HF: a null factor means the ratio of the extended to the original context length.
    factor = rope.factor if rope.factor is not None else max_position / orig_len
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:  # truthiness, as HF: a zero means "not given"
        attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)

    low = _yarn_correction_dim(beta_fast, dim, rope.theta, orig_len)
    high = _yarn_correction_dim(beta_slow, dim, rope.theta, orig_len)
    if rope.truncate is None or rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (inv_freq_interpolation * (1 - extrapolation_weight)
                + inv_freq_extrapolation * extrapolation_weight)
    return inv_freq, attention_factor


def _longrope_params(
    rope: RopeSpec, dim: int, max_position: int
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Short and long LongRoPE frequencies, the attention factor, and the original context length.

    HF derives the attention factor from ``factor`` when the rope dict gives one, else from
    ``max_position_embeddings / original_max_position_embeddings`` (Phi-3 configs give no factor).
    RopeSpec cannot tell a missing factor from its default 1.0, so 1.0 counts as "not given" here;
    ``max_position`` must then be the config's ``max_position_embeddings``.
    """
    orig_len = rope.original_max_position_embeddings or max_position
    factors = {}
    for name in ("short_factor", "long_factor"):
        values = getattr(rope, name)
        if values is None:
            raise ConfigError(f"rope_scaling.{name} is required for rope_type='longrope'")
        if len(values) != dim // 2:
            raise ConfigError(
                f"rope_scaling.{name} has {len(values)} entries but rotary_dim={dim} needs {dim // 2} "
                f"(rope_scaling.short_factor has {len(rope.short_factor or ())}, "
                f"rope_scaling.long_factor has {len(rope.long_factor or ())})"
            )
        factors[name] = torch.tensor(values, dtype=torch.float32)
    factor = rope.factor if rope.factor != 1.0 else max_position / orig_len
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif factor <= 1.0:
        attention_factor = 1.0
    else:
        attention_factor = math.sqrt(1 + math.log(factor) / math.log(orig_len))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    pos_freqs = rope.theta**exponents
    short = 1.0 / (factors["short_factor"] * pos_freqs)
    long = 1.0 / (factors["long_factor"] * pos_freqs)
    return short, long, attention_factor, orig_len


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate ``x`` [T, heads, head_dim] by ``cos``/``sin`` [T, rotary_dim / 2], in float32."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    xf = x.float()
    half = rotary_dim // 2
    x1, x2 = xf[..., :half], xf[..., half:rotary_dim]
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if rotary_dim < x.shape[-1]:
        parts.append(xf[..., rotary_dim:])
    return torch.cat(parts, dim=-1).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k of a flat token batch; one instance is shared by all layers."""

    def __init__(
        self, rope: RopeSpec, head_dim: int, max_position: int, rotary_dim: int | None = None
    ) -> None:
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if not (0 < rotary_dim <= head_dim and rotary_dim % 2 == 0):
            raise ConfigError(f"rotary_dim={rotary_dim} must be even and in (0, head_dim={head_dim}]")
        if rope.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"rope_type={rope.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )
        if rope.rope_type == "dynamic" and rotary_dim <= 2:
            raise ConfigError(f"rope_type='dynamic' needs rotary_dim > 2, got {rotary_dim}")
        self.rope = rope
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        self.attention_scaling = 1.0
        # dynamic: positions below this use the plain table; a call reaching past it rescales the base.
        self.dynamic_threshold: int | None = None
        # longrope: a call reaching past this uses long_cos/long_sin (the long factors) instead.
        self.longrope_threshold: int | None = None
        self.long_inv_freq: torch.Tensor | None = None
        self.long_cos: torch.Tensor | None = None
        self.long_sin: torch.Tensor | None = None
        table_len = max_position

        kind = rope.rope_type
        if kind in ("default", "dynamic"):
            inv_freq = _default_inv_freq(rope.theta, rotary_dim)
        elif kind == "linear":
            inv_freq = _default_inv_freq(rope.theta, rotary_dim) / rope.factor
        elif kind == "llama3":
            inv_freq = _llama3_inv_freq(rope, rotary_dim, max_position)
        elif kind == "yarn":
            inv_freq, self.attention_scaling = _yarn_inv_freq(rope, rotary_dim, max_position)
        else:  # longrope: inv_freq is the short set; the short table only ever serves positions below the threshold
            inv_freq, long_inv_freq, self.attention_scaling, threshold = _longrope_params(
                rope, rotary_dim, max_position
            )
            self.longrope_threshold = table_len = threshold
            self.long_inv_freq = long_inv_freq
            self.long_cos, self.long_sin = self._tables(max(max_position, threshold + 1), long_inv_freq)
        if kind == "dynamic":
            self.dynamic_threshold = rope.original_max_position_embeddings or max_position
            table_len = self.dynamic_threshold
        self.inv_freq = inv_freq
        self.cos_table, self.sin_table = self._tables(table_len)
        # Set by reserve(): callers promise positions below it, so a plain table is indexed with no host sync.
        self.reserved_positions = 0

    def extra_repr(self) -> str:
        return (f"rope_type={self.rope.rope_type!r}, theta={self.rope.theta}, head_dim={self.head_dim}, "
                f"rotary_dim={self.rotary_dim}, max_position={self.max_position}")

    def _tables(self, length: int, inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [length, rotary_dim / 2] for positions 0..length-1, scaled by attention_scaling.

        ``inv_freq`` defaults to ``self.inv_freq``.
        """
        inv_freq = self.inv_freq if inv_freq is None else inv_freq
        positions = torch.arange(length, dtype=torch.int64, device=inv_freq.device).to(torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling

    def _dynamic_base(self, seq_len: int) -> float:
        """HF's dynamic-NTK base for a call that sees ``seq_len`` positions (> the threshold)."""
        rope, dim, orig_len = self.rope, self.rotary_dim, self.dynamic_threshold
        assert orig_len is not None
        return rope.theta * ((rope.factor * seq_len / orig_len) - (rope.factor - 1)) ** (dim / (dim - 2))

    @property
    def position_independent(self) -> bool:
        """True when a token's rotation depends on its position alone (not dynamic NTK, not longrope)."""
        return self.dynamic_threshold is None and self.longrope_threshold is None

    def reserve(self, num_positions: int) -> bool:
        """Promise that positions stay below ``num_positions`` (the engine's max_model_len).

        For a position-independent rope the table is grown to cover them once, and from then on
        :meth:`cos_sin` makes no host synchronization, so a forward pass can be captured in a CUDA
        graph. Returns whether that holds (dynamic NTK and longrope read the largest position).
        """
        if not self.position_independent:
            return False
        if num_positions > self.cos_table.shape[0]:
            self.cos_table, self.sin_table = self._tables(num_positions)
        self.reserved_positions = num_positions
        return True

    def _tables_to(self, device: torch.device) -> None:
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
            self.cos_table = self.cos_table.to(device)
            self.sin_table = self.sin_table.to(device)
            if self.long_inv_freq is not None and self.long_cos is not None and self.long_sin is not None:
                self.long_inv_freq = self.long_inv_freq.to(device)
                self.long_cos = self.long_cos.to(device)
                self.long_sin = self.long_sin.to(device)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, rotary_dim / 2], float32, for ``positions`` [T]."""
        self._tables_to(positions.device)
        if self.reserved_positions and self.position_independent:
            return self.cos_table[positions], self.sin_table[positions]
        # One host sync: dynamic NTK and longrope depend on it, and the table may need to grow.
        seq_len = int(positions.max()) + 1 if positions.numel() else 0
        if self.longrope_threshold is not None and seq_len > self.longrope_threshold:
            assert self.long_inv_freq is not None and self.long_cos is not None and self.long_sin is not None
            if seq_len > self.long_cos.shape[0]:  # past max_position: grow geometrically, rarely
                self.long_cos, self.long_sin = self._tables(
                    max(seq_len, 2 * self.long_cos.shape[0]), self.long_inv_freq
                )
            return self.long_cos[positions], self.long_sin[positions]
        if self.dynamic_threshold is not None and seq_len > self.dynamic_threshold:
            inv_freq = _default_inv_freq(self._dynamic_base(seq_len), self.rotary_dim).to(positions.device)
            freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]
            return freqs.cos(), freqs.sin()
        if seq_len > self.cos_table.shape[0]:  # past max_position: grow geometrically, rarely
            self.cos_table, self.sin_table = self._tables(max(seq_len, 2 * self.cos_table.shape[0]))
        return self.cos_table[positions], self.sin_table[positions]

    def fused_tables(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The float32 cos and sin tables [P, rotary_dim / 2] on q's device when the fused kernels
        (:mod:`dockyard.ops.triton_fused`) may rotate ``q``: tables reserved, independent of the
        step's positions, and the fused ops enabled for q. None otherwise."""
        if not (self.reserved_positions and self.position_independent and fused_ops_enabled(q)):
            return None
        self._tables_to(q.device)
        return self.cos_table, self.sin_table

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k of a flat token batch; returns them with the same shapes and dtypes.

        positions: [T] int64, tokens of several sequences concatenated, in any order;
        q: [T, num_q_heads, head_dim]; k: [T, num_kv_heads, head_dim].
        """
        positions = positions.to(q.device)
        tables = self.fused_tables(q)
        if tables is not None:
            # One Triton kernel per tensor, rotating in place (q and k are fresh projections); Triton is an
            # optional dependency
            from dockyard.ops.triton_fused import rotary_in_place

            return (rotary_in_place(q, positions, *tables, self.rotary_dim),
                    rotary_in_place(k, positions, *tables, self.rotary_dim))
        cos, sin = self.cos_sin(positions)
        return _rotate(q, cos, sin, self.rotary_dim), _rotate(k, cos, sin, self.rotary_dim)


def get_rope(
    rope: RopeSpec, head_dim: int, max_position: int, rotary_dim: int | None = None
) -> RotaryEmbedding:
    """The rotary embedding for ``rope``; raises ConfigError for an unknown rope_type."""
    return RotaryEmbedding(rope, head_dim, max_position, rotary_dim)
