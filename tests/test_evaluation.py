"""Evaluation, calibration and the Hugging Face export, on the tiny random checkpoint and a tiny synthetic data set."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from models.calibration import (
    ExitObservations,
    calibrate,
    candidate_exit_sets,
    choose_setting,
    decode_cost,
    propose_schedules,
    schedule_outcome,
    search_schedule,
    share_lower_bound,
)
from models.checkpoint import Thresholds, load_checkpoint, save_thresholds
from models.decoding import FULL_DEPTH
from models.engine import CaptionEngine
from models.evaluation import Distortion, caption_metrics, evaluate_thresholds, exit_agreement, load_eval_set
from models.hf_export import to_hf_vision_encoder_decoder
from models.plots import plot_sweeps
from models.preprocess import normalize
from models.synthetic import generate_dataset

N_LAYER = 4  # tests.conftest.tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-data") / "shapes"
    generate_dataset(out, 2, 6, 6, seed=3, image_size=32, workers=1)
    return out


@pytest.fixture(scope="module")
def eval_set(data_dir):
    return load_eval_set(str(data_dir), "test", 32)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return CaptionEngine.from_checkpoint(tiny_checkpoint, device="cpu")


# ----- distortions ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, kind, amount, shown", [
    ("none", "none", 0.0, "none"), ("", "none", 0.0, "none"), ("clean", "none", 0.0, "none"),
    ("noise:10", "noise", 10.0, "noise:10"), ("blur:1.5", "blur", 1.5, "blur:1.5"),
    ("noise:0", "noise", 0.0, "noise:0"),
])
def test_distortion_parse_accepts_documented_forms(text, kind, amount, shown):
    d = Distortion.parse(text)
    assert (d.kind, d.amount, str(d)) == (kind, amount, shown)
    assert Distortion.parse(str(d)) == d


@pytest.mark.parametrize("text", ["foo", "noise", "noise:", "blur:abc", "noise:-1", "blur:300", "gauss:2", "noise=3"])
def test_distortion_parse_rejects_bad_strings_with_a_message_naming_them(text):
    with pytest.raises(ValueError) as info:
        Distortion.parse(text)
    assert repr(text) in str(info.value) and "\n" not in str(info.value)


@pytest.fixture(scope="module")
def pixels():
    return torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("text", ["noise:20", "blur:1.5"])
def test_distortion_apply_is_deterministic_per_seed_and_changes_pixels(pixels, text):
    d = Distortion.parse(text)
    a, b = d.apply(pixels, seed=5), d.apply(pixels, seed=5)
    assert a.dtype == torch.uint8 and a.shape == pixels.shape
    assert torch.equal(a, b)
    assert (a != pixels).float().mean() > 0.3
    if d.kind == "noise":
        assert not torch.equal(a, d.apply(pixels, seed=6))
        # zero-mean noise: the image stays the same image on average
        assert abs(a.float().mean() - pixels.float().mean()) < 2.0


@pytest.mark.parametrize("text", ["none", "noise:0", "blur:0"])
def test_no_distortion_leaves_pixels_alone(pixels, text):
    assert torch.equal(Distortion.parse(text).apply(pixels, seed=1), pixels)


# ----- metrics --------------------------------------------------------------------------------------------------
REFS = [
    ["a red circle on the left", "one red circle"],
    ["two blue squares", "a pair of blue squares"],
    ["a green star and a yellow triangle", "a yellow triangle and a green star"],
    ["a large white diamond", "one big white diamond"],
]


def test_caption_metrics_high_for_identical_low_for_unrelated_captions():
    same = caption_metrics([r[0] for r in REFS], REFS)
    unrelated = caption_metrics(["purple dog jumps high"] * len(REFS), REFS)
    shuffled = caption_metrics([REFS[(i + 1) % len(REFS)][0] for i in range(len(REFS))], REFS)
    assert same["bleu4"] > 0.99 and same["ciderD"] > 3.0 and same["rougeL"] > 0.99
    assert unrelated["bleu4"] < 0.01 and unrelated["ciderD"] < 0.01 and unrelated["rougeL"] == 0.0
    # captions are scored against their own image's references
    assert shuffled["ciderD"] < same["ciderD"] / 3 and shuffled["bleu4"] < same["bleu4"]
    assert {f"bleu{n}" for n in range(1, 5)} <= set(same)


def test_caption_metrics_handles_empty_captions():
    scores = caption_metrics([""] * len(REFS), REFS)
    assert scores["ciderD"] == 0.0 and scores["bleu4"] < 0.01


# ----- interleaved evaluation -----------------------------------------------------------------------------------
def test_eval_set_has_pixels_references_and_objects(eval_set):
    assert eval_set.pixels.shape == (6, 3, 32, 32) and eval_set.pixels.dtype == torch.uint8
    assert len(eval_set.references) == 6 and all(len(r) == 5 for r in eval_set.references)
    assert eval_set.objects is not None and len(eval_set.objects) == 6


def test_evaluate_thresholds_reports_full_depth_and_each_threshold(engine, eval_set):
    grid = [0.3, 0.6, 0.95]
    report = evaluate_thresholds(engine, eval_set, grid, batch_size=2, progress=False)
    assert report["images"] == 6 and report["batch_size"] == 2 and report["distortion"] == "none"
    full = report["full"]
    assert full["threshold"] is None
    assert full["mean_exit_layer"] == N_LAYER and full["layers_saved"] == 0.0
    assert full["decoder_speedup"] == 1.0 and full["end_to_end_speedup"] == 1.0
    assert [e["threshold"] for e in report["thresholds"]] == grid
    assert all(e["exit_layers"] == [1, 2, 3] for e in report["thresholds"])  # every trained exit by default
    assert full["heads_per_token"] == 1.0  # full depth checks no exit, only the final head
    for entry in [full, *report["thresholds"]]:
        for key in ("bleu4", "ciderD", "rougeL", "scene_accuracy", "decode_ms_per_caption", "tokens_per_caption"):
            assert key in entry
        assert entry["decoder_speedup"] > 0 and entry["end_to_end_speedup"] > 0
        assert entry["decode_ms_per_caption"] > 0
        assert 1 <= entry["mean_exit_layer"] <= N_LAYER
        assert entry["layers_saved"] == pytest.approx(1 - entry["mean_exit_layer"] / N_LAYER)
        assert 1 <= entry["tokens_per_caption"] <= engine.config.n_positions - 1
    # the tiny checkpoint's heads are sharp enough that a low threshold really exits early
    assert report["thresholds"][0]["mean_exit_layer"] < N_LAYER


def test_simulated_exits_are_reported_beside_the_real_ones(engine, eval_set, tmp_path):
    report = evaluate_thresholds(engine, eval_set, [0.3, 0.6], batch_size=3, progress=False, simulated=True)
    entries = report["thresholds"]
    assert [(e["threshold"], e["simulated"]) for e in entries] == [(0.3, False), (0.3, True), (0.6, False),
                                                                  (0.6, True)]
    assert report["full"]["simulated"] is False
    for simulated in entries[1::2]:
        assert 1 <= simulated["mean_exit_layer"] < N_LAYER  # the layer count the paper would report
    plot_sweeps([{**report, "checkpoint": "tiny"}], tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_evaluate_thresholds_with_a_subset_of_exits(engine, eval_set):
    report = evaluate_thresholds(engine, eval_set, [0.3], batch_size=6, exit_sets=[(2,)], progress=False)
    (entry,) = report["thresholds"]
    assert entry["exit_layers"] == [2]
    assert entry["mean_exit_layer"] >= 2 and 1.0 <= entry["heads_per_token"] <= 2.0


def test_evaluate_thresholds_under_a_distortion(engine, eval_set):
    report = evaluate_thresholds(engine, eval_set, [0.5], batch_size=3, distortion=Distortion.parse("noise:30"),
                                 progress=False)
    assert report["distortion"] == "noise:30"
    assert report["full"]["mean_exit_layer"] == N_LAYER and len(report["thresholds"]) == 1


def test_exit_agreement_is_a_fraction_per_exit_layer(engine, eval_set):
    agreement = exit_agreement(engine, eval_set, batch_size=4)
    assert sorted(agreement) == [1, 2, 3]
    assert all(0.0 <= v <= 1.0 for v in agreement.values())


def test_exit_agreement_is_one_for_an_exit_identical_to_the_final_layer(tiny_checkpoint, eval_set):
    ckpt = load_checkpoint(tiny_checkpoint)
    model = ckpt.model
    with torch.no_grad():
        model.init_exits_from_final_head()
        last = model.decoder.transformer.h[-1]  # make the last layer the identity: exit 3 == final head
        for proj in (last.attn.c_proj, last.crossattention.c_proj, last.mlp.c_proj):
            proj.weight.zero_()
            proj.bias.zero_()
    agreement = exit_agreement(CaptionEngine(ckpt, "cpu"), eval_set)
    assert agreement[3] == 1.0
    assert all(0.0 <= v <= 1.0 for v in agreement.values())


# ----- calibration ----------------------------------------------------------------------------------------------
def _entry(threshold, cider, mean_exit, heads, exits=(1, 2, 3)):
    return {"threshold": threshold, "exit_layers": list(exits), "ciderD": cider, "mean_exit_layer": mean_exit,
            "heads_per_token": heads}


SWEEP = [
    _entry(0.5, 0.70, 1.5, 1.5),
    _entry(0.8, 0.95, 2.5, 2.5),
    _entry(0.85, 0.97, 2.5, 2.5),
    _entry(0.9, 0.99, 3.0, 3.0),
    _entry(0.99, 1.00, 3.8, 3.5),
]


@pytest.mark.parametrize("fraction, expected", [(0.9, 0.85), (0.98, 0.9), (1.0, 0.99), (0.5, 0.5)])
def test_choose_setting_picks_the_cheapest_entry_meeting_the_floor(fraction, expected):
    chosen = choose_setting(SWEEP, {"ciderD": 1.0}, fraction, head_cost_ratio=0.0)
    assert chosen["threshold"] == expected


def test_choose_setting_counts_head_checks_at_their_cost():
    many_heads = _entry(0.9, 1.0, 2.0, 3.0, exits=(1, 2, 3))
    few_heads = _entry(0.9, 1.0, 2.5, 1.0, exits=(3,))
    sweep = [many_heads, few_heads]
    assert choose_setting(sweep, {"ciderD": 1.0}, 0.99, head_cost_ratio=0.0) is many_heads
    assert choose_setting(sweep, {"ciderD": 1.0}, 0.99, head_cost_ratio=0.5) is few_heads  # 3.5 vs 3.0
    assert decode_cost(many_heads, 0.5) == pytest.approx(3.5)


def test_choose_setting_counts_catch_up_layers_at_their_cost():
    """Deferred keys and values: a setting that leaves early but leaves much to catch up can cost more."""
    early = dict(_entry(0.7, 1.0, 3.0, 2.0), catch_up_layers_per_token=5.0)
    late = dict(_entry(0.9, 1.0, 5.0, 2.0), catch_up_layers_per_token=1.0)
    sweep = [early, late]
    assert choose_setting(sweep, {"ciderD": 1.0}, 0.99, head_cost_ratio=0.0) is early  # catch-up free
    assert choose_setting(sweep, {"ciderD": 1.0}, 0.99, head_cost_ratio=0.0, catch_up_ratio=0.6) is late  # 6.0 vs 5.6
    assert decode_cost(early, 0.0, 0.6) == pytest.approx(6.0)
    assert decode_cost(_entry(0.9, 1.0, 2.0, 1.0), 0.0, 0.6) == pytest.approx(2.0)  # propagate: none to catch up


def test_choose_setting_none_when_nothing_meets_the_floor():
    assert choose_setting(SWEEP, {"ciderD": 2.0}, 0.99, head_cost_ratio=0.1) is None
    assert choose_setting([], {"ciderD": 1.0}, 0.5, head_cost_ratio=0.1) is None


def test_choose_setting_other_metric():
    sweep = [dict(_entry(0.5, 0.0, 1.0, 1.0), bleu4=0.9), dict(_entry(0.9, 1.0, 3.0, 3.0), bleu4=0.5)]
    full = {"ciderD": 1.0, "bleu4": 1.0}
    assert choose_setting(sweep, full, 0.8, head_cost_ratio=0.0, metric="bleu4")["threshold"] == 0.5
    assert choose_setting(sweep, full, 0.8, head_cost_ratio=0.0)["threshold"] == 0.9


def test_choose_setting_by_lower_bound_skips_a_setting_that_passes_by_luck():
    lucky = dict(_entry(0.6, 0.995, 2.0, 2.0), ciderD_share_lower_bound=0.97)
    sure = dict(_entry(0.8, 0.995, 3.0, 3.0), ciderD_share_lower_bound=0.991)
    sweep = [lucky, sure]
    assert choose_setting(sweep, {"ciderD": 1.0}, 0.99, head_cost_ratio=0.0) is lucky
    assert choose_setting(sweep, {"ciderD": 1.0}, 0.99, head_cost_ratio=0.0, lower_bound=True) is sure
    assert choose_setting(sweep, {"ciderD": 1.0}, 0.995, head_cost_ratio=0.0, lower_bound=True) is None


def test_share_lower_bound_of_a_uniform_loss_is_the_loss():
    full = np.linspace(1.0, 5.0, 50)
    assert share_lower_bound(full, full, 0.95) == pytest.approx(1.0)
    assert share_lower_bound(0.98 * full, full, 0.95) == pytest.approx(0.98)


def test_share_lower_bound_falls_below_the_measured_share_and_tightens_with_more_images():
    """Per-image scores that scatter around full depth's: the bound sits below the measured share, by less
    when there are more images, and by more at a higher confidence. Repeatable."""
    rng = np.random.default_rng(7)
    full = rng.uniform(2.0, 6.0, 4000)
    kept = full * rng.choice([1.0, 0.5], size=4000, p=[0.98, 0.02])  # a few captions lose half their score
    share = kept.sum() / full.sum()
    small = share_lower_bound(kept[:200], full[:200], 0.95)
    large = share_lower_bound(kept, full, 0.95)
    assert small < kept[:200].sum() / full[:200].sum() and large < share
    assert share - large < (kept[:200].sum() / full[:200].sum() - small) / 2
    assert share_lower_bound(kept, full, 0.99) < large
    assert share_lower_bound(kept, full, 0.95) == large


def test_share_lower_bound_needs_paired_scores():
    with pytest.raises(ValueError, match="paired"):
        share_lower_bound([1.0, 2.0], [1.0], 0.95)
    with pytest.raises(ValueError, match="paired"):
        share_lower_bound([], [], 0.95)
    assert share_lower_bound([0.0, 0.0], [0.0, 0.0], 0.95) == 1.0  # nothing to lose


def test_per_image_cider_averages_to_the_corpus_score():
    references = [["a red circle", "one red circle"], ["two blue squares", "a pair of blue squares"],
                  ["a small green star", "one green star"]]
    scores = caption_metrics(["a red circle", "two red squares", "a green star"], references, per_image=True)
    assert len(scores["ciderD_per_image"]) == 3
    assert np.mean(scores["ciderD_per_image"]) == pytest.approx(scores["ciderD"])
    assert scores["ciderD_per_image"][0] > scores["ciderD_per_image"][1]
    assert "ciderD_per_image" not in caption_metrics(["a red circle"], references[:1])


@pytest.mark.parametrize("layers, expected", [
    ([1, 2, 3], [(1, 2, 3), (2, 3), (2,), (3,)]),
    ([3, 1, 2], [(1, 2, 3), (2, 3), (2,), (3,)]),
    ([1], [(1,)]),
    ([2, 4], [(2, 4), (4,)]),
])
def test_candidate_exit_sets(layers, expected):
    assert candidate_exit_sets(layers) == expected


def test_calibrate_result_is_saved_and_loaded_with_its_sweep(engine, data_dir, tiny_checkpoint, tmp_path):
    val = load_eval_set(str(data_dir), "val", 32, limit=4)
    grid = [0.3, 0.6, 0.9]
    sets = [(2, 3), (3,)]  # neither is the engine's default (every trained exit)
    result = calibrate(engine, val, grid, quality_fraction=0.5, batch_size=2, split="val", exit_sets=sets,
                       schedules=False, confidence=0.0)
    assert [(e["exit_layers"], e["threshold"]) for e in result.sweep] == \
        [(list(s), t) for s in sets for t in grid]
    full = result.details["full_depth"]
    assert full["mean_exit_layer"] == N_LAYER
    assert result.details["calibration_split"] == "val" and result.details["images"] == 4
    ratio = result.details["head_cost_ratio"]
    assert ratio > 0
    for entry in result.sweep:
        assert entry["cost_layers_per_token"] == pytest.approx(decode_cost(entry, ratio))
        if entry["exit_layers"] == [3]:  # only exit 3 consulted: every token leaves at layer 3 or 4
            assert entry["mean_exit_layer"] >= 3 and entry["heads_per_token"] <= 2
    expected = choose_setting(result.sweep, full, 0.5, ratio)
    assert result.threshold == (None if expected is None else expected["threshold"])
    assert result.details["confidence"] == 0.0
    assert all("ciderD_per_image" not in e and "ciderD_share_lower_bound" not in e for e in result.sweep)

    directory = shutil.copytree(tiny_checkpoint, tmp_path / "ck")
    save_thresholds(directory, result)
    loaded = load_checkpoint(directory).thresholds
    assert loaded.threshold == result.threshold
    assert len(loaded.sweep) == len(grid) * len(sets)
    assert loaded.details["quality_fraction"] == 0.5 and loaded.details["full_depth"]["mean_exit_layer"] == N_LAYER
    assert expected is not None  # the random model's full-depth CIDEr-D is ~0: every setting meets the floor
    # an engine on the calibrated checkpoint consults the exits the calibration chose
    assert loaded.details["exit_layers"] == expected["exit_layers"]
    assert CaptionEngine.from_checkpoint(directory, device="cpu").exit_layers == tuple(expected["exit_layers"])
    assert engine.exit_layers == (1, 2, 3)


def test_calibrate_at_a_confidence_chooses_by_the_lower_bound(engine, data_dir):
    val = load_eval_set(str(data_dir), "val", 32, limit=4)
    result = calibrate(engine, val, [0.3, 0.9], quality_fraction=0.5, batch_size=2, exit_sets=[(1, 2, 3)],
                       schedules=False, confidence=0.9)
    assert result.details["confidence"] == 0.9 and "0.9 confidence" in result.details["criterion"]
    for entry in result.sweep:
        assert "ciderD_per_image" not in entry
        assert 0.0 <= entry["ciderD_share_lower_bound"] <= max(1.0, entry["ciderD_share"])
    expected = choose_setting(result.sweep, result.details["full_depth"], 0.5, result.details["head_cost_ratio"],
                              lower_bound=True)
    assert result.threshold == (None if expected is None else expected["threshold"])
    with pytest.raises(ValueError, match="confidence"):
        calibrate(engine, val, [0.3], confidence=1.0)


def hard_and_easy_tokens() -> ExitObservations:
    """Exits 1 and 2 of a 4-layer decoder. Easy tokens: exit 1 right at 0.95. Hard tokens: exit 1 wrong at
    0.7, exit 2 right at 0.6. One threshold for both exits either takes the wrong answers (<= 0.7) or sends
    the hard tokens to the final layer (> 0.7); asking more of exit 1 than of exit 2 does neither."""
    easy, hard = 60, 40
    confidence = np.array([[0.95, 0.97]] * easy + [[0.7, 0.6]] * hard)
    prediction = np.array([[5, 5]] * easy + [[8, 6]] * hard)
    final = np.array([5] * easy + [6] * hard)
    return ExitObservations((1, 2), confidence, prediction, final)


def test_schedule_search_asks_more_of_a_confidently_wrong_shallow_exit():
    obs = hard_and_easy_tokens()
    thresholds = search_schedule(obs, n_layer=4, head_cost_ratio=0.1, weight=50.0)
    assert thresholds[0] > 0.7 and thresholds[1] <= 0.6
    cost, disagreement = schedule_outcome(obs, thresholds, 4, 0.1)
    assert disagreement == 0.0
    assert cost == pytest.approx((60 * (1 + 0.1) + 40 * (2 + 0.2)) / 100)
    for scalar in (0.6, 0.7, 0.8):  # every single threshold is wrong more often or costs more
        scalar_cost, scalar_disagreement = schedule_outcome(obs, (scalar, scalar), 4, 0.1)
        assert scalar_disagreement > 0 or scalar_cost > cost
    [proposal] = propose_schedules(obs, 4, 0.1, weights=(50.0,))
    assert proposal.exits == (1, 2) and proposal.threshold == thresholds[1]
    assert proposal.offsets == (pytest.approx(thresholds[0] - thresholds[1]), 0.0)


def test_a_calibrated_schedule_is_saved_and_decoded_with(engine, data_dir, tiny_checkpoint, tmp_path):
    """Proposals are decoded for real, next to the grid; a winning schedule's offsets reach the engine."""
    val = load_eval_set(str(data_dir), "val", 32, limit=4)
    result = calibrate(engine, val, [0.5], quality_fraction=0.5, batch_size=2, exit_sets=[(3,)])
    directory = shutil.copytree(tiny_checkpoint, tmp_path / "ck")
    save_thresholds(directory, Thresholds(0.5, result.sweep, {**result.details, "exit_layers": [1, 3],
                                                               "exit_offsets": [0.25, 0.0]}))
    loaded = CaptionEngine.from_checkpoint(directory, device="cpu")
    assert loaded.exit_layers == (1, 3) and loaded.exit_offsets == (0.25, 0.0)
    pixels = normalize(val.pixels, loaded.dtype)
    by_default = loaded.caption_pixels(pixels, 0.5).results
    explicit = loaded.caption_pixels(pixels, 0.5, exits=(1, 3), exit_offsets=(0.25, 0.0)).results
    assert [r.trace.exit_layers for r in by_default] == [r.trace.exit_layers for r in explicit]
    for r in by_default:  # a token leaving at exit 1 had confidence >= 0.75 there
        assert all(c[0] >= 0.75 for c, layer in zip(r.trace.exit_confidences, r.trace.exit_layers) if layer == 1)


