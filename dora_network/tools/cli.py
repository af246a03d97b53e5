"""Command-line plumbing shared by the dora-* tools: root logging, argument parsers, progress bars, precisions.

The tools are console scripts, so they configure the root logger themselves (sd-scripts' convention: rich if
importable, plain logging otherwise); the library functions only use ``logging.getLogger(__name__)``. Nothing here
imports the trainer.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Iterable, Sequence

import torch

__all__ = [
    "PRECISIONS", "add_report_flags", "install_root_handler", "make_parser", "parse_args", "progress_bar",
    "setup_logging",
]

#: ``--save_precision`` / ``--dora_scale_precision`` choices (sd-scripts' spellings) -> dtype.
PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def install_root_handler(plain_format: str) -> bool:
    """Give the root logger one handler (rich if importable, else plain ``plain_format``) unless it has one.

    Returns:
        True if a handler was installed, False if logging was already configured (then nothing changes).
    """
    root = logging.getLogger()
    if root.handlers:
        return False
    try:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    except ImportError:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(plain_format))
    root.addHandler(handler)
    return True


def setup_logging(verbose: bool = False) -> None:
    """Root logging for the tools: rich if importable, plain otherwise; left alone if already configured.

    Args:
        verbose: INFO level (progress lines) instead of WARNING.
    """
    if install_root_handler("%(levelname)s %(name)s: %(message)s"):
        logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)


def make_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """An argparse parser whose epilog (examples) keeps its line breaks."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_report_flags(parser: argparse.ArgumentParser, json_help: str) -> None:
    """``--json`` (machine-readable output) and ``--verbose`` (INFO logging), as dora-inspect/dora-convert take them."""
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument("--verbose", action="store_true", help="log progress at INFO level")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` and set up logging: INFO with ``--verbose``, or always for a tool without that flag."""
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", True))
    return args


def progress_bar(items: Iterable[Any] | None, *, desc: str, unit: str, total: int | None = None,
                 enabled: bool = True) -> Any:
    """A tqdm bar over ``items`` (or, with ``items=None``, one to ``update()`` by hand), if enabled.

    Returns:
        The bar; or ``items`` itself (None for a manual bar) when disabled or tqdm is not installed (it comes with
        sd-scripts and our [train] extra).
    """
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, total=total, unit=unit)
