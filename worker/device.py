"""Pin this process to one MindSpore device; CPU also gets the kernel fallbacks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Target = Literal["Ascend", "CPU"]


@dataclass(frozen=True)
class DeviceConfig:
    target: Target
    device_id: int

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
    ms.set_device(config.target, config.device_id)
    if config.target == "CPU":
        from worker import cpu_fallbacks

        cpu_fallbacks.apply()
