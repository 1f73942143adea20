"""Weighting strategies behind one interface (`Weighting`), selected by name from `WEIGHTINGS`.

Adding a method (GradNorm, DWA, ...) means one new file here and one registry line.
"""

from __future__ import annotations

import inspect

from pipeline.errors import UserError
from pipeline.reducer.weighting.base import Weighting
from pipeline.reducer.weighting.fixed import EqualWeighting, FixedWeighting
from pipeline.reducer.weighting.running_mean import RunningMeanWeighting
from pipeline.reducer.weighting.uncertainty import PositiveUncertaintyWeighting, UncertaintyWeighting

WEIGHTINGS: dict[str, type[Weighting]] = {
    cls.name: cls for cls in (EqualWeighting, FixedWeighting, UncertaintyWeighting,
                              PositiveUncertaintyWeighting, RunningMeanWeighting)
}


def build_weighting(name: str, tasks, options: dict | None = None) -> Weighting:
    """The strategy `name` for `tasks`; bad names or options are UserErrors naming the flag."""
    if name not in WEIGHTINGS:
        raise UserError(f"unknown weighting {name!r} (--balance / loss.weighting): choose "
                        f"one of {', '.join(WEIGHTINGS)}")
    cls = WEIGHTINGS[name]
    options = dict(options or {})
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "tasks")]
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise UserError(f"weighting {name!r} does not take option(s) {unknown} "
                        f"(loss.weighting_options); it accepts {accepted or 'none'}")
    return cls(tasks, **options)


__all__ = ["Weighting", "WEIGHTINGS", "build_weighting", "EqualWeighting", "FixedWeighting",
           "UncertaintyWeighting", "PositiveUncertaintyWeighting", "RunningMeanWeighting"]
