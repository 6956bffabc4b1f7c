"""Input listing: extensions, ignored files (counted, with reasons), output-name collisions,
--keep-ext naming, output folder inside the input folder, sharding."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weclip_infer.batch.listing import (
    DEFAULT_EXTS,
    InputError,
    check_output_location,
    list_inputs,
    normalize_exts,
    scan_inputs,
    shard,
)


def _img(path: Path, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, format=fmt)


def _names(listing):
    return [n for _, n in listing.items]


def test_folder_listing_reports_ignored_files_with_reasons(tmp_path):
    _img(tmp_path / "b.jpg")
    _img(tmp_path / "sub" / "a.PNG")
    _img(tmp_path / "anim.gif")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "README").write_text("hello")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "missing.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    listing = scan_inputs(tmp_path)
    assert _names(listing) == ["anim", "b", "sub/a"]  # sorted, recursive, case-insensitive, GIF taken
    reasons = {Path(p).name: r for p, r in listing.ignored}
    assert set(reasons) == {"notes.txt", "README", "dangling.jpg", "pipe.jpg"}
    assert reasons["notes.txt"].startswith("extension not taken") and ".txt" in reasons["notes.txt"]
    assert reasons["dangling.jpg"] == "broken symbolic link" and reasons["pipe.jpg"] == "not a regular file"
    line = listing.ignored_summary()
    assert line.startswith("4 file(s) ignored:") and "2 extension not taken ((none), .txt)" in line
    assert "1 not a regular file" in line and "1 broken symbolic link" in line


def test_extension_filter_and_validation(tmp_path):
    _img(tmp_path / "a.jpg")
    _img(tmp_path / "b.png")
    assert _names(scan_inputs(tmp_path, " .JPG ")) == ["a"]
    assert normalize_exts("jpg,.PNG,png") == (".jpg", ".png")
    assert "gif" in DEFAULT_EXTS
    with pytest.raises(InputError, match="at least one extension"):
        scan_inputs(tmp_path, ",")
    with pytest.raises(InputError, match="input not found"):
        scan_inputs(tmp_path / "nope")


def test_same_stem_is_refused_unless_extensions_are_kept(tmp_path):
    _img(tmp_path / "a.jpg")
    _img(tmp_path / "a.png")
    _img(tmp_path / "c.jpg")
    with pytest.raises(InputError) as e:
        scan_inputs(tmp_path)
    msg = str(e.value)
    assert "a.jpg" in msg and "a.png" in msg and "--keep-ext" in msg and "\n" not in msg
    assert _names(scan_inputs(tmp_path, keep_ext=True)) == ["a.jpg", "a.png", "c.jpg"]


def test_list_file_names_duplicates_and_collisions(tmp_path):
    _img(tmp_path / "in" / "x.jpg")
    _img(tmp_path / "in" / "y.jpg")
    lst = tmp_path / "list.txt"
    lst.write_text("in/x.jpg\n# comment\n\nin/y.jpg\nin/./x.jpg\n")
    listing = scan_inputs(lst)
    assert _names(listing) == ["in/x", "in/y"]
    assert [(Path(p).name, r) for p, r in listing.ignored] == [("x.jpg", "listed twice")]
    assert [n for _, n in list_inputs(lst, keep_ext=True)] == ["in/x.jpg", "in/y.jpg"]
    _img(tmp_path / "in" / "x.png")
    lst.write_text("in/x.jpg\nin/x.png\n")
    with pytest.raises(InputError, match="more than one input"):
        scan_inputs(lst)


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_folder_inside_input_is_refused(tmp_path, where):
    src = tmp_path / "in"
    _img(src / "a.png")
    out = src if where == "same" else src / "masks"
    with pytest.raises(InputError, match="input folder"):
        check_output_location(src, out, scan_inputs(src).items, lambda n: [f"{n}.png"])
    check_output_location(src, tmp_path / "out", scan_inputs(src).items, lambda n: [f"{n}.png"])  # fine
    # the input folder inside the output folder is fine (outputs land beside it, not in it)
    check_output_location(src, tmp_path, scan_inputs(src).items, lambda n: [f"in_{n}.png"])


def test_list_file_output_that_would_overwrite_an_input_is_refused(tmp_path):
    _img(tmp_path / "a.png")
    lst = tmp_path / "list.txt"
    lst.write_text("a.png\n")
    items = scan_inputs(lst).items
    with pytest.raises(InputError, match="would overwrite an input"):
        check_output_location(lst, tmp_path, items, lambda n: [f"{n}.png"])
    check_output_location(lst, tmp_path / "out", items, lambda n: [f"{n}.png"])


def test_shard_partitions_and_validates(tmp_path):
    items = list(range(10))
    parts = [shard(items, f"{i}/3") for i in range(3)]
    assert sorted(sum(parts, [])) == items and parts[1] == [1, 4, 7]
    for bad in ("3/3", "-1/2", "a/b", "1", "1/0"):
        with pytest.raises(InputError, match="--shard"):
            shard(items, bad)
