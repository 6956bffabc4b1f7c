"""The segmentation service behind every server engine: parse → decode → segment → encode.

:class:`SegmentationService` holds one :class:`~weclip_infer.predictor.Segmenter` and turns a
batch of raw requests into one :class:`Response` each. A bad request never fails its neighbours:
client errors become 4xx responses, unexpected failures a 500 for that request only. The network
passes of a batch's requests run together (:class:`~weclip_infer.serving.batching.BatchedNetwork`:
images resized to the same network size share one forward pass per scale), while each response
stays what the request would get alone. Engine adapters (the TorchServe handler, the Ray Serve
deployment) only translate their request objects into ``(request mapping, headers)`` pairs and
the responses back.
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .batching import BatchedNetwork
from .errors import RequestError
from .requests import parse_request
from .responses import encode_result, error_body
from .serve_config import DEFAULT_MAX_REQUEST_COST, DEFAULT_NETWORK_BATCH, check_backend_for_model, read_serve_config

__all__ = ["Response", "SegmentationService"]

logger = logging.getLogger(__name__)


@dataclass
class Response:
    """One answer: HTTP ``status``, ``content_type``, ``body`` and per-stage ``timings`` (s)."""

    status: int
    content_type: str
    body: bytes
    timings: Dict[str, float] = field(default_factory=dict)


@dataclass
class _Item:
    payload: Optional[bytes] = None
    opts: Dict[str, Any] = field(default_factory=dict)
    image: Optional[np.ndarray] = None
    result: Any = None
    error: Optional[str] = None
    status: int = 200
    t0: float = field(default_factory=time.perf_counter)
    timings: Dict[str, float] = field(default_factory=dict)

    def fail(self, message: str, status: int) -> None:
        self.error, self.status = message, status


class SegmentationService:
    """Requests in, responses out, around one ``Segmenter`` (see the module docstring)."""

    def __init__(self, segmenter: Any, max_pixels: int, network_batch: int = DEFAULT_NETWORK_BATCH,
                 serve_config: Optional[Dict[str, Any]] = None, model_dir: Optional[Path] = None):
        self.segmenter = segmenter
        self.max_pixels = int(max_pixels)
        self.serve_config: Dict[str, Any] = dict(serve_config or {})
        self.max_request_cost = float(self.serve_config.get("max_request_cost") or DEFAULT_MAX_REQUEST_COST)
        self.model_dir = model_dir
        self.last_batch: Dict[str, float] = {}
        # every predict() of this segmenter goes through the batching wrapper (a pass-through
        # outside a batch); network_batch caps the images of one backend call
        backend = segmenter.backend
        if isinstance(backend, BatchedNetwork):
            backend.max_rows = int(network_batch)
            self.network = backend
        else:
            self.network = BatchedNetwork(backend, max_rows=int(network_batch))
            segmenter.backend = self.network
        # and its CRF runs on the batch's coordinating thread (see serving.batching)
        segmenter.crf_runner = self.network.on_coordinator

    @classmethod
    def from_model_dir(cls, model_dir: Union[str, Path], device: Union[str, None] = None) -> "SegmentationService":
        """Load a checkpoint directory or export bundle with its ``serve_config.json``."""
        import torch

        from ..crf import prepare_torch_crf
        from ..memory import reuse_freed_memory
        from ..predictor import Segmenter

        model_dir = Path(model_dir)
        cfg = read_serve_config(model_dir)
        backend = cfg["backend"]
        check_backend_for_model(backend, model_dir)
        if cfg.get("num_threads"):
            torch.set_num_threads(int(cfg["num_threads"]))
        keys = ("scales", "flip", "crf", "long_side", "crf_backend", "crf_max_pixels", "precision")
        options = {k: cfg[k] for k in keys if cfg.get(k) is not None}
        t0 = time.perf_counter()
        seg = Segmenter.from_pretrained(model_dir, device=device, backend=backend,
                                        max_pixels=cfg["max_pixels"], **options)
        logger.info("WeCLIP model loaded from %s (device %s) in %.2f s", model_dir, seg.device,
                    time.perf_counter() - t0)
        reuse_freed_memory(device=seg.device)  # per-request temporaries reused, not page-faulted in again
        if seg.crf_backend in ("auto", "torch"):  # compiled now, not in the first CRF request
            t0 = time.perf_counter()
            if prepare_torch_crf(seg.device):
                logger.info("torch CRF prepared in %.2f s", time.perf_counter() - t0)
        return cls(seg, cfg["max_pixels"], network_batch=cfg["network_batch"], serve_config=cfg, model_dir=model_dir)
    _annotator: Any = None
    _annotator_lock = threading.Lock()

    def annotator(self) -> Any:
        """The :class:`~weclip_infer.annotate.Annotator` of the modes ``tags`` and ``open``, made on
        first use from the served model (a checkpoint; exported graphs have no GradCAM path)."""
        with self._annotator_lock:
            if self._annotator is None:
                from ..annotate import AnnotateLimits, Annotator

                model = getattr(self.segmenter, "model", None)
                if model is None:
                    d = self.model_dir
                    if d is None or (d / "manifest.json").is_file() or not (d / "config.json").is_file():
                        raise ValueError("modes 'tags' and 'open' need a checkpoint model; this server runs an "
                                         "exported graph")
                    from ..checkpoint import load_checkpoint

                    model = load_checkpoint(d, device=getattr(self.segmenter, "device", None))
                limits = AnnotateLimits(max_pixels=min(self.max_pixels, AnnotateLimits.max_pixels))
                self._annotator = Annotator(model, limits=limits)
            return self._annotator

    # -- stages ------------------------------------------------------------------------------------
    def _decode(self, requests: Sequence[Tuple[Any, Mapping[str, Any]]]) -> List[_Item]:
        from ..imageio import ImageDecodeError, load_image

        items = []
        for idx, (req, headers) in enumerate(requests):
            item = _Item()
            items.append(item)
            try:
                item.payload, item.opts = parse_request(req, headers)
                t0 = time.perf_counter()
                item.image = load_image(item.payload, max_pixels=self.max_pixels, name="request body")
                item.timings["decode"] = time.perf_counter() - t0
                item.payload = None
            except RequestError as e:
                item.fail(e.message, e.status)
            except ImageDecodeError as e:
                item.fail(f"bad image: {e.reason}", 413 if "more than the limit" in e.reason else 400)
            except Exception as e:  # noqa: BLE001 - one request's failure is answered, not raised
                logger.exception("request %d: preprocessing failed", idx)
                item.fail(f"preprocessing failed: {type(e).__name__}: {e}", 500)
        return items

    def _predict(self, idx: int, item: _Item) -> None:
        o = item.opts
        try:
            mode = o.get("mode", "decoder")
            if mode != "decoder":  # masks from class names: bounded by the annotator's limits
                if mode == "open" and not o.get("labels"):
                    raise ValueError("mode=open needs the class names in 'labels'")
                item.result = self.annotator().annotate(item.image, o.get("labels") or "auto", mode=mode,
                                                        crf=o.get("crf"))
                item.timings.update({k: v for k, v in item.result.timings.items() if k != "decode"})
                return
            if item.image is not None and (o.get("scales") is not None or o.get("flip") is not None):
                self._check_cost(item.image.shape[:2], o.get("scales"), o.get("flip"))
            item.result = self.segmenter.predict(item.image, scales=o.get("scales"), flip=o.get("flip"),
                                                 crf=o.get("crf"), labels_hint=o.get("labels"))
            item.timings.update({k: v for k, v in item.result.timings.items() if k != "decode"})
        except ImportError as e:
            item.fail(f"option not available on this server: {e}", 400)
        except ValueError as e:  # too small image, unknown label hint, bad scale...
            item.fail(str(e), 400)
        except Exception as e:  # noqa: BLE001
            logger.exception("request %d: inference failed", idx)
            item.fail(f"inference failed: {type(e).__name__}: {e}", 500)

    def _check_cost(self, hw: Tuple[int, int], scales: Any, flip: Any) -> None:
        """``ValueError`` (answered 400) when a request's own scales/flip ask for more network work
        than ``max_request_cost`` times the default options' on this image: the cost of attention
        grows with the square of the token count, so a few large scales could hold a worker for
        minutes (past TorchServe's response timeout)."""
        cost = self.segmenter.request_cost(hw, scales, flip)
        if cost > self.max_request_cost:
            asked = ",".join(f"{s:g}" for s in (scales or self.segmenter.scales))
            raise ValueError(f"scales {asked}{' + flip' if (self.segmenter.flip if flip is None else flip) else ''} "
                             f"would cost {cost:.1f}× the network work of this server's default request; the "
                             f"limit is {self.max_request_cost:g}× (max_request_cost in serve_config.json)")

    def _infer(self, items: List[_Item]) -> None:
        todo = [(idx, item) for idx, item in enumerate(items) if item.error is None]
        outcomes = self.network.run([functools.partial(self._predict, idx, item) for idx, item in todo])
        for (idx, item), out in zip(todo, outcomes):
            if isinstance(out, BaseException):  # _predict answers its own errors; this is a bug
                logger.error("request %d: inference failed", idx, exc_info=out)
                item.fail(f"inference failed: {type(out).__name__}: {out}", 500)

    def _encode(self, items: List[_Item]) -> List[Response]:
        out = []
        for idx, item in enumerate(items):
            body, ctype = b"", "application/json"
            if item.error is None:
                assert item.image is not None and item.result is not None  # set for every request without error
                try:
                    t0 = time.perf_counter()
                    item.result.timings["decode"] = item.timings.get("decode", 0.0)
                    body, ctype = encode_result(item.result, item.image, item.opts.get("output", "png"),
                                                item.opts.get("rle", False))
                    item.timings["encode"] = time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001
                    logger.exception("request %d: encoding failed", idx)
                    item.fail(f"encoding failed: {type(e).__name__}: {e}", 500)
            if item.error is not None:
                body, ctype = error_body(item.error), "application/json"
            item.timings["request"] = time.perf_counter() - item.t0
            out.append(Response(item.status, ctype, body, dict(item.timings)))
            item.image = item.result = None
        return out

    def handle(self, requests: Sequence[Tuple[Any, Mapping[str, Any]]]) -> List[Response]:
        """One :class:`Response` per ``(request mapping, headers)`` pair, in order.

        ``last_batch`` then holds the batch's network figures: ``network_s`` (time in the
        network), ``network_calls`` and ``requests``.
        """
        items = self._decode(requests)
        calls0, secs0 = self.network.network_calls, self.network.network_seconds
        self._infer(items)
        self.last_batch = {"requests": len(items), "network_calls": self.network.network_calls - calls0,
                           "network_s": self.network.network_seconds - secs0}
        return self._encode(items)
