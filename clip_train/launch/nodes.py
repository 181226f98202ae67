"""Which node this launcher is and where the others meet: from the flags, or from SLURM inside an allocation.

Inside a SLURM allocation (``SLURM_JOB_ID`` set) the cluster launcher reads the node count (``SLURM_NNODES``), this
node's rank (``SLURM_NODEID``) and the master (the first host of ``SLURM_JOB_NODELIST``, expanded by python-hostlist)
and derives the port from the job id, so ``srun --nodes=N --ntasks-per-node=1 bash test/train_clip_cluster.sh ...``
needs no node flags. A flag given on the command line wins over SLURM; every value remembers where it came from,
for the start-up line.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field

from clip_train.errors import LaunchError
from clip_train.launch.options import UINT, Options

SLURM_PORT_BASE = (
    20000  # the port is SLURM_PORT_BASE + job id % 10000: below Linux's ephemeral ports (32768+)
)


@dataclass
class Nodes:
    """The node layout of one launch and, per value, where it came from (a flag, a SLURM variable, a default)."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: str  # "" on one node: the launcher picks a free one
    local_addr: str  # the address the other nodes reach this one on (torchrun's --local_addr)
    rdzv_id: str  # the same on every node of one launch
    source: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """e.g. ``nnodes=2 (SLURM_NNODES), node_rank=1 (SLURM_NODEID), master=gpu01:21234 (...)``."""
        values = {"nnodes": self.nnodes, "node_rank": self.node_rank, "master_addr": self.master_addr}
        values["master_port"] = self.master_port
        return ", ".join(f"{k}={v} ({self.source[k]})" for k, v in values.items())


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list (``gpu[01-04,07]``) as host names, by python-hostlist (SLURM's own syntax)."""
    try:
        import hostlist  # python-hostlist, in requirements.txt; only the SLURM path needs it
    except ImportError as exc:
        raise LaunchError(
            "reading SLURM_JOB_NODELIST needs python-hostlist: pip install -r requirements.txt"
        ) from exc
    try:
        hosts = hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as exc:
        raise LaunchError(
            f"SLURM_JOB_NODELIST='{nodelist}' does not expand ({exc}): run the launcher through srun inside the "
            "allocation, or give --nnodes, --node_rank and --master_addr"
        ) from exc
    if not hosts:
        raise LaunchError(f"SLURM_JOB_NODELIST='{nodelist}' names no host")
    return hosts


def _slurm(env: dict[str, str]) -> dict[str, tuple[str, str]]:
    """What SLURM says: {name: (value, where from)}."""
    job = env["SLURM_JOB_ID"]
    hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
    found = {"master_addr": (hosts[0], "first host of SLURM_JOB_NODELIST")}
    digits = re.sub(r"\D", "", job)
    found["master_port"] = (str(SLURM_PORT_BASE + int(digits or 0) % 10000), f"from SLURM_JOB_ID={job}")
    for name, var in (("nnodes", "SLURM_NNODES"), ("node_rank", "SLURM_NODEID")):
        if not UINT.fullmatch(env.get(var, "")):
            raise LaunchError(
                f"SLURM_JOB_ID is set but {var}='{env.get(var, '')}' is no number: run under srun"
            )
        found[name] = (env[var], var)
    if len(hosts) != int(env["SLURM_NNODES"]):
        raise LaunchError(
            f"SLURM_JOB_NODELIST='{env.get('SLURM_JOB_NODELIST')}' names {len(hosts)} host(s) but "
            f"SLURM_NNODES={env['SLURM_NNODES']}"
        )
    rank = int(env["SLURM_NODEID"])
    found["local_addr"] = (hosts[rank] if rank < len(hosts) else hosts[0], "SLURM_JOB_NODELIST")
    return found


def resolve_nodes(opts: Options, env: dict[str, str]) -> Nodes:
    """The node layout: the user's flags, else SLURM's variables (cluster launcher in an allocation), else one node."""
    slurm = _slurm(env) if opts.profile == "cluster" and env.get("SLURM_JOB_ID") else {}
    given = {k: (v, f"--{k}") for k, v in opts.flags.items()}
    if "nnodes" in given and "nnodes" in slurm and given["nnodes"][0] != slurm["nnodes"][0]:
        raise LaunchError(
            f"--nnodes={given['nnodes'][0]} but this SLURM allocation (job {env['SLURM_JOB_ID']}) has "
            f"SLURM_NNODES={slurm['nnodes'][0]} nodes: leave --nnodes out, or allocate {given['nnodes'][0]} nodes"
        )
    steps = env.get("SLURM_STEP_NUM_TASKS", "")
    if slurm and UINT.fullmatch(steps) and int(steps) != int(slurm["nnodes"][0]):
        raise LaunchError(
            f"srun started {steps} launchers for {slurm['nnodes'][0]} nodes: one per node is needed "
            "(srun --ntasks-per-node=1); torchrun starts the processes of each node"
        )
    defaults = {"nnodes": ("1", "default"), "node_rank": ("0", "default")}
    defaults["master_addr"], defaults["master_port"] = ("127.0.0.1", "default"), ("", "default")
    pick = {k: given.get(k) or slurm.get(k) or defaults[k] for k in defaults}
    if opts.profile == "cluster" and not slurm:
        for flag in ("nnodes", "node_rank", "master_addr"):
            if flag not in given:
                raise LaunchError(
                    f"train_clip_cluster.sh needs --{flag} (the same line on every node, its own --node_rank), "
                    "or run it through srun inside a SLURM allocation",
                    True,
                )
    nnodes_text, rank_text = pick["nnodes"][0], pick["node_rank"][0]
    if not (UINT.fullmatch(nnodes_text) and int(nnodes_text) > 0):
        raise LaunchError(f"--nnodes must be a positive integer (got '{nnodes_text}')", True)
    nnodes = int(nnodes_text)
    if not (UINT.fullmatch(rank_text) and int(rank_text) < nnodes):
        raise LaunchError(
            f"--node_rank must be 0..{nnodes - 1} for --nnodes={nnodes} (got '{rank_text}')", True
        )
    node_rank, master, port = int(rank_text), pick["master_addr"][0], pick["master_port"][0]
    if nnodes > 1 and not port:
        pick["master_port"] = port = "29500", "default"
    if nnodes > 1:
        _check_resolves(master, pick["master_addr"][1])
    if node_rank == 0 or nnodes == 1:
        local = master
    elif "local_addr" in slurm and "node_rank" not in given:
        local = slurm["local_addr"][0]
    else:
        local = local_ip(master)
    rdzv_id = f"slurm-{env['SLURM_JOB_ID']}" if slurm else f"clip-{master}-{port}"
    source = {k: v[1] for k, v in pick.items()}
    return Nodes(nnodes, node_rank, master, port, local, rdzv_id, source)


def _check_resolves(host: str, source: str) -> None:
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as exc:
        raise LaunchError(
            f"the master address '{host}' ({source}) does not resolve ({exc}): give --master_addr as an IP "
            "address or a host name every node can resolve"
        ) from exc


def local_ip(master_addr: str) -> str:
    """The address this node reaches the master from: the one the other nodes can reach it on."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((master_addr, 9))  # UDP: no packet is sent
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())
