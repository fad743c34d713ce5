"""Pin this process to one MindSpore device; CPU also gets the kernel fallbacks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Target = Literal["Ascend", "CPU"]


@dataclass(frozen=True)
class DeviceConfig:
    target: Target
    device_id: int  # the device's number on its host: names the worker and its results
    runtime_id: int = -1  # the id MindSpore is given (0 when ASCEND_RT_VISIBLE_DEVICES shows one device)

    @property
    def name(self) -> str:
        return f"{self.target.lower()}:{self.device_id}"

    @property
    def half_precision(self) -> bool:
        return self.target == "Ascend"


def configure(config: DeviceConfig) -> None:
    """Bind MindSpore to the device (PyNative mode); call once, before any model is built."""
    import mindspore as ms

    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device(config.target, config.device_id if config.runtime_id < 0 else config.runtime_id)
    if config.target == "CPU":
        from worker import cpu_fallbacks

        cpu_fallbacks.apply()
