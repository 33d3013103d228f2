"""The early-exit engine must compute exactly what the model defines, and skip what it says it skips."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.decoding import FULL_DEPTH, EarlyExitDecoder
from models.model import CapeenModel
from tests.test_model import small_config


@torch.no_grad()
def reference_decode(model: CapeenModel, encoder_states: torch.Tensor, threshold: float, max_tokens: int,
                     simulate: bool = False, offsets: dict[int, float] | None = None):
    """Plain re-implementation, one image at a time, no cache: every layer's K/V recomputed from its stored input.

    A token that leaves after layer e hands its hidden state to the skipped layers as their input at that
    position (CALM state propagation), which is what the engine's folded projections must reproduce. With
    `simulate`, every layer runs and the token is the first confident exit's (the paper's evaluation).
    `offsets` (1-based exit layer -> offset) raise the threshold at each exit.
    """
    offsets = offsets or {}
    cfg = model.config
    blocks = model.decoder.transformer.h
    cross = model.decoder.cross_kv(encoder_states)
    layer_inputs: list[list[torch.Tensor]] = [[] for _ in range(cfg.n_layer)]  # per layer, per position (1, d)
    token, tokens, exits = cfg.bos_token_id, [], []
    for t in range(max_tokens):
        h = model.decoder.transformer.wte.weight[token] + model.decoder.transformer.wpe.weight[t]
        h = h[None]
        exited_at, chosen = cfg.n_layer, None
        for layer, block in enumerate(blocks):
            layer_inputs[layer].append(h)
            seq = torch.cat(layer_inputs[layer])  # (t+1, d)
            q, k, v = block.attn.c_attn(block.ln_1(seq)).split(cfg.n_embd, dim=-1)
            heads = lambda x: x.view(x.shape[0], cfg.n_head, -1).transpose(0, 1)
            att = F.scaled_dot_product_attention(heads(q[-1:]), heads(k), heads(v))
            h = h + block.attn.c_proj(att.transpose(0, 1).reshape(1, -1))
            ck, cv = cross[layer]
            qc = block.crossattention.q_attn(block.ln_cross_attn(h)).view(cfg.n_head, 1, -1)
            att = F.scaled_dot_product_attention(qc, ck[0], cv[0])
            h = h + block.crossattention.c_proj(att.transpose(0, 1).reshape(1, -1))
            h = h + block.mlp(block.ln_2(h))
            logits = model.exit_logits(layer + 1, h) if (layer + 1) in cfg.exit_layers or layer + 1 == cfg.n_layer else None
            if logits is None:
                continue
            conf, pred = F.softmax(logits, -1).max(-1)
            if simulate:
                if chosen is None and (layer + 1 == cfg.n_layer or float(conf) >= threshold):
                    exited_at, chosen = layer + 1, int(pred)
                continue
            if layer + 1 == cfg.n_layer or float(conf) >= threshold + offsets.get(layer + 1, 0.0):
                exited_at = layer + 1
                for later in range(layer + 1, cfg.n_layer):
                    layer_inputs[later].append(h)
                break
        token = chosen if simulate else int(pred)
        tokens.append(token)
        exits.append(exited_at)
        if token == cfg.eos_token_id:
            break
    return tokens, exits


def sharp_small_model() -> CapeenModel:
    """A random 6-layer model whose exits really fire at mid thresholds (tests/test_cuda.py uses it too)."""
    torch.manual_seed(3)
    m = CapeenModel(small_config(n_layer=6, exit_layers=[1, 2, 3, 4, 5], vocab_size=12)).eval()
    # sharpen the heads so that confidences spread over [0, 1] and exits actually happen at mid thresholds
    with torch.no_grad():
        for head in m.exits.values():
            head.proj.weight.mul_(5)
    return m


@pytest.fixture(scope="module")
def model():
    return sharp_small_model()


@pytest.mark.parametrize("threshold", [FULL_DEPTH, 0.0, 0.5, 0.8, 0.9])
def test_engine_matches_the_plain_reference(model, threshold):
    engine = EarlyExitDecoder(model)
    torch.manual_seed(1)
    states = torch.randn(4, 5, model.config.n_embd)
    seen_layers = set()
    with torch.no_grad():
        traces = engine.decode(states, threshold, max_tokens=10)
        for row, trace in enumerate(traces):
            tokens, exits = reference_decode(model, states[row:row + 1], threshold, 10)
            assert trace.token_ids == tokens
            assert trace.exit_layers == exits
            seen_layers.update(exits)
    if threshold == 0.8:  # the fixture is tuned so that this threshold mixes early, middle and full-depth exits
        assert {1, 2, 6} <= seen_layers


def test_per_exit_offsets_set_each_exits_threshold(model):
    """A calibrated schedule: threshold 0.7 with offsets asks 1.0 at exit 1 down to 0.6 at exit 5."""
    offsets = (0.3, 0.2, 0.1, 0.0, -0.1)
    torch.manual_seed(1)
    states = torch.randn(6, 5, model.config.n_embd)
    scheduled = EarlyExitDecoder(model, exits=[1, 2, 3, 4, 5], exit_offsets=offsets)
    plain = EarlyExitDecoder(model)
    by_default = scheduled.decode(states, 0.7, max_tokens=10)
    passed = plain.decode(states, 0.7, max_tokens=10, exits=[1, 2, 3, 4, 5], exit_offsets=offsets)
    differs = False
    for row in range(6):
        tokens, exits = reference_decode(model, states[row:row + 1], 0.7, 10, offsets=dict(zip(range(1, 6), offsets)))
        for trace in (by_default[row], passed[row]):
            assert trace.token_ids == tokens and trace.exit_layers == exits
        differs |= exits != plain.decode(states[row:row + 1], 0.7, max_tokens=10)[0].exit_layers
    assert differs  # the offsets changed where some token left
    # explicit exits without offsets mean none, not the decoder's default ones
    bare = scheduled.decode(states, 0.7, max_tokens=10, exits=[1, 2, 3, 4, 5])
    assert [t.exit_layers for t in bare] == [t.exit_layers for t in plain.decode(states, 0.7, max_tokens=10)]
    with pytest.raises(ValueError, match="2 exit offsets for 5 exits"):
        plain.decode(states, 0.7, exits=[1, 2, 3, 4, 5], exit_offsets=(0.1, 0.2))
    with pytest.raises(ValueError, match="finite"):
        EarlyExitDecoder(model, exits=[1], exit_offsets=[float("nan")])


def test_each_offset_stays_with_its_exit_in_whatever_order_they_are_given(model):
    # a hand-written thresholds.json or `capeen evaluate --exits 5,1,... --exit-offsets ...` need not be sorted
    schedule = {5: -0.1, 1: 0.3, 4: 0.0, 2: 0.2, 3: 0.1}
    torch.manual_seed(1)
    states = torch.randn(6, 5, model.config.n_embd)
    shuffled = EarlyExitDecoder(model, exits=list(schedule), exit_offsets=list(schedule.values()))
    assert (shuffled.exits, shuffled.exit_offsets) == ((1, 2, 3, 4, 5), (0.3, 0.2, 0.1, 0.0, -0.1))
    passed = EarlyExitDecoder(model).decode(states, 0.7, max_tokens=10, exits=list(schedule),
                                            exit_offsets=list(schedule.values()))
    for row, (trace, passed_trace) in enumerate(zip(shuffled.decode(states, 0.7, max_tokens=10), passed)):
        tokens, exits = reference_decode(model, states[row:row + 1], 0.7, 10, offsets=schedule)
        assert (trace.token_ids, trace.exit_layers) == (passed_trace.token_ids, passed_trace.exit_layers) \
            == (tokens, exits)
    with pytest.raises(ValueError, match=r"exit layers \[3\] are given more than once"):
        EarlyExitDecoder(model, exits=[3, 1, 3], exit_offsets=[0.1, 0.0, 0.2])


@pytest.mark.parametrize("kv_fill, simulate", [("propagate", False), ("deferred", False), ("deferred", True)])
def test_a_threshold_above_1_runs_every_layer_even_where_a_negative_offset_lowers_the_bar(model, kv_fill, simulate):
    # thresholds above 1 mean full depth; a schedule's negative offsets must not let such a row leave at an exit
    # where it recorded nothing (that used to fail the whole batch) when it shares a batch with an early-exit row
    decoder = EarlyExitDecoder(model, exit_offsets=[-0.5] * 5, kv_fill=kv_fill)
    torch.manual_seed(2)
    states = torch.randn(2, 5, model.config.n_embd)
    mixed = decoder.decode(states, [1.05, 0.6], max_tokens=8, simulate_exits=simulate)
    alone = [decoder.decode(states[row:row + 1], [t], max_tokens=8, simulate_exits=simulate)[0]
             for row, t in enumerate([1.05, 0.6])]
    assert [(t.token_ids, t.exit_layers) for t in mixed] == [(t.token_ids, t.exit_layers) for t in alone]
    assert set(mixed[0].exit_layers) == {model.config.n_layer}
    assert set(mixed[1].exit_layers) != {model.config.n_layer}


def test_thresholds_come_as_numbers_lists_arrays_or_tensors_and_nan_is_refused(model):
    decoder = EarlyExitDecoder(model)
    torch.manual_seed(1)
    states = torch.randn(3, 5, model.config.n_embd)
    expected = [t.token_ids for t in decoder.decode(states, [0.5, 0.5, 0.5], max_tokens=10)]
    for thresholds in (0.5, np.float64(0.5), np.array(0.5), np.full(3, 0.5), torch.tensor(0.5, dtype=torch.float64),
                       torch.full((3,), 0.5, dtype=torch.float64), (0.5, 0.5, 0.5)):
        assert [t.token_ids for t in decoder.decode(states, thresholds, max_tokens=10)] == expected, thresholds
    with pytest.raises(ValueError, match="got 2 thresholds for 3 images"):
        decoder.decode(states, np.full(2, 0.5))
    with pytest.raises(ValueError, match="thresholds must be numbers"):
        decoder.decode(states, [0.5, float("nan"), 0.5])


def test_full_depth_runs_every_layer_and_zero_threshold_leaves_at_the_first_exit(model):
    engine = EarlyExitDecoder(model)
    states = torch.randn(2, 5, model.config.n_embd)
    full = engine.decode(states, FULL_DEPTH, max_tokens=8)
    eager = engine.decode(states, 0.0, max_tokens=8)
    assert all(layer == 6 for trace in full for layer in trace.exit_layers)
    assert all(layer == 1 for trace in eager for layer in trace.exit_layers)
    assert all(len(c) == 1 for trace in full for c in trace.exit_confidences)  # no exit evaluated at full depth


@pytest.mark.parametrize("kv_fill, seed", [("propagate", 1), ("deferred", 2)])
def test_a_caption_does_not_depend_on_its_batch(model, kv_fill, seed):
    engine = EarlyExitDecoder(model, kv_fill=kv_fill)
    torch.manual_seed(seed)
    states = torch.randn(8, 5, model.config.n_embd)
    thresholds = [0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, FULL_DEPTH]
    batched = engine.decode(states, thresholds, max_tokens=10)
    for row in range(8):
        alone = engine.decode(states[row:row + 1], thresholds[row], max_tokens=10)[0]
        assert alone.token_ids == batched[row].token_ids
        assert alone.exit_layers == batched[row].exit_layers
        assert alone.catch_up_layers == batched[row].catch_up_layers
        for a, b in zip(alone.exit_confidences, batched[row].exit_confidences):
            assert a == pytest.approx(b, abs=1e-5)
    assert batched[7].catch_up_layers == 0 and set(batched[7].exit_layers) == {6}  # full depth leaves nothing behind


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.8])
def test_simulated_exits_compute_every_layer_and_take_the_first_confident_exit(model, threshold):
    engine = EarlyExitDecoder(model)
    torch.manual_seed(4)
    states = torch.randn(4, 5, model.config.n_embd)
    simulated = engine.decode(states, threshold, max_tokens=10, simulate_exits=True)
    real = engine.decode(states, threshold, max_tokens=10)
    for row in range(4):
        tokens, exits = reference_decode(model, states[row:row + 1], threshold, 10, simulate=True)
        assert simulated[row].token_ids == tokens and simulated[row].exit_layers == exits
        # the trace ends at the exit the token was taken from, as a real exit's would
        assert [points[-1] for points in simulated[row].exit_points] == exits
    if threshold == 0.0:  # every token from exit 1: the same tokens whether or not later layers ran
        assert [t.token_ids for t in simulated] == [t.token_ids for t in real]
    with pytest.raises(ValueError, match="exclusive"):
        engine.decode(states, threshold, simulate_exits=True, observe_exits=True)


def test_observe_exits_records_every_exit_without_leaving(model):
    engine = EarlyExitDecoder(model)
    states = torch.randn(2, 5, model.config.n_embd)
    observed = engine.decode(states, 0.5, max_tokens=8, observe_exits=True)
    full = engine.decode(states, FULL_DEPTH, max_tokens=8)
    for o, f in zip(observed, full):
        assert o.token_ids == f.token_ids
        assert all(points == [1, 2, 3, 4, 5, 6] for points in o.exit_points)
        assert all(len(p) == 6 for p in o.exit_predictions)
        assert o.confidences == pytest.approx(f.confidences, abs=1e-5)


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9])
def test_deferred_kv_fill_gives_the_exact_tokens_of_simulated_exits_while_skipping(model, threshold):
    """Deferred keys and values are computed exactly, later: the same tokens and exits as the paper's simulation
    (every layer run), and each position is computed as deep as the deepest token after it needed."""
    engine = EarlyExitDecoder(model, kv_fill="deferred")
    torch.manual_seed(1)
    states = torch.randn(8, 5, model.config.n_embd)
    batched = engine.decode(states, threshold, max_tokens=10)
    caught_up = 0
    for row in range(8):
        tokens, exits = reference_decode(model, states[row:row + 1], threshold, 10, simulate=True)
        alone = engine.decode(states[row:row + 1], threshold, max_tokens=10)[0]
        for trace in (batched[row], alone):
            assert trace.token_ids == tokens and trace.exit_layers == exits
            depths = [max(exits[p:]) for p in range(len(exits))]  # what the tokens after each one needed
            assert trace.catch_up_layers == sum(depths) - sum(exits)
            assert trace.layers_computed() == sum(depths)
        caught_up += alone.catch_up_layers
    assert caught_up > 0  # some tokens did leave early and were caught up later
    # CALM propagation approximates the same keys and values: later tokens see different states
    propagated = EarlyExitDecoder(model).decode(states, threshold, max_tokens=10)
    gaps = [abs(a - b) for p, d in zip(propagated, batched) if p.token_ids == d.token_ids
            for pc, dc in zip(p.exit_confidences, d.exit_confidences) for a, b in zip(pc, dc)]
    assert max(gaps) > 1e-3


def test_kv_fill_is_chosen_per_decoder_or_per_call(model):
    states = torch.randn(3, 5, model.config.n_embd)
    deferred = EarlyExitDecoder(model, kv_fill="deferred").decode(states, 0.8, max_tokens=10)
    per_call = EarlyExitDecoder(model).decode(states, 0.8, max_tokens=10, kv_fill="deferred")
    assert [t.token_ids for t in deferred] == [t.token_ids for t in per_call]
    with pytest.raises(ValueError, match="unknown kv_fill 'exact'"):
        EarlyExitDecoder(model, kv_fill="exact")
    with pytest.raises(ValueError, match="unknown kv_fill"):
        EarlyExitDecoder(model).decode(states, 0.8, kv_fill="")


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.8, 0.9])
def test_the_bandit_counts_deferred_catch_up_as_the_decoder_does(model, threshold):
    """The reward charges, under deferred fill, the layers a later, deeper token makes the decoder compute for
    earlier ones (bandit.layers_computed); it must be exactly the decoder's own count, for any arm."""
    from bandit import layers_computed

    torch.manual_seed(4)
    states = torch.randn(6, 5, model.config.n_embd)
    caught_up = 0
    for trace in EarlyExitDecoder(model, kv_fill="deferred").decode(states, threshold, max_tokens=10):
        exits = np.asarray(trace.exit_layers)
        assert int((layers_computed(exits, True) - exits).sum()) == trace.catch_up_layers
        assert np.array_equal(layers_computed(exits, False), exits)
        caught_up += trace.catch_up_layers
    if threshold in (0.5, 0.8):  # exits in mixed depths: the comparison above was not all zeros
        assert caught_up > 0
