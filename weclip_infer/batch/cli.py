"""``weclip-segment`` and the command-line plumbing every batch tool shares (exit codes, signals,
one-line errors, the end-of-run summary)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from ..imageio import DEFAULT_MAX_PIXELS
from .listing import DEFAULT_EXTS, check_output_location, scan_inputs, shard
from .results import OutputWriteError
from .runner import check_writable

__all__ = ["EXIT_OK", "EXIT_INPUTS_FAILED", "EXIT_USAGE", "EXIT_WRITE_FAILED", "EXIT_INTERRUPTED", "EXIT_TERMINATED",
           "Terminated", "graceful_termination", "exit_code", "run_guarded", "print_summary", "main"]

log = logging.getLogger(__name__)

EXIT_OK = 0             #: every input has its outputs
EXIT_INPUTS_FAILED = 1  #: some inputs could not be read or segmented (listed in results.jsonl); the rest are done
EXIT_USAGE = 2          #: bad arguments, missing input, name collisions, output inside the input, model not loadable
EXIT_WRITE_FAILED = 3   #: outputs could not be written (disk full, read-only or unwritable folder)
EXIT_INTERRUPTED = 130  #: stopped by Ctrl-C (SIGINT); finished outputs stay, --resume continues
EXIT_TERMINATED = 143   #: stopped by SIGTERM; as above


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM, so that it unwinds exactly
    as after Ctrl-C (workers shut down, open files closed, finished outputs kept)."""


@contextlib.contextmanager
def graceful_termination() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_code(summary: dict[str, Any]) -> int:
    """3 if an output could not be written, 1 if some inputs failed, else 0."""
    if summary.get("write_failed"):
        return EXIT_WRITE_FAILED
    return EXIT_INPUTS_FAILED if summary.get("failed") else EXIT_OK


def print_summary(summary: dict[str, Any], verb: str = "segmented", file=None) -> None:
    """The end-of-run lines: counts on stdout, ignored files and up to 20 failures on stderr."""
    file = file or sys.stdout
    print(f"{verb} {summary['segmented']}, failed {summary['failed']}, "
          f"skipped (existing) {summary['skipped_existing']} "
          f"of {summary['total']} in {summary['seconds']:.1f} s ({summary['images_per_s']:.2f} img/s)", file=file)
    if summary.get("ignored_summary"):
        print(f"  note: {summary['ignored_summary']}", file=sys.stderr)
    for path, why in summary.get("failures", [])[:20]:
        print(f"  FAILED {path}: {why}", file=sys.stderr)
    if len(summary.get("failures", [])) > 20:
        print(f"  ... and {len(summary['failures']) - 20} more (see results.jsonl)", file=sys.stderr)


