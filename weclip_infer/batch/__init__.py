"""Batch processing of image folders, shared by the batch CLIs (``weclip-segment`` and others).

- :mod:`.listing`: which inputs a run takes (and which it ignores, and why), their output names,
  refusal of name collisions and of an output folder inside the input folder;
- :mod:`.results`: the ``results.jsonl`` log (whole-line atomic appends, torn-line-tolerant reader);
- :mod:`.workers`: decoding in worker processes that die with their parent;
- :mod:`.runner`: :func:`run_folder`, the folder loop around a per-image function;
- :mod:`.segmentation`: :func:`segment_folder`, the per-image function of ``weclip-segment``;
- :mod:`.cli`: exit codes, SIGTERM handling, one-line errors, and ``weclip-segment`` itself.

See ``docs/batch.md``.
"""
from .listing import DEFAULT_EXTS, InputError, Listing, check_output_location, list_inputs, scan_inputs, shard
from .results import OutputWriteError, ResultsLog, read_results
from .runner import RESULTS_NAME, Deferred, ImageResult, check_writable, run_folder
from .workers import DecodedImage, iter_decoded, worker_initializer

__all__ = ["DEFAULT_EXTS", "InputError", "Listing", "check_output_location", "list_inputs", "scan_inputs", "shard",
           "OutputWriteError", "ResultsLog", "read_results", "RESULTS_NAME", "Deferred", "ImageResult", "run_folder",
           "check_writable",
           "DecodedImage", "iter_decoded", "worker_initializer", "segment_folder"]


def __getattr__(name: str):
    if name == "segment_folder":  # imports the model stack; loaded on first use
        from .segmentation import segment_folder

        return segment_folder
    raise AttributeError(name)
