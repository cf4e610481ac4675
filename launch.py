"""Run a decomposition (SPD or APD): `python launch.py --config=configs/tms_5-2.py[:smoke] [--workdir=DIR]`.

The entry point only resolves the experiment family (`experiments.builder`) and hands it, with the
config, to the library's one runner (`spdjax.runner`), which picks the method from the config.

Re-running the same command resumes from the newest checkpoint in the workdir.
`--mode=analyze` regenerates the summary and figures of a finished run without training.
`--mode=cluster` groups a finished SPD run's subcomponents into mechanisms (`spdjax.clustering`) and
writes WORKDIR/clustering/ (`--cluster.alpha=1 --cluster.seeds=3 --cluster.sampler=exp_rank ...`).
`--mode=harvest` collects per-subcomponent statistics and examples into WORKDIR/harvest/harvest.sqlite
(resumable; `--harvest.n_rows=100000 ...`); `--mode=report` also writes WORKDIR/report.html, the
component browser, which opens offline.

Several hosts: start the same command on every host with `--distributed` (or under Slurm with
SLURM_NTASKS > 1, detected) and a workdir they all share; `jax.distributed.initialize()` finds the
coordinator from the cluster environment, or from `--coordinator_address`, `--num_processes`,
`--process_id`. Process 0 logs and writes the outputs; every process takes part in checkpointing.
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

import experiments
from spdjax.checkpoint import CheckpointError
from spdjax.clustering.workflow import cluster_workdir
from spdjax.clustering.workflow import default_config as cluster_defaults
from spdjax.interpret.workflow import default_config as harvest_defaults
from spdjax.interpret.workflow import harvest_workdir, report_summary, report_workdir
from spdjax.runner import PREEMPTED_EXIT_CODE, ConfigMismatchError, Preempted, RunOptions, analyze, format_summary, run
from spdjax.train import NonFiniteError
from spdjax.workdir import WorkdirError

CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")  # > 1: started as several processes

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (a get_config(arg) .py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")
_CACHE = flags.DEFINE_string("cache_dir", ".cache/targets", "Where trained targets are cached.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "analyze", "cluster", "harvest", "report"],
    "train (or resume), or analyze, cluster, harvest or report (component browser) a finished run.",
)


def settings_flag(name: str, defaults, help_text: str):
    """`--<name>.<field>=value` overrides of a settings dict. ml_collections reads them from argv when the
    flag is defined, so an unknown field fails here: a one-line error, not a traceback."""
    try:
        return config_flags.DEFINE_config_dict(name, defaults, help_text)
    except (AttributeError, KeyError) as e:
        field = str(e).strip("\"'")
        print(f"error: unknown --{name}.{field}; allowed: {sorted(defaults)}", file=sys.stderr)
        sys.exit(1)


_CLUSTER = settings_flag("cluster", cluster_defaults(), "Clustering settings (--mode=cluster).")
_HARVEST = settings_flag("harvest", harvest_defaults(), "Harvest settings (--mode=harvest/report).")
_FRESH = flags.DEFINE_bool("fresh", False, "Discard the workdir's checkpoints and metrics; start over.")
_ALLOW = flags.DEFINE_bool("allow_config_change", False, "Resume even though the config changed.")
_WANDB = flags.DEFINE_string("wandb_project", None, "Also log to this Weights & Biases project (needs wandb).")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bar.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Keep JAX/Orbax/absl INFO logs.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Multi-process run: call jax.distributed.initialize() (auto-on when SLURM_NTASKS etc. > 1).",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


def distributed_requested() -> bool:
    """--distributed, --coordinator_address, or a cluster launcher that started several processes."""
    if flags.FLAGS["distributed"].present:
        return _DISTRIBUTED.value
    if _COORDINATOR.value:
        return True
    return any(int(os.environ.get(v, "1") or 1) > 1 for v in CLUSTER_ENV)


def initialize_distributed() -> None:
    import jax

    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process collectives
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value
    )


def main(argv):
    del argv
    if not _VERBOSE.value:  # JAX/Orbax INFO chatter (e.g. "Unable to initialize backend 'tpu'")
        for name in ("jax", "absl", "orbax"):
            logging.getLogger(name).setLevel(logging.WARNING)
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    workdir = _WORKDIR.value or os.path.join("runs", name)
    lead = True
    if distributed_requested():
        initialize_distributed()
        import jax

        lead = jax.process_index() == 0
    try:
        build = experiments.builder(_CACHE.value)
        if _MODE.value == "analyze":
            summary = analyze(_CONFIG.value, workdir, build) if lead else None
        elif _MODE.value in ("harvest", "report"):
            make = harvest_workdir if _MODE.value == "harvest" else report_workdir
            summary = report_summary(make(_CONFIG.value, workdir, build, _HARVEST.value)) if lead else None
        elif _MODE.value == "cluster":
            summary = cluster_summary(cluster_workdir(_CONFIG.value, workdir, build, _CLUSTER.value)) if lead else None
        else:
            options = RunOptions(
                quiet=_QUIET.value, fresh=_FRESH.value, allow_config_change=_ALLOW.value, wandb_project=_WANDB.value
            )
            summary = run(_CONFIG.value, workdir, build, options)
    except Preempted as e:  # SIGTERM / SIGINT: checkpoint written; a scheduler may requeue on this code
        print(str(e), file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, the last periodic checkpoint stands
        print("interrupted: stopped at once; the newest checkpoint in the workdir stands", file=sys.stderr)
        sys.exit(130)
    except (ConfigMismatchError, NonFiniteError, CheckpointError, WorkdirError, ValueError, FileNotFoundError,
            ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if lead and summary is not None:  # other processes: outputs come from process 0
        print(format_summary(summary))
        if _MODE.value in ("train", "analyze", "cluster"):
            print(f"outputs in {os.path.join(workdir, 'clustering') if _MODE.value == 'cluster' else workdir}")


def cluster_summary(clusters: dict) -> dict:
    """The printed lines of a clustering: sizes, stops, stability and ground-truth scores."""
    out = {k: clusters[k] for k in ("n_samples", "n_subcomponents", "n_groups")}
    out["stop"] = clusters["seeds"][0]["stop"]
    out.update({f"stability/{k}": v for k, v in clusters["stability"].items()})
    out.update({f"truth/{k}": v for k, v in clusters["evaluation"].items()})
    out["largest_groups"] = str([g["size"] for g in clusters["groups"][:10]])
    return out


def config_path_arg(argv) -> str | None:
    """The file part of the last `--config` value in `argv` (before absl parses it), or None."""
    value = None
    args = list(argv[1:])
    for i, a in enumerate(args):
        if a == "--":
            break
        if a.startswith(("--config=", "-config=")):
            value = a.split("=", 1)[1]
        elif a in ("--config", "-config") and i + 1 < len(args):
            value = args[i + 1]
    return None if value is None else value.split(":", 1)[0]


def config_file_problem(path: str | None) -> str | None:
    """A one-line error for a --config path that is missing or a directory: ml_collections would only
    report it, as a traceback, when the config is first used."""
    if path is None:
        return None
    if not path:
        return "--config: the config file path is empty"
    if os.path.isdir(path):
        return f"config file is a directory, not a .py file: {path}"
    if not os.path.exists(path):
        return f"config file not found: {path}"
    return None


def _load_failure(value) -> str | None:
    """The last line of ml_collections' deferred load error (`_ErrorConfig`), e.g. a permission error."""
    if type(value).__name__ != "_ErrorConfig":
        return None
    lines = [ln.strip() for ln in str(getattr(value, "_error", "")).splitlines() if ln.strip()]
    return lines[-1] if lines else "it could not be loaded"


def parse_flags(argv):
    """absl flag parsing with one-line errors (unknown or mistyped --config.* overrides included; a config
    file that is missing, a directory or unreadable)."""
    problem = config_file_problem(config_path_arg(argv))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(1)
    try:
        rest = flags.FLAGS(argv)
        failure = _load_failure(flags.FLAGS["config"].value)
        if failure is None:
            return rest
        print(f"error: config file {flags.FLAGS['config'].config_filename}: {failure}", file=sys.stderr)
    except OSError as e:  # the deferred load error, raised while applying --config.* overrides
        lines = [ln.strip() for ln in str(e.__cause__ or e).splitlines() if ln.strip()]
        print(f"error: config file {config_path_arg(argv)}: {lines[-1] if lines else e}", file=sys.stderr)
    except flags.Error as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        # a config file that raised: its first line and the exception's last line, not the traceback
        print(f"error: {lines[0]} {lines[-1]}" if len(lines) > 1 else f"error: {e}", file=sys.stderr)
    except (AttributeError, KeyError) as e:  # ml_collections: an override names a missing field
        name = str(e).strip("\"'")
        print(f"error: unknown config field {name!r} in a --config.* override", file=sys.stderr)
    except (TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
