"""Greedy caption decoding with real early exits.

Each token runs the decoder one layer at a time. After every layer that carries an exit head the token's
confidence (max softmax probability of that head) is compared with its sequence's threshold; once it reaches
it, the token leaves with that head's argmax and **the remaining layers are not computed for it**.

Later tokens still attend to every layer's keys and values at that position, so the skipped layers' KV-cache
entries are filled from the exited hidden state (state propagation, as in CALM, Schuster et al. 2022). Only the
key/value projections are needed, and each layer's LayerNorm scale and shift are folded into its K/V weights
once, at start-up, so that filling all skipped layers is one LayerNorm and one matrix product.

Rows of a batch decode together: each has its own threshold, only the rows still running are computed at each
layer, and finished captions drop out of the batch.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models.model import CapeenModel

FULL_DEPTH = math.inf  # a threshold no confidence reaches: every layer runs


@dataclass
class DecodeTrace:
    """What happened to one caption: its tokens and, per token, the exits evaluated on the way."""

    token_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)  # 1-based decoder layer each token left at
    # per token: confidence at every exit evaluated, in order; the last one is where the token left
    exit_confidences: list[list[float]] = field(default_factory=list)
    # per token: 1-based layers of those exits (so `exit_confidences[t][k]` was measured after `exit_points[t][k]`)
    exit_points: list[list[int]] = field(default_factory=list)
    # per token: the argmax of each exit evaluated (only kept when decoding with `observe_exits`)
    exit_predictions: list[list[int]] = field(default_factory=list)
    threshold: float = FULL_DEPTH

    @property
    def confidences(self) -> list[float]:
        """The confidence of each emitted token at the exit it left through."""
        return [c[-1] for c in self.exit_confidences]

    def layers_computed(self) -> int:
        return sum(self.exit_layers)


class SectionTimer:
    """Wall time per named section of the decode loop (for `capeen bench`'s profile); CPU or synchronised CUDA."""

    def __init__(self, synchronize=lambda: None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.synchronize = synchronize

    @contextmanager
    def __call__(self, name: str):
        self.synchronize()
        start = time.perf_counter()
        yield
        self.synchronize()
        self.seconds[name] += time.perf_counter() - start


_NO_TIMING = nullcontext()


class EarlyExitDecoder:
    """Greedy decoding for a `CapeenModel` with per-sequence confidence thresholds."""

    def __init__(self, model: CapeenModel) -> None:
        self.model = model
        self.config = config = model.config
        self.blocks = list(model.decoder.transformer.h)
        self.exit_after = {layer - 1 for layer in config.exit_layers}  # 0-based block indices
        self.n_layer, self.d, self.n_head = config.n_layer, config.n_embd, config.n_head
        self.timer: SectionTimer | None = None  # set to profile where decode time goes
        self._prepare_weights()

    @torch.no_grad()
    def _prepare_weights(self) -> None:
        """Stack per-layer weights so that cross-attention K/V and state propagation are single products."""
        d = self.d
        cross_w = [b.crossattention.c_attn.weight for b in self.blocks]
        cross_b = [b.crossattention.c_attn.bias for b in self.blocks]
        self.cross_weight = torch.cat(cross_w, dim=1).contiguous()  # (d, L * 2d)
        self.cross_bias = torch.cat(cross_b).contiguous()
        # LN(h) @ W = norm(h) @ (diag(g) W) + (b @ W): fold ln_1 into each layer's K/V projection
        folded_w, folded_b = [], []
        for block in self.blocks:
            w_kv = block.attn.c_attn.weight[:, d:]  # (d, 2d): key and value columns
            b_kv = block.attn.c_attn.bias[d:]
            folded_w.append(block.ln_1.weight[:, None] * w_kv)
            folded_b.append(block.ln_1.bias @ w_kv + b_kv)
        self.prop_weight = torch.cat(folded_w, dim=1).contiguous()  # (d, L * 2d)
        self.prop_bias = torch.cat(folded_b).contiguous()
        self.eps = self.config.layer_norm_epsilon

    def refresh(self) -> None:
        """Call after changing the model's weights in place (or its device/dtype)."""
        self._prepare_weights()

    # ------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(
        self,
        encoder_states: torch.Tensor,
        thresholds: list[float] | torch.Tensor | float = FULL_DEPTH,
        max_tokens: int | None = None,
        observe_exits: bool = False,
    ) -> list[DecodeTrace]:
        """Greedy-decode one caption per image.

        `thresholds` is one value per row (or one for all); `FULL_DEPTH` (or anything above 1) runs every layer
        without evaluating exits. With `observe_exits`, every exit is evaluated and recorded but no token leaves
        early: the full-depth caption plus what each exit would have said (for analysis and calibration).
        """
        cfg = self.config
        batch = encoder_states.shape[0]
        device, dtype = encoder_states.device, encoder_states.dtype
        if max_tokens is None:
            max_tokens = cfg.n_positions - 1
        max_tokens = max(1, min(max_tokens, cfg.n_positions - 1))
        if isinstance(thresholds, torch.Tensor):
            thresholds = thresholds.flatten().tolist()
        thresholds_list = [float(t) for t in thresholds] if isinstance(thresholds, (list, tuple)) \
            else [float(thresholds)] * batch
        if len(thresholds_list) != batch:
            raise ValueError(f"got {len(thresholds_list)} thresholds for {batch} images")
        thr = torch.tensor(thresholds_list, dtype=torch.float64, device=device)
        L, H, hd = self.n_layer, self.n_head, self.d // self.n_head

        # cross-attention keys/values of every layer, in one product: (L, 2, B, H, P, hd)
        p = encoder_states.shape[1]
        cross = torch.addmm(self.cross_bias, encoder_states.reshape(-1, self.d), self.cross_weight)
        cross = cross.view(batch, p, L, 2, H, hd).permute(2, 3, 0, 4, 1, 5).contiguous()
        # self-attention cache of every layer: (L, 2, B, H, T, hd)
        cache = torch.zeros(L, 2, batch, H, max_tokens, hd, device=device, dtype=dtype)

        traces = [DecodeTrace(threshold=t) for t in thresholds_list]
        alive = list(range(batch))  # original row of each active row
        tokens = torch.full((batch,), cfg.bos_token_id, dtype=torch.long, device=device)
        wte, wpe = self.model.decoder.transformer.wte.weight, self.model.decoder.transformer.wpe.weight
        ln_f, lm_head = self.model.decoder.transformer.ln_f, self.model.decoder.lm_head

        for t in range(max_tokens):
            n = len(alive)
            h = (wte[tokens] + wpe[t]).unsqueeze(1)  # (n, 1, d)
            records_exits = [observe_exits or thresholds_list[row] <= 1.0 for row in alive]
            check_exits = any(records_exits)
            rows = None  # None: all active rows are still running at this layer
            next_tokens = torch.empty(n, dtype=torch.long, device=device)
            step_conf: list[list[float]] = [[] for _ in range(n)]
            step_points: list[list[int]] = [[] for _ in range(n)]
            step_preds: list[list[int]] = [[] for _ in range(n)]
            row_ids = list(range(n))  # active-row index of each running row

            for layer, block in enumerate(self.blocks):
                with self._section("decoder layers"):
                    h = self._block(block, layer, h, rows, cache, cross, t)
                if layer == L - 1:
                    with self._section("final head"):
                        logits = lm_head(ln_f(h[:, 0]))
                        conf, pred = F.softmax(logits.float(), dim=-1).max(dim=-1)
                        conf_list, pred_list = conf.tolist(), pred.tolist()
                elif check_exits and layer in self.exit_after:
                    with self._section("exit heads"):
                        logits = self.model.exits[str(layer + 1)](h[:, 0])
                        conf, pred = F.softmax(logits.float(), dim=-1).max(dim=-1)
                        conf_list, pred_list = conf.tolist(), pred.tolist()
                else:
                    continue
                final_layer = layer == L - 1
                for i, r in enumerate(row_ids):
                    if not (final_layer or records_exits[r]):
                        continue  # a full-depth row of a mixed batch: as if decoded alone, no exits evaluated
                    step_conf[r].append(conf_list[i])
                    step_points[r].append(layer + 1)
                    step_preds[r].append(pred_list[i])
                if final_layer:
                    leaving = torch.ones_like(conf, dtype=torch.bool)
                elif observe_exits:
                    continue
                else:
                    running_thr = thr if rows is None else thr[rows]
                    leaving = conf >= running_thr
                    if not bool(leaving.any()):
                        continue
                active_index = torch.arange(n, device=device) if rows is None else rows
                leave_rows = active_index[leaving]
                next_tokens[leave_rows] = pred[leaving]
                if layer == L - 1:
                    break
                with self._section("state propagation"):
                    self._propagate(h[leaving, 0], layer, leave_rows, cache, t)
                stay = ~leaving
                rows = active_index[stay]
                h = h[stay]
                row_ids = [r for r, s in zip(row_ids, stay.tolist()) if s]

            for r in range(n):
                trace = traces[alive[r]]
                trace.exit_confidences.append(step_conf[r])
                trace.exit_points.append(step_points[r])
                trace.exit_layers.append(step_points[r][-1] if not observe_exits else L)
                if observe_exits:
                    trace.exit_predictions.append(step_preds[r])
            next_list = next_tokens.tolist()
            keep = []
            for r, token in enumerate(next_list):
                traces[alive[r]].token_ids.append(token)
                if token != cfg.eos_token_id:
                    keep.append(r)
            if not keep:
                break
            if len(keep) < n:  # finished captions leave the batch
                index = torch.tensor(keep, device=device)
                cache, cross, thr = cache.index_select(2, index), cross.index_select(2, index), thr[index]
                next_tokens = next_tokens[index]
                alive = [alive[r] for r in keep]
            tokens = next_tokens
        return traces

    def _section(self, name: str):
        return self.timer(name) if self.timer is not None else _NO_TIMING

    def _block(self, block, layer: int, h: torch.Tensor, rows: torch.Tensor | None, cache: torch.Tensor,
               cross: torch.Tensor, t: int) -> torch.Tensor:
        """One decoder layer for the running rows, writing this position's keys/values into the cache."""
        n, H, d = h.shape[0], self.n_head, self.d
        hd = d // H
        qkv = block.attn.c_attn(F.layer_norm(h, (d,), block.ln_1.weight, block.ln_1.bias, self.eps))
        q, kv = qkv[:, 0, :d], qkv[:, 0, d:].view(n, 2, H, hd).transpose(0, 1)  # (2, n, H, hd)
        layer_cache = cache[layer]  # (2, B, H, T, hd)
        if rows is None:
            layer_cache[:, :, :, t] = kv
            keys, values = layer_cache[0, :, :, : t + 1], layer_cache[1, :, :, : t + 1]
            cross_k, cross_v = cross[layer, 0], cross[layer, 1]
        else:
            layer_cache[:, :, :, t].index_copy_(1, rows, kv)
            past = layer_cache[:, :, :, : t + 1].index_select(1, rows)
            keys, values = past[0], past[1]
            layer_cross = cross[layer].index_select(1, rows)
            cross_k, cross_v = layer_cross[0], layer_cross[1]
        attn = F.scaled_dot_product_attention(q.view(n, H, 1, hd), keys, values)
        h = h + block.attn.c_proj(attn.view(n, 1, d))
        x = F.layer_norm(h, (d,), block.ln_cross_attn.weight, block.ln_cross_attn.bias, self.eps)
        q_cross = block.crossattention.q_attn(x).view(n, H, 1, hd)
        h = h + block.crossattention.c_proj(F.scaled_dot_product_attention(q_cross, cross_k, cross_v).view(n, 1, d))
        return h + block.mlp(F.layer_norm(h, (d,), block.ln_2.weight, block.ln_2.bias, self.eps))

    def _propagate(self, hidden: torch.Tensor, layer: int, rows: torch.Tensor, cache: torch.Tensor, t: int) -> None:
        """Fill the K/V cache of layers after `layer` (0-based) at position t from the exited hidden state."""
        first = layer + 1
        count, H, hd = self.n_layer - first, self.n_head, self.d // self.n_head
        start = first * 2 * self.d
        normed = F.layer_norm(hidden, (self.d,), eps=self.eps)
        kv = torch.addmm(self.prop_bias[start:], normed, self.prop_weight[:, start:])
        kv = kv.view(-1, count, 2, H, hd).permute(1, 2, 0, 3, 4)  # (count, 2, n, H, hd)
        cache[first:, :, :, :, t].index_copy_(2, rows, kv)
