"""The energy (kWh) and emissions (kg CO2eq) of a training session, each with its method.

Where the energy comes from, in order of preference:
- codecarbon's offline tracker, when it is installed (`pip install 'lmkit[carbon]'`): it reads
  RAPL / NVML counters itself where it can, else estimates from its CPU power table and the
  CPU load, and adds a RAM estimate. It runs quiet, offline, and writes no file.
- otherwise lmkit's own meters: the CPU is **measured** by Intel RAPL
  (`/sys/class/powercap/intel-rapl:*/energy_uj`, the whole package, when readable) or
  **estimated** as process CPU time x `CPU_WATTS_PER_CORE`; a CUDA GPU is **measured** by NVML's
  energy counter (`pynvml`, when installed) or **estimated** as wall time x `GPU_WATTS`.

Emissions = energy (kWh) x carbon intensity (g CO2eq/kWh) / 1000, the intensity given as a
number or a country code (`carbon_intensity`; default the world average). Under torchrun rank
0 meters its own process (or GPU) and per-process figures are multiplied by the number of ranks;
RAPL counts the whole CPU package, so it is not multiplied.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmkit.errors import ConfigError, MissingExtra, require

log = logging.getLogger("lmkit")
RAPL_ROOT = Path("/sys/class/powercap")
# Estimates where nothing is measured. A busy core of a server CPU: Intel Xeon Gold 6248,
# 150 W TDP / 20 cores = 7.5 W. A GPU without NVML counted at a data-centre board's TDP
# (NVIDIA A100 PCIe: 300 W) for the whole session.
CPU_WATTS_PER_CORE = 7.5
GPU_WATTS = 300.0
# Grid carbon intensity, g CO2eq/kWh. World: IEA Global Energy & CO2 Status Report 2019 (the
# world average codecarbon also uses). Countries: codecarbon 3.3's global_energy_mix.json (Our
# World in Data / Ember, 2023). With codecarbon installed any of its 200+ ISO alpha-3 codes works.
WORLD = 475.0
GRID: dict[str, tuple[str, float]] = {  # alpha-3: (alpha-2, g/kWh)
    "AUS": ("AU", 548.7), "BRA": ("BR", 98.3), "CAN": ("CA", 170.0), "CHN": ("CN", 582.3),
    "DEU": ("DE", 381.0), "ESP": ("ES", 174.1), "FRA": ("FR", 56.0), "GBR": ("GB", 237.6),
    "IND": ("IN", 713.4), "ITA": ("IT", 330.7), "JPN": ("JP", 485.4), "NLD": ("NL", 267.6),
    "NOR": ("NO", 30.1), "POL": ("PL", 661.9), "SWE": ("SE", 40.7), "USA": ("US", 369.5),
}
_ALPHA2 = {a2: a3 for a3, (a2, _) in GRID.items()}


def carbon_intensity(spec: str | float | None = "world") -> tuple[float, str]:
    """(g CO2eq/kWh, where the figure comes from) for a number ("56", 56.0), "world", or a
    country code: ISO alpha-3 ("FRA") or alpha-2 ("FR") of the built-in table, or any alpha-3
    code of codecarbon's data when it is installed."""
    text = "world" if spec is None else str(spec).strip()
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None:
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"carbon_intensity={text!r}: give g CO2eq/kWh as a number >= 0 "
                              "or a country code (e.g. FRA)")
        return value, "given (g CO2eq/kWh)"
    if text.lower() == "world":
        return WORLD, "world average (IEA 2019)"
    code = _ALPHA2.get(text.upper(), text.upper())
    mix = _codecarbon_mix()
    if code in mix and mix[code].get("carbon_intensity") is not None:
        entry = mix[code]
        return float(entry["carbon_intensity"]), \
            f"{code} grid ({entry.get('year', '?')}, codecarbon data)"
    if code in GRID:
        return GRID[code][1], f"{code} grid (2023, Our World in Data / Ember)"
    known = ", ".join(sorted(GRID)) + (" and codecarbon's other alpha-3 codes" if mix else
                                       " (install lmkit[carbon] for 200+ more)")
    raise ConfigError(f"carbon_intensity={text!r} is neither a number (g CO2eq/kWh), 'world' "
                      f"nor a known country code; known: {known}")


