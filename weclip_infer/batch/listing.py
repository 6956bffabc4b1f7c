"""Which files a folder run takes, which it ignores (and why), and what each output is called.

An input is a folder (walked recursively, filtered by extension, sorted) or a list file (one
path per line, ``#`` comments, paths relative to the list's folder). Every input gets an output
*name*: its path relative to the input folder without the extension (``sub/a.jpg`` → ``sub/a``),
or with it when ``keep_ext`` is set (``sub/a.jpg`` → ``sub/a.jpg``). Outputs are that name plus a
suffix (``sub/a.png``), mirrored under the output folder.

Everything that would make a run lose data is refused here, before any model is loaded: two
inputs that map to the same name (``a.jpg`` and ``a.png``) and an output folder that is (or is
inside) the input folder.
"""
from __future__ import annotations

import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = ["DEFAULT_EXTS", "InputError", "Listing", "normalize_exts", "scan_inputs", "list_inputs", "shard",
           "check_output_location"]

#: Extensions a folder run takes by default (lower case, no dot). Animated GIFs give their first frame.
DEFAULT_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff", "gif")


class InputError(ValueError):
    """The inputs or the output location cannot be used as given (a usage error, not a bad image)."""


@dataclass
class Listing:
    """The result of :func:`scan_inputs`.

    ``items``: ``(path, name)`` pairs in processing order; ``ignored``: ``(path, reason)`` for every
    file found but not taken (wrong extension, not a regular file, listed twice).
    """

    items: list[tuple[Path, str]]
    ignored: list[tuple[str, str]] = field(default_factory=list)

    def ignored_summary(self) -> str:
        """One line such as ``3 file(s) ignored: 2 extension not taken (.gif, .txt), 1 not a regular file``."""
        if not self.ignored:
            return ""
        counts = Counter(reason.split(":")[0] for _, reason in self.ignored)
        exts = sorted({os.path.splitext(p)[1].lower() or "(none)" for p, r in self.ignored
                       if r.startswith("extension not taken")})
        parts = []
        for reason, n in counts.most_common():
            extra = ""
            if reason == "extension not taken":
                extra = f" ({', '.join(exts[:8])}{', ...' if len(exts) > 8 else ''})"
            parts.append(f"{n} {reason}{extra}")
        return f"{len(self.ignored)} file(s) ignored: " + ", ".join(parts)


def normalize_exts(exts: Sequence[str] | str) -> tuple[str, ...]:
    """``"JPG, .png"`` or ``["jpg", ".PNG"]`` → ``(".jpg", ".png")``; an empty list is an error."""
    if isinstance(exts, str):
        exts = exts.split(",")
    out = tuple(dict.fromkeys("." + e.strip().lower().lstrip(".") for e in exts if e.strip()))
    if not out:
        raise InputError("--ext: give at least one extension, e.g. jpg,png")
    return out


def _name(rel: str, keep_ext: bool) -> str:
    return rel if keep_ext else os.path.splitext(rel)[0]


def _collisions(items: list[tuple[Path, str]], keep_ext: bool) -> None:
    by_name: dict[str, list[Path]] = {}
    for p, name in items:
        by_name.setdefault(name, []).append(p)
    clashes = {n: ps for n, ps in by_name.items() if len(ps) > 1}
    if not clashes:
        return
    first = sorted(clashes)[:3]
    shown = "; ".join(f"{', '.join(str(p) for p in clashes[n])} -> {n}" for n in first)
    more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
    hint = "" if keep_ext else "; pass --keep-ext to name outputs after the full file name (a.jpg -> a.jpg.png)"
    raise InputError(f"{len(clashes)} output name(s) would be written by more than one input, e.g. {shown}{more}{hint}")


def scan_inputs(src: Path, exts: Sequence[str] | str = DEFAULT_EXTS, *, keep_ext: bool = False) -> Listing:
    """List the inputs under ``src`` (folder or list file) with their output names.

    Raises :class:`InputError` when ``src`` does not exist or two inputs would get the same output
    name (so that no output is silently overwritten).
    """
    src = Path(src)
    want = normalize_exts(exts)
    ignored: list[tuple[str, str]] = []
    items: list[tuple[Path, str]] = []
    if src.is_dir():
        for p in sorted(src.rglob("*")):
            try:
                mode = p.lstat().st_mode
            except OSError as e:
                ignored.append((str(p), f"cannot be read: {e.strerror}"))
                continue
            if stat.S_ISDIR(mode):
                continue
            if stat.S_ISLNK(mode):
                if p.is_dir():
                    continue  # rglob does not follow links to folders; say nothing about them
                if not p.exists():
                    ignored.append((str(p), "broken symbolic link"))
                    continue
                mode = p.stat().st_mode
            if not stat.S_ISREG(mode):
                ignored.append((str(p), "not a regular file"))
                continue
            if p.suffix.lower() not in want:
                ignored.append((str(p), f"extension not taken: {p.suffix.lower() or '(none)'} is not in --ext"))
                continue
            items.append((p, _name(p.relative_to(src).as_posix(), keep_ext)))
    elif src.is_file():
        seen: set[Path] = set()
        for line in src.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line)
            p = p if p.is_absolute() else src.parent / p
            key = Path(os.path.abspath(p))
            if key in seen:
                ignored.append((str(p), "listed twice"))
                continue
            seen.add(key)
            rel = _name(Path(line).as_posix(), keep_ext).lstrip("/")
            items.append((p, rel.replace("..", "_")))
    else:
        raise InputError(f"input not found: {src}")
    _collisions(items, keep_ext)
    return Listing(items, ignored)


def list_inputs(src: Path, exts: Sequence[str] | str = DEFAULT_EXTS, *,
                keep_ext: bool = False) -> list[tuple[Path, str]]:
    """``(path, output name)`` for a folder (recursive, filtered by extension, sorted) or a list
    file (one path per line, relative to the list's folder). See :func:`scan_inputs`."""
    return scan_inputs(src, exts, keep_ext=keep_ext).items


def shard(items: list, spec: Optional[str]) -> list:
    """Keep every n-th item starting at i for ``spec = "i/n"`` (0 ≤ i < n)."""
    if not spec:
        return items
    try:
        i, n = (int(v) for v in spec.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        raise InputError(f"--shard: expected i/n with 0 <= i < n, got {spec!r}") from None
    return items[i::n]


def check_output_location(src: Path, out: Path, items: Sequence[tuple[Path, str]],
                          output_names: Callable[[str], Sequence[str]]) -> None:
    """Refuse an output folder that would overwrite inputs or be read back as input.

    ``out`` equal to or inside a folder ``src`` is refused (the outputs would replace inputs such
    as ``a.png`` and a later run would take the masks as images); for a list file, any output
    path (``output_names(name)`` under ``out``) that is one of the inputs is refused.
    """
    out_abs = Path(os.path.realpath(out))
    if Path(src).is_dir():
        src_abs = Path(os.path.realpath(src))
        if out_abs == src_abs or src_abs in out_abs.parents:
            where = "the input folder" if out_abs == src_abs else "inside the input folder"
            raise InputError(f"--out {out} is {where} "
                             f"{src}: outputs would overwrite inputs or be read as inputs next time; "
                             "choose a folder outside it")
        return
    inputs = {os.path.realpath(p) for p, _ in items}
    for _, name in items:
        for rel in output_names(name):
            target = os.path.realpath(out_abs / rel)
            if target in inputs:
                raise InputError(f"output {target} would overwrite an input; choose another --out")
