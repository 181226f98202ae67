"""The device families and their names in the environment: torch-free, so the launcher shares them."""

FAMILIES = ("npu", "cuda", "cpu")
VISIBLE_DEVICES_ENV = {"npu": "ASCEND_RT_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES"}
