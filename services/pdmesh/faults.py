"""Fault injection for tests and drills: `PDMESH_FAULTS` names faults and how often they happen.

    PDMESH_FAULTS="kv_corrupt=0.5,kv_truncate=0.1,kv_delay_ms=3000,prefill_crash=0.05"

Off unless set. It is the `faults` setting of `WorkerConfig`, so it is read once, at start, like
every other setting (environment, `--faults` or a config file), and `pdmesh serve` hands it to
each worker; a bad spec stops the worker at start with an error naming the bad part. A fault
fires at its real code point:

| key | value | what happens, where |
|---|---|---|
| kv_corrupt | probability | prefill sender: one byte of the KV is flipped after its checksum, before it goes on the wire |
| kv_truncate | probability | prefill sender: every layer goes out short (the last element of each head is dropped) |
| kv_delay_ms | milliseconds | prefill sender: sleeps this long before sending (on every hand-off, or as kv_delay says) |
| kv_delay | probability | how often kv_delay_ms applies (default 1) |
| prefill_crash | probability | prefill worker: the process exits (os._exit) while the prompt is in its engine |
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass

from pdmesh.errors import InvalidRequestError

log = logging.getLogger(__name__)
CRASH_EXIT_CODE = 70  # what a prefill_crash exits with (EX_SOFTWARE), so logs tell it from a real crash


@dataclass(frozen=True, slots=True)
class Faults:
    kv_corrupt: float = 0.0
    kv_truncate: float = 0.0
    kv_delay_ms: float = 0.0
    kv_delay: float = 1.0
    prefill_crash: float = 0.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "kv_delay_ms":
                if value < 0:
                    raise InvalidRequestError(f"PDMESH_FAULTS: kv_delay_ms must be >= 0, got {value:g}", "faults")
            elif not 0.0 <= value <= 1.0:
                raise InvalidRequestError(f"PDMESH_FAULTS: {f.name} is a probability in [0, 1], got {value:g}",
                                          "faults")

    @property
    def active(self) -> bool:
        return self != Faults()


NAMES = tuple(f.name for f in dataclasses.fields(Faults))


def parse(spec: str) -> Faults:
    """`kv_corrupt=0.5,kv_delay_ms=3000` -> Faults; "" -> no faults."""
    values: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, text = part.partition("=")
        name = name.strip()
        if not sep or name not in NAMES:
            raise InvalidRequestError(f"PDMESH_FAULTS: {part!r} is not NAME=VALUE with NAME one of "
                                      f"{', '.join(NAMES)}", "faults")
        try:
            values[name] = float(text)
        except ValueError:
            raise InvalidRequestError(f"PDMESH_FAULTS: {name}={text!r} is not a number", "faults") from None
    return Faults(**values)


_faults = Faults()
_random = random.Random()


def install(faults: Faults) -> None:
    """Turn faults on for this process (a worker does it once, at start)."""
    global _faults
    _faults = faults
    if faults.active:
        log.warning("fault injection is ON: %s", faults)


def hit(name: str) -> bool:
    """Whether fault `name` happens this time (always False unless installed)."""
    probability = getattr(_faults, name)
    return probability > 0 and _random.random() < probability


def delay_s() -> float:
    """Seconds to stall a hand-off now (kv_delay_ms, kv_delay of the time); 0 when off."""
    return _faults.kv_delay_ms / 1000 if _faults.kv_delay_ms and hit("kv_delay") else 0.0
