"""Run an SPD decomposition: `python launch.py --config=configs/tms_5-2.py[:smoke] [--workdir=DIR]`.

Re-running the same command resumes from the newest checkpoint in the workdir.
`--mode=analyze` regenerates the summary and figures of a finished run without training.
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from spdjax.run import ConfigMismatchError, analyze, format_summary, run
from spdjax.train import NonFiniteError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (a get_config(arg) .py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")
_CACHE = flags.DEFINE_string("cache_dir", ".cache/targets", "Where trained targets are cached.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "analyze"], "train (or resume), or analyze a finished run.")
_FRESH = flags.DEFINE_bool("fresh", False, "Discard the workdir's checkpoints and metrics; start over.")
_ALLOW = flags.DEFINE_bool("allow_config_change", False, "Resume even though the config changed.")
_WANDB = flags.DEFINE_string("wandb_project", None, "Also log to this Weights & Biases project (needs wandb).")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bar.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Keep JAX/Orbax/absl INFO logs.")


def main(argv):
    del argv
    if not _VERBOSE.value:  # JAX/Orbax INFO chatter (e.g. "Unable to initialize backend 'tpu'")
        for name in ("jax", "absl", "orbax"):
            logging.getLogger(name).setLevel(logging.WARNING)
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = _WORKDIR.value or os.path.join("runs", name)
    try:
        if _MODE.value == "analyze":
            summary = analyze(_CONFIG.value, workdir, _CACHE.value)
        else:
            summary = run(
                _CONFIG.value, workdir, _CACHE.value, quiet=_QUIET.value, fresh=_FRESH.value,
                allow_config_change=_ALLOW.value, wandb_project=_WANDB.value,
            )
    except (ConfigMismatchError, NonFiniteError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(format_summary(summary))
    print(f"outputs in {workdir}")


def parse_flags(argv):
    """absl flag parsing with one-line errors (unknown or mistyped --config.* overrides included)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
    except (AttributeError, KeyError) as e:  # ml_collections: an override names a missing field
        name = str(e).strip("\"'")
        print(f"error: unknown config field {name!r} in a --config.* override", file=sys.stderr)
    except (TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
