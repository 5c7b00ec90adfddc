"""The torch reference as a backend: our ``LlamaForCausalLM`` (plain) or the torch River algorithm
(``runtime/torch_reference.py``) behind the backend protocol, over host KV buffers.

It is the ground truth the ONNX backends are tested against and the way to run River on a GPU with
nothing but torch. Each step reads the valid past from the shared buffers and writes only the new
positions back; it loads torch, so only ``--backend torch`` imports it.
"""

from __future__ import annotations

import numpy as np
import torch

from river.compiler.river.manifest import RiverInfo
from river.export.contract import StepContract
from river.runtime.backend import StepBackend
from river.runtime.kv_cache import SharedKVCache


class TorchBackend(StepBackend):
    name = "torch"
    supports_recall = True

    def __init__(self, model, river: RiverInfo | None = None, defaults=None, thresholds=None):
        from river.runtime.torch_reference import TorchRiver

        self.model = model.eval()
        self.contract = StepContract.of_config(model.config)
        self._init_river(river, defaults, thresholds)
        self.reference = None if river is None else TorchRiver(
            model, river.gates, river.kind, river.precision, river.block, twin_format=river.twin_format,
            head=river.head)

    def prefill(self, input_ids: np.ndarray, cache: SharedKVCache) -> np.ndarray:
        return self._prefill_by_extend(input_ids, cache)

    @torch.no_grad()
    def extend(self, token_ids: np.ndarray, cache: SharedKVCache) -> np.ndarray:
        b, s = token_ids.shape
        p = cache.length
        cache.require_room(s)
        ids = torch.from_numpy(np.ascontiguousarray(token_ids, np.int64))
        mask = torch.ones((b, p + s), dtype=torch.int64)
        positions = torch.arange(p, p + s, dtype=torch.int64).expand(b, s)
        past = [torch.from_numpy(buf[:, :, :p]) for buf in cache.buffers()]
        if self.reference is None:
            logits, *presents = self.model(ids, mask, positions, *past)
        else:
            logits, presents, exit_layer = self.reference.step(ids, mask, positions, past, self.thresholds,
                                                               self.recall_margin)
            self.last_exit_layer = int(exit_layer[0])
            self.last_recalled = np.full(b, self.reference.recalled)
        for layer in range(self.contract.num_layers):  # only the new positions go back into the buffers
            cache.write(layer, presents[2 * layer][:, :, p:].numpy(), presents[2 * layer + 1][:, :, p:].numpy(), at=p)
        return logits.numpy()
