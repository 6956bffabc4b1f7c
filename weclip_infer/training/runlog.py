"""What a training run writes besides checkpoints, and how it talks.

* Messages go through :mod:`logging` (logger ``weclip_infer.training``). While a run is active,
  rank 0 also copies them into ``<out>/train.log`` (:func:`run_log_file`). The command line shows
  them on stderr through :class:`TqdmLoggingHandler`, which writes above a tqdm progress bar.
* :class:`CsvLog`: ``log.csv``, one row per iteration; on resume the rows up to the checkpoint's
  iteration are kept and later ones dropped.
* :func:`read_evals` / :func:`append_eval`: ``eval.jsonl``, one JSON line per evaluation.
* :func:`open_tensorboard`: a ``SummaryWriter`` when TensorBoard is installed.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Optional

from weclip_infer.io_utils import atomic_path

__all__ = ["LOG_COLUMNS", "logger", "CsvLog", "read_evals", "append_eval", "open_tensorboard", "run_log_file",
           "TqdmLoggingHandler", "setup_console_logging"]

LOG_COLUMNS = ["iter", "epoch", "loss", "loss_seg", "loss_aff", "lr", "time", "pseudo_miou", "rfm"]

logger = logging.getLogger("weclip_infer.training")


class TqdmLoggingHandler(logging.Handler):
    """Writes records to stderr with ``tqdm.write`` so they appear above an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            import sys

            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_console_logging(debug: bool = False, rank: int = 0) -> None:
    """Console logging for the command line: INFO lines of the package on stderr (rank 0;
    other ranks show warnings only), DEBUG with ``debug``."""
    pkg = logging.getLogger("weclip_infer")
    if any(isinstance(h, TqdmLoggingHandler) for h in pkg.handlers):
        return
    h = TqdmLoggingHandler()
    h.setFormatter(logging.Formatter("%(message)s" if not debug else "%(levelname)s %(name)s: %(message)s"))
    pkg.addHandler(h)
    pkg.setLevel(logging.DEBUG if debug else (logging.INFO if rank == 0 else logging.WARNING))


@contextlib.contextmanager
def run_log_file(path: Optional[Path]) -> Iterator[None]:
    """Copy the package's INFO+ messages into ``path`` (appending) while the block runs; no-op for
    None (ranks other than 0)."""
    if path is None:
        yield
        return
    pkg = logging.getLogger("weclip_infer")
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    old_level = pkg.level
    if pkg.getEffectiveLevel() > logging.INFO:
        pkg.setLevel(logging.INFO)  # the file gets INFO even when the console shows less
    pkg.addHandler(handler)
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(old_level)
        handler.close()


class CsvLog:
    """``log.csv`` of rank 0 (``enabled``); keeps earlier rows up to ``start_iter`` on resume."""

    def __init__(self, path: Path, start_iter: int, enabled: bool):
        self.path = path
        self.rows: list[dict] = []
        self.f = None
        if not enabled:
            return
        if path.is_file():  # resuming in the same folder: keep rows up to the checkpoint
            with open(path, newline="", encoding="utf-8") as f:
                self.rows = [r for r in csv.DictReader(f)
                             if r.get("iter", "").isdigit() and int(r["iter"]) <= start_iter]
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=LOG_COLUMNS, extrasaction="ignore")
                w.writeheader()
                w.writerows(self.rows)
        self.f = open(path, "a", newline="", encoding="utf-8")
        self.w = csv.DictWriter(self.f, fieldnames=LOG_COLUMNS, extrasaction="ignore")

    def write(self, row: dict) -> None:
        if self.f is None:
            return
        self.rows.append(row)
        self.w.writerow(row)
        self.f.flush()

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def read_evals(path: Path, start_iter: int) -> list[dict]:
    """Records of ``eval.jsonl`` up to ``start_iter`` (the file is rewritten to hold only those;
    unreadable lines, e.g. a torn last line, are dropped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and int(rec.get("iter", 0)) <= start_iter:
            out.append(rec)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    return out


def append_eval(path: Path, rec: dict) -> None:
    """Append one evaluation record (without its text tables) to ``eval.jsonl``."""
    from weclip_infer.metrics import to_jsonable

    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(to_jsonable({k: v for k, v in rec.items() if k != "table"})) + "\n")


def open_tensorboard(out: Path, enabled: bool) -> Any:
    """A ``SummaryWriter`` writing to ``<out>/tb``, or None (disabled or not installed)."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is optional
        logger.info("note: TensorBoard not installed (pip install tensorboard); skipping TensorBoard scalars")
        return None
    return SummaryWriter(str(out / "tb"))
