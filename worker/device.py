"""Which device this process runs on, and with which backend (plain data; `worker.pipelines.base.configure` binds the
backend's framework to it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kiq.settings import Settings

Target = Literal["Ascend", "CPU", "GPU"]


@dataclass(frozen=True)
class DeviceConfig:
    target: Target
    device_id: int  # the device's number on its host: names the worker and its results
    runtime_id: int = -1  # the id the framework is given (0 when *_VISIBLE_DEVICES shows one device)
    backend: str = "mindone"  # "mindone" (MindSpore) or "diffusers" (torch)

    @classmethod
    def from_settings(cls, settings: Settings) -> DeviceConfig:
        return cls(settings.device_target, settings.device_id, settings.runtime_device_id, settings.model_backend)

    @property
    def name(self) -> str:
        return f"{self.target.lower()}:{self.device_id}"

    @property
    def half_precision(self) -> bool:
        return self.target != "CPU"

    @property
    def runtime(self) -> int:
        return self.device_id if self.runtime_id < 0 else self.runtime_id
