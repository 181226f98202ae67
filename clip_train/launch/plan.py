"""The launch decided before anything starts: device family and count, the workers' environment, the run
folder, the one torchrun command (what --dry_run prints)."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from clip_train.device import families
from clip_train.device.families import VISIBLE_DEVICES_ENV
from clip_train.errors import LaunchError
from clip_train.launch import runfolder, worker
from clip_train.launch.nodes import Nodes, local_ip, resolve_nodes
from clip_train.launch.options import (
    MAX_RESTARTS_MULTI,
    PROFILES,
    SAVE_STEPS_1P,
    SAVE_STEPS_MULTI,
    UINT,
    Options,
)

REPO = Path(__file__).resolve().parents[2]
HCCL_DEFAULTS = {"HCCL_CONNECT_TIMEOUT": 120, "HCCL_EXEC_TIMEOUT": 1836}  # Ascend's own defaults, seconds
HCCL_CONNECT = "1200"  # multi-node start-ups can take minutes; raised, never lowered
SHUTDOWN_SECONDS = "120"  # torchrun's wait for workers to save after SIGTERM (its default: 30)
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
    """(variable, value) that makes card ``device_id`` the only one a 1-process run sees (families.visible_card)."""
    var = VISIBLE_DEVICES_ENV[family]
    value = families.visible_card(var, device_id, env)
    if value is None:
        raise LaunchError(
            f"ASCEND_DEVICE_ID={device_id} but {var}={env[var]} lists fewer than {device_id + 1} cards"
        )
    return var, value


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@dataclass
class LaunchPlan:
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
    nodes: Nodes
    launcher_id: str  # this node's launcher, as the rank-0 file names it (worker.py)
    card: str = ""  # the physical card of a 1-process run on an accelerator, e.g. ASCEND_RT_VISIBLE_DEVICES=3
    notes: list[str] = field(default_factory=list)


def make_launch_plan(opts: Options, environ: dict[str, str], probe=probe_devices) -> LaunchPlan:
    # First: a bad node setup is one line before anything is built or made.
    nodes = resolve_nodes(opts, environ)
    env = dict(environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # the tee'd log follows the run live
    set_: dict[str, str] = {}
    kind, _, _, multi = PROFILES[opts.profile]
    device_id = env.get("ASCEND_DEVICE_ID", "0")
    if not UINT.fullmatch(device_id):
        raise LaunchError(f"ASCEND_DEVICE_ID must be a device number (got '{device_id}')")
    data, model = opts.get("data_path"), opts.get("model_path")
    demo_classes = ""  # the demo's class folder, when the launcher builds the demo
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
        demo_classes = found.get("classes_dir", "")
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
    nnodes, node_rank = nodes.nnodes, nodes.node_rank
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
    master_addr = nodes.master_addr
    if family == "npu":  # collective-communication settings for HCCL, on Ascend hosts only
        set_["HCCL_WHITELIST_DISABLE"] = env.get("HCCL_WHITELIST_DISABLE", "1")
        set_["HCCL_CONNECT_TIMEOUT"] = env.get("HCCL_CONNECT_TIMEOUT", HCCL_CONNECT)
        for var, default in HCCL_DEFAULTS.items():
            if var in env and env[var].isdigit() and int(env[var]) < default:
                notes.append(
                    f"[Warning] {var}={env[var]} is below Ascend's default ({default} s): kept as you set it"
                )
        if nnodes > 1:
            set_["HCCL_IF_IP"] = env.get("HCCL_IF_IP") or local_ip(master_addr)
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
        if demo_classes:  # the demo's shapes and colours as classes: zero-shot top-1 beside retrieval
            args.update(zeroshot_dir=[demo_classes], zeroshot_templates=["simple"])
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
        Path(env.get("OUTPUT_ROOT") or REPO / "test" / "output"), device_id, case, user_out,
        node=node_rank if nnodes > 1 else None,
    )  # fmt: skip
    args["output_dir"] = [str(paths.run_dir)]
    launcher_id = (
        f"node {node_rank} on {socket.gethostname()} (launcher pid {os.getpid()}) into {paths.summary_file}"
    )
    env[worker.STOP_FILE_ENV] = str(paths.run_dir / runfolder.STOP)
    env[worker.RANK0_FILE_ENV] = str(paths.run_dir / runfolder.RANK0)
    env[worker.NODE_FILE_ENV] = str(runfolder.node_file(paths.run_dir, node_rank))
    env[worker.LAUNCHER_ENV], env[worker.NODE_TOKEN_ENV] = launcher_id, nodes.rdzv_id

    restarts = opts.get("max_restarts") or str(MAX_RESTARTS_MULTI if world > 1 else 0)
    # c10d, each restart with a fresh store: with the static rendezvous restarted workers share the first
    # attempt's store and can read a dead worker's address from it, and hang; across nodes, c10d lets every node's
    # agent re-form the group after a failure on any node (it numbers the nodes itself: worker.py says who got 0).
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    if nnodes == 1:
        endpoint = f"127.0.0.1:{nodes.master_port or _free_port()}"
        command += ["--nnodes", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint]
        command += ["--local_addr", "127.0.0.1"]  # not the host name, which need not resolve
    else:  # node 0 hosts the rendezvous store at the master address; every node names the address it is reached on
        command += ["--nnodes", str(nnodes), "--rdzv_backend", "c10d"]
        command += ["--rdzv_endpoint", f"{master_addr}:{nodes.master_port}", "--rdzv_id", nodes.rdzv_id]
        command += ["--rdzv_conf", f"is_host={str(node_rank == 0).lower()}", "--local_addr", nodes.local_addr]
    set_["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    command += ["--max_restarts", restarts, str(Path(worker.__file__).resolve()), str(REPO / "run_clip.py")]
    for name, values in args.items():
        command += [f"--{name}", *values]
    return LaunchPlan(
        opts.profile, family, ndev, nproc, world, node_rank, env, set_, args, command, paths,
        managed=user_out is None, case=case, batch_size=int(batch) if batch.isdigit() else 0,
        model_name=model_name, nodes=nodes, launcher_id=launcher_id, card=card, notes=notes,
    )  # fmt: skip


def dry_run_text(plan: LaunchPlan) -> str:
    lines = [f"family={plan.family} devices={plan.ndev} world_size={plan.world}"]
    if plan.nodes.nnodes > 1 or plan.profile == "cluster":
        lines.append(f"nodes: {plan.nodes.describe()}")
    lines += [f"env: {k}={v}" for k, v in sorted(plan.env_set.items())]
    lines += [
        f"log={plan.paths.log_file}",
        f"summary={plan.paths.summary_file}",
        f"run_dir={plan.paths.run_dir}",
    ]
    return "\n".join([*lines, "command: " + shlex.join(plan.command)])