def _codecarbon_mix() -> dict[str, Any]:
    """codecarbon's per-country energy mix (alpha-3 -> record), or {} without codecarbon."""
    try:
        require("codecarbon", "carbon")
        from codecarbon.input import DataSource
    except (MissingExtra, ImportError):
        return {}
    return DataSource().get_global_energy_mix_data()


# ---- meters: each gives the kWh used since it started ------------------------------------------


class Meter:
    """kWh used since the meter started (`kwh`); `sample` reads counters that wrap."""

    method = ""

    def sample(self) -> None:
        pass

    def kwh(self) -> float:
        raise NotImplementedError


class RaplMeter(Meter):
    """Intel RAPL package (and DRAM) counters under `root`: measured, whole package. The
    counters wrap at max_energy_range_uj, so `sample` must run more often than one wrap."""

    method = "measured: Intel RAPL (whole CPU package)"

    def __init__(self, root: Path = RAPL_ROOT):
        zones = []
        for zone in sorted(root.glob("intel-rapl:*")):
            name = (zone / "name").read_text().strip() if (zone / "name").exists() else ""
            if name.startswith("package") or name == "dram":
                zones.append(zone)
        if not zones:
            raise OSError(f"no RAPL package zone under {root}")
        self.zones = zones
        self.ranges = [int((z / "max_energy_range_uj").read_text()) for z in zones]
        self.last = self._read()
        self.total_uj = 0

    def _read(self) -> list[int]:
        return [int((z / "energy_uj").read_text()) for z in self.zones]

    def sample(self) -> None:
        now = self._read()
        for i, (before, after) in enumerate(zip(self.last, now)):
            self.total_uj += after - before if after >= before else \
                after + self.ranges[i] - before
        self.last = now

    def kwh(self) -> float:
        self.sample()
        return self.total_uj / 3.6e12


class EstimateMeter(Meter):
    """Estimated: seconds of `clock` x `watts` (process CPU time x W per core; wall time x W
    per GPU)."""

    def __init__(self, clock: Callable[[], float], watts: float, what: str):
        self.clock, self.watts, self.start = clock, watts, clock()
        self.method = f"estimated: {what}"

    def kwh(self) -> float:
        return (self.clock() - self.start) * self.watts / 3.6e6


def cpu_estimate() -> EstimateMeter:
    """The process's CPU time (all threads, user + system) x CPU_WATTS_PER_CORE."""
    return EstimateMeter(time.process_time, CPU_WATTS_PER_CORE,
                         f"process CPU time x {CPU_WATTS_PER_CORE:g} W per core")


def gpu_estimate() -> EstimateMeter:
    """Wall time x GPU_WATTS (no NVML to read)."""
    return EstimateMeter(time.perf_counter, GPU_WATTS, f"wall time x {GPU_WATTS:g} W per GPU")


class NvmlMeter(Meter):
    """NVML's total-energy counter of one GPU (mJ since the driver loaded): measured."""

    method = "measured: NVML GPU energy counter"

    def __init__(self, device: torch.device):
        import pynvml  # nvidia-ml-py; the caller falls back to an estimate without it

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        self.handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}") if uuid else \
            pynvml.nvmlDeviceGetHandleByIndex(index)
        self.read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        self.start = self.read()

    def kwh(self) -> float:
        return (self.read() - self.start) / 3.6e9


