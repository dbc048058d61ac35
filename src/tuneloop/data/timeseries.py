"""Time tables as planners keep them → series on a regular time axis, and the feature rows a forecaster reads.

A time table has a time column (a date, a datetime, or parts in columns: year / month / day / hour / minute),
any regular frequency, one or many series (an id column, or several), the target, and known-in-advance
feature columns (weather, prices, promotions, events). Holidays come from the `holidays` package (offline).

    read_time_table(spec, ...)                 TimeTable: rows sorted by series and time, one per step
    design(table, positions, ...)              feature rows for (series, target step, horizon) triples:
                                               lags are NaN when they would look past the forecast origin

Every problem names `file:line: field: what`: a time that does not parse, a target that is not a number, two
rows for the same series and time, a gap in a series (a missing step; `aggregate` fills empty buckets instead,
since no sales in a bucket means zero demand), a feature missing from a row.

The time axis is an integer step index (`TimeTable.step_of`): fixed steps (minutes, hours, days, weeks) count
from the first time; month, quarter and year steps count calendar periods, so February is one step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from .formats import iter_rows

TIME_PARTS = ("year", "month", "day", "hour", "minute")
CALENDAR = ("hour", "dayofweek", "day", "month", "dayofyear", "holiday")
MAX_PROBLEMS = 10
# calendar step names → months per step (the rest are fixed pandas Timedeltas)
CALENDAR_STEPS = {"M": 1, "MS": 1, "ME": 1, "Q": 3, "QS": 3, "QE": 3, "Y": 12, "YS": 12, "YE": 12, "A": 12, "AS": 12}


@dataclass
class TimeTable:
    """One row per (series, step). `values[s]` is series s's target on its contiguous steps
    `start[s] .. start[s] + len - 1`; `features[s][name]` the known feature columns on the same steps."""

    source: str
    target: str
    freq: str  # "30min", "h", "D", "W", "MS", "QS", "YS" (a pandas alias), the data's own step
    series: list[str]
    start: dict[str, int]
    values: dict[str, np.ndarray]
    features: dict[str, dict[str, np.ndarray]]
    feature_names: list[str]
    categorical: dict[str, list[str]] = field(default_factory=dict)  # feature → its category names (codes)
    origin_time: Any = None  # pandas Timestamp of step 0
    holidays: str | None = None  # country code for the `holidays` package

    @property
    def end(self) -> dict[str, int]:
        return {s: self.start[s] + len(self.values[s]) - 1 for s in self.series}

    def time_of(self, step: int):
        import pandas as pd

        months = CALENDAR_STEPS.get(self.freq)
        if months:
            return self.origin_time + pd.DateOffset(months=months * int(step))
        return self.origin_time + int(step) * pd.Timedelta(pd.tseries.frequencies.to_offset(self.freq))

    def times(self, steps) -> "Any":
        import pandas as pd

        return pd.DatetimeIndex([self.time_of(int(k)) for k in steps])

    def seasons(self) -> list[int]:
        """The data's own seasonal periods in steps (hourly: a day and a week; daily: a week and a
        364-day year, so last year's value falls on the same weekday; weekly 52, monthly 12, quarterly 4)."""
        return seasons_for(self.freq)


def seasons_for(freq: str) -> list[int]:
    import pandas as pd

    months = CALENDAR_STEPS.get(freq)
    if months:
        return {1: [12], 3: [4], 12: []}[months]
    step = pd.Timedelta(pd.tseries.frequencies.to_offset(freq))
    day, week = pd.Timedelta(days=1), pd.Timedelta(days=7)
    if step < day and day % step == pd.Timedelta(0):
        return [int(day / step), int(week / step)]
    if step == day:
        return [7, 364]
    if step == week:
        return [52]
    return []


def _problems(lines: list[str]) -> DataError:
    more = f"\n... and {len(lines) - MAX_PROBLEMS} more" if len(lines) > MAX_PROBLEMS else ""
    return DataError("\n".join(lines[:MAX_PROBLEMS]) + more)


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return None if isinstance(v, float) and math.isnan(v) else float(v)
    if isinstance(v, str):
        try:
            x = float(v.strip().replace(",", "")) if v.strip() else None
        except ValueError:
            return None
        return None if x is None or math.isnan(x) else x
    return None


