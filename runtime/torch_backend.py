"""The torch reference as a backend: our ``LlamaForCausalLM`` (plain) or the torch River algorithm
(``runtime/torch_reference.py``) behind the backend protocol, over host KV buffers.

It is the ground truth the ONNX backends are tested against and the way to run River on a GPU with
nothing but torch. Each step reads the valid past from the shared buffers and writes only the new
positions back; it loads torch, so only ``--backend torch`` imports it.
"""

from __future__ import annotations

import weakref

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
        # per cache: its token ids by position and the first position whose K/V a twin wrote (or that
        # attended to one) since the last repair: what a recall reruns (runtime/exit_history.py)
        self._sequences: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

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
        seq = self._sequences.setdefault(cache, {"ids": np.zeros((b, cache.physical), np.int64), "damaged": None})
        seq["ids"][:, p:p + s] = token_ids
        if seq["damaged"] is not None and seq["damaged"] >= p:  # rolled back past it
            seq["damaged"] = None
        start = p
        if self.reference is None:
            logits, *presents = self.model(ids, mask, positions, *past)
        else:
            logits, presents, exit_layer = self.reference.step(ids, mask, positions, past, self.thresholds,
                                                               self.recall_margin)
            self.last_exit_layer = int(exit_layer[0])
            self.last_recalled = np.full(b, self.reference.recalled)
            if self.reference.recalled and seq["damaged"] is not None:  # repair: the backbone reruns the damage
                start = seq["damaged"]
                rerun = torch.from_numpy(seq["ids"][:, start:p + s].copy())
                logits, *presents = self.model(rerun, mask, torch.arange(start, p + s).expand(b, -1),
                                               *[x[:, :, :start] for x in past])
                logits = logits[:, -s:]
            if self.reference.recalled:
                seq["damaged"] = None
            elif self.last_exit_layer < self.contract.num_layers and seq["damaged"] is None:
                seq["damaged"] = p
        for layer in range(self.contract.num_layers):  # only the new (or repaired) positions go back
            key, value = presents[2 * layer], presents[2 * layer + 1]
            cache.write(layer, key[:, :, -(p + s - start):].numpy(), value[:, :, -(p + s - start):].numpy(), at=start)
        return logits.numpy()
