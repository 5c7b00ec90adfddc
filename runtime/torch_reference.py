"""The River algorithm in torch, over our ``LlamaForCausalLM``: the ground truth for the ONNX River
graph (same gates, same twins, same KV share), and the way to time River on a GPU.

One ``step`` mirrors one River graph step: run the backbone; after each gate layer compare the
per-row cosine similarity of the block's input and output (last position) with the gate's threshold;
when every row clears it, run the river (twins of the remaining layers, writing their K/V) and the
head (and, when the river is unsure and recall is on, the backbone from the exit on). Twin weights come from ``river.compiler.quantize``, the same routine the compiler uses, and
each twin kind computes what its class in the twin registry (``river.compiler.river.twins``) says.
"""

from __future__ import annotations

import copy

import torch
from river.compiler.quantize import BITS, PackedWeight, nbits_activations, quantize
from river.compiler.river import twins
from river.compiler.river.recall import RECALL_OFF, river_margin
from river.models.llama import DecoderLayer, LlamaForCausalLM, additive_causal_mask


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row cosine of [B,H] tensors, with the River graph's exact formula (eps on the norm)."""
    dot = (a * b).sum(-1)
    norm = torch.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return dot / torch.clamp(norm, min=1e-12)


class NBitsLinear(torch.nn.Module):
    """A twin linear layer computing what the ORT twin format's MatMulNBits (accuracy level 4)
    computes: int8 activations per block times the dequantized weight."""

    def __init__(self, weight: PackedWeight):
        super().__init__()
        self.block = weight.block
        self.register_buffer("weight_deq", torch.from_numpy(weight.dequantize().astype("float64")))

    def forward(self, x):
        return torch.matmul(nbits_activations(x, self.block), self.weight_deq).to(torch.float32)


class TorchRiver:
    def __init__(self, model: LlamaForCausalLM, gates, kind: str = "full", precision: str = "int8", block: int = 64,
                 twin_format: str = "ort", head: str = "fp32"):
        self.model, self.gates, self.kind, self.precision, self.block = model.eval(), tuple(gates), kind, precision, block
        self.twin_kind, self.twin_format, self.head = twins.get(kind), twin_format, head
        self._twins: dict[int, DecoderLayer] = {}
        self._head = None

    def quantized(self, linear: torch.nn.Linear, precision: str) -> torch.nn.Module:
        """``linear`` as the River graph computes it at ``precision``: the block-quantized weight
        (dequantized), behind the ORT twin format's per-block int8 activations."""
        if precision == "fp32" or linear.in_features % self.block:
            return linear
        w = linear.weight.detach().cpu().numpy().T  # the ONNX MatMul layout [in, out]
        qw = quantize(w, BITS[precision], self.block, self.twin_format)
        if self.twin_format == "ort":
            return NBitsLinear(qw)
        out = copy.deepcopy(linear)
        with torch.no_grad():
            out.weight.copy_(torch.from_numpy(qw.dequantize().T.copy()))
        return out

    def twin(self, layer: int) -> DecoderLayer:
        """A copy of the layer whose linear weights are block-quantized and dequantized (the twin),
        except those its twin kind keeps exact."""
        if layer not in self._twins:
            twin = copy.deepcopy(self.model.model.layers[layer])
            for parent in list(twin.modules()):
                for name, mod in list(parent.named_children()):
                    if isinstance(mod, torch.nn.Linear) and name not in self.twin_kind.torch_exact:
                        setattr(parent, name, self.quantized(mod, self.precision))
            self._twins[layer] = twin
        return self._twins[layer]

    def river_head(self) -> torch.nn.Module:
        """The LM head a river ends with, at the head precision."""
        if self._head is None:
            self._head = self.quantized(self.model.lm_head, self.head)
        return self._head

    @torch.no_grad()
    def step(self, input_ids, attention_mask, position_ids, past, thresholds, recall_margin: float = RECALL_OFF):
        """(logits, presents, exit_layer[B]) for one step; ``past`` is the flat contract list. A batch
        exits when every row clears the gate and is recalled when any row's river is unsure
        (``compiler/river/recall.py``): then the backbone runs on from the exit layer."""
        m = self.model.model
        L = len(m.layers)
        h = m.embed_tokens(input_ids)
        cos, sin = m.rotary_emb(position_ids)
        mask = additive_causal_mask(attention_mask, position_ids, h.dtype)
        presents: list[torch.Tensor] = []
        exit_after = None
        self.recalled = False
        self.similarities: list[torch.Tensor] = []  # per gate reached: per-row s_k
        for l, layer in enumerate(m.layers):
            h_in = h
            h, k, v = layer(h, cos, sin, mask, past[2 * l], past[2 * l + 1])
            presents += [k, v]
            if l in self.gates:
                gi = self.gates.index(l)
                sim = cosine_rows(h_in[:, -1], h[:, -1])
                self.similarities.append(sim)
                if bool((sim >= float(thresholds[gi])).all()):
                    exit_after = l
                    break
        if exit_after is not None:
            h_exit = h
            for l in range(exit_after + 1, L):
                twin = self.twin(l)
                h, k, v = self.twin_kind.torch(twin, h, h_exit, (cos, sin), mask, past[2 * l], past[2 * l + 1])
                presents += [k, v]
            logits = self.river_head()(m.norm(h))
            if recall_margin != RECALL_OFF and (river_margin(logits[:, -1].numpy()) < recall_margin).any():
                h, presents = h_exit, presents[:2 * (exit_after + 1)]  # recalled: the backbone from the exit on
                self.recalled = True
                for l in range(exit_after + 1, L):
                    h, k, v = m.layers[l](h, cos, sin, mask, past[2 * l], past[2 * l + 1])
                    presents += [k, v]
                exit_after = None
        if exit_after is None:
            logits = self.model.lm_head(m.norm(h))
        exit_layer = torch.full((input_ids.shape[0],), L if exit_after is None else exit_after + 1, dtype=torch.int64)
        return logits, presents, exit_layer