def _infer_freq(deltas) -> str:
    """The step most rows advance by: a calendar month / quarter / year when the gaps are 28-31 / 90-92 /
    365-366 days, else the fixed step itself."""
    import pandas as pd

    if len(deltas) == 0:
        raise DataError("time column: need at least two times per series to tell the frequency "
                        "(or set forecast.frequency)")
    common = pd.Series(deltas).mode().iloc[0]
    days = common / pd.Timedelta(days=1)
    if 28 <= days <= 31:
        return "MS"
    if 89 <= days <= 92:
        return "QS"
    if 365 <= days <= 366:
        return "YS"
    return _fixed_name(common)


def _fixed_name(step) -> str:
    """A fixed step's plain name: W, D, 2D, h, 30min, 15s (pandas would say 24h for a day)."""
    import pandas as pd

    for unit, name in ((pd.Timedelta(days=7), "W"), (pd.Timedelta(days=1), "D"), (pd.Timedelta(hours=1), "h"),
                       (pd.Timedelta(minutes=1), "min"), (pd.Timedelta(seconds=1), "s")):
        if step >= unit and step % unit == pd.Timedelta(0):
            n = int(step / unit)
            return name if n == 1 else f"{n}{name}"
    raise DataError(f"time column: step {step} is finer than a second")


