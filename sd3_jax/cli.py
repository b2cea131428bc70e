"""`sd3-jax convert|sample|train|prepare|export|plan`: the command line.

Every command reports bad input as one line on stderr (`sd3-jax: error: ...`) and exits 2, leaving no
half-written output behind.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing


def _train(a: argparse.Namespace) -> None:
    from sd3_jax.train.config import apply_overrides, load_config
    from sd3_jax.train.loop import maybe_initialize_distributed, train

    maybe_initialize_distributed()
    cfg = apply_overrides(load_config(a.config), a.set)
    train(cfg, a.workdir, progress=not a.no_progress)


def _one_line(e: BaseException) -> str:
    """The error as one line (a file name or key may carry a newline), with the file for OS errors."""
    text = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror or e}"
    return " ".join(text.split("\n"))


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one `--help` away) and exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sd3-jax", description="Stable Diffusion 3 in JAX.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train or fine-tune an MMDiT from a Python config")
    t.add_argument("--config", required=True, help="experiments/NAME.py defining get_config()")
    t.add_argument(
        "--workdir", required=True, help="checkpoints and metrics.jsonl go here; resumes if present"
    )
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=_train)

    from sd3_jax import cli_commands

    cli_commands.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command == "plan":
        # plan compiles for TPU devices described by libtpu; it needs no local accelerator, and a host
        # without a TPU would otherwise have libtpu print start-up errors while jax looks for one.
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from sd3_jax.convert.mapping import CheckpointError
    from sd3_jax.convert.orbax_io import CheckpointFormatError
    from sd3_jax.train.guard import Preempted
    from sd3_jax.train.loop import CheckpointWriteError, TrainingDiverged

    try:
        a.fn(a)
    except (CheckpointError, CheckpointFormatError, OSError, ValueError) as e:
        print(f"sd3-jax: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"sd3-jax: error: {e}", file=sys.stderr)
        return 1
    except CheckpointWriteError as e:
        print(f"sd3-jax: error: {e}", file=sys.stderr, flush=True)
        # Orbax's writer threads are still failing on the full disk: an orderly interpreter exit would
        # print each of their errors as it tears them down. The run is over and the last complete
        # checkpoint is intact on disk, so leave at once.
        sys.stdout.flush()
        os._exit(1)
    except Preempted as e:
        print(f"sd3-jax: {e}", file=sys.stderr)
        return 128 + 15  # as a process killed by SIGTERM, which the scheduler asked for
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
