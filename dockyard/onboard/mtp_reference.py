"""The MTP layer's independent reference, in float64: transformers' own ``DeepseekV3DecoderLayer`` holding the
layer's block weights, with enorm / hnorm / eh_proj / shared_head (and the target's embedding and LM head)
written as torch ops from the DeepSeek-V3 report's definition. transformers skips the MTP layers on load,
so this is as close to "what the checkpoint means" as a reference gets: its block is transformers', the
wiring around it is the paper's, and none of it is dockyard's module.

The features gate's MTP row (:mod:`dockyard.onboard.gates.features.mtp`) compares the trial model's layer
with it (:func:`compare_with_reference`); so do the tests, with the engine's proposals too.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RotaryEmbedding

from dockyard.models.deepseek_mtp import DeepseekMTP
from dockyard.testing import rel_rmse

REFERENCE_MODEL_TYPES = ("deepseek_v3",)  # the model types whose decoder layer transformers ships for this


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """DeepSeek's RMSNorm: ``x / sqrt(mean(x²) + eps) · weight``."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class MTPReference:
    """The MTP layer in float64: transformers' DeepseekV3DecoderLayer holding the layer's block weights, and
    enorm / hnorm / eh_proj / shared_head (and the target's embedding and LM head) as torch ops."""

    def __init__(self, cfg: dict[str, Any], mtp: DeepseekMTP) -> None:
        """``cfg``: the config.json ``mtp``'s target was built from (a ``deepseek_v3`` model_type)."""
        config = DeepseekV3Config(**{k: v for k, v in cfg.items() if k != "architectures"})
        config._attn_implementation = config._experts_implementation = "eager"  # the plain PyTorch forwards
        self.eps = config.rms_norm_eps
        prefix = f"model.layers.{mtp.index}."
        ours = {n[len(prefix):]: p.detach().double().cpu() for n, p in mtp.named_parameters()}
        self.layer = DeepseekV3DecoderLayer(config, mtp.index).double().eval()
        state = {}
        for name in self.layer.state_dict():
            if name == "mlp.experts.gate_up_proj":  # transformers stacks the experts: [E, 2I, H] and [E, H, I]
                state[name] = torch.stack([torch.cat([ours[f"mlp.experts.{e}.gate_proj.weight"],
                                                      ours[f"mlp.experts.{e}.up_proj.weight"]])
                                           for e in range(config.n_routed_experts)])
            elif name == "mlp.experts.down_proj":
                state[name] = torch.stack([ours[f"mlp.experts.{e}.down_proj.weight"]
                                           for e in range(config.n_routed_experts)])
            else:
                state[name] = ours[name]
        self.layer.load_state_dict(state, strict=True)
        self.rotary = DeepseekV3RotaryEmbedding(config)
        self.w = ours
        embed, head = mtp.shared
        self.embed = embed.weight.detach().double().cpu()
        self.head = ours.get("shared_head.head.weight", head.weight.detach().double().cpu())

    @torch.no_grad()
    def __call__(self, tokens: list[int], hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows t = 0.. (token t + 1, target hidden state t) → (logits [T, V], the layer's output [T, H])."""
        w, n = self.w, len(tokens)
        e = rms(self.embed[torch.tensor(tokens)], w["enorm.weight"], self.eps)
        x = torch.cat([e, rms(hidden.double(), w["hnorm.weight"], self.eps)], dim=-1) @ w["eh_proj.weight"].T
        positions = torch.arange(n)[None]
        cos_sin = self.rotary(x[None], positions)
        mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)[None, None]
        out = self.layer(x[None], attention_mask=mask, position_ids=positions, position_embeddings=cos_sin)
        out = (out[0] if isinstance(out, tuple) else out)[0]
        return rms(out, w["shared_head.norm.weight"], self.eps) @ self.head.T, out

    def guesses(self, tokens: list[int], hidden: torch.Tensor, k: int) -> list[int]:
        """The first ``k`` greedy guesses after ``tokens`` (all known; ``hidden``: the target's pre-norm hidden
        states of all but the last), the layer fed its own output after the first."""
        rows, h = list(tokens[1:]), hidden
        out_tokens = []
        for _ in range(k):
            logits, out = self(rows, h)
            guess = int(logits[-1].argmax())
            out_tokens.append(guess)
            rows.append(guess)
            h = torch.cat([h.double(), out[-1:]])
        return out_tokens


def compare_with_reference(cfg: dict[str, Any], mtp: DeepseekMTP, rows: int = 16, seed: int = 0) -> dict[str, float]:
    """``mtp``'s output and logits on ``rows`` random (token, hidden state) rows, against :class:`MTPReference`:
    their rms error relative to the reference's rms."""
    gen = torch.Generator().manual_seed(seed)
    spec = mtp.spec
    tokens = torch.randint(0, spec.vocab_size, (rows,), generator=gen)
    hidden = torch.randn(rows, spec.hidden_size, generator=gen)
    device, dtype = mtp.layer.eh_proj.weight.device, mtp.layer.eh_proj.weight.dtype
    with torch.no_grad():  # outside a forward context: the rows attend causally to each other
        out = mtp(tokens.to(device), torch.arange(rows, device=device), hidden.to(device, dtype))
        logits = mtp.compute_logits(out)
    ref_logits, ref_out = MTPReference(cfg, mtp)(tokens.tolist(), hidden)
    return {"output_rmse_ratio": rel_rmse(out.double().cpu(), ref_out),
            "logits_rmse_ratio": rel_rmse(logits.double().cpu(), ref_logits)}
