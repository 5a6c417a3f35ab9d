"""The decoder every supported family is built from: Llama's shape with each family's quirks as spec fields.

Llama 2/3/3.1/3.2, Mistral, SmolLM, Granite, Qwen2/2.5, Qwen3, Gemma 2/3 and OLMo 2 are this class
as is: the differences between them (q/k/v bias, q/k norm per head or over the projection, Gemma's
(1 + w) norms and sandwich norms, OLMo 2's post-norms, scaled embeddings, residual and logit
multipliers, soft-capping, local/global layers with their own rope base, partial rotary, attention
sinks) are fields of :class:`~dockyard.spec.ModelSpec`. Families whose blocks differ (fused
projections, MoE MLPs, latent attention) subclass :class:`LlamaForCausalLM` and override
``make_attention`` / ``make_mlp``.

Parameter names are HF's (``model.layers.N.self_attn.q_proj``), so checkpoints map onto the module
tree with no renaming and this file reads side by side with ``modeling_llama.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from dockyard.distributed.sharding import Sharder
from dockyard.errors import ConfigError
from dockyard.ops.activation import act_and_mul
from dockyard.ops.attention import Attention
from dockyard.ops.fp8_linear import Fp8Linear, concat_fp8_linears
from dockyard.ops.norm import RMSNorm
from dockyard.ops.quant_linear import QuantLinear, concat_quant_linears
from dockyard.ops.rotary import RotaryEmbedding, get_rope
from dockyard.spec import ModelSpec, RopeSpec

# Multimodal checkpoints: the language model's weights sit under one of these prefixes (published
# layout first, transformers v5's second); the towers and projectors are not part of the text model.
_LM_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                ("model.language_model.", "model."))
_NON_TEXT_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                      "model.multi_modal_projector.", "audio_tower.", "model.audio_tower.")


# The projections of LlamaAttention / LlamaMLP (separate or fused), in checkpoint naming.
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
                "down_proj")


def make_norm(spec: ModelSpec, size: int) -> RMSNorm:
    """The family's RMSNorm over ``size`` features."""
    if spec.norm_type == "layernorm":
        raise ConfigError(f"{spec.architecture} uses LayerNorm, which dockyard's decoder does not implement yet")
    return RMSNorm(size, spec.rms_norm_eps, one_plus=spec.norm_type == "rms_one_plus")


