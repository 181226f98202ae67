"""The launchers behind test/train_clip_*.sh: ``python3 -m clip_train.launch PROFILE [flags]``.

PROFILE (full_1p, performance_1p, full_8p, performance_8p, cluster) sets the recipe's defaults; the user's flags
set the rest. Every case, one card included, is the same torchrun command, so 1p, 8p and multi-node runs cannot
drift apart. The run folder per case, the set-aside of finished runs and the log layout are in runfolder.py;
the summary is summary.py's. Run any launcher with --help for the flags.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from clip_train.launch import runfolder

REPO = Path(__file__).resolve().parents[2]
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
VISIBLE = {"npu": "ASCEND_RT_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES"}
HCCL_DEFAULTS = {"HCCL_CONNECT_TIMEOUT": 120, "HCCL_EXEC_TIMEOUT": 1836}  # Ascend's own defaults, seconds
HCCL_CONNECT = "1200"  # multi-node start-ups can take minutes; raised, never lowered
SHUTDOWN_SECONDS = "120"  # torchrun's wait for workers to save after SIGTERM (its default: 30)
UINT = re.compile(r"0|[1-9][0-9]*")  # no leading zeros, as the bash launcher had it


class LaunchError(Exception):
    """One line for the user; with usage=True the usage follows it."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def usage(profile: str) -> str:
    kind, nproc, epochs, _ = PROFILES[profile]
    node = (
        " --nnodes=N --node_rank=R --master_addr=ADDR [--master_port=29500]" if profile == "cluster" else ""
    )
    restarts = MAX_RESTARTS_MULTI if nproc > 1 else 0
    return f"""usage: bash test/train_clip_{profile}.sh --data_path=COCO_DIR --model_path=CLIP_ROBERTA_DIR{node} [flags]
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
train_$ASCEND_DEVICE_ID.log and the summary <CaseName>.log are in $OUTPUT_ROOT/$ASCEND_DEVICE_ID/.
Case names: clip_bs{{batch}}_{{world}}p_{kind}."""


@dataclass
class Options:
    profile: str
    flags: dict[str, str] = field(default_factory=dict)  # the launcher's own, as given
    switches: set[str] = field(default_factory=set)
    passthrough: list[tuple[str, list[str]]] = field(default_factory=list)  # run_clip.py's, in order

    def get(self, name: str) -> str:
        kind, nproc, epochs, _ = PROFILES[self.profile]
        defaults = {"batch_size": "64", "train_epochs": epochs, "model_name": "clip", "nnodes": "1"}
        defaults.update(node_rank="0", master_addr="127.0.0.1", nproc_per_node=str(nproc))
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
    positive("nnodes")
    nnodes, rank = int(opts.get("nnodes")), opts.get("node_rank")
    if not (UINT.fullmatch(rank) and int(rank) < nnodes):
        raise LaunchError(f"--node_rank must be 0..{nnodes - 1} for --nnodes={nnodes} (got '{rank}')", True)
    port = opts.get("master_port")
    if port and not (UINT.fullmatch(port) and 0 < int(port) < 65536):
        raise LaunchError(f"--master_port must be a port number (got '{port}')", True)
    if opts.get("nproc_per_node") != "auto":
        positive("nproc_per_node", "a positive integer or 'auto'")
    restarts = opts.get("max_restarts")
    if restarts and not UINT.fullmatch(restarts):
        raise LaunchError(f"--max_restarts must be 0 or a positive integer (got '{restarts}')", True)
    if opts.profile == "cluster":
        for flag in ("nnodes", "node_rank", "master_addr"):
            if flag not in opts.flags:
                raise LaunchError(
                    f"train_clip_cluster.sh needs --{flag} (the same line on every node, its own --node_rank)",
                    True,
                )


PROBE = """
import sys
try:
    import torch_npu  # noqa: F401  (registers torch.npu)
    import torch
    if torch.npu.device_count() > 0:
        print("npu", torch.npu.device_count())
        sys.exit()
except ImportError:
    pass
except Exception as exc:  # torch_npu present but broken: say so, then fall back
    print(f"[Warning] torch_npu did not load ({exc}); looking for GPUs instead", file=sys.stderr)
import torch
print("cuda", torch.cuda.device_count()) if torch.cuda.is_available() else print("cpu", 0)
"""


def probe_devices(env: dict[str, str]) -> tuple[str, int]:
    """(family, device count) as the workers will see them; the last line is the answer (torch_npu may chat)."""
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE, text=True)
    words = (proc.stdout.strip().splitlines() or [""])[-1].split()
    if proc.returncode != 0 or len(words) != 2 or words[0] not in ("npu", "cuda", "cpu"):
        raise LaunchError(
            f"could not import torch with {sys.executable}: install requirements.txt, "
            "or set PYTHON to the python that has torch"
        )
    return words[0], int(words[1])


