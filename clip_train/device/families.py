"""The device families and their names in the environment: torch-free, so the launcher shares them."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

from clip_train.errors import ArgumentError

FAMILIES = ("npu", "cuda", "cpu")
VISIBLE_DEVICES_ENV = {"npu": "ASCEND_RT_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES"}
TORCHRUN_ENV = ("WORLD_SIZE", "LOCAL_RANK")  # set by torchrun (and so by the launcher) for every process


def visible_card(var: str, device_id: int, env: Mapping[str, str]) -> str | None:
    """The value of ``var`` that leaves card ``device_id`` the only one visible: ``device_id`` itself, or, when
    ``var`` already narrows the cards (e.g. 4,5,6), its ``device_id``-th entry; None when that list is shorter."""
    given = [c.strip() for c in env.get(var, "").split(",") if c.strip()]
    if not given:
        return str(device_id)
    return given[device_id] if device_id < len(given) else None


def pin_card(device_id: int, env: MutableMapping[str, str]) -> dict[str, str | None]:
    """Make card ``device_id`` the only one a direct (one-process) run sees, before torch first looks at the
    devices: transformers trains a single process on <family>:0, so visibility is what picks the card. Both
    families' variables are set, since the family is not known yet without looking. Returns {variable: value set,
    or None where it already lists fewer cards (left alone)}; {} for card 0. Refuses it under torchrun,
    where each process trains on the card of its LOCAL_RANK."""
    if device_id == 0:
        return {}
    if any(name in env for name in TORCHRUN_ENV):
        raise ArgumentError(
            f"--device_id {device_id}: under torchrun (and the launcher) each process trains on the card of its "
            f"LOCAL_RANK; leave --device_id out and pick the cards with ASCEND_DEVICE_ID (the launcher's 1-card "
            f"runs) or {' / '.join(VISIBLE_DEVICES_ENV.values())}"
        )
    pinned = {var: visible_card(var, device_id, env) for var in VISIBLE_DEVICES_ENV.values()}
    for var, value in pinned.items():
        if value is not None:
            env[var] = value
    return pinned


def pinned_card_problem(device_id: int, pinned: Mapping[str, str | None], family: str) -> str | None:
    """What is wrong with the card ``pin_card`` chose, once the family is known (None: it is this process's
    <family>:0 now)."""
    if not pinned:
        return None
    if family == "cpu":
        shown = ", ".join(f"{var}={value}" for var, value in pinned.items() if value is not None)
        return (
            f"--device_id {device_id}: no NPU or GPU card {device_id} is visible to this process ({shown}); "
            "give a card this host has, or leave --device_id out on a CPU host"
        )
    var = VISIBLE_DEVICES_ENV[family]
    if pinned.get(var) is None:
        return (
            f"--device_id {device_id}: {var} lists fewer than {device_id + 1} cards; give an index into that "
            f"list, or unset {var}"
        )
    return None