# ----- Hugging Face export --------------------------------------------------------------------------------------
def test_hf_generate_gives_the_same_greedy_tokens_as_our_full_depth_decoder(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    model = ckpt.model
    with torch.no_grad():  # let the image and the position dominate the random decoder, so outputs vary
        for block in model.decoder.transformer.h:
            block.crossattention.c_proj.weight.mul_(30)
        model.decoder.transformer.wpe.weight.mul_(30)
        # sharper final distribution (logits x20, same argmax), so that confidences are far from uniform
        model.decoder.transformer.ln_f.weight.mul_(20)
        model.decoder.transformer.ln_f.bias.mul_(20)
    engine = CaptionEngine(ckpt, "cpu")
    pixels = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    traces = [r.trace for r in engine.caption_pixels(pixels, FULL_DEPTH).results]
    ours = [t.token_ids for t in traces]
    assert len(set(map(tuple, ours))) >= 3, "outputs must vary across images for this test to mean anything"
    assert len({t for ids in ours for t in ids}) >= 5

    hf = to_hf_vision_encoder_decoder(model)
    max_new = model.config.n_positions - 1
    with torch.no_grad():
        generated = hf.generate(pixel_values=pixels, max_new_tokens=max_new, do_sample=False, num_beams=1,
                                output_scores=True, return_dict_in_generate=True)
    out = generated.sequences
    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    assert out.shape[1] <= max_new + 1
    assert (out[:, 0] == model.config.bos_token_id).all()
    for row, mine in zip(out[:, 1:].tolist(), ours):
        theirs = row[: row.index(eos) + 1] if eos in row else row
        assert theirs == mine
        assert all(t == pad for t in row[len(theirs):])
    # not just the same argmax: the same distribution (our full-depth confidence is the final head's max prob)
    probs = torch.softmax(torch.stack(generated.scores, dim=1).float(), dim=-1).max(dim=-1).values
    assert probs.mean() > 0.2
    for i, trace in enumerate(traces):
        theirs = probs[i, : len(trace.token_ids)]
        assert torch.allclose(torch.tensor(trace.confidences), theirs, rtol=0, atol=1e-5)


def test_every_setting_is_warmed_up_once_before_its_timed_batches(engine, eval_set, monkeypatch):
    """A setting's first call pays for lazy set-up; on a few images that alone once showed early exit 3.4x
    faster end to end than full depth. Each setting gets one untimed batch first, whose captions are dropped."""
    from models.evaluation import Setting, decode_interleaved

    calls: list[float] = []
    caption_pixels = engine.caption_pixels

    def counted(pixels, thresholds, **kwargs):
        calls.append(thresholds)
        return caption_pixels(pixels, thresholds, **kwargs)

    monkeypatch.setattr(engine, "caption_pixels", counted)
    settings = [Setting(FULL_DEPTH), Setting(0.5)]
    runs = decode_interleaved(engine, eval_set, settings, batch_size=2, progress=False)
    batches = -(-len(eval_set) // 2)
    assert calls[:2] == [FULL_DEPTH, 0.5] and len(calls) == 2 * (batches + 1)
    assert all(len(run.captions) == len(run.traces) == len(eval_set) for run in runs)