class CodecarbonMeter:
    """codecarbon's OfflineEmissionsTracker: no network, no output file, errors only in the log.
    It measures RAPL/NVML where it can, else estimates; it also counts RAM."""

    def __init__(self, codecarbon: Any, gpu: torch.device | None):
        logging.getLogger("codecarbon").setLevel(logging.ERROR)
        gpu_ids = [gpu.index or 0] if gpu is not None else None
        self.tracker = codecarbon.OfflineEmissionsTracker(
            output_methods=[], log_level="error", tracking_mode="process",
            allow_multiple_runs=True, measure_power_secs=15, gpu_ids=gpu_ids)
        self.tracker.start()
        self.version = getattr(codecarbon, "__version__", "?")
        self.method = f"codecarbon {self.version} ({self._hardware()})"
        self.final, self.stopped = None, False
        self.last = {"cpu_kwh": 0.0, "gpu_kwh": 0.0, "ram_kwh": 0.0}

    def _hardware(self) -> str:
        parts = [f"{type(h).__name__} {getattr(h, '_mode', '')}".strip()
                 for h in getattr(self.tracker, "_hardware", [])]
        return ", ".join(parts) or "default"

    def parts(self) -> dict[str, float]:
        data = self.final
        if data is None and self.stopped:  # stopping failed: what was read before
            return self.last
        if data is None:  # a reading mid-run: the tracker keeps running
            try:
                self.tracker.flush()
                data = self.tracker._prepare_emissions_data()
            except Exception as e:  # keep the last reading rather than stop the run
                log.warning("codecarbon could not be read (%s)", e)
                return self.last
        self.last = {"cpu_kwh": data.cpu_energy, "gpu_kwh": data.gpu_energy,
                     "ram_kwh": data.ram_energy}
        return self.last

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.tracker.stop()  # codecarbon suppresses its own errors here
            self.final = getattr(self.tracker, "final_emissions_data", None)


class EnergyMeter:
    """The energy of one training session on `device` and its emissions at `intensity`
    (see `carbon_intensity`). `use_codecarbon`: None = when installed; `rapl_root` is where the
    RAPL counters are read (tests point it at fake counter files)."""

    def __init__(self, device: torch.device, *, intensity: str | float | None = "world",
                 world_size: int = 1, use_codecarbon: bool | None = None,
                 rapl_root: Path = RAPL_ROOT):
        self.intensity, self.carbon_source = carbon_intensity(intensity)
        self.world_size, self._sampled = world_size, time.monotonic()
        gpu = device if device.type == "cuda" else None
        self.codecarbon = self.cpu = self.gpu = None
        module = None
        if use_codecarbon is not False:
            try:
                module = require("codecarbon", "carbon", "codecarbon energy tracking")
            except MissingExtra:
                if use_codecarbon:
                    raise
        if module is not None:
            try:
                self.codecarbon = CodecarbonMeter(module, gpu)
                return
            except Exception as e:  # a meter must never stop a training run
                log.warning("codecarbon could not start (%s); lmkit's own meters are used", e)
        try:
            self.cpu = RaplMeter(rapl_root)
        except (OSError, ValueError):  # no RAPL, or not readable (root only since 2020)
            self.cpu = cpu_estimate()
        if gpu is not None:
            try:
                self.gpu = NvmlMeter(gpu)
            except Exception:  # no pynvml, no driver, or a GPU without an energy counter
                self.gpu = gpu_estimate()

    def sample(self) -> None:
        """Read the counters that wrap around (called every step; reads at most once a
        second)."""
        now = time.monotonic()
        if now - self._sampled < 1.0:
            return
        self._sampled = now
        for meter in (self.cpu, self.gpu):
            if meter is not None:
                meter.sample()

    def reading(self) -> dict[str, Any]:
        """This session so far, a flat record: energy_kwh, its parts (cpu_kwh, gpu_kwh,
        ram_kwh), energy_method, the carbon intensity and its source, emissions_kg."""
        if self.codecarbon is not None:
            parts, method = self.codecarbon.parts(), self.codecarbon.method
            scale = self.world_size
        else:
            parts = {"cpu_kwh": self.cpu.kwh() * (1 if isinstance(self.cpu, RaplMeter)
                                                  else self.world_size)}
            method = f"cpu {self.cpu.method}"
            if self.gpu is not None:
                parts["gpu_kwh"] = self.gpu.kwh() * self.world_size
                method += f"; gpu {self.gpu.method}"
            scale = 1
        parts = {k: v * scale for k, v in parts.items()}
        if self.world_size > 1:
            method += f"; rank 0's process figures x {self.world_size} ranks"
        energy = sum(parts.values())
        return {"energy_kwh": energy, **parts, "energy_method": method,
                "carbon_intensity_g_per_kwh": self.intensity,
                "carbon_source": self.carbon_source,
                "emissions_kg": energy * self.intensity / 1000}

    def stop(self) -> None:
        if self.codecarbon is not None:
            self.codecarbon.stop()
