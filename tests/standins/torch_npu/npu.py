"""STAND-IN for torch_npu.npu: device queries, set_option and friends, GradScaler; every call is recorded."""

CALLS: list[tuple] = []
DEVICE_COUNT = 0  # a test sets this to pretend an NPU is present


def is_available() -> bool:
    return DEVICE_COUNT > 0


def device_count() -> int:
    return DEVICE_COUNT


def set_option(options: dict) -> None:
    CALLS.append(("set_option", dict(options)))


def set_compile_mode(jit_compile: bool) -> None:
    CALLS.append(("set_compile_mode", jit_compile))


def synchronize(device=None) -> None:
    CALLS.append(("synchronize", device))


class config:  # noqa: N801 - mirrors torch_npu.npu.config
    allow_internal_format = True


class _GradScaler:
    """Mirrors torch_npu.npu.amp.GradScaler's constructor (it takes `dynamic`); records its arguments."""

    def __init__(
        self,
        init_scale=2.0**16,
        growth_factor=2.0,
        backoff_factor=0.5,
        growth_interval=2000,
        dynamic=True,
        enabled=True,
    ):
        self.init_scale, self.dynamic = init_scale, dynamic
        CALLS.append(("GradScaler", {"init_scale": init_scale, "dynamic": dynamic}))


class amp:  # noqa: N801 - mirrors torch_npu.npu.amp
    GradScaler = _GradScaler