def _step_index(times, freq: str, t0) -> np.ndarray:
    """Integer steps from t0; None where a time is off the step grid."""
    import pandas as pd

    months = CALENDAR_STEPS.get(freq)
    if months:
        m = (times.year - t0.year) * 12 + (times.month - t0.month)
        return np.where(m % months == 0, m // months, -10**12).astype(np.int64)
    step = pd.Timedelta(pd.tseries.frequencies.to_offset(freq))
    d = (times - t0) / step
    return np.where(np.isclose(d, np.round(d)), np.round(d), -10**12).astype(np.int64)


def read_time_table(spec: str, target: str, *, time_field: str | None = None,
                    time_parts: dict[str, str] | None = None, series_field: str | list[str] | None = None,
                    features: list[str] = (), frequency: str | None = None, aggregate: str | None = None,
                    holidays: str | None = None, start: str | None = None, fmt: str = "auto",
                    require_target: bool = True,
                    like: "TimeTable | None" = None) -> "TimeTable | dict":
    """Read and check a time table. With `require_target=False` (future features for `tuneloop forecast`)
    the target may be absent and a dict {(series, step): {feature: value}} is returned on `like`'s axis."""
    import pandas as pd

    if (time_field is not None) + bool(time_parts) + (start is not None) != 1:
        raise ConfigError("forecast: give the time as data.time_field (one column), forecast.time_parts "
                          "(columns for year / month / day / hour) or forecast.start (no time column: rows are "
                          "consecutive steps), exactly one of them")
    if start is not None and frequency is None:
        raise ConfigError("forecast.start: needs forecast.frequency (the step between consecutive rows)")
    if time_parts:
        unknown = sorted(set(time_parts) - set(TIME_PARTS))
        if unknown or "year" not in time_parts:
            raise ConfigError(f"forecast.time_parts: keys are {', '.join(TIME_PARTS)} (year required); "
                              f"got {', '.join(sorted(time_parts))}")
    if aggregate is not None and frequency is None:
        raise ConfigError("forecast.aggregate: needs forecast.frequency (the bucket size, e.g. D or h)")
    sfields = [series_field] if isinstance(series_field, str) else list(series_field or [])
    time_label = time_field or ("+".join(time_parts.values()) if time_parts else "(row order)")
    counts: dict[str, int] = {}
    problems: list[str] = []
    lines, raw_times, sids, ys, feats = [], [], [], [], {f: [] for f in features}
    for row in iter_rows(spec, fmt):
        if row.problem is not None:
            problems.append(f"{spec}:{row.line}: {row.problem}")
            continue
        d = row.data
        if start is not None:
            sid = "/".join(str(d.get(c)) for c in sfields) if sfields else target
            raw_times.append(counts.get(sid, 0))
            counts[sid] = counts.get(sid, 0) + 1
        elif time_field is not None:
            if d.get(time_field) in (None, ""):
                problems.append(f"{spec}:{row.line}: {time_field}: missing time")
                continue
            raw_times.append(str(d[time_field]))
        else:
            parts = {}
            for part, col in time_parts.items():
                x = _number(d.get(col))
                if x is None or x != int(x):
                    problems.append(f"{spec}:{row.line}: {col}: {part} must be a whole number, got {d.get(col)!r}")
                    break
                parts[part] = int(x)
            else:
                raw_times.append(parts)
            if len(raw_times) != len(lines) + 1:
                continue
        missing = [c for c in sfields if d.get(c) in (None, "")]
        if missing:
            problems.append(f"{spec}:{row.line}: {missing[0]}: missing series id")
            raw_times.pop()
            continue
        sids.append("/".join(str(d[c]) for c in sfields) if sfields else target)
        if aggregate == "count":
            ys.append(1.0)
        else:
            y = _number(d.get(target))
            if y is None and (require_target or d.get(target) not in (None, "")):
                got = "missing" if d.get(target) in (None, "") else f"not a number: {d.get(target)!r}"
                problems.append(f"{spec}:{row.line}: {target}: {got}")
            ys.append(y)
        for f in features:
            v = d.get(f)
            if v in (None, "") or (isinstance(v, float) and math.isnan(v)):
                problems.append(f"{spec}:{row.line}: {f}: missing value of known feature {f!r}")
            feats[f].append(v)
        lines.append(row.line)
    if not lines and not problems:
        raise DataError(f"{spec}: no rows")
    # times: one vectorised parse, then name every row that did not parse
    if start is not None:
        try:
            t_first = pd.Timestamp(start)
            off = pd.tseries.frequencies.to_offset(frequency)
        except ValueError:
            raise ConfigError(f"forecast.start / frequency: {start!r} / {frequency!r}: not a time and a pandas "
                              f"frequency") from None
        times = pd.Series([t_first + i * off for i in raw_times])
    elif time_field is not None:
        times = pd.to_datetime(pd.Series(raw_times), errors="coerce", format="mixed")
    else:
        cols = {p: [t.get(p, 1 if p in ("month", "day") else 0) for t in raw_times] for p in TIME_PARTS}
        try:
            times = pd.to_datetime(pd.DataFrame(cols), errors="coerce")
        except (ValueError, OverflowError):
            times = pd.Series([pd.NaT] * len(raw_times))
    for i in np.flatnonzero(times.isna().to_numpy()):
        problems.append(f"{spec}:{lines[i]}: {time_label}: not a date or time: {raw_times[i]!r}")
    if problems:
        raise _problems(problems)
    if getattr(times.dt, "tz", None) is not None:
        times = times.dt.tz_convert(None)
    frame = pd.DataFrame({"line": lines, "series": sids, "time": times, "y": ys})
    # features: numbers where every value is one, else categories (codes in first-seen order)
    categorical: dict[str, list[str]] = {}
    for f in features:
        nums = [_number(v) for v in feats[f]]
        if all(x is not None for x in nums):
            frame[f] = nums
        else:
            cats = list(dict.fromkeys(str(v) for v in feats[f]))
            categorical[f] = cats
            frame[f] = [float(cats.index(str(v))) for v in feats[f]]
    if aggregate is not None:
        frame = _aggregate(frame, frequency, aggregate, features, categorical)
    if frequency is None:
        deltas = frame.sort_values(["series", "time"]).groupby("series")["time"].diff().dropna()
        deltas = deltas[deltas > pd.Timedelta(0)]
        frequency = _infer_freq(deltas)
    else:
        try:
            frequency = frequency if frequency in CALENDAR_STEPS else \
                _fixed_name(pd.Timedelta(pd.tseries.frequencies.to_offset(frequency)))
        except ValueError:
            raise ConfigError(f"forecast.frequency: {frequency!r} is not a pandas frequency (e.g. 30min, h, D, W, "
                              f"MS, QS)") from None
    t0 = like.origin_time if like is not None else frame["time"].min()
    if CALENDAR_STEPS.get(frequency):
        t0 = pd.Timestamp(t0.year, t0.month, 1) if like is None else t0
    frame["step"] = _step_index(pd.DatetimeIndex(frame["time"]), frequency, t0)
    off = frame[frame["step"] < -10**11]
    if len(off):
        raise _problems([f"{spec}:{r.line}: {time_label}: {r.time} is not on the {frequency} grid of the "
                         f"other rows" for r in off.itertuples()])
    frame = frame.sort_values(["series", "step", "line"], kind="stable")
    dup = frame.duplicated(["series", "step"], keep=False)
    if dup.any():
        first = frame[dup].groupby(["series", "step"])["line"].transform("min")
        problems = [f"{spec}:{r.line}: {time_label}: duplicate time {r.time} for series {r.series!r} "
                    f"(first at line {first[i]})" for i, r in zip(frame[dup].index, frame[dup].itertuples())
                    if r.line != first[i]]
        raise _problems(problems)
    if not require_target:
        # future rows: categories coded as the training table coded them
        out = {}
        for rec in frame.to_dict(orient="records"):
            vals = {}
            for f in features:
                v = rec[f]
                if like is not None and f in like.categorical:
                    name = categorical[f][int(v)] if f in categorical else str(v)
                    v = float(like.categorical[f].index(name)) if name in like.categorical[f] else np.nan
                vals[f] = float(v)
            out[(rec["series"], int(rec["step"]))] = vals
        return out
    problems = []
    start, values, fvals = {}, {}, {}
    for s, g in frame.groupby("series", sort=False):
        steps = g["step"].to_numpy()
        gaps = np.flatnonzero(np.diff(steps) != 1)
        for j in gaps:
            prev, nxt = g.iloc[j], g.iloc[j + 1]
            n = int(steps[j + 1] - steps[j] - 1)
            problems.append(f"{spec}:{nxt.line}: {time_label}: gap in series {s!r}: {n} missing step(s) of "
                            f"{frequency} between {prev.time} (line {prev.line}) and {nxt.time}")
        start[s] = int(steps[0])
        values[s] = g["y"].to_numpy(dtype=np.float64, copy=True)
        fvals[s] = {f: g[f].to_numpy(dtype=np.float64) for f in features}
    if problems:
        raise _problems(problems)
    series = list(dict.fromkeys(frame["series"]))
    return TimeTable(source=spec, target=target, freq=frequency, series=series, start=start, values=values,
                     features=fvals, feature_names=list(features), categorical=categorical, origin_time=t0,
                     holidays=holidays)


def _aggregate(frame, freq: str, how: str, features: list[str], categorical: dict):
    """Rows of an order log → one row per series and bucket: the count of rows or the sum / mean of the
    target, features averaged; every bucket inside a series' span exists (an empty one sold nothing: 0)."""
    import pandas as pd

    per = freq if freq not in ("MS", "QS", "YS") else freq[0]
    try:
        frame["time"] = pd.DatetimeIndex(frame["time"]).to_period(per).start_time
    except ValueError:
        raise ConfigError(f"forecast.frequency: {freq!r} is not a pandas frequency (e.g. h, D, W, MS)") from None
    agg = {"y": "sum" if how in ("count", "sum") else "mean", "line": "min",
           **{f: "mean" for f in features if f not in categorical}, **{f: "first" for f in categorical}}
    out = frame.groupby(["series", "time"], as_index=False).agg(agg)
    filled = []
    for s, g in out.groupby("series", sort=False):
        full = pd.date_range(g["time"].min(), g["time"].max(), freq=freq)
        g = g.set_index("time").reindex(full)
        g["series"] = s
        g["y"] = g["y"].fillna(0.0) if how in ("count", "sum") else g["y"]
        g["line"] = g["line"].ffill().astype(int)
        for f in features:
            g[f] = g[f].ffill().bfill()
        filled.append(g.rename_axis("time").reset_index())
    return pd.concat(filled, ignore_index=True)


# ----------------------------------------------------------------------------------------------------
# features


def default_lags(freq: str, horizon: int) -> list[int]:
    """Every step back to one season (and the horizon), two seasons, and the longer seasons."""
    seasons = seasons_for(freq)
    first = seasons[0] if seasons else 4
    lags = set(range(1, max(first, horizon) + 1)) | {2 * first} | set(seasons[1:]) | {s * 2 for s in seasons[1:2]
                                                                                      if s * 2 <= 400}
    return sorted(lags)


def usable_lags(table: TimeTable, lags: list[int], last: int) -> list[int]:
    """The lags some training target up to step `last` can read (a lag no row has is a column of NaN,
    which boosting cannot bin): a 364-day lag needs more than a year of history."""
    span = last - min(table.start.values())
    return [L for L in sorted(lags) if L < span]


def holiday_names(country: str | None, times) -> list[str]:
    if not country:
        return [""] * len(times)
    import holidays as hol

    years = sorted({t.year for t in times})
    try:
        cal = hol.country_holidays(country, years=years)
    except NotImplementedError:
        raise ConfigError(f"forecast.holidays: {country!r} is not a country the holidays package knows "
                          f"(e.g. US, GB, DE, AU)") from None
    return [cal.get(t.date(), "") or "" for t in times]


@dataclass
class Design:
    """Feature rows: `X` (rows x columns, NaN where unknown), their `names`, and per row the series, target
    step, horizon, origin-time value and the series' scale (targets are modelled as y / scale)."""

    X: np.ndarray
    names: list[str]
    series: list[str]
    steps: np.ndarray
    horizon: np.ndarray
    scale: np.ndarray
    context: list[dict]  # what the text template may name


def design(table: TimeTable, rows: list[tuple[str, int, int]], lags: list[int], scale: dict[str, float],
           future: dict | None = None) -> Design:
    """Features of each (series, target step, horizon): the origin is step - horizon, and no value after it
    is read (lags shorter than the horizon are NaN, the level is the mean of the season before the origin).
    `future`: known features for steps past the series' end, {(series, step): {name: value}}."""
    seasons = table.seasons()
    season = seasons[0] if seasons else 1
    steps = np.array([k for _, k, _ in rows], dtype=np.int64)
    times = table.times(steps) if len(rows) else []
    names_h = holiday_names(table.holidays, times)
    cal = {"hour": [t.hour for t in times], "dayofweek": [t.dayofweek for t in times], "day": [t.day for t in times],
           "month": [t.month for t in times], "dayofyear": [t.dayofyear for t in times],
           "holiday": [float(bool(n)) for n in names_h]}
    sub_daily = bool(seasons) and season > 7 and not CALENDAR_STEPS.get(table.freq)
    cal_names = [c for c in CALENDAR if c != "hour" or sub_daily]
    names = ["series", "horizon", "level", *[f"lag{L}" for L in lags], *cal_names, *table.feature_names]
    X = np.full((len(rows), len(names)), np.nan)
    context = []
    sidx = {s: i for i, s in enumerate(table.series)}
    for r, (s, k, h) in enumerate(rows):
        y, st, sc = table.values[s], table.start[s], scale[s]
        o = k - h - st  # origin position in the series' array
        X[r, 0], X[r, 1] = sidx[s], h
        lo = max(0, o - season + 1)
        if o >= 0:
            X[r, 2] = y[lo:o + 1].mean() / sc
        for j, L in enumerate(lags):
            p = k - L - st
            if L >= h and 0 <= p <= o:
                X[r, 3 + j] = y[p] / sc
        base = 3 + len(lags)
        for j, c in enumerate(cal_names):
            X[r, base + j] = cal[c][r]
        pos = k - st
        fx = {}
        for j, f in enumerate(table.feature_names):
            if 0 <= pos < len(y):
                v = table.features[s][f][pos]
            elif future is not None and (s, k) in future:
                v = future[(s, k)][f]
            else:
                v = np.nan
            X[r, base + len(cal_names) + j] = v
            fx[f] = table.categorical[f][int(v)] if f in table.categorical and not np.isnan(v) else v
        t = times[r]
        context.append({**fx, "series": s, "time": t.isoformat(), "date": t.date().isoformat(),
                        "weekday": t.day_name(), "month": t.month_name(), "hour": t.hour, "horizon": int(h),
                        "holiday": names_h[r], "last": float(y[o]) if 0 <= o < len(y) else None,
                        **{f"lag{L}": (float(y[k - L - st]) if L >= h and 0 <= k - L - st <= o else None)
                           for L in lags}})
    return Design(X=X, names=names, series=[s for s, _, _ in rows], steps=steps,
                  horizon=np.array([h for _, _, h in rows], dtype=np.int64),
                  scale=np.array([scale[s] for s, _, _ in rows]), context=context)


def target_rows(table: TimeTable, first: int, last: int, horizons: list[int], min_history: int) -> list[tuple]:
    """(series, step, horizon) for every target step in [first, last] of each series whose origin has at
    least `min_history` steps before it."""
    out = []
    for s in table.series:
        st, en = table.start[s], table.end[s]
        for k in range(max(first, st), min(last, en) + 1):
            for h in horizons:
                if k - h - st >= min_history:
                    out.append((s, k, h))
    return out


def actual(table: TimeTable, s: str, k: int) -> float:
    return float(table.values[s][k - table.start[s]])