def _concat_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One Linear whose output is the outputs of ``linears`` side by side; None where that is not exact
    (FP8 parts whose scale blocks would straddle two of them, quantized parts of different layouts, or a mix
    of FP8 or quantized and plain Linears)."""
    if any(isinstance(lin, QuantLinear) for lin in linears):
        return concat_quant_linears(linears)
    if any(isinstance(lin, Fp8Linear) for lin in linears):
        if not all(isinstance(lin, Fp8Linear) for lin in linears):
            return None
        return concat_fp8_linears(linears)  # type: ignore[arg-type]
    first = linears[0]
    has_bias = first.bias is not None
    fused = nn.Linear(first.in_features, sum(lin.out_features for lin in linears), bias=has_bias, device="meta")
    fused.weight = nn.Parameter(torch.cat([lin.weight.detach() for lin in linears]), requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([lin.bias.detach() for lin in linears]), requires_grad=False)
    return fused


class LlamaAttention(nn.Module):
    """q/k/v projections → [q/k norm] → rotary → attention over the KV cache → output projection."""

    def __init__(self, spec: ModelSpec, layer: int, rotary_emb: nn.Module, fused_qkv: bool = False) -> None:
        super().__init__()
        self.num_heads = spec.num_attention_heads
        self.num_kv_heads = spec.num_key_value_heads
        self.head_dim = spec.head_dim
        self.q_size, self.kv_size = spec.q_size, spec.kv_size
        qkv_bias = spec.attention_bias or spec.qkv_bias
        if fused_qkv:  # Phi-3: one [q | k | v] projection in the checkpoint
            self.qkv_proj = nn.Linear(spec.hidden_size, spec.q_size + 2 * spec.kv_size, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(spec.hidden_size, spec.q_size, bias=qkv_bias)
            self.k_proj = nn.Linear(spec.hidden_size, spec.kv_size, bias=qkv_bias)
            self.v_proj = nn.Linear(spec.hidden_size, spec.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(spec.q_size, spec.hidden_size, bias=spec.attention_bias)
        self.qk_norm = spec.qk_norm
        if spec.qk_norm == "head":
            self.q_norm = make_norm(spec, spec.head_dim)
            self.k_norm = make_norm(spec, spec.head_dim)
        elif spec.qk_norm == "full":
            self.q_norm = make_norm(spec, spec.q_size)
            self.k_norm = make_norm(spec, spec.kv_size)
        if spec.attention_sinks:
            self.sinks = nn.Parameter(torch.zeros(spec.num_attention_heads))
        self.rotary_emb = rotary_emb
        scale = spec.attention_scale if spec.attention_scale is not None else self.head_dim**-0.5
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, scale=scale,
                              sliding_window=spec.layer_sliding_window(layer),
                              logit_softcap=spec.attn_logit_softcapping)

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if hasattr(self, "qkv_proj"):
            return self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, hidden] at ``positions`` [T] → attention output [T, hidden]."""
        tokens = hidden_states.shape[0]
        q, k, v = self.project_qkv(hidden_states)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(tokens, self.num_heads, self.head_dim)
        k = k.reshape(tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn(q, k, v, sinks=getattr(self, "sinks", None), rotary=self.rotary_emb, positions=positions)
        return self.o_proj(out.reshape(tokens, -1))

    def shard(self, sharder: Sharder, prefix: str) -> None:
        """Keep the q and KV heads of ``sharder.parallel``: q/k/v column-parallel, o_proj row-parallel."""
        if hasattr(self, "qkv_proj"):
            raise ConfigError("tensor parallelism does not support fused qkv_proj checkpoints (Phi-3) yet")
        parallel, d = sharder.parallel, self.head_dim
        (h0, h1), (k0, k1) = parallel.heads, parallel.kv_heads
        sharder.column(self, prefix, "q_proj", h0 * d, h1 * d)
        sharder.column(self, prefix, "k_proj", k0 * d, k1 * d)
        sharder.column(self, prefix, "v_proj", k0 * d, k1 * d)
        sharder.row(self, prefix, "o_proj", h0 * d, h1 * d, reduce=True)
        self.num_heads, self.num_kv_heads = parallel.num_heads, parallel.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        self.attn.num_heads, self.attn.num_kv_heads = self.num_heads, self.num_kv_heads


class LlamaMLP(nn.Module):
    """down(act(gate(x)) * up(x)); ``fused`` keeps Phi-3's one [gate | up] projection."""

    def __init__(self, spec: ModelSpec, intermediate_size: int | None = None, fused: bool = False) -> None:
        super().__init__()
        size = intermediate_size or spec.intermediate_size
        bias = spec.mlp_bias
        self.size = size
        if fused:
            self.gate_up_proj = nn.Linear(spec.hidden_size, 2 * size, bias=bias)
        else:
            self.gate_proj = nn.Linear(spec.hidden_size, size, bias=bias)
            self.up_proj = nn.Linear(spec.hidden_size, size, bias=bias)
        self.down_proj = nn.Linear(size, spec.hidden_size, bias=bias)
        self.act = spec.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).split(self.size, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(act_and_mul(gate, up, self.act))

    def shard(self, sharder: Sharder, prefix: str) -> None:
        """Split the intermediate features: gate/up column-parallel, down row-parallel (all-reduced)."""
        self.size = sharder.gated_mlp(self, prefix, self.size, reduce=True)


class LlamaDecoderLayer(nn.Module):
    """Attention then MLP, each with a residual; where the norms sit is ``spec.norm_placement``.

    pre (Llama): x + attn(norm(x)); sandwich (Gemma): x + norm(attn(norm(x))), the MLP alike with
    pre_/post_feedforward_layernorm; post (OLMo 2): x + norm(attn(x)).
    """

    def __init__(self, spec: ModelSpec, attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.placement = spec.norm_placement
        self.residual_multiplier = spec.residual_multiplier
        hidden = spec.hidden_size
        if self.placement != "post":
            self.input_layernorm = make_norm(spec, hidden)
        self.self_attn = attn
        self.post_attention_layernorm = make_norm(spec, hidden)
        if self.placement == "sandwich":
            self.pre_feedforward_layernorm = make_norm(spec, hidden)
        if self.placement in ("sandwich", "post"):
            self.post_feedforward_layernorm = make_norm(spec, hidden)
        self.mlp = mlp

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        x, m = hidden_states, self.residual_multiplier
        if self.fusable:
            out, residual = self.forward_fused(positions, x, None)
            return out + residual
        if self.placement == "pre":
            x = x + self.self_attn(positions, self.input_layernorm(x)) * m
            return x + self.mlp(self.post_attention_layernorm(x)) * m
        if self.placement == "sandwich":
            x = x + self.post_attention_layernorm(self.self_attn(positions, self.input_layernorm(x))) * m
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))) * m
        x = x + self.post_attention_layernorm(self.self_attn(positions, x)) * m
        return x + self.post_feedforward_layernorm(self.mlp(x)) * m

    @property
    def fusable(self) -> bool:
        """Whether :meth:`forward_fused` applies (pre-norm, no residual multiplier)."""
        return self.placement == "pre" and self.residual_multiplier == 1.0

    def forward_fused(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-norm layer with its residual adds fused into the norms that follow them.

        Takes the previous layer's MLP output ``x`` and the residual stream before it was added
        (None for the first layer, whose input is the stream); returns this layer's MLP output and
        the stream before it is added: the next layer (or the final norm) adds it while normalizing.
        """
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual=residual)
        h, residual = self.post_attention_layernorm(self.self_attn(positions, h), residual=residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    """Embedding (× embedding_multiplier) → decoder layers → final norm."""

    def __init__(self, spec: ModelSpec, layers: list[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.embedding_multiplier = spec.embedding_multiplier
        self.round_multiplier = spec.round_embedding_multiplier
        self.layers = nn.ModuleList(layers)
        self.norm = make_norm(spec, spec.hidden_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        if self.round_multiplier:
            hidden_states = hidden_states * torch.tensor(self.embedding_multiplier, dtype=hidden_states.dtype)
        elif self.embedding_multiplier != 1.0:
            hidden_states = hidden_states * self.embedding_multiplier
        if all(isinstance(layer, LlamaDecoderLayer) and layer.fusable for layer in self.layers):
            residual = None
            for layer in self.layers:
                hidden_states, residual = layer.forward_fused(positions, hidden_states, residual)
            return self.norm(hidden_states, residual=residual)[0]
        for layer in self.layers:
            hidden_states = layer(positions, hidden_states)
        return self.norm(hidden_states)


class LlamaForCausalLM(nn.Module):
    """Flat token batch → hidden states; ``compute_logits`` turns chosen rows into logits."""

    fused_projections = False  # Phi-3's checkpoints fuse q/k/v and gate/up

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        # One rotary table per rope setting, shared by the layers using it (tables can be large).
        self.rotary_emb = get_rope(spec.rope, spec.head_dim, spec.max_position_embeddings, spec.rotary_dim)
        self.local_rotary_emb: RotaryEmbedding | None = None
        if spec.rope_local_theta is not None:  # Gemma 3: sliding layers use plain rope with their own base
            local = RopeSpec(rope_type="default", theta=spec.rope_local_theta)
            self.local_rotary_emb = get_rope(local, spec.head_dim, spec.max_position_embeddings, spec.rotary_dim)
        layers = [LlamaDecoderLayer(spec, self.make_attention(spec, i, self.rotary_for_layer(i)),
                                    self.make_mlp(spec, i)) for i in range(spec.num_hidden_layers)]
        self.model = LlamaModel(spec, layers)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---- what subclasses change ----
    def make_attention(self, spec: ModelSpec, layer: int, rotary_emb: nn.Module) -> nn.Module:
        return LlamaAttention(spec, layer, rotary_emb, fused_qkv=self.fused_projections)

    def make_mlp(self, spec: ModelSpec, layer: int) -> nn.Module:
        return LlamaMLP(spec, fused=self.fused_projections)

    def shard(self, sharder: Sharder, prefix: str) -> None:
        """A vocabulary slice of the embedding and the LM head (the layers shard themselves)."""
        sharder.vocab(self)

    def map_checkpoint_name(self, name: str) -> str | None:
        """A published checkpoint name → our parameter name (None: not part of the text model)."""
        if name.startswith(_NON_TEXT_PREFIXES):
            return None
        for prefix, ours in _LM_PREFIXES:
            if name.startswith(prefix):
                return ours + name[len(prefix):]
        return name

    def fuse_projections(self) -> None:
        """Concatenate each attention's q/k/v and each MLP's gate/up weights into one matmul (done after
        loading, on the GPU: one wide matmul reads its weights faster than three narrow ones and
        launches once). The forward passes already handle the fused layout (Phi-3 ships it).
        FP8 projections (:class:`Fp8Linear`) are concatenated with their scale grids when that is exact
        (each part but the last a whole number of scale block rows), else left unfused."""
        for module in self.modules():
            if isinstance(module, LlamaAttention) and not hasattr(module, "qkv_proj"):
                fused = _concat_linears([module.q_proj, module.k_proj, module.v_proj])
                if fused is not None:
                    module.qkv_proj = fused
                    del module.q_proj, module.k_proj, module.v_proj
            elif isinstance(module, LlamaMLP) and not hasattr(module, "gate_up_proj"):
                fused = _concat_linears([module.gate_proj, module.up_proj])
                if fused is not None:
                    module.gate_up_proj = fused
                    del module.gate_proj, module.up_proj

    def fp8_linear_names(self) -> list[str]:
        """Names of the projections whose FP8 checkpoint weights may stay FP8 (become :class:`Fp8Linear`):
        the q/k/v/o and gate/up/down (or fused) Linears of attention and dense MLPs, which are only
        ever called. FP8 weights elsewhere (MoE expert banks stack their weights, MLA reads them) are
        dequantized on load (``dockyard.weights.fp8``)."""
        return [f"{name}.{attr}" for name, module in self.named_modules()
                if isinstance(module, (LlamaAttention, LlamaMLP))
                for attr in _PROJECTIONS if type(getattr(module, attr, None)) is nn.Linear]

    # ---- the model ----
    def rotary_for_layer(self, layer: int) -> RotaryEmbedding:
        if self.local_rotary_emb is not None and self.spec.layer_sliding_window(layer) is not None:
            return self.local_rotary_emb
        return self.rotary_emb

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] → hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden states [N, hidden] → logits [N, vocab] in float32 (scaled and soft-capped as the family does)."""
        logits = self.lm_head(hidden_states)
        if self.spec.logits_scale != 1.0:
            logits = logits * self.spec.logits_scale
        cap = self.spec.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3 / Phi-3.5 / Phi-4: the Llama shape with fused qkv and gate_up projections."""

    fused_projections = True

