"""Run an SPD decomposition: `python launch.py --config=configs/tms_5-2.py[:smoke] [--workdir=DIR]`."""

from absl import app, flags
from ml_collections import config_flags

from spdjax.run import format_summary, run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (a get_config(arg) .py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")
_CACHE = flags.DEFINE_string("cache_dir", ".cache/targets", "Where trained targets are cached.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bar.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Keep JAX/absl INFO logs.")


def main(argv):
    del argv
    import logging
    import os

    if not _VERBOSE.value:  # JAX/Orbax INFO chatter (e.g. "Unable to initialize backend 'tpu'")
        logging.getLogger("jax").setLevel(logging.WARNING)
        logging.getLogger("absl").setLevel(logging.WARNING)

    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = _WORKDIR.value or os.path.join("runs", name)
    summary = run(_CONFIG.value, workdir, _CACHE.value, quiet=_QUIET.value)
    print(format_summary(summary))
    print(f"outputs in {workdir}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
