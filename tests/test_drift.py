"""`capeen bench-drift` end to end on a tiny random model and a tiny generated data set."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from capeen.drift import POLICY_NAMES, add_arguments, bench_drift_main, stream_order
from capeen.errors import UserError
from tests.conftest import make_tiny_checkpoint

PHASE_LENGTH = 6
PHASES = "none,noise:40,blur:1.5,none"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from models.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("drift-data")
    generate_dataset(out, 8, 4, 24, 0, image_size=32, workers=1)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("drift-checkpoint"), threshold=0.6)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_data, checkpoint):
    out = tmp_path_factory.mktemp("drift-out")
    args = _args("--checkpoint", str(checkpoint), "--data", str(tiny_data), "--phase-length", str(PHASE_LENGTH),
                 "--phases", PHASES, "--device", "cpu", "--json", str(out / "drift.json"),
                 "--plot", str(out / "drift.png"), "--quiet", "--mu", "0.02")
    assert bench_drift_main(args) == 0
    return out, json.loads((out / "drift.json").read_text())


def test_report_structure(report):
    _, data = report
    assert data["policies"] == list(POLICY_NAMES)
    assert data["requests"] == PHASE_LENGTH * 4
    assert [p["distortion"] for p in data["per_phase"]] == ["none", "noise:40", "blur:1.5", "none"]
    assert data["exit_positions"] == [1, 2, 3, 4]
    assert data["kv_fill"] == "propagate"  # the tiny checkpoint's calibration did not choose otherwise
    assert data["fixed_threshold"] == 0.6 and 0.6 in data["grid"]
    # The bandit's defaults: the variance index, c = 1, min_std 0.005.
    assert (data["bonus"], data["exploration"], data["min_std"]) == ("variance", 1.0, 0.005)
    # cd-ucb's detector: its defaults, and the requests at which it restarted (1-based, increasing)
    assert (data["change_window"], data["change_threshold"], data["explore_every"]) == (100, 5.0, 0)
    changes = data["changes_detected"]["cd-ucb"]
    assert list(data["changes_detected"]) == ["cd-ucb"] and changes == sorted(set(changes))
    assert all(1 <= c <= data["requests"] for c in changes)
    for phase in data["per_phase"]:
        assert set(phase["policies"]) == {*POLICY_NAMES, "best-fixed", "full-depth"}
        for name in (*POLICY_NAMES, "best-fixed"):
            row = phase["policies"][name]
            assert row["requests"] == PHASE_LENGTH
            assert math.isfinite(row["ciderD"]) and row["ciderD"] >= 0
            assert 1.0 <= row["mean_exit_layer"] <= 4.0
            assert math.isfinite(row["reward"])
        assert phase["policies"]["full-depth"]["mean_exit_layer"] == 4.0
        assert phase["best_fixed"]["threshold"] in data["grid"]
    assert set(data["done_when"]) >= {"checked", "passed", "measure", "pct", "reward_ok", "quality_ok",
                                      "distorted_phases"}
    assert [p["distortion"] for p in data["done_when"]["distorted_phases"]] == ["noise:40", "blur:1.5"]


def test_every_policy_saw_every_request(report):
    _, data = report
    for name in POLICY_NAMES:
        stream = data["stream"][name]
        assert len(stream["thresholds"]) == len(stream["rewards"]) == data["requests"]
        assert all(t in data["grid"] for t in stream["thresholds"])
    assert set(data["stream"]["fixed"]["thresholds"]) == {0.6}
    # the bandits explore: more than one arm is tried
    assert all(len(set(data["stream"][name]["thresholds"])) > 1 for name in ("ucb1", "sw-ucb", "d-ucb"))


def test_percentages_against_best_fixed_arm(report):
    _, data = report
    for phase in data["per_phase"]:
        arms = phase["fixed_arm_rewards"]
        best = phase["best_fixed"]
        assert best["reward"] == pytest.approx(max(arms.values()))
        assert arms[f"{best['threshold']:g}"] == pytest.approx(best["reward"])
        assert best["reward"] > 0, "the test's mu should leave the best arm a positive reward"
        full = phase["full_depth_reward"]
        assert phase["policies"]["full-depth"]["reward"] == pytest.approx(full)
        assert phase["policies"]["full-depth"]["pct_of_gain"] == pytest.approx(0.0)
        for name in (*POLICY_NAMES, "best-fixed"):
            row = phase["policies"][name]
            assert row["pct_of_best"] == pytest.approx(100.0 * row["reward"] / best["reward"])
            assert row["pct_of_gain"] == pytest.approx(100.0 * (row["reward"] - full) / (best["reward"] - full))
            assert row["regret"] == pytest.approx(best["reward"] - row["reward"])
            for key in ("pct_of_best", "pct_of_gain", "pct_of_best_same_traces", "pct_of_gain_same_traces"):
                assert math.isfinite(row[key])
            # on the traces that define it, no fixed arm beats the best one
            if name == "fixed":
                assert row["pct_of_best_same_traces"] <= 100.0 + 1e-9
        # the best fixed arm, read off the same traces, is exactly 100%
        assert phase["policies"]["best-fixed"]["pct_of_best_same_traces"] == pytest.approx(100.0)
        assert phase["policies"]["best-fixed"]["pct_of_gain_same_traces"] == pytest.approx(100.0)
    total = sum(p["best_fixed"]["reward"] for p in data["per_phase"])
    assert data["overall"]["best_fixed_per_phase_reward"] == pytest.approx(total)
    for name in POLICY_NAMES:
        row = data["overall"]["policies"][name]
        assert row["pct_of_best"] == pytest.approx(100.0 * row["reward"] / total)
        assert row["regret"] == pytest.approx(total - row["reward"])
    check = data["done_when"]
    assert check["measure"] == "pct_of_best"
    distorted = [phase for phase in data["per_phase"] if phase["distortion"] != "none"]
    for phase, row in zip(distorted, check["distorted_phases"], strict=True):
        assert row["full_depth_ciderD"] == pytest.approx(phase["policies"]["full-depth"]["ciderD"])
    assert check["pct"] == pytest.approx(data["overall"]["policies"][check["best_drift_aware"]]["pct_of_best"])


def test_negative_rewards_fall_back_to_the_gain_share():
    from capeen.drift import Yardstick

    score = Yardstick(best=-2.0, full_depth=-6.0).score(-3.0, -2.0)
    assert score["pct_of_best"] is None and score["pct_of_best_same_traces"] is None
    assert score["pct_of_gain"] == pytest.approx(75.0) and score["pct_of_gain_same_traces"] == pytest.approx(100.0)
    assert score["regret"] == pytest.approx(1.0)
    assert Yardstick(best=1.0, full_depth=2.0).score(1.0, 1.0)["pct_of_gain"] is None


def _phase(distortion: str, ciders: dict[str, float], layers: dict[str, float]) -> dict:
    return {"phase": 0, "distortion": distortion,
            "policies": {name: {"ciderD": c, "mean_exit_layer": layers.get(name, 12.0)} for name, c in ciders.items()}}


def test_done_when_states_the_room_full_depth_leaves():
    """A fixed threshold that already matches full depth on distorted images leaves no CIDEr-D to gain: the
    check reports full depth's CIDEr-D next to the policies', so a failed quality check says why."""
    from capeen.drift import done_when

    overall = {"fixed": {"reward": 1.0, "pct_of_best": 90.0}, "cd-ucb": {"reward": 2.0, "pct_of_best": 97.0}}
    report = {"overall": {"policies": overall}, "per_phase": [
        _phase("none", {"fixed": 4.0, "cd-ucb": 4.0, "full-depth": 4.1}, {"fixed": 3.0, "cd-ucb": 3.0}),
        _phase("noise:40", {"fixed": 1.6, "cd-ucb": 1.5, "full-depth": 1.6}, {"fixed": 4.5, "cd-ucb": 3.5}),
        _phase("blur:2", {"fixed": 3.0, "cd-ucb": 3.2, "full-depth": 4.0}, {"fixed": 4.0, "cd-ucb": 3.9}),
    ]}
    check = done_when(report)
    assert check["best_drift_aware"] == "cd-ucb" and check["reward_ok"]
    noise, blur = check["distorted_phases"]
    assert noise["full_depth_ciderD"] == 1.6 and noise["fixed_share_of_full_depth"] == pytest.approx(100.0)
    assert not noise["higher_ciderD"] and noise["not_deeper"]
    assert blur["fixed_share_of_full_depth"] == pytest.approx(75.0)
    assert blur["higher_ciderD"] and blur["not_deeper"]
    assert not check["quality_ok"] and not check["passed"]
    report["per_phase"][1]["policies"]["full-depth"]["ciderD"] = 0.0  # a model that says nothing right
    assert done_when(report)["distorted_phases"][0]["fixed_share_of_full_depth"] is None


def test_plot_written(report):
    out, _ = report
    png = (out / "drift.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_same_stream_is_reproducible():
    assert stream_order(10, 25, seed=3) == stream_order(10, 25, seed=3)
    order = stream_order(10, 20, seed=3)
    assert sorted(order[:10]) == list(range(10)) and order[10:] == order[:10]


@pytest.mark.parametrize("flag, value", [
    ("--phase-length", "0"), ("--phases", "none,fog:3"), ("--policies", "fixed,greedy"), ("--mu", "-1"),
    ("--window", "0"), ("--gamma", "1.5"), ("--threads", "0"), ("--threshold", "1.5"), ("--seed", "-2"),
    ("--policies", "ucb1,ucb1"), ("--min-std", "-0.1"), ("--exploration", "nan"), ("--grid", "0.3,abc"),
    ("--grid", "0.3,1.5"), ("--change-window", "5"), ("--change-window", "2"), ("--change-threshold", "0"),
    ("--change-threshold", "inf"), ("--explore-every", "-1"), ("--phases", "none,,blur:2"),
    ("--mu", "1e308"), ("--mu", "nan"), ("--phase-length", "1000000000"),
])
def test_bad_options_are_user_errors(tiny_data, checkpoint, flag, value):
    args = _args("--checkpoint", str(checkpoint), "--data", str(tiny_data), flag, value)
    with pytest.raises(UserError) as info:
        bench_drift_main(args)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("flag, value, problem", [
    ("--json", "{tmp}", "is a directory"), ("--json", "{tmp}/missing/drift.json", "does not exist"),
    ("--plot", "{tmp}/drift.xyz", "name the plot file with one of .png"), ("--plot", "{tmp}/drift", ".png"),
    ("--plot", "{tmp}", "is a directory"),
])
def test_output_files_are_checked_before_the_run(tmp_path, tiny_data, checkpoint, monkeypatch, flag, value,
                                                 problem):
    """A bad --json or --plot path is refused at once, not after a benchmark that may take hours."""
    import capeen.drift

    monkeypatch.setattr(capeen.drift, "run_drift", lambda *a, **k: pytest.fail("the run started"))
    args = _args("--checkpoint", str(checkpoint), "--data", str(tiny_data), flag, value.format(tmp=tmp_path))
    with pytest.raises(UserError, match=problem):
        bench_drift_main(args)
    assert not (tmp_path / "missing").exists()


def _short_run(tmp_path, tiny_data, checkpoint, *options: str) -> dict:
    """Two phases of 3 requests, without decoding the best fixed arm; the JSON report."""
    args = _args("--checkpoint", str(checkpoint), "--data", str(tiny_data), "--phase-length", "3",
                 "--phases", "none,blur:1.5", "--device", "cpu", "--json", str(tmp_path / "drift.json"), "--quiet",
                 "--no-decode-best", *options)
    assert bench_drift_main(args) == 0
    return json.loads((tmp_path / "drift.json").read_text())


def test_a_grid_below_the_calibrated_threshold(tmp_path, tiny_data, checkpoint):
    report = _short_run(tmp_path, tiny_data, checkpoint, "--policies", "fixed,sw-ucb", "--grid", "0.2,0.4")
    assert report["grid"] == [0.2, 0.4, 0.6]  # the calibrated threshold of the checkpoint is always an arm
    chosen = report["stream"]["sw-ucb"]["thresholds"]
    assert len(chosen) == 6 and set(chosen) <= {0.2, 0.4, 0.6}


def test_kv_fill_option_reaches_the_engine(tmp_path, tiny_data, checkpoint):
    report = _short_run(tmp_path, tiny_data, checkpoint, "--policies", "fixed", "--kv-fill", "deferred")
    assert report["kv_fill"] == "deferred"
    for phase in report["per_phase"]:
        assert 1.0 <= phase["policies"]["fixed"]["mean_exit_layer"] <= 4.0


def test_missing_data_is_a_user_error(tmp_path, checkpoint):
    with pytest.raises(UserError, match="not found"):
        bench_drift_main(_args("--checkpoint", str(checkpoint), "--data", str(tmp_path / "nope")))


def test_markdown_table(report):
    from capeen.drift import format_table

    _, data = report
    table = format_table(data)
    for phase, distortion in enumerate(["none", "noise:40", "blur:1.5", "none"], start=1):
        for name in POLICY_NAMES:
            assert f"| {phase}: {distortion} | {name} |" in table
    assert "Verdict: " in table and "| per-phase best fixed |" in table
    assert "no forced exploration" in table and "1 in 0" not in table  # the default explore_every is 0
    assert "forced exploration 1 in 50," in format_table({**data, "explore_every": 50})


def test_uncalibrated_checkpoint_needs_a_threshold(tmp_path, tiny_data):
    uncalibrated = make_tiny_checkpoint(tmp_path / "ck", threshold=None)
    base = ("--checkpoint", str(uncalibrated), "--data", str(tiny_data), "--device", "cpu", "--quiet",
            "--phase-length", "2", "--phases", "none,noise:20")
    with pytest.raises(UserError, match="calibrated threshold"):
        bench_drift_main(_args(*base))
    out = tmp_path / "r.json"
    assert bench_drift_main(_args(*base, "--threshold", "0.7", "--policies", "fixed,sw-ucb", "--no-decode-best",
                                  "--bonus", "range", "--json", str(out))) == 0
    data = json.loads(out.read_text())
    assert data["fixed_threshold"] == 0.7 and 0.7 in data["grid"] and data["calibrated_threshold"] is None
    assert (data["bonus"], data["exploration"]) == ("range", 0.2)  # the range index's own default c
    assert set(data["per_phase"][0]["policies"]) == {"fixed", "sw-ucb", "full-depth"}
