"""On a GPU host: the early-exit engine computes on CUDA what it computes on a CPU, in half precision too, and
the service decodes there. CI has no GPU, so these are skipped there; run `pytest tests/test_cuda.py` on a
CUDA machine (BENCHMARKS.md, "On a GPU", says when they last ran and what they found). The last test
reads only torch's flags and runs everywhere."""

from __future__ import annotations

import httpx
import pytest
import torch

from models.checkpoint import load_checkpoint
from models.decoding import FULL_DEPTH, EarlyExitDecoder
from models.engine import CaptionEngine, attention_backends
from models.synthetic import draw_example
from service.settings import Settings
from tests.test_decoding import reference_decode, sharp_small_model
from tests.test_service import encode, running_server, upload

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SCENES = 64


@pytest.fixture(scope="module")
def sharp_model():
    return sharp_small_model().cuda()


@pytest.fixture(scope="module")
def scenes():
    size = load_checkpoint().model.config.image_size
    return [draw_example(7, "test", i, size)[0] for i in range(SCENES)]


def captions(engine: CaptionEngine, images, threshold: float) -> list[tuple[list[int], list[int]]]:
    out = engine.caption(images, threshold)
    return [(r.trace.token_ids, r.trace.exit_layers) for r in out.results]


def shipped(device: str, half: bool = False) -> CaptionEngine:
    return CaptionEngine(load_checkpoint(), device=device, half=half)  # its own copy: .to() moves modules in place


@needs_gpu
@pytest.mark.parametrize("threshold", [FULL_DEPTH, 0.5, 0.8])
def test_decoder_on_cuda_matches_the_plain_reference(sharp_model, threshold):
    torch.manual_seed(1)
    states = torch.randn(4, 5, sharp_model.config.n_embd, device="cuda")
    with torch.no_grad():
        traces = EarlyExitDecoder(sharp_model).decode(states, threshold, max_tokens=10)
        for row, trace in enumerate(traces):
            tokens, exits = reference_decode(sharp_model, states[row:row + 1], threshold, 10)
            assert (trace.token_ids, trace.exit_layers) == (tokens, exits)


@needs_gpu
@pytest.mark.parametrize("kv_fill", ["propagate", "deferred"])
def test_a_caption_on_cuda_does_not_depend_on_its_batch(sharp_model, kv_fill):
    decoder = EarlyExitDecoder(sharp_model, kv_fill=kv_fill)
    torch.manual_seed(2)
    states = torch.randn(8, 5, sharp_model.config.n_embd, device="cuda")
    thresholds = [0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, FULL_DEPTH]
    with torch.no_grad():
        batched = decoder.decode(states, thresholds, max_tokens=10)
        for row in range(8):
            alone = decoder.decode(states[row:row + 1], thresholds[row], max_tokens=10)[0]
            assert (alone.token_ids, alone.exit_layers) == (batched[row].token_ids, batched[row].exit_layers)


@needs_gpu
def test_the_shipped_model_captions_on_cuda_as_on_the_cpu(scenes):
    """Moving to a GPU must not change what users get. cuDNN's convolutions use TF32 by default, so a token
    whose confidence sits right at the threshold may leave one exit apart: allow one scene in 32 to differ."""
    cpu, gpu = shipped("cpu"), shipped("cuda")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    for threshold in (FULL_DEPTH, gpu.calibrated_threshold):
        on_cpu, on_gpu = captions(cpu, scenes, threshold), captions(gpu, scenes, threshold)
        same = sum(a == b for a, b in zip(on_cpu, on_gpu))
        assert same >= SCENES - SCENES // 32, (threshold, same)


@needs_gpu
def test_half_precision_on_cuda_keeps_the_captions_and_the_early_exits(scenes):
    full, half = shipped("cuda"), shipped("cuda", half=True)
    assert half.dtype in (torch.bfloat16, torch.float16)
    threshold = half.calibrated_threshold
    in_full, in_half = captions(full, scenes, threshold), captions(half, scenes, threshold)
    same_words = sum(a[0] == b[0] for a, b in zip(in_full, in_half))
    assert same_words >= SCENES * 7 // 8, same_words
    depth = [sum(layers) / len(layers) for _, layers in in_half]
    assert sum(depth) / len(depth) < full.config.n_layer - 2  # tokens still leave early, well before the end


@needs_gpu
def test_the_service_decodes_on_the_gpu_in_half_precision(scenes, tmp_path):
    settings = Settings(device="cuda", half=True, log_level="warning", bandit_state=tmp_path / "bandit.json")
    reference = shipped("cuda", half=True)
    with running_server(settings) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        model = http.get("/v1/model").json()
        assert model["device"].startswith("cuda") and model["dtype"] == str(reference.dtype).removeprefix("torch.")
        for image in scenes[:4]:
            answer = http.post("/caption", files=upload(encode(image)), data={"mode": "fixed"})
            assert answer.status_code == 200, answer.text
            expected = reference.caption([image], reference.calibrated_threshold).results[0]
            assert answer.json()["caption"] == expected.caption


def test_decoding_on_cuda_keeps_away_from_cudnn_attention():
    """cuDNN's attention builds a graph per new shape, and early exit makes a new shape nearly every call: on an
    H200 that made bf16 early exit slower than full depth. Only flags are read, so this runs without a GPU."""
    assert torch.backends.cuda.cudnn_sdp_enabled()  # torch's default, which the engine must not keep
    with attention_backends(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()  # and the process's settings are left as they were
    with attention_backends(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled()
