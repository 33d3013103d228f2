"""Greedy caption decoding with real early exits.

Each token runs the decoder one layer at a time. After every layer that carries an exit head the token's
confidence (max softmax probability of that head) is compared with its sequence's threshold; once it reaches
it, the token leaves with that head's argmax and **the remaining layers are not computed for it**.

Later tokens still attend to every layer's keys and values at that position. Two ways fill the skipped
layers' KV-cache entries (`kv_fill`):

- `propagate` (CALM, Schuster et al. 2022): from the exited hidden state, on the spot. Only the key/value
  projections are needed, and each layer's LayerNorm scale and shift are folded into its K/V weights once, at
  start-up, so that filling all skipped layers is one LayerNorm and one matrix product. Cheap, but those keys
  and values are approximations, and later tokens read them.
- `deferred` (the synchronised parallel decoding of FREE, Bae et al. 2023): the exited position stays
  pending, with its hidden state, until a later token of the same caption runs deeper. That token carries
  the pending positions through the layers it computes, in the same layer calls, one row each. Every key and
  value is then exactly what full computation would give, so the tokens equal `simulate_exits`'s. A row
  riding along costs less than a layer call of its own (at batch 1 on a CPU, about half of one: the call's
  fixed costs are paid once), and in a large batch, whose layers are bound by their matrix products, about
  a full row.

Each exit may add an offset to a row's threshold (a calibrated schedule: a shallow exit, more often confidently
wrong, can ask for more confidence than a deep one, as CALM's decaying thresholds do). A row with threshold t
leaves at exit e once its confidence reaches t + offset_e.

Rows of a batch decode together: each has its own threshold, only the rows still running are computed at each
layer, and finished captions drop out of the batch.

`simulate_exits` decodes the way the paper's code evaluates: every layer runs for every token, and the token
is taken from the first exit that reaches the threshold. Nothing is skipped, so it saves no time; its quality is
that of exact keys and values, without state propagation. Evaluating it next to the real engine shows what
propagation costs and what the simulated layer count hides.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from models import kernels
from models.model import CapeenModel

FULL_DEPTH = math.inf  # a threshold no confidence reaches: every layer runs


def _row_thresholds(thresholds, batch: int) -> list[float]:
    """One threshold per row, from one for all (a number, or a 0-d tensor or array) or one per row (a
    sequence, tensor or array). NaN is refused: it would compare false with every confidence and decode at
    full depth, reported as a threshold."""
    if isinstance(thresholds, torch.Tensor) or hasattr(thresholds, "ndim"):  # torch or numpy
        thresholds = thresholds.flatten().tolist() if thresholds.ndim else thresholds.item()
    values = [float(t) for t in thresholds] if isinstance(thresholds, (list, tuple)) else [float(thresholds)] * batch
    if len(values) != batch:
        raise ValueError(f"got {len(values)} thresholds for {batch} images")
    if any(math.isnan(t) for t in values):
        raise ValueError(f"thresholds must be numbers, got {values}")
    return values


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
    # `kv_fill="deferred"`: layers computed later for positions that had left early (catching up)
    catch_up_layers: int = 0

    @property
    def confidences(self) -> list[float]:
        """The confidence of each emitted token at the exit it left through."""
        return [c[-1] for c in self.exit_confidences]

    def layers_computed(self) -> int:
        """Decoder layers computed for this caption: each token's, plus any later catch-up."""
        return sum(self.exit_layers) + self.catch_up_layers


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

KV_FILLS = ("propagate", "deferred")


class PendingPositions:
    """A caption's positions that left early and whose deeper layers' keys and values are not computed yet.

    Kept in position order. A later token raises every pending position it carries to its own exit depth, so
    depths never increase along the positions: the ones to carry from a layer on are always a tail.
    """

    def __init__(self) -> None:
        self.positions: list[int] = []
        self.depths: list[int] = []  # layers computed so far for each position
        self.hidden: torch.Tensor | None = None  # (len(positions), d): each one's input to its next layer

    def take_tail(self, depth: int) -> tuple[list[int], torch.Tensor | None]:
        """Remove and return the positions computed exactly `depth` layers deep (they join the next layer)."""
        count = 0
        while count < len(self.depths) and self.depths[-1 - count] == depth:
            count += 1
        if not count:
            return [], None
        positions, hidden = self.positions[-count:], self.hidden[-count:]
        del self.positions[-count:], self.depths[-count:]
        self.hidden = self.hidden[:-count] if self.positions else None
        return positions, hidden

    def put_tail(self, positions: list[int], depth: int, hidden: torch.Tensor) -> None:
        """Append positions (later than any kept, in order) now computed `depth` layers deep."""
        self.positions += positions
        self.depths += [depth] * len(positions)
        self.hidden = hidden if self.hidden is None else torch.cat([self.hidden, hidden])