def visible_card(family: str, device_id: int, env: dict[str, str]) -> tuple[str, str]:
    """(variable, value) that makes card ``device_id`` the only one a 1-process run sees.

    If the user already narrowed the cards (e.g. ASCEND_RT_VISIBLE_DEVICES=4,5,6), device_id indexes that list.
    """
    var = VISIBLE[family]
    given = [c.strip() for c in env.get(var, "").split(",") if c.strip()]
    if not given:
        return var, str(device_id)
    if device_id >= len(given):
        raise LaunchError(f"ASCEND_DEVICE_ID={device_id} but {var}={env[var]} lists {len(given)} card(s)")
    return var, given[device_id]


def _local_ip(master_addr: str) -> str:
    """The address this node reaches the master from: the one the other nodes can reach it on."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((master_addr, 9))  # UDP: no packet is sent
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@dataclass
class Plan:
    """Everything the launch does, decided before anything starts (what --dry_run prints)."""

    profile: str
    family: str
    ndev: int
    nproc: int
    world: int
    node_rank: int
    env: dict[str, str]  # the workers' environment
    env_set: dict[str, str]  # what the launcher set in it (shown by --dry_run)
    run_args: dict[str, list[str]]
    command: list[str]
    paths: runfolder.RunPaths
    managed: bool  # the run folder is the launcher's (not a user --output_dir): finished runs are set aside
    case: str
    batch_size: int
    model_name: str
    card: str = ""  # the physical card of a 1-process run on an accelerator, e.g. ASCEND_RT_VISIBLE_DEVICES=3
    notes: list[str] = field(default_factory=list)


def make_plan(opts: Options, environ: dict[str, str], probe=probe_devices) -> Plan:
    env = dict(environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # the tee'd log follows the run live
    set_: dict[str, str] = {}
    kind, _, _, multi = PROFILES[opts.profile]
    device_id = env.get("ASCEND_DEVICE_ID", "0")
    if not UINT.fullmatch(device_id):
        raise LaunchError(f"ASCEND_DEVICE_ID must be a device number (got '{device_id}')")
    data, model = opts.get("data_path"), opts.get("model_path")
    if "demo" in opts.switches and not (data and model):
        made = subprocess.run(
            [sys.executable, "-m", "clip_train.demo", "--print-paths"],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        if made.returncode != 0:
            raise LaunchError("building the demo data/model failed (see above)")
        found = dict(line.split("=", 1) for line in made.stdout.splitlines() if "=" in line)
        data, model = data or found.get("data_dir", ""), model or found.get("model_dir", "")
    if not data:
        raise LaunchError("--data_path is required (or --demo)", True)
    if not model:
        raise LaunchError("--model_path is required (or --demo)", True)
    if not os.path.isdir(data):
        raise LaunchError(f"--data_path={data} is not a directory: point it at the COCO 2017 folder")
    if not os.path.isdir(model):
        raise LaunchError(
            f"--model_path={model} is not a directory: point it at the clip-roberta folder "
            "(python3 save_clip_roberta.py makes one)"
        )

    family, ndev = probe(env)
    nproc_flag = opts.get("nproc_per_node")
    nproc = max(ndev, 1) if nproc_flag == "auto" else int(nproc_flag)
    if family != "cpu" and nproc > ndev:
        raise LaunchError(
            f"--nproc_per_node={nproc} but this node has {ndev} {family.upper()} device(s): use --nproc_per_node=auto"
        )
    nnodes, node_rank = int(opts.get("nnodes")), int(opts.get("node_rank"))
    world = nnodes * nproc
    card, notes = "", []
    if world == 1 and family != "cpu":
        if int(device_id) >= ndev:
            raise LaunchError(
                f"ASCEND_DEVICE_ID={device_id} but this node has {ndev} {family.upper()} device(s)"
            )
        var, value = visible_card(family, int(device_id), env)
        set_[var] = value
        card = f"{var}={value}"
    master_addr = opts.get("master_addr")
    if family == "npu":  # collective-communication settings for HCCL, on Ascend hosts only
        set_["HCCL_WHITELIST_DISABLE"] = env.get("HCCL_WHITELIST_DISABLE", "1")
        set_["HCCL_CONNECT_TIMEOUT"] = env.get("HCCL_CONNECT_TIMEOUT", HCCL_CONNECT)
        for var, default in HCCL_DEFAULTS.items():
            if var in env and env[var].isdigit() and int(env[var]) < default:
                notes.append(
                    f"[Warning] {var}={env[var]} is below Ascend's default ({default} s): kept as you set it"
                )
        if nnodes > 1:
            set_["HCCL_IF_IP"] = env.get("HCCL_IF_IP") or _local_ip(master_addr)
    set_["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_SECONDS)
    env.update(set_)

    batch = opts.get("batch_size")
    args: dict[str, list[str]] = {}
    args["output_dir"] = []  # filled below, once the case name is known; first as in the recipe
    args.update(num_train_epochs=[opts.get("train_epochs")], model_name_or_path=[model], data_dir=[data])
    args.update(dataset_name=["ydshieh/coco_dataset_script"], dataset_config_name=["2017"])
    if family != "cpu":  # on CPU run_clip.py picks the loader workers itself
        args["dataloader_num_workers"] = [str(min(8, max(1, (os.cpu_count() or 1) // nproc)))]
    args.update(image_column=["image_path"], caption_column=["caption"], remove_unused_columns=["False"])
    args.update(do_train=[], do_eval=[], fp16=[], dataloader_drop_last=[], fp16_opt_level=["O2"])
    args.update(loss_scale=["12800000"], optim=["adamw_apex_fused_npu"], use_combine_grad=[])
    args.update(per_device_train_batch_size=[batch], per_device_eval_batch_size=[batch])
    args.update(learning_rate=["5e-5"], warmup_steps=["0"], weight_decay=["0.1"], skip_steps=["10"])
    if "demo" in opts.switches:  # the demo's towers start from random weights: they need a larger step
        args.update(learning_rate=["5e-4"], logging_steps=["10"])
    args["save_steps"] = [str(SAVE_STEPS_MULTI if multi else SAVE_STEPS_1P)]
    if multi and family == "npu":  # the recipe's Ascend value; run_clip.py picks each family's otherwise
        args["ddp_bucket_cap_mb"] = ["150"]
    if kind == "perf":
        args["max_steps"] = ["1000"]
    if family == "cpu":  # transformers 5 sets up DDP on a CPU-only host only with use_cpu
        args["use_cpu"] = []
    for name, values in opts.passthrough:  # the user's win, in place
        args[name] = values
    batch = args["per_device_train_batch_size"][0] if args["per_device_train_batch_size"] else batch
    model_name = opts.get("model_name")
    case = runfolder.case_name(model_name, batch, world, kind)
    user_out = args["output_dir"][0] if args["output_dir"] else None
    paths = runfolder.run_paths(
        Path(env.get("OUTPUT_ROOT") or REPO / "test" / "output"), device_id, case, user_out
    )
    args["output_dir"] = [str(paths.run_dir)]

    restarts = opts.get("max_restarts") or str(MAX_RESTARTS_MULTI if world > 1 else 0)
    port = opts.get("master_port") or (_free_port() if nnodes == 1 else "29500")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    if nnodes == 1:
        # c10d on this host, each restart with a fresh store: with the static rendezvous the restarted workers
        # share the first attempt's store and can read a dead worker's address from it, and hang.
        command += ["--nnodes", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"]
        command += ["--local_addr", "127.0.0.1"]  # not the host name, which need not resolve
        set_["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    else:  # the static rendezvous keeps --node_rank (c10d would rank the nodes in its own order)
        command += ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--master_addr", master_addr]
        command += ["--master_port", port]
    command += ["--max_restarts", restarts, str(REPO / "run_clip.py")]
    for name, values in args.items():
        command += [f"--{name}", *values]
    return Plan(
        opts.profile, family, ndev, nproc, world, node_rank, env, set_, args, command, paths,
        managed=user_out is None, case=case, batch_size=int(batch) if batch.isdigit() else 0,
        model_name=model_name, card=card, notes=notes,
    )  # fmt: skip


def dry_run_text(plan: Plan) -> str:
    lines = [f"family={plan.family} devices={plan.ndev} world_size={plan.world}"]
    lines += [f"env: {k}={v}" for k, v in sorted(plan.env_set.items())]
    lines += [
        f"log={plan.paths.log_file}",
        f"summary={plan.paths.summary_file}",
        f"run_dir={plan.paths.run_dir}",
    ]
    return "\n".join([*lines, "command: " + shlex.join(plan.command)])


def main(argv: list[str] | None = None) -> int:
    started = time.time()  # E2ETrainingTime counts the demo build and the device probe too
    argv = sys.argv[1:] if argv is None else argv
    profile = argv[0] if argv else ""
    if profile not in PROFILES:
        print(
            f"[Error] clip_train.launch is run by test/train_clip_*.sh (got profile '{profile}')",
            file=sys.stderr,
        )
        return 1
    if "-h" in argv[1:] or "--help" in argv[1:]:
        print(usage(profile))
        return 0
    try:
        opts = parse(profile, argv[1:])
        plan = make_plan(opts, dict(os.environ))
        if "dry_run" in opts.switches:
            for note in plan.notes:
                print(note, file=sys.stderr)
            print(dry_run_text(plan))
            return 0
        from clip_train.launch.run import execute  # the run itself: folders, tee, signals, summary

        return execute(plan, started=started, machine=platform.machine())
    except LaunchError as exc:
        print(f"[Error] {exc}", file=sys.stderr)
        if exc.usage:
            print(usage(profile), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
