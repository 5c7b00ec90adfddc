"""The two KV-absence baselines River is measured against (DESIGN 1 and 9), on the torch reference.

Both exit a token at the same similarity gates and thresholds as the River graph (so the exit policy
is the same and only the handling of the skipped layers' K/V differs), but run no twins: an exited
token goes from its exit layer straight to the final norm and head, and the layers above its exit
write no K/V for it. What later tokens do about those holes:

- ``mask`` (D-LLM): nothing is ever filled in; a later token's attention in layer l masks every
  position whose token exited below l (per-layer key masks).
- ``recompute`` (EE-LLM): the exited tokens' hidden states at their exit are kept; the next token
  that goes deeper than them runs each skipped layer over [the exited tokens..., itself] in one
  multi-token step (their K/V recomputed by the backbone, batched with the current token), so the
  deep layers' caches never keep holes past the next full-depth token.

They are implemented in torch, not ONNX Runtime: per-layer key masks and batched recomputation of
a variable, data-dependent set of positions per layer do not fit the step graph's one mask and one
write window. Their speed is therefore measured against the torch full model (``full-torch``),
never against ONNX Runtime's. Imports torch: only ``river-bench`` loads this module.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from river.compiler.river.manifest import RiverInfo
from river.export.contract import StepContract
from river.runtime.backend import StepBackend
from river.runtime.kv_cache import SharedKVCache
from river.runtime.torch_reference import cosine_rows

POLICIES = ("mask", "recompute")


def visible_mask(valid: torch.Tensor, start: int, s: int) -> torch.Tensor:
    """Additive mask [1,1,s,T] for queries at positions start..start+s-1 over keys 0..T-1 (T = start+s):
    key j is visible to query i iff it is valid in this layer and j <= i (causal by index)."""
    t = start + s
    causal = torch.arange(t).unsqueeze(0) <= torch.arange(start, t).unsqueeze(1)  # [s,T]
    visible = causal & valid[:t].bool().unsqueeze(0)
    return torch.where(visible, 0.0, torch.finfo(torch.float32).min).view(1, 1, s, t)


class AbsenceState:
    """Per-request bookkeeping beside the KV buffers: which positions each layer holds (mask), and
    the exited tokens' hidden states waiting for their skipped layers (recompute)."""

    def __init__(self, num_layers: int, capacity: int, hidden: int):
        self.valid = torch.zeros(num_layers, capacity, dtype=torch.bool)  # layer l holds K/V of position j
        self.filled = [0] * num_layers  # recompute: layer l holds positions [0, filled[l])
        self.hidden = torch.zeros(capacity, hidden)  # recompute: hidden after the deepest layer each ran


class ExitWithoutTwinsBackend(StepBackend):
    """Token-level early exit with no river: the baselines' shared step (see the module docstring).

    ``extend`` runs the new tokens layer by layer; after each gate the last row's similarity is
    compared with the gate's threshold (every gate off during prefill), as in the River graph."""

    def __init__(self, model, river: RiverInfo, policy: str, thresholds: Sequence[float] | None = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown KV-absence policy {policy!r}: one of {POLICIES}")
        self.model, self.policy, self.name = model.eval(), policy, f"torch-{policy}"
        self.contract = StepContract.of_config(model.config)
        self._init_river(river, thresholds)
        self.states: dict[int, AbsenceState] = {}
        self.recomputed = 0  # recompute: (token, layer) pairs run again for exited tokens

    def new_cache(self, capacity: int, batch: int = 1) -> SharedKVCache:
        if batch != 1:
            raise ValueError("the KV-absence baselines run one sequence at a time")
        cache = super().new_cache(capacity, batch)
        cfg = self.model.config
        self.states[id(cache)] = AbsenceState(cfg.num_layers, capacity, cfg.hidden_size)
        return cache

    def release(self, cache=None) -> None:
        if cache is None:
            self.states.clear()
        else:
            self.states.pop(id(cache), None)

    def prefill(self, input_ids: np.ndarray, cache: SharedKVCache) -> np.ndarray:
        return self._prefill_by_extend(input_ids, cache)

    @torch.no_grad()
    def extend(self, token_ids: np.ndarray, cache: SharedKVCache) -> np.ndarray:
        b, s = token_ids.shape
        p = cache.length
        cache.require_room(s)
        st = self.states[id(cache)]
        m = self.model.model
        h = m.embed_tokens(torch.from_numpy(np.ascontiguousarray(token_ids, np.int64)))
        exit_layer = len(m.layers)
        for l, layer in enumerate(m.layers):
            h_in = h
            h = self._layer(l, layer, h, p, cache, st)
            if l in self.river.gates:
                sim = cosine_rows(h_in[:, -1], h[:, -1])
                if bool((sim >= float(self.thresholds[self.river.gates.index(l)])).all()):
                    exit_layer = l + 1
                    break
        if self.policy == "recompute":
            st.hidden[p:p + s] = h[0]  # the state the skipped layers will start from
        self.last_exit_layer = exit_layer
        return self.model.lm_head(m.norm(h)).numpy()

    def _layer(self, l: int, layer, h: torch.Tensor, p: int, cache: SharedKVCache, st: AbsenceState) -> torch.Tensor:
        """Run layer ``l`` for the new tokens at p.. (and, for recompute, the exited tokens it lacks)."""
        s = h.shape[1]
        keys, values = torch.from_numpy(cache.keys[l]), torch.from_numpy(cache.values[l])  # views: written in place
        start = p
        if self.policy == "recompute" and st.filled[l] < p:  # exited tokens this layer never saw
            start = st.filled[l]
            self.recomputed += p - start
            h = torch.cat((st.hidden[start:p].unsqueeze(0), h), dim=1)
        st.valid[l, start:p + s] = True
        positions = torch.arange(start, p + s).unsqueeze(0)
        cos, sin = self.model.model.rotary_emb(positions)
        mask = visible_mask(st.valid[l], start, p + s - start)
        out, k, v = layer(h, cos, sin, mask, keys[:, :, :start], values[:, :, :start])
        keys[:, :, start:p + s] = k[:, :, start:]
        values[:, :, start:p + s] = v[:, :, start:]
        st.filled[l] = p + s
        if start < p:
            st.hidden[start:p] = out[0, :p - start]  # the exited tokens' state one layer deeper
        return out[:, p - start:]
