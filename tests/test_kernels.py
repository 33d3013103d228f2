"""models.kernels: large CPU products on oneDNN give the same numbers, small ones and anything needing gradients
stay on MKL, and captions do not depend on the choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import kernels
from models.checkpoint import load_checkpoint
from models.decoding import FULL_DEPTH
from models.engine import CaptionEngine

pytestmark = pytest.mark.skipif(not kernels.onednn_available(), reason="this torch build has no working oneDNN linear")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Large products on oneDNN whatever this machine's CPU prefers; counts the products that went there."""
    monkeypatch.setattr(kernels, "_setting", True)
    calls = []
    real = kernels._onednn_linear

    def counting(x, weight, bias):
        calls.append((tuple(x.shape), tuple(weight.shape)))
        return real(x, weight, bias)

    monkeypatch.setattr(kernels, "_onednn_linear", counting)
    return calls


def test_large_products_go_to_onednn_with_the_same_result(onednn_calls):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(300, 128), torch.randn(512, 128), torch.randn(512)
    with torch.inference_mode():
        assert torch.allclose(kernels.linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-4)
        assert torch.allclose(kernels.linear(x, weight), F.linear(x, weight), atol=1e-4)
        residual = torch.randn(300, 512)
        for added in (bias, residual):  # a bias, or a residual stream added in the same call
            assert torch.allclose(kernels.addmm(added, x, weight.t()), torch.addmm(added, x, weight.t()), atol=1e-4)
        batched = torch.randn(4, 65, 128)  # leading dimensions count as rows
        assert torch.allclose(kernels.linear(batched, weight, bias), F.linear(batched, weight, bias), atol=1e-4)
    assert len(onednn_calls) == 5


def test_small_products_and_training_stay_on_mkl(onednn_calls):
    torch.manual_seed(0)
    weight, bias = torch.randn(512, 128, requires_grad=True), torch.randn(512, requires_grad=True)
    with torch.inference_mode():
        kernels.linear(torch.randn(8, 128), weight, bias)  # 0.5M multiply-adds: MKL's fixed cost is lower
        kernels.addmm(bias, torch.randn(1, 128), weight.t())
    assert onednn_calls == []
    x = torch.randn(300, 128, requires_grad=True)
    kernels.linear(x, weight, bias).sum().backward()  # the oneDNN op has no autograd
    assert onednn_calls == []
    assert torch.allclose(weight.grad, x.detach().sum(0).expand(512, 128), atol=1e-4)


def test_a_strided_weight_view_stays_on_mkl_and_dense_slices_go_to_onednn(onednn_calls):
    # oneDNN ran a column slice of a wider weight (the keys and values of the layers after an exit) hundreds
    # of times slower than MKL: only dense layouts may go there
    torch.manual_seed(0)
    wide, x = torch.randn(128, 3072), torch.randn(16, 128)
    columns = wide[:, 512:]  # (in, out) with a row stride of 3072: neither it nor its transpose is dense
    rows = wide.t().contiguous()[512:]  # the same weights as (out, in): a dense block
    bias = torch.randn(2560)
    with torch.inference_mode():
        expected = torch.addmm(bias, x, columns)
        assert torch.allclose(kernels.addmm(bias, x, columns), expected, atol=1e-4)
        assert torch.allclose(kernels.linear(x, columns.t(), bias), expected, atol=1e-4)
        assert onednn_calls == []
        assert torch.allclose(kernels.linear(x, rows, bias), expected, atol=1e-4)
    assert onednn_calls == [((16, 128), (2560, 128))]


def test_switching_off_restores_the_previous_state(onednn_calls):
    x, weight = torch.randn(300, 128), torch.randn(512, 128)
    with pytest.raises(RuntimeError, match="inside"):
        with kernels.onednn_disabled():
            assert not kernels.onednn_active()
            with torch.inference_mode():
                kernels.linear(x, weight)
            raise RuntimeError("inside")
    assert kernels.onednn_active() and onednn_calls == []
    with torch.inference_mode():
        kernels.linear(x, weight)
    assert len(onednn_calls) == 1


@pytest.fixture
def auto_choice(monkeypatch):
    """The default setting, not measured yet; yields a list that the fake measurement's calls land in."""
    monkeypatch.setattr(kernels, "_setting", "auto")
    monkeypatch.setattr(kernels, "_auto_gain", None)
    measured = []

    def measure(speeds):
        def fake_time_products():
            measured.append(speeds)
            return speeds
        monkeypatch.setattr(kernels, "_time_products", fake_time_products)
        monkeypatch.setattr(kernels, "_auto_gain", None)
    return measure, measured