def run_guarded(prog: str, fn: Callable[[], int], *, debug: bool = False,
                usage_errors: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, RuntimeError)) -> int:
    """Run a batch CLI body: SIGTERM behaves like Ctrl-C, errors become one ``prog: error: ...``
    line (traceback with ``debug``) and the documented exit codes."""
    def report(msg: str) -> None:
        print(f"{prog}: error: {msg}", file=sys.stderr)
        if debug:
            traceback.print_exc()

    try:
        with graceful_termination():
            return fn()
    except OutputWriteError as e:
        report(f"{e} (stopped; finished outputs are kept, rerun with --resume)" if e.fatal else str(e))
        s = getattr(e, "summary", None)
        if s:
            print_summary(s)
        return EXIT_WRITE_FAILED
    except Terminated:
        print(f"{prog}: terminated (SIGTERM); finished outputs are kept, rerun with --resume to continue",
              file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished outputs are kept, rerun with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except usage_errors as e:
        report(str(e))
        return EXIT_USAGE


def _parse_scales(s: Optional[str]):
    if s is None:
        return None
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers expected, got {s!r}") from None


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number ``>= minimum``."""

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"a whole number expected, got {s!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def add_run_options(ap: argparse.ArgumentParser) -> None:
    """``--quiet`` and ``--debug``, the same for every folder command."""
    ap.add_argument("--quiet", action="store_true", help="no progress bar and no informational messages")
    ap.add_argument("--debug", action="store_true", help="print the full traceback of an error")


def setup_cli_logging(quiet: bool) -> None:
    """Informational messages on stderr unless ``--quiet`` (or the application configured logging)."""
    if not quiet and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")


DESCRIPTION = """\
Segment every image of a folder (recursively) or of a list file with a trained WeCLIP model.

The output folder mirrors the input tree: sub/a.jpg gives sub/a.png, a palette PNG whose pixel
values are class indices (0 = background; VOC colours), optionally sub/a_overlay.jpg, and
results.jsonl with one line per image (classes, pixel areas, timings, or the reason it failed).
Every file is written atomically, so a killed run leaves no half-written mask and --resume
skips exactly the images that are done. Unreadable images are reported and skipped; files with
other extensions are counted as ignored. Two inputs that would write the same mask (a.jpg and
a.png) and an output folder inside the input folder are refused before anything is written.
"""

EPILOG = """\
examples:
  weclip-segment photos/ --out masks/
  weclip-segment photos/ --out masks/ --overlay --resume
  weclip-segment photos/ --out masks/ --keep-ext --workers 0
  weclip-segment list.txt --out masks/ --shard 0/2 --threads 1

exit codes:
  0  every image segmented
  1  some images could not be read or segmented (see results.jsonl); the others are done
  2  usage error: bad option, input not found, colliding names, --out inside the input,
     model not loadable
  3  outputs could not be written (disk full, read-only or unwritable folder); stops early
  130, 143  interrupted by Ctrl-C or SIGTERM; rerun with --resume to continue
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="weclip-segment", description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", type=Path, help="folder of images (searched recursively) or a text file listing one "
                                             "image path per line (relative to the file's folder; # starts a comment)")
    ap.add_argument("--out", type=Path, required=True,
                    help="output folder for masks, overlays and results.jsonl (created if missing; must not be the "
                         "input folder or inside it)")
    ap.add_argument("--model", default=None, help="trained checkpoint folder or exported bundle (default: the small "
                                                   "demo model shipped with the package)")
    ap.add_argument("--backend", default="auto", choices=["auto", "eager", "onnx", "torchscript"],
                    help="how to run the model: auto picks by model folder and processor, eager is PyTorch on a "
                         "checkpoint folder, onnx/torchscript run an export (default: auto)")
    ap.add_argument("--device", default=None, help="cpu, cuda or auto (default: auto, a GPU when there is one)")
    ap.add_argument("--ext", default=",".join(DEFAULT_EXTS),
                    help="comma-separated file extensions to take from a folder, case-insensitive "
                         "(default: %(default)s); animated GIFs give their first frame")
    ap.add_argument("--keep-ext", action="store_true",
                    help="name outputs after the full file name (a.jpg -> a.jpg.png) so that a.jpg and a.png can "
                         "share a folder")
    ap.add_argument("--resume", action="store_true", help="skip images whose mask already exists in --out")
    ap.add_argument("--shard", default=None, metavar="I/N",
                    help="process only every N-th image starting at I (0 <= I < N), to split a folder across "
                         "processes; thread sizing assumes the N shards share this machine (else set --threads)")
    ap.add_argument("--workers", type=_non_negative_int, default=2,
                    help="image-decoding worker processes (0: decode in the main process; default: %(default)s)")
    ap.add_argument("--threads", type=_positive_int, default=None,
                    help="compute threads for the model (default: the CPUs this process may use - affinity and "
                         "container quota - divided by the number of shards)")
    ap.add_argument("--overlay", action="store_true",
                    help="also write <name>_overlay.jpg, the mask blended over the image")
    ap.add_argument("--crf", action="store_true",
                    help="refine masks with a dense CRF (torch mean field by default; slower); "
                         "images above the CRF pixel budget are refined at a reduced size")
    ap.add_argument("--scales", type=_parse_scales, default=None, metavar="S1,S2,...",
                    help="image scales to average, e.g. 1,0.75 (default: the model's setting)")
    ap.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                    help="network arithmetic (default: the model's inference.precision, fp32); bf16 runs eager "
                         "PyTorch and pays off on CPUs with AVX512_BF16 or AMX (README: Speed on your processor)")
    ap.add_argument("--no-flip", action="store_true", help="do not average with the horizontally flipped image")
    ap.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                    help="refuse images with more pixels than this (default: %(default)s)")
    ap.add_argument("--engine", default="local", choices=["local", "ray"],
                    help="local: this machine (default); ray: decoding, the model and DenseCRF on a Ray cluster, "
                         "same outputs (needs the ray extra; see docs/scale_out.md)")
    ray = ap.add_argument_group("--engine ray")
    ray.add_argument("--address", default=None,
                     help="Ray cluster: auto (the running one) or ray://HOST:10001 (default: a private Ray started "
                          "on this machine and stopped at the end)")
    ray.add_argument("--num-actors", type=_positive_int, default=1,
                     help="model copies (actors, each with --threads CPUs, default 1; default: 1)")
    ray.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (default: 0)")
    ray.add_argument("--batch-size", type=_positive_int, default=4, help="images per actor call (default: 4)")
    add_run_options(ap)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``weclip-segment``; returns the exit code (see ``--help``)."""
    a = build_parser().parse_args(argv)
    setup_cli_logging(a.quiet)

    def body() -> int:
        from ..threads import apply_threads, plan_threads
        from .listing import normalize_exts
        from .segmentation import mask_name, overlay_name, segment_folder

        # everything that can be refused is checked before the model is loaded
        shard([], a.shard)  # validates I/N
        shard_n = int(a.shard.split("/")[1]) if a.shard else 1
        listing = scan_inputs(a.input, normalize_exts(a.ext), keep_ext=a.keep_ext)
        check_output_location(a.input, a.out, listing.items,
                              lambda n: [mask_name(n), overlay_name(n)] if a.overlay else [mask_name(n)])
        check_writable(a.out)
        apply_threads(plan_threads(processes=shard_n, requested=a.threads))
        if a.engine == "ray":
            from ..ray import require_ray

            require_ray()
            from ..ray.data import segment_folder_ray

            summary = segment_folder_ray(
                a.input, a.out, model=a.model, backend=a.backend, device=a.device, listing=listing, resume=a.resume,
                shard_spec=a.shard, overlay_out=a.overlay, crf=a.crf or None, scales=a.scales,
                flip=False if a.no_flip else None, max_pixels=a.max_pixels, progress=not a.quiet, address=a.address,
                num_actors=a.num_actors, gpus_per_actor=a.gpus_per_actor, cpus_per_actor=a.threads or 1,
                batch_size=a.batch_size, precision=a.precision)
            print_summary(summary)
            return exit_code(summary)
        from ..memory import reuse_freed_memory
        from ..predictor import Segmenter
        from ..quickstart import DEMO_MODEL_DIR

        seg = Segmenter.from_pretrained(a.model or str(DEMO_MODEL_DIR), device=a.device, backend=a.backend,
                                        precision=a.precision)
        reuse_freed_memory(device=seg.device)  # per-image temporaries reused, not page-faulted in again
        if a.crf:
            from ..crf import INSTALL_HINT, crf_available

            if not crf_available():
                raise RuntimeError(INSTALL_HINT)
        summary = segment_folder(seg, a.input, a.out, listing=listing, resume=a.resume, shard_spec=a.shard,
                                 workers=a.workers, overlay_out=a.overlay, crf=a.crf or None, scales=a.scales,
                                 flip=False if a.no_flip else None, max_pixels=a.max_pixels, progress=not a.quiet)
        print_summary(summary)
        return exit_code(summary)

    return run_guarded("weclip-segment", body, debug=a.debug)
