"""The launchers' flags: the profiles' defaults, the user's flags parsed and checked, the usage text."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from clip_train.errors import LaunchError

# The recipe's checkpoint cadence: a 1-card run never saves before the end, multi-card runs every 15000 steps.
SAVE_STEPS_1P, SAVE_STEPS_MULTI = 150000, 15000
MAX_RESTARTS_MULTI = 3  # torchrun restarts all workers after a failure; they resume from the last checkpoint
PROFILES = {  # name: (kind, processes per node, epochs, multi-card)
    "full_1p": ("acc", 1, "3", False),
    "performance_1p": ("perf", 1, "1", False),
    "full_8p": ("acc", 8, "3", True),
    "performance_8p": ("perf", 8, "1", True),
    "cluster": ("acc", 8, "3", True),
}
OWN_FLAGS = ("data_path", "model_path", "batch_size", "train_epochs", "model_name", "nproc_per_node")
OWN_FLAGS += ("nnodes", "node_rank", "master_addr", "master_port", "max_restarts")
SWITCHES = ("demo", "dry_run")
UINT = re.compile(r"0|[1-9][0-9]*")  # no leading zeros, as the bash launcher had it


def usage(profile: str) -> str:
    kind, nproc, epochs, _ = PROFILES[profile]
    node = (
        " --nnodes=N --node_rank=R --master_addr=ADDR [--master_port=29500]" if profile == "cluster" else ""
    )
    slurm = (
        "\n       srun --nodes=N --ntasks-per-node=1 bash test/train_clip_cluster.sh --data_path=DIR "
        "--model_path=DIR [flags]\n          (in a SLURM allocation the node flags come from SLURM; flags given win)"
        if profile == "cluster"
        else ""
    )
    restarts = MAX_RESTARTS_MULTI if nproc > 1 else 0
    return f"""usage: bash test/train_clip_{profile}.sh --data_path=COCO_DIR --model_path=CLIP_ROBERTA_DIR{node} [flags]{slurm}
       bash test/train_clip_{profile}.sh --demo [flags]      (tiny embedded data and model, built locally)

  --data_path=DIR         COCO 2017 folder (annotations/ and train2017/, val2017/ as zips or folders)
  --model_path=DIR        the clip-roberta folder (save_clip_roberta.py makes it)
  --batch_size=64         per device, train and eval
  --train_epochs={epochs}
  --model_name=clip       network name in the summary and its CaseName
  --nproc_per_node={nproc}      processes on this node; 'auto' = the NPUs, else GPUs, present (1 on CPU)
  --nnodes=1 --node_rank=0 --master_addr=127.0.0.1 --master_port=PORT   (multi-node; every node runs the same line)
  --max_steps=N           stop after N optimizer steps (performance scripts: 1000)
  --max_restarts={restarts}        times torchrun restarts the workers after a failure (default: 0 on 1 process, else {MAX_RESTARTS_MULTI})
  --demo                  use the embedded demo data and model (made once, cached in $CLIP_DEMO_ROOT)
  --dry_run               print the device family and the launch command, then exit
  any other --flag=value or --flag value goes to run_clip.py and wins over the launcher's default,
  e.g. --output_dir=DIR --save_steps=500 --learning_rate=1e-4 --overwrite_output_dir

Environment: ASCEND_DEVICE_ID (0) names the output folder and, on 1 process, the card; OUTPUT_ROOT (test/output);
PYTHON (python3). Each case runs in $OUTPUT_ROOT/$ASCEND_DEVICE_ID/<CaseName>/ (a finished run there is renamed
<CaseName>.finished-<time> when the case runs again; an interrupted one is resumed); the log
train_$ASCEND_DEVICE_ID.log (train_$ASCEND_DEVICE_ID.node$R.log per node on several nodes) and the summary
<CaseName>.log are in $OUTPUT_ROOT/$ASCEND_DEVICE_ID/. On several nodes the run folder must be on storage every node
sees; the node whose worker holds global rank 0 writes the summary. A run that stopped for good (diverged, bad
argument or data: exit 2) is not restarted.
Case names: clip_bs{{batch}}_{{world}}p_{kind}."""


@dataclass
class Options:
    profile: str
    flags: dict[str, str] = field(default_factory=dict)  # the launcher's own, as given
    switches: set[str] = field(default_factory=set)
    passthrough: list[tuple[str, list[str]]] = field(default_factory=list)  # run_clip.py's, in order

    def get(self, name: str) -> str:
        kind, nproc, epochs, _ = PROFILES[self.profile]
        defaults = {"batch_size": "64", "train_epochs": epochs, "model_name": "clip"}
        defaults.update(nproc_per_node=str(nproc))  # the node flags' defaults are nodes.py's
        return self.flags.get(name, defaults.get(name, ""))


def parse(profile: str, argv: list[str]) -> Options:
    """Group argv into --name[=value] [values...]; the launcher's flags are checked, the others pass through."""
    opts, i = Options(profile), 0
    while i < len(argv):
        token, i = argv[i], i + 1
        if not token.startswith("--") or len(token) == 2:
            raise LaunchError(f"unexpected argument '{token}': flags are --name=value or --name value", True)
        name, eq, value = token[2:].partition("=")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.@-]*", name):
            raise LaunchError(f"'{token}' is not a flag name", True)
        values = [value] if eq else []
        while not eq and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if name in SWITCHES:
            if values:
                raise LaunchError(f"--{name} takes no value", True)
            opts.switches.add(name)
        elif name in OWN_FLAGS:
            if len(values) != 1:
                raise LaunchError(f"--{name} needs one value, as --{name}=VALUE", True)
            opts.flags[name] = values[0]
        else:
            opts.passthrough.append((name, values))
    _validate(opts)
    return opts


def _validate(opts: Options) -> None:
    def positive(name: str, what: str = "a positive integer") -> None:
        if not (UINT.fullmatch(opts.get(name)) and int(opts.get(name)) > 0):
            raise LaunchError(f"--{name} must be {what} (got '{opts.get(name)}')", True)

    positive("batch_size")
    if not re.fullmatch(r"[0-9]*\.?[0-9]+", opts.get("train_epochs")):
        raise LaunchError(f"--train_epochs must be a number (got '{opts.get('train_epochs')}')", True)
    # --nnodes and --node_rank are checked with SLURM's values, in nodes.py
    port = opts.get("master_port")
    if port and not (UINT.fullmatch(port) and 0 < int(port) < 65536):
        raise LaunchError(f"--master_port must be a port number (got '{port}')", True)
    if opts.get("nproc_per_node") != "auto":
        positive("nproc_per_node", "a positive integer or 'auto'")
    restarts = opts.get("max_restarts")
    if restarts and not UINT.fullmatch(restarts):
        raise LaunchError(f"--max_restarts must be 0 or a positive integer (got '{restarts}')", True)
