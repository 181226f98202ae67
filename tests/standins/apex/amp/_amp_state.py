"""STAND-IN for apex/amp/_amp_state.py (Ascend apex, gitee ascend/apex master at 49a7994, 2023-11): the global
state that amp.initialize fills; `loss_scalers[0]` is the LossScaler that scale_loss uses."""


class AmpState:
    def __init__(self) -> None:
        self.hard_override = False
        self.loss_scalers: list = []
        self.opt_properties = None


_amp_state = AmpState()


def master_params(optimizer):
    """The params the optimizer steps on (after O2's lazy init: the fp32 master copies)."""
    for group in optimizer.param_groups:
        yield from group["params"]
