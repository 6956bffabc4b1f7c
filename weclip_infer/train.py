"""``python -m weclip_infer.train``: thin entry point of :mod:`weclip_infer.training.cli`."""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from weclip_infer.training.cli import main as _main

    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