class LayerWeights(NamedTuple):
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    attn_w: torch.Tensor
    attn_b: torch.Tensor
    attn_proj_w: torch.Tensor
    attn_proj_b: torch.Tensor
    lnx_w: torch.Tensor
    lnx_b: torch.Tensor
    q_w: torch.Tensor
    q_b: torch.Tensor
    cross_proj_w: torch.Tensor
    cross_proj_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc_w: torch.Tensor
    fc_b: torch.Tensor
    mlp_proj_w: torch.Tensor
    mlp_proj_b: torch.Tensor


class RiderLayout(NamedTuple):
    """A layer call with pending positions riding along: entries are the running rows' tokens, then riders."""

    rows: torch.Tensor | None  # active rows still running (None: all of them, in order)
    cache_rows: torch.Tensor  # per entry: its cache row
    positions: torch.Tensor  # per entry: its position
    mask: torch.Tensor  # (running, 1, width, T): which positions each (row, slot) query may attend to
    width: int  # slots per running row: one token plus its riders, the most of any row
    slots: tuple[torch.Tensor, torch.Tensor]  # per entry: (running row, slot)


class EarlyExitDecoder:
    """Greedy decoding for a `CapeenModel` with per-sequence confidence thresholds."""

    def __init__(self, model: CapeenModel, exits: Sequence[int] | None = None,
                 exit_offsets: Sequence[float] | None = None, kv_fill: str = "propagate") -> None:
        self.model = model
        self.config = config = model.config
        self.blocks = list(model.decoder.transformer.h)
        # the exits consulted by default (a subset of those trained), and what each adds to the threshold
        self.exits, self.exit_offsets = self.check_schedule(exits, exit_offsets)
        self.kv_fill = self.check_kv_fill(kv_fill)
        self.n_layer, self.d, self.n_head = config.n_layer, config.n_embd, config.n_head
        self.timer: SectionTimer | None = None  # set to profile where decode time goes
        self._causal: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
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
        # stored (L * 2d, d), so that the rows of the layers after an exit are one dense block
        self.prop_weight = torch.cat(folded_w, dim=1).t().contiguous()
        self.prop_bias = torch.cat(folded_b).contiguous()
        self.eps = self.config.layer_norm_epsilon
        self.layer_weights = [
            LayerWeights(
                b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias, b.attn.c_proj.weight,
                b.attn.c_proj.bias, b.ln_cross_attn.weight, b.ln_cross_attn.bias, b.crossattention.q_attn.weight,
                b.crossattention.q_attn.bias, b.crossattention.c_proj.weight, b.crossattention.c_proj.bias,
                b.ln_2.weight, b.ln_2.bias, b.mlp.c_fc.weight, b.mlp.c_fc.bias, b.mlp.c_proj.weight, b.mlp.c_proj.bias,
            )
            for b in self.blocks
        ]
        decoder = self.model.decoder
        self.heads = {layer: (head.ln.weight, head.ln.bias, head.proj.weight)
                      for layer, head in ((int(k), v) for k, v in self.model.exits.items())}
        self.heads[self.n_layer] = (decoder.transformer.ln_f.weight, decoder.transformer.ln_f.bias,
                                    decoder.lm_head.weight)

    def check_schedule(self, exits: Sequence[int] | None,
                       offsets: Sequence[float] | None) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """Validate 1-based exit layers to consult (None: every exit the model has) and the offset each adds to
        the threshold (one per exit, in the same order; None: none). Both come back in layer order, each
        offset still with its own exit, whatever order they were given in."""
        chosen = tuple(self.config.exit_layers) if exits is None else tuple(int(e) for e in exits)
        unknown = sorted(set(e for e in chosen if e not in self.config.exit_layers))
        if unknown:
            raise ValueError(f"exit layers {unknown} have no trained head (the model has {self.config.exit_layers})")
        if offsets is None:
            layers = tuple(sorted(set(chosen)))
            return layers, (0.0,) * len(layers)
        values = tuple(float(o) for o in offsets)
        if len(values) != len(chosen):
            raise ValueError(f"got {len(values)} exit offsets for {len(chosen)} exits {list(chosen)}")
        if not all(math.isfinite(o) for o in values):
            raise ValueError(f"exit offsets must be finite numbers, got {list(offsets)}")
        repeated = sorted(set(e for e in chosen if chosen.count(e) > 1))
        if repeated:
            raise ValueError(f"exit layers {repeated} are given more than once, each with an offset of its own")
        schedule = sorted(zip(chosen, values))
        return tuple(layer for layer, _ in schedule), tuple(offset for _, offset in schedule)

    @staticmethod
    def check_kv_fill(kv_fill: str) -> str:
        if kv_fill not in KV_FILLS:
            raise ValueError(f"unknown kv_fill {kv_fill!r} (one of {', '.join(KV_FILLS)})")
        return kv_fill

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
        exits: Sequence[int] | None = None,
        simulate_exits: bool = False,
        exit_offsets: Sequence[float] | None = None,
        kv_fill: str | None = None,
    ) -> list[DecodeTrace]:
        """Greedy-decode one caption per image.

        `thresholds` is one value per row (or one for all); `FULL_DEPTH` (or anything above 1) runs every layer
        without evaluating exits. With `observe_exits`, every exit is evaluated and recorded but no token leaves
        early: the full-depth caption plus what each exit would have said (for analysis and calibration).
        `exits` picks which trained exits are consulted (default: the decoder's `exits` and `exit_offsets`):
        consulting fewer costs fewer checks, and skipping an over-confident shallow exit can keep quality.
        `exit_offsets` (one per consulted exit, default none when `exits` is given) raise or lower the threshold
        at each exit. With `simulate_exits`, every layer runs and each token is the first confident exit's
        (module docstring); its trace records the exits up to that one and that exit's layer, as if the token
        had left there. `kv_fill` (default: the decoder's) says how skipped layers' keys and values are filled.
        """
        if simulate_exits and observe_exits:
            raise ValueError("simulate_exits and observe_exits are exclusive")
        if exits is None and exit_offsets is None:
            consulted, offsets = self.exits, self.exit_offsets
        else:
            consulted, offsets = self.check_schedule(self.exits if exits is None else exits, exit_offsets)
        kv_fill = self.kv_fill if kv_fill is None else self.check_kv_fill(kv_fill)
        deferred = kv_fill == "deferred" and not (simulate_exits or observe_exits)
        offset_after = {layer - 1: offset for layer, offset in zip(consulted, offsets)}  # 0-based layer -> offset
        cfg = self.config
        batch = encoder_states.shape[0]
        device, dtype = encoder_states.device, encoder_states.dtype
        if max_tokens is None:
            max_tokens = cfg.n_positions - 1
        max_tokens = max(1, min(max_tokens, cfg.n_positions - 1))
        thresholds_list = _row_thresholds(thresholds, batch)
        L, H, hd = self.n_layer, self.n_head, self.d // self.n_head

        # cross-attention keys/values of every layer, in one product: (L, 2, B, H, P, hd)
        p = encoder_states.shape[1]
        # (batch x image tokens) rows x 2d per layer: large enough for oneDNN (models.kernels)
        with self._section("cross-attention keys and values"):
            cross = kernels.addmm(self.cross_bias, encoder_states.reshape(-1, self.d), self.cross_weight)
            cross = cross.view(batch, p, L, 2, H, hd).permute(2, 3, 0, 4, 1, 5).contiguous()
        # self-attention cache of every layer: (L, 2, B, H, T, hd)
        cache = torch.zeros(L, 2, batch, H, max_tokens, hd, device=device, dtype=dtype)

        traces = [DecodeTrace(threshold=t) for t in thresholds_list]
        alive = list(range(batch))  # original row of each active row
        pending = [PendingPositions() for _ in range(batch)] if deferred else []  # per active row
        tokens = torch.full((batch,), cfg.bos_token_id, dtype=torch.long, device=device)
        wte, wpe = self.model.decoder.transformer.wte.weight, self.model.decoder.transformer.wpe.weight

        for t in range(max_tokens):
            n = len(alive)
            h = wte[tokens] + wpe[t]  # (n, d)
            row_thr = [thresholds_list[row] for row in alive]
            records_exits = [observe_exits or thr_r <= 1.0 for thr_r in row_thr]
            check_exits = any(records_exits)
            rows = None  # None: all active rows are still running at this layer
            row_ids = list(range(n))  # active-row index of each running row
            next_list = [0] * n
            step_conf: list[list[float]] = [[] for _ in range(n)]
            step_points: list[list[int]] = [[] for _ in range(n)]
            step_preds: list[list[int]] = [[] for _ in range(n)]
            decided = [False] * n  # simulate_exits: the row's token is chosen, the row runs on
            # kv_fill="deferred": pending positions carried through this step's layers (their rows run on)
            catching_up = any(pend.positions for pend in pending)
            riders: list[tuple[int, int, int]] = []  # (active row, position, layer it joined at), per row of ride_h
            ride_h: torch.Tensor | None = None
            layout = None  # index tensors of a layer call with riders, rebuilt when the entries change

            for layer in range(L):
                if catching_up and layer:
                    joined, joined_riders = [], []
                    for r in row_ids:
                        positions, hidden = pending[r].take_tail(layer)
                        if positions:
                            joined_riders += [(r, position, layer) for position in positions]
                            joined.append(hidden)
                    if joined:  # joiners go first: each row's riders stay in position order
                        riders[:0] = joined_riders
                        ride_h = torch.cat(joined if ride_h is None else [*joined, ride_h])
                        layout = None
                with self._section("decoder layers"):
                    if ride_h is None:
                        h = self._block(layer, h, rows, cache, cross, t)
                    elif len(row_ids) == 1:  # one caption: its riders and token are positions t - m .. t
                        x = self._block_one_row(layer, torch.cat([ride_h, h]), row_ids[0], cache, cross, t)
                        ride_h, h = x[:-1], x[-1:]
                    else:
                        if layout is None:
                            layout = self._rider_layout(row_ids, rows, riders, t, device)
                        x = self._block_with_riders(layer, torch.cat([h, ride_h]), layout, cache, cross, t)
                        h, ride_h = x[: len(row_ids)], x[len(row_ids):]
                final_layer = layer == L - 1
                if not final_layer and not (check_exits and layer in offset_after):
                    continue
                offset = 0.0 if final_layer else offset_after[layer]
                with self._section("final head" if final_layer else "exit heads"):
                    conf, pred = self._head(layer + 1, h)
                    conf_list, pred_list = conf.tolist(), pred.tolist()
                stay = []
                for i, r in enumerate(row_ids):
                    if decided[r]:
                        continue  # row_ids only still holds it under simulate_exits, where it runs every layer
                    if final_layer or records_exits[r]:  # a full-depth row of a mixed batch evaluates no exits
                        step_conf[r].append(conf_list[i])
                        step_points[r].append(layer + 1)
                        step_preds[r].append(pred_list[i])
                    # a row above 1 evaluates no exit, even where a negative offset would bring its bar below 1
                    if final_layer or (records_exits[r] and not observe_exits
                                       and conf_list[i] >= row_thr[r] + offset):
                        next_list[r] = pred_list[i]
                        decided[r] = simulate_exits
                    else:
                        stay.append(i)
                if simulate_exits or len(stay) == len(row_ids):
                    continue  # nothing leaves (under simulate_exits every row runs every layer)
                if deferred:
                    with self._section("deferred bookkeeping"):
                        ride_h = self._leave_pending(layer, h, row_ids, stay, riders, ride_h, pending, traces,
                                                     alive, t)
                    layout = None  # the running rows change
                if final_layer:
                    continue
                if stay:
                    keep_index = torch.tensor(stay, device=device)
                    active = torch.arange(n, device=device) if rows is None else rows
                    if not deferred:
                        leave_mask = torch.ones(len(row_ids), dtype=torch.bool, device=device)
                        leave_mask[keep_index] = False
                        with self._section("state propagation"):
                            self._propagate(h[leave_mask], layer, active[leave_mask], cache, t)
                    rows, h = active[keep_index], h[keep_index]
                    row_ids = [row_ids[i] for i in stay]
                else:
                    if not deferred:
                        with self._section("state propagation"):
                            self._propagate(h, layer, rows, cache, t)
                    break  # every row has left: the remaining layers are not computed at all

            keep = []
            for r in range(n):
                trace = traces[alive[r]]
                trace.exit_confidences.append(step_conf[r])
                trace.exit_points.append(step_points[r])
                trace.exit_layers.append(L if observe_exits else step_points[r][-1])
                if observe_exits:
                    trace.exit_predictions.append(step_preds[r])
                trace.token_ids.append(next_list[r])
                if next_list[r] != cfg.eos_token_id:
                    keep.append(r)
            if not keep:
                break
            if len(keep) < n:  # finished captions leave the batch
                index = torch.tensor(keep, device=device)
                with self._section("finished captions leave the batch"):
                    cache, cross = cache.index_select(2, index), cross.index_select(2, index)
                alive = [alive[r] for r in keep]
                next_list = [next_list[r] for r in keep]
                if deferred:
                    pending = [pending[r] for r in keep]
            tokens = torch.tensor(next_list, dtype=torch.long, device=device)
        return traces

    def _section(self, name: str):
        return self.timer(name) if self.timer is not None else _NO_TIMING

    def _leave_pending(self, layer: int, h: torch.Tensor, row_ids: list[int], stay: list[int],
                       riders: list[tuple[int, int, int]], ride_h: torch.Tensor | None,
                       pending: list[PendingPositions], traces: list[DecodeTrace], alive: list[int],
                       t: int) -> torch.Tensor | None:
        """kv_fill="deferred": the running rows not in `stay` left after 0-based `layer`. Their token and the
        positions they carried stay pending at that depth (or are complete after the last layer), and their
        riders leave the layer calls (`riders` is updated in place; the riders' hidden states are returned)."""
        depth = layer + 1
        staying = {row_ids[i] for i in stay}
        carried_by: dict[int, list[int]] = defaultdict(list)  # leaving row -> its riders' indices
        kept = []
        for k, (r, _, _) in enumerate(riders):
            (kept if r in staying else carried_by[r]).append(k)
        for i, r in enumerate(row_ids):
            if r in staying:
                continue
            carried = sorted(carried_by.get(r, ()), key=lambda k: riders[k][1])  # in position order
            traces[alive[r]].catch_up_layers += sum(depth - riders[k][2] for k in carried)
            if depth == self.n_layer:
                continue  # every layer computed: nothing left pending
            hidden = h[i:i + 1] if not carried else torch.cat([ride_h[carried], h[i:i + 1]])
            pending[r].put_tail([riders[k][1] for k in carried] + [t], depth, hidden)
        if len(kept) < len(riders):
            riders[:] = [riders[k] for k in kept]
            ride_h = ride_h[kept] if kept else None
        return ride_h

    @staticmethod
    def _rider_layout(row_ids: list[int], rows: torch.Tensor | None, riders: list[tuple[int, int, int]], t: int,
                      device: torch.device) -> RiderLayout:
        """Where each entry of a layer call with riders goes: the running rows' tokens, then the riders (two
        running rows or more; one alone takes `_block_one_row`)."""
        running = len(row_ids)
        slot_of = {r: i for i, r in enumerate(row_ids)}
        counts = [1] * running
        entry_row, entry_slot, positions = list(range(running)), [0] * running, [t] * running
        for r, position, _ in riders:
            i = slot_of[r]
            entry_row.append(i)
            entry_slot.append(counts[i])
            counts[i] += 1
            positions.append(position)
        width = max(counts)
        position_index = torch.tensor(positions, device=device)
        entry_row_index, entry_slot_index = torch.tensor(entry_row, device=device), torch.tensor(entry_slot, device=device)
        # a padding slot sees position 0 only, so that no softmax is over nothing
        allowed = torch.zeros(running, width, t + 1, dtype=torch.bool, device=device)
        allowed[:, :, 0] = True
        allowed[entry_row_index, entry_slot_index] = \
            torch.arange(t + 1, device=device)[None, :] <= position_index[:, None]
        cache_rows = torch.tensor([row_ids[i] for i in entry_row], device=device)
        return RiderLayout(rows, cache_rows, position_index, allowed.unsqueeze(1), width,
                           (entry_row_index, entry_slot_index))

    def _block(self, layer: int, h: torch.Tensor, rows: torch.Tensor | None, cache: torch.Tensor,
               cross: torch.Tensor, t: int) -> torch.Tensor:
        """One decoder layer for the running rows (h: (n, d)), writing position t's keys/values into the cache.

        Plain tensor ops on pre-extracted weights: at batch 1 a layer is a few microseconds of arithmetic, so
        module-call overhead would otherwise be a large share of the time.
        """
        w = self.layer_weights[layer]
        n, H, d, eps = h.shape[0], self.n_head, self.d, self.eps
        hd = d // H
        # torch.layer_norm, select and narrow rather than F.layer_norm and Python indexing: the same kernels
        # with less per-call overhead, which is a visible share of a layer at batch 1
        qkv = torch.addmm(w.attn_b, torch.layer_norm(h, (d,), w.ln1_w, w.ln1_b, eps), w.attn_w)
        q, kv = qkv[:, :d], qkv[:, d:].view(n, 2, H, hd).transpose(0, 1)  # (2, n, H, hd)
        layer_cache = cache[layer]  # (2, B, H, T, hd)
        if rows is None:
            layer_cache.select(3, t).copy_(kv)
            past = layer_cache.narrow(3, 0, t + 1)
            keys, values = past[0], past[1]
            layer_cross = cross[layer]
            cross_k, cross_v = layer_cross[0], layer_cross[1]
        else:
            layer_cache[:, :, :, t].index_copy_(1, rows, kv)
            past = layer_cache[:, :, :, : t + 1].index_select(1, rows)
            keys, values = past[0], past[1]
            layer_cross = cross[layer].index_select(1, rows)
            cross_k, cross_v = layer_cross[0], layer_cross[1]
        attn = F.scaled_dot_product_attention(q.view(n, H, 1, hd), keys, values)
        h = torch.addmm(h + w.attn_proj_b, attn.view(n, d), w.attn_proj_w)
        x = torch.layer_norm(h, (d,), w.lnx_w, w.lnx_b, eps)
        q_cross = torch.addmm(w.q_b, x, w.q_w).view(n, H, 1, hd)
        attn = F.scaled_dot_product_attention(q_cross, cross_k, cross_v)
        h = torch.addmm(h + w.cross_proj_b, attn.view(n, d), w.cross_proj_w)
        return self._mlp(w, h)

    def _mlp(self, w: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        x = torch.layer_norm(h, (self.d,), w.ln2_w, w.ln2_b, self.eps)
        return torch.addmm(h + w.mlp_proj_b, F.gelu(torch.addmm(w.fc_b, x, w.fc_w), approximate="tanh"), w.mlp_proj_w)

    def _block_with_riders(self, layer: int, x: torch.Tensor, layout: RiderLayout, cache: torch.Tensor,
                           cross: torch.Tensor, t: int) -> torch.Tensor:
        """`_block` for the running rows' tokens plus pending positions riding along (x: (m, d), the entries of
        `layout`): each entry writes its own position's keys/values and attends to its row up to it."""
        w = self.layer_weights[layer]
        m, H, d, eps = x.shape[0], self.n_head, self.d, self.eps
        hd = d // H
        qkv = torch.addmm(w.attn_b, torch.layer_norm(x, (d,), w.ln1_w, w.ln1_b, eps), w.attn_w)
        q, kv = qkv[:, :d], qkv[:, d:].view(m, 2, H, hd)
        layer_cache = cache[layer]  # (2, B, H, T, hd)
        # written before anyone attends: a rider sees the riders before it in its row at this very layer
        layer_cache.permute(1, 3, 0, 2, 4).index_put_((layout.cache_rows, layout.positions), kv)
        past = layer_cache.narrow(3, 0, t + 1)
        layer_cross = cross[layer]
        if layout.rows is not None:
            past, layer_cross = past.index_select(1, layout.rows), layer_cross.index_select(1, layout.rows)
        attn = self._attend_by_row(q, past[0], past[1], layout, layout.mask)
        h = torch.addmm(x + w.attn_proj_b, attn, w.attn_proj_w)
        q_cross = torch.addmm(w.q_b, torch.layer_norm(h, (d,), w.lnx_w, w.lnx_b, eps), w.q_w)
        attn = self._attend_by_row(q_cross, layer_cross[0], layer_cross[1], layout, None)
        h = torch.addmm(h + w.cross_proj_b, attn, w.cross_proj_w)
        return self._mlp(w, h)

    def _block_one_row(self, layer: int, x: torch.Tensor, row: int, cache: torch.Tensor, cross: torch.Tensor,
                       t: int) -> torch.Tensor:
        """`_block` for one row's consecutive positions t - m + 1 .. t (x: (m, d), in order).

        A caption's pending positions always end at its current one: a token that runs every layer completes
        all of them, so they are the positions after the last such token, and the ones a layer carries are
        the latest of those. Slices and a causal mask then do what `_block_with_riders` needs index tensors for.
        """
        w = self.layer_weights[layer]
        m, H, d, eps = x.shape[0], self.n_head, self.d, self.eps
        hd = d // H
        start = t + 1 - m
        qkv = torch.addmm(w.attn_b, torch.layer_norm(x, (d,), w.ln1_w, w.ln1_b, eps), w.attn_w)
        q, kv = qkv[:, :d], qkv[:, d:].view(m, 2, 1, H, hd).permute(1, 2, 3, 0, 4)  # (2, 1, H, m, hd)
        layer_cache = cache[layer].narrow(1, row, 1)  # (2, 1, H, T, hd)
        layer_cache.narrow(3, start, m).copy_(kv)
        past = layer_cache.narrow(3, 0, t + 1)
        # 4-d inputs: the fused CPU attention kernel takes those, 3-d ones fall back to the slow reference
        causal = self._causal_mask(t + 1, x.device, x.dtype)[start:]  # position start + i sees those <= start + i
        attn = F.scaled_dot_product_attention(q.view(1, m, H, hd).transpose(1, 2), past[0], past[1], attn_mask=causal)
        h = torch.addmm(x + w.attn_proj_b, attn.transpose(1, 2).reshape(m, d), w.attn_proj_w)
        q_cross = torch.addmm(w.q_b, torch.layer_norm(h, (d,), w.lnx_w, w.lnx_b, eps), w.q_w)
        layer_cross = cross[layer].narrow(1, row, 1)  # (2, 1, H, P, hd)
        attn = F.scaled_dot_product_attention(q_cross.view(1, m, H, hd).transpose(1, 2), layer_cross[0], layer_cross[1])
        h = torch.addmm(h + w.cross_proj_b, attn.transpose(1, 2).reshape(m, d), w.cross_proj_w)
        return self._mlp(w, h)

    def _causal_mask(self, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(size, size) additive causal mask (0 or -inf), cached: a slice of one made for every position."""
        mask = self._causal.get((device, dtype))
        if mask is None:
            n = self.config.n_positions
            future = torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
            mask = torch.zeros(n, n, device=device, dtype=dtype).masked_fill(future, float("-inf"))
            self._causal[(device, dtype)] = mask
        return mask[:size, :size]

    def _attend_by_row(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: RiderLayout,
                       mask: torch.Tensor | None) -> torch.Tensor:
        """Attention for entries (q: (m, d)) against their rows' keys/values ((running, H, S, hd)); (m, d) out."""
        d, H = self.d, self.n_head
        running, width = keys.shape[0], layout.width
        grouped = q.new_zeros(running, width, d)  # padded: each running row's token and riders, in slots
        grouped[layout.slots] = q
        grouped = grouped.view(running, width, H, d // H)
        out = F.scaled_dot_product_attention(grouped.transpose(1, 2), keys, values, attn_mask=mask)
        return out.transpose(1, 2).reshape(running, width, d)[layout.slots]

    def _head(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Confidence (max softmax probability) and argmax of the exit after 1-based `layer` (n_layer: final)."""
        ln_w, ln_b, proj = self.heads[layer]
        logits = F.linear(torch.layer_norm(h, (self.d,), ln_w, ln_b, self.eps), proj)
        return torch.softmax(logits, dim=-1, dtype=torch.float32).max(dim=-1)

    def _propagate(self, hidden: torch.Tensor, layer: int, rows: torch.Tensor | None, cache: torch.Tensor,
                   t: int) -> None:
        """Fill the K/V cache of layers after `layer` (0-based) at position t from the exited hidden state
        (rows: the cache rows of `hidden`; None: all of them, in order)."""
        first = layer + 1
        count, H, hd = self.n_layer - first, self.n_head, self.d // self.n_head
        start = first * 2 * self.d
        normed = torch.layer_norm(hidden, (self.d,), None, None, self.eps)
        kv = kernels.linear(normed, self.prop_weight[start:], self.prop_bias[start:])
        kv = kv.view(-1, count, 2, H, hd).permute(1, 2, 0, 3, 4)  # (count, 2, n, H, hd)
        target = cache[first:].select(4, t)  # (count, 2, B, H, hd)
        if rows is None:
            target.copy_(kv)
        else:
            target.index_copy_(2, rows, kv)