def test_auto_sends_large_products_to_onednn_only_where_it_measured_faster(auto_choice, onednn_calls):
    measure, measured = auto_choice
    kernels.set_onednn("auto")
    x, weight = torch.randn(300, 128), torch.randn(512, 128)
    measure((2.0e-3, 1.0e-3))  # an AMD EPYC's MKL: oneDNN twice as fast
    with torch.inference_mode():
        for _ in range(3):
            kernels.linear(x, weight)
    assert kernels.auto_gain() == pytest.approx(2.0) and len(onednn_calls) == 3
    assert len(measured) == 1, "the choice is measured once per process"
    onednn_calls.clear()
    measure((1.0e-3, 0.95e-3))  # an Intel Xeon's: level within the noise
    with torch.inference_mode():
        kernels.linear(x, weight)
    assert not kernels.onednn_active() and onednn_calls == []
    with kernels.onednn_forced():  # for side-by-side measurements
        assert kernels.onednn_active()
    assert kernels.onednn_setting() == "auto" and not kernels.onednn_active()


def test_forcing_either_way_skips_the_measurement(auto_choice):
    measure, measured = auto_choice
    measure((1.0e-3, 1.0e-3))
    kernels.set_onednn(True)
    assert kernels.onednn_active()
    kernels.set_onednn(False)
    assert not kernels.onednn_active()
    assert measured == []
    with pytest.raises(ValueError, match="true, false or auto"):
        kernels.set_onednn("maybe")
    assert kernels.onednn_setting() is False


def test_the_measurement_times_both_libraries_on_this_machine():
    mkl_s, onednn_s = kernels._time_products(rounds=1)
    rows, n_in, n_out = kernels.AUTO_PRODUCT
    # a product of 34M multiply-adds takes microseconds to seconds on any CPU; zero would mean nothing ran
    assert 1e-6 < mkl_s < 10 and 1e-6 < onednn_s < 10


def test_a_build_without_onednn_falls_back_to_mkl(monkeypatch, onednn_calls):
    monkeypatch.setattr(kernels, "_available", None)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert not kernels.onednn_active()
    x, weight, bias = torch.randn(300, 128), torch.randn(512, 128), torch.randn(512)
    with torch.inference_mode():
        assert torch.equal(kernels.linear(x, weight, bias), F.linear(x, weight, bias))
    assert onednn_calls == []


def test_dispatched_linears_keep_their_parameters():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 128))
    before = {k: v.clone() for k, v in block.state_dict().items()}
    x = torch.randn(200, 128)
    with torch.inference_mode():
        expected = block(x)
    assert kernels.dispatch_large_linears(block) == 2
    assert all(isinstance(m, kernels.SizeDispatchedLinear) for m in (block[0], block[2]))
    assert block.state_dict().keys() == before.keys()
    assert all(torch.equal(block.state_dict()[k], v) for k, v in before.items())
    with torch.inference_mode():
        assert torch.allclose(block(x), expected, atol=1e-4)
    assert kernels.dispatch_large_linears(block) == 0  # already dispatched


def test_captions_do_not_depend_on_the_kernels(tiny_checkpoint, onednn_calls):
    """A batch large enough that the encoder and the cross-attention products go to oneDNN gives the same
    captions and traces as the same batch on MKL alone."""
    engine = CaptionEngine(load_checkpoint(tiny_checkpoint), device="cpu")
    pixels = torch.rand(48, 3, engine.config.image_size, engine.config.image_size) * 2 - 1
    for threshold in (FULL_DEPTH, 0.6):
        with_onednn = engine.caption_pixels(pixels, threshold).results
        assert onednn_calls, "the encoder's and the cross-attention's products should have gone to oneDNN"
        onednn_calls.clear()
        with kernels.onednn_disabled():
            on_mkl = engine.caption_pixels(pixels, threshold).results
        assert onednn_calls == []
        assert [r.trace.token_ids for r in with_onednn] == [r.trace.token_ids for r in on_mkl]
        assert [r.trace.exit_layers for r in with_onednn] == [r.trace.exit_layers for r in on_mkl]
        for a, b in zip(with_onednn, on_mkl):
            assert a.trace.confidences == pytest.approx(b.trace.confidences, abs=1e-4)


def test_state_propagation_of_a_batch_gives_the_same_captions_on_onednn(onednn_calls):
    """The shipped model under CALM propagation, 32 images at once: the keys and values of the layers after an
    exit are a dense block of the stacked weights, large enough for oneDNN, and the captions are those of MKL."""
    engine = CaptionEngine(load_checkpoint(None), device="cpu", kv_fill="propagate")
    size = engine.config.image_size
    pixels = torch.rand(32, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with_onednn = engine.caption_pixels(pixels, 0.9).results
    stacked = engine.decoder.prop_weight.shape[0]  # every layer's keys and values
    assert any(rows < stacked for _, (rows, _) in onednn_calls), "no propagation product went to oneDNN"
    with kernels.onednn_disabled():
        on_mkl = engine.caption_pixels(pixels, 0.9).results
    assert [r.trace.token_ids for r in with_onednn] == [r.trace.token_ids for r in on_mkl]
    assert [r.trace.exit_layers for r in with_onednn] == [r.trace.exit_layers for r in on_mkl]
