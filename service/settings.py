"""Every knob of the service, read from `CAPEEN_*` environment variables (pydantic-settings).

One object carries them from `capeen serve` (whose flags override the environment) to the app, so a
deployment is configured the same way whether it runs in a container, under systemd or in a test.
The field descriptions are the settings table of the README.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, ValidatorFunctionWrapHandler, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bandit import DEFAULT_MU, MAX_MU, POLICIES, parse_grid
from capeen.outputs import output_file_problem
from service.access_log import AccessLog

MiB = 1024 * 1024


class Settings(BaseSettings):
    # no inf or nan: a timeout of inf overflows the event loop's clock, and a price of nan poisons every reward
    model_config = SettingsConfigDict(env_prefix="CAPEEN_", extra="ignore", allow_inf_nan=False)

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    checkpoint: Path | None = Field(None, description="checkpoint directory; unset: the shipped default")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: CUDA when available, else CPU")
    half: bool = Field(False, description="half precision (bf16, else fp16) on CUDA; ignored on CPU")
    kv_fill: Literal["propagate", "deferred"] | None = Field(
        None, description="how the keys and values of layers a token skipped are filled: propagate (CALM, "
        "approximate) or deferred (exact, computed when a later token runs deeper); unset: the way the "
        "checkpoint's threshold was calibrated for")
    max_batch_size: int = Field(16, ge=1, description="most requests decoded together in one batch")
    max_wait_ms: float = Field(20.0, ge=0, le=10_000, description="longest a batch waits for requests still being "
                               "decoded (it never waits when none is, so a lone request goes at once)")
    wait_fill: float = Field(0.5, gt=0, le=1, description="a batch waits for requests still being decoded only "
                             "until it holds this share of max_batch_size; 1: until it is full")
    queue_size: int = Field(64, ge=1, description="images that may wait for the model; more get 503")
    max_images_per_request: int = Field(16, ge=1, le=1000, description="most images in one POST /caption/batch, "
                                        "each of at most max_upload_bytes (1000 at most: the form parser's own "
                                        "limit on parts); queue_size when that is smaller, since a request's "
                                        "images are queued together")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="deadline of a request from its arrival; past "
                                     "it: 504")
    header_timeout_s: float = Field(10.0, gt=0, le=3600, description="longest a connection may take to send a "
                                    "request's headers, from its start or from the previous response; past it, "
                                    "it is closed (a slowloris client holding sockets)")
    max_upload_bytes: int = Field(10 * MiB, ge=1, description="largest image file accepted, in bytes; more: 413")
    max_pixels: int = Field(40_000_000, ge=1,
                            description="largest image accepted, in pixels, read from its header; more: 413")
    jpeg_scaled_decode: bool = Field(True, description="decode a JPEG upload at 1/2, 1/4 or 1/8 of its size while "
                                     "both sides stay at least the model's input size (libjpeg scales in the DCT): "
                                     "a fraction of the time and memory of a phone photo's full decode; false: "
                                     "every pixel is decoded, then the image is resized")
    decode_concurrency: int = Field(4, ge=1, description="uploads decoded into pixels at once, the others wait "
                                    "their turn: bounds the memory large images take (a 40-megapixel one needs "
                                    "a few hundred MB while it is decoded)")
    max_tokens: int | None = Field(None, ge=1, description="longest caption in tokens, and the cap of the max_tokens "
                                   "option; unset: the model's limit")
    policy: str = Field("cd-ucb", description="bandit policy of mode=adaptive: ucb1, sw-ucb, d-ucb or cd-ucb "
                        "(UCB1 that starts learning afresh when it detects that the rewards moved)")
    bandit_state: Path | None = Field(None, description="JSON snapshot of the bandit, restored at start and "
                                      "written while the service runs (bandit_save_interval_s), after a reset "
                                      "and at shutdown; unset: learning starts afresh at each start")
    bandit_save_interval_s: float = Field(60.0, gt=0, le=86_400, description="while the service runs, the bandit "
                                          "snapshot is written this often when something was learnt (and at "
                                          "shutdown, and after a reset): what a crash or a kill can lose")
    bandit_mu: float = Field(DEFAULT_MU, ge=0, le=MAX_MU, description="the bandit's price of running the whole "
                             "decoder, in units of confidence")
    bandit_thresholds: str | None = Field(None, description="the bandit's arms, comma-separated thresholds in "
                                          "[0, 1]; the calibrated one is always added. Unset: 0.5, 0.55, ..., "
                                          "0.95, 0.99; a lower floor lets the bandit trade more quality for speed")
    admin_token: SecretStr | None = Field(None, description="bearer token that POST /v1/bandit/reset requires; "
                                          "unset: no token needed")
    torch_threads: int = Field(1, ge=1, description="torch intra-op threads; one is fastest for this small decoder "
                               "on a few CPU cores and avoids OpenMP stalls next to other processes")
    onednn: Literal["auto"] | bool = Field("auto", description="on a CPU, run the large matrix products (the image "
                                           "encoder, the cross-attention keys and values) on oneDNN: about twice "
                                           "as fast as MKL there on AMD CPUs, no faster on Intel ones; auto: "
                                           "measured at start-up; false: every product on MKL")
    engine_process: bool = Field(True, description="decode in a child process of its own, so that the HTTP work "
                                 "never holds the Python lock the decode loop needs; false: in the service's process")
    engine_timeout_s: float = Field(60.0, gt=0, le=3600, description="longest an engine process may take over one "
                                    "batch; past it, it is taken for hung (a stuck GPU), killed and started again, "
                                    "and the batch's requests that still wait get 500")
    engines: int = Field(1, ge=1, description="engine processes decoding batches side by side, each with its own "
                         "copy of the model and torch_threads threads: on a host with CPU cores to spare, more "
                         "captions per second. Needs engine_process")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="log level of the service's own lines and uvicorn's; other libraries (torch, PIL) "
        "write only their warnings and errors")
    access_log: AccessLog = Field("requests", description="uvicorn's line per request. requests: all but the "
                                  "successful GETs of /healthz, /readyz and /metrics, which health checks and "
                                  "Prometheus send every few seconds; all: those too; off: none")

    @model_validator(mode="after")
    def _engines_need_their_processes(self) -> Settings:
        if self.engines > 1 and not self.engine_process:
            raise ValueError("CAPEEN_ENGINES above 1 needs CAPEEN_ENGINE_PROCESS=true: engines inside the "
                             "service's process would take turns on one Python lock")
        return self

    @property
    def images_per_request(self) -> int:
        """The most images one POST /caption/batch may carry: its images are queued all at once or not at all,
        so a request of more than the queue holds would get 503 for ever."""
        return min(self.max_images_per_request, self.queue_size)

    @model_validator(mode="after")
    def _a_batch_fits_in_the_queue(self) -> Settings:
        # the default gives way to a smaller queue (images_per_request); a value given on purpose is refused
        if "max_images_per_request" in self.model_fields_set and self.max_images_per_request > self.queue_size:
            raise ValueError(f"CAPEEN_MAX_IMAGES_PER_REQUEST ({self.max_images_per_request}) is more than "
                             f"CAPEEN_QUEUE_SIZE ({self.queue_size}): a request of that many images could never "
                             "be queued")
        return self

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _checkpoint_given(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():  # Path("") is the current folder
            raise ValueError("empty: give a checkpoint directory, or unset CAPEEN_CHECKPOINT for the shipped one")
        return value

    @field_validator("bandit_state", mode="before")
    @classmethod
    def _state_path_given(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            raise ValueError("empty: give the snapshot's file path, or unset CAPEEN_BANDIT_STATE so that learning "
                             "starts afresh at each start")
        return value

    @field_validator("bandit_state")
    @classmethod
    def _writable_state_path(cls, value: Path | None) -> Path | None:
        # checked at start: found out at the first save, it would cost what was learnt (a link is followed, as
        # the snapshot's writer follows it)
        problem = None if value is None else output_file_problem(value)
        if problem:
            raise ValueError(f"{value}: {problem}, so the snapshot could not be written")
        return value

    @field_validator("admin_token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        # an empty token (`CAPEEN_ADMIN_TOKEN=` from an unset shell variable) would lock the reset route for good
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("is set but empty; give a token, or unset it to leave POST /v1/bandit/reset open")
        # so would one that no client can send as it is: HTTP trims a header's spaces at either end, and clients
        # and servers disagree on the encoding of other characters than ASCII
        token = value.get_secret_value() if value is not None else ""
        if token != token.strip() or not all(" " <= char <= "~" for char in token):
            raise ValueError("may hold only ASCII letters, digits, punctuation and inner spaces: an Authorization "
                             "header could not carry it reliably")
        return value

    @field_validator("bandit_thresholds")
    @classmethod
    def _valid_grid(cls, value: str | None) -> str | None:
        if value is not None:
            parse_grid(value)
        return value

    @field_validator("onednn", mode="wrap")
    @classmethod
    def _onednn_choice(cls, value: object, handler: ValidatorFunctionWrapHandler) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            return handler(value)  # pydantic's booleans: true, false, 1, 0, yes, no, ...
        except ValidationError:
            raise ValueError(f"should be auto, true or false, got {value!r}") from None

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"unknown policy {value!r}; choose one of {', '.join(sorted(POLICIES))}")
        return value
