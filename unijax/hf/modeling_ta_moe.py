"""transformers modeling code for Janus with TA-MoE FFNs, written beside the weights of an export.

`python -m unijax.convert --to_hf` copies this file into the output directory of a TA-MoE model and
points `config.json`'s `auto_map` at it, so that

    AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)

loads the model. It is transformers' `JanusForConditionalGeneration` with the FFN of each TA-MoE
decoder layer replaced by `TAMoEMLP`, which computes what `unijax.models.moe.TAMoE` computes at
inference (no capacity limit, no token dropped):

    y = sum_k gate_k * expert_k(x) + alpha * shared(x)

The task router's argmax picks the expert group of each token (`group_assignment` `router`; `soft`
weights both groups by its probabilities), then the group's router keeps the top-k experts,
renormalising their softmax weights. Routers run in float32. The expert weights keep unijax's
stacked layout: `experts.gate_proj` / `up_proj` `[2N, hidden, inner]`, `experts.down_proj`
`[2N, inner, hidden]`, understanding experts first.

This module imports torch and transformers and is never imported by unijax itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import JanusConfig, JanusForConditionalGeneration


class JanusTAMoEConfig(JanusConfig):
    """`JanusConfig` plus `ta_moe`: num_experts_per_group, num_shared_experts, top_k,
    expert_intermediate_size, group_assignment (router | soft), layers (empty: every layer)."""

    model_type = "janus_ta_moe"
    ta_moe: dict | None = None


class TAMoEMLP(nn.Module):
    def __init__(self, hidden: int, inner: int, moe: dict, bias: bool = False):
        super().__init__()
        n = int(moe["num_experts_per_group"])
        self.n, self.top_k, self.assignment = n, int(moe["top_k"]), moe["group_assignment"]
        if self.assignment not in ("router", "soft"):
            raise ValueError(f"ta_moe.group_assignment={self.assignment!r}: an exported model routes by its task "
                             f"router ('router' or 'soft')")
        self.task_router = nn.Linear(hidden, 2, bias=False)
        self.router = nn.Linear(hidden, 2 * n, bias=False)
        self.experts = nn.Module()
        self.experts.gate_proj = nn.Parameter(torch.zeros(2 * n, hidden, inner))
        self.experts.up_proj = nn.Parameter(torch.zeros(2 * n, hidden, inner))
        self.experts.down_proj = nn.Parameter(torch.zeros(2 * n, inner, hidden))
        shared = int(moe.get("num_shared_experts", 0)) * inner
        if shared:
            self.shared = nn.Module()
            self.shared.gate_proj = nn.Linear(hidden, shared, bias=bias)
            self.shared.up_proj = nn.Linear(hidden, shared, bias=bias)
            self.shared.down_proj = nn.Linear(shared, hidden, bias=bias)
        else:
            self.shared = None
        self.alpha = nn.Parameter(torch.ones(()))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[S, hidden]` -> (expert ids `[S, K]`, gates `[S, K]`) in float32."""
        n, k = self.n, self.top_k
        xf = x.float()
        task_logits = F.linear(xf, self.task_router.weight.float())
        probs = torch.softmax(F.linear(xf, self.router.weight.float()).view(-1, 2, n), dim=-1)
        if self.assignment == "soft":
            vals, idx = probs.topk(k, dim=-1)                                   # [S, 2, k]
            gates = vals / vals.sum(-1, keepdim=True) * torch.softmax(task_logits, -1)[..., None]
            ids = idx + (torch.arange(2, device=x.device) * n)[None, :, None]
            return ids.reshape(-1, 2 * k), gates.reshape(-1, 2 * k)
        group = task_logits.argmax(-1)
        p = probs[torch.arange(probs.shape[0], device=x.device), group]          # [S, N]
        vals, idx = p.topk(k, dim=-1)
        return idx + group[:, None] * n, vals / vals.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xs = x.reshape(-1, shape[-1])
        ids, gates = self.route(xs)
        out = torch.zeros_like(xs)
        for e in torch.unique(ids).tolist():
            rows, slot = (ids == e).nonzero(as_tuple=True)
            h = xs[rows]
            y = (F.silu(h @ self.experts.gate_proj[e]) * (h @ self.experts.up_proj[e])) @ self.experts.down_proj[e]
            out.index_add_(0, rows, y * gates[rows, slot, None].to(y.dtype))
        if self.shared is not None:
            s = self.shared
            out = out + self.alpha.to(xs.dtype) * s.down_proj(F.silu(s.gate_proj(xs)) * s.up_proj(xs))
        return out.reshape(shape)


class JanusTAMoEForConditionalGeneration(JanusForConditionalGeneration):
    config_class = JanusTAMoEConfig

    def __init__(self, config: JanusTAMoEConfig):
        super().__init__(config)
        moe, text = config.ta_moe, config.text_config
        inner = int(moe.get("expert_intermediate_size") or text.intermediate_size)
        layers = self.model.language_model.layers
        for i in moe.get("layers") or range(len(layers)):
            layers[i].mlp = TAMoEMLP(text.hidden_size, inner, moe, bias=getattr(text, "mlp_bias", False))
        self.post_init()
