"""Column-level checks behind clients.data: ids, timestamps, amounts, labels and numeric features.

Every check raises DataError whose message names the file, the column and up to five offending rows as
`row N: value`, where N counts data rows from 1 (the header is not counted) in the file's original order.
"""

from __future__ import annotations

import codecs
import gzip
import io
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from pandas.api import types as ptypes

logger = logging.getLogger(__name__)

MAX_SHOWN = 5
_DELIMITERS: dict[str, str] = {";": "semicolon (';')", "\t": "tab", "|": "pipe ('|')"}
_CHUNK = 1 << 20
# A time of day followed by a UTC offset or zone letters: "10:00+01:00", "10:00:00.5Z", "10:00 UTC".
# Anchored on the time so that a plain date such as "2024-01-01" never reads as an offset. Plain RE2
# syntax (no \s or \d) keeps pandas on pyarrow's vectorized regex instead of Python's re, row by row.
_OFFSET_RE = r"[0-9]:[0-9]{2}(?::[0-9]{2}(?:[.,][0-9]+)?)? *(?:[Zz]|UTC|GMT|[+-][0-9]{2}(?::?[0-9]{2})?)$"


class DataError(ValueError):
    """Bad input data; message names the file, the column and a sample of offending rows."""

    def __init__(
        self,
        message: str,
        *,
        path: str | Path = "",
        column: str | None = None,
        rows: Sequence[object] | None = None,
    ) -> None:
        super().__init__(message)
        self.path = str(path)
        self.column = column
        self.rows: list[object] = list(rows or [])


def show_value(value: object) -> str:
    """Render one cell for an error message: strings quoted so blanks and spaces stay visible."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def bad_rows(path: str | Path, column: str, problem: str, values: pd.Series, hint: str = "") -> DataError:
    """Build a DataError for the rows of `values` (the offending cells, original index kept)."""
    sample = values.iloc[:MAX_SHOWN]
    rows = [int(i) + 1 for i in sample.index]
    shown = ", ".join(f"row {r}: {show_value(v)}" for r, v in zip(rows, sample.tolist(), strict=True))
    more = f", ... ({len(values) - MAX_SHOWN} more)" if len(values) > MAX_SHOWN else ""
    tail = f"; {hint}" if hint else ""
    message = f"{path}: column '{column}': {len(values)} {problem} ({shown}{more}){tail}"
    return DataError(message, path=path, column=column, rows=rows)


def check_ids(values: pd.Series, *, path: str | Path, column: str, unique: bool) -> pd.Series:
    """Reject missing or blank ids (and repeated ones if `unique`); return the values unchanged."""
    missing = values.isna()
    if ptypes.is_string_dtype(values.dtype) or ptypes.is_object_dtype(values.dtype):
        missing |= values.astype("str").str.strip().eq("").fillna(False).astype(bool)
    if missing.any():
        raise bad_rows(path, column, "missing or blank ids", values[missing])
    if unique:
        repeated = values.duplicated(keep=False)
        if repeated.any():
            raise bad_rows(path, column, "rows with a duplicate id", values[repeated])
    return values


def _as_float(values: pd.Series) -> np.ndarray:
    """Numbers as float64 with NaN for anything that is not a number."""
    numbers = pd.to_numeric(values, errors="coerce")
    return np.asarray(numbers.to_numpy(dtype="float64", na_value=np.nan))


def check_numbers(values: pd.Series, *, path: str | Path, column: str) -> np.ndarray:
    """Reject non-numeric, missing and infinite values; return them as float64."""
    numbers = _as_float(values)
    if not (ptypes.is_numeric_dtype(values.dtype) or ptypes.is_bool_dtype(values.dtype)):
        text = values.notna() & np.isnan(numbers)
        if text.any():
            raise bad_rows(path, column, "non-numeric values", values[text])
    not_finite = ~np.isfinite(numbers)
    if not_finite.any():
        raise bad_rows(path, column, "missing or infinite values", values[not_finite])
    return numbers


def check_amount(values: pd.Series, *, path: str | Path, column: str) -> pd.Series:
    """Amounts: numeric, finite and not negative; returned as float64."""
    numbers = check_numbers(values, path=path, column=column)
    negative = numbers < 0
    if negative.any():
        raise bad_rows(path, column, "negative amounts", values[negative])
    return pd.Series(numbers, index=values.index, dtype="float64")


def check_labels(values: pd.Series, *, path: str | Path, column: str) -> pd.Series:
    """Fraud labels: every value 0 or 1 (missing values are errors); returned as int8."""
    numbers = _as_float(values)
    bad = ~np.isin(numbers, (0.0, 1.0))
    if bad.any():
        hint = "labels must be 0 (genuine) or 1 (fraud)"
        raise bad_rows(path, column, "labels that are not 0 or 1", values[bad], hint)
    return pd.Series(numbers, index=values.index).astype("int8")


def check_features(frame: pd.DataFrame, names: Sequence[str], *, path: str | Path) -> pd.DataFrame:
    """Feature columns: numeric and finite, also once narrowed to float32; returned as float32."""
    out: dict[str, np.ndarray] = {}
    for name in names:
        numbers = check_numbers(frame[name], path=path, column=name)
        with np.errstate(over="ignore"):
            narrow = numbers.astype("float32")
        overflow = ~np.isfinite(narrow)
        if overflow.any():
            raise bad_rows(path, name, "values too large for float32", frame[name][overflow])
        out[name] = narrow
    return pd.DataFrame(out, index=frame.index)


def _mixed_zone_error(values: pd.Series, zoned: pd.Series, path: str | Path, column: str) -> DataError:
    """Explain a column in which some timestamps carry a UTC offset and some do not."""
    naive = values[~zoned & values.notna()]
    example = values[zoned].iloc[:1]
    with_offset = f"row {int(example.index[0]) + 1}: {show_value(example.iloc[0])}"
    hint = (
        f"mixed time zones: {int(zoned.sum())} other timestamps have one (e.g. {with_offset}); "
        "give every timestamp a UTC offset, or none"
    )
    return bad_rows(path, column, "timestamps without a UTC offset", naive, hint)


def _parse_text(values: pd.Series, *, utc: bool, path: str | Path, column: str) -> pd.Series:
    """Parse date strings: a fast pass with one inferred format, then per-row parsing of the rest."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            parsed = pd.to_datetime(values, errors="coerce", utc=utc)
            retry = parsed.isna() & values.notna()
            if retry.any():
                parsed = parsed.copy()
                parsed.loc[retry] = pd.to_datetime(values[retry], errors="coerce", utc=utc, format="mixed")
        except (ValueError, TypeError) as exc:
            message = f"{path}: column '{column}': cannot parse the timestamps (mixed time zones?): {exc}"
            raise DataError(message, path=path, column=column) from exc
    return parsed


def parse_timestamps(values: pd.Series, *, path: str | Path, column: str) -> pd.Series:
    """Timestamps as tz-naive datetime64[ns]; offsets and tz-aware values are converted to UTC."""
    if ptypes.is_datetime64_any_dtype(values.dtype):
        parsed = values
    elif values.isna().all():
        raise bad_rows(path, column, "unparsable or missing timestamps", values)
    elif ptypes.is_numeric_dtype(values.dtype) or ptypes.is_bool_dtype(values.dtype):
        message = (
            f"{path}: column '{column}': holds numbers ({values.dtype}), not dates and times; "
            "write timestamps such as 2024-01-31 13:45:00 (or use a feature table with a numeric time column)"
        )
        raise DataError(message, path=path, column=column)
    else:
        text = values.astype("str")
        zoned = text.str.strip().str.contains(_OFFSET_RE, regex=True).fillna(False).astype(bool)
        if zoned.any() and (~zoned & values.notna()).any():
            raise _mixed_zone_error(values, zoned, path, column)
        parsed = _parse_text(text, utc=bool(zoned.any()), path=path, column=column)
    if isinstance(parsed.dtype, pd.DatetimeTZDtype):
        parsed = parsed.dt.tz_convert(None)
    unparsable = parsed.isna()
    if unparsable.any():
        raise bad_rows(path, column, "unparsable or missing timestamps", values[unparsable])
    too_far = (parsed < pd.Timestamp.min) | (parsed > pd.Timestamp.max)
    if too_far.any():
        raise bad_rows(path, column, "timestamps outside the years 1677-2262", values[too_far])
    return parsed.astype("datetime64[ns]")


def _open_binary(path: Path) -> gzip.GzipFile | io.BufferedReader:
    """Open a (possibly gzipped) file for reading bytes."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb")


def _first_bad_byte(path: Path) -> tuple[int, int, str] | None:
    """Find the first byte that is not UTF-8 (offset, 1-based line, reason), streaming the file."""
    base, lines, pending = 0, 1, b""
    with _open_binary(path) as stream:
        while True:
            chunk = stream.read(_CHUNK)
            data = pending + chunk
            try:
                codecs.decode(data, "utf-8")
            except UnicodeDecodeError as exc:
                if chunk and exc.end == len(data) and "unexpected end" in exc.reason:
                    pending, good = data[exc.start :], data[: exc.start]
                    base, lines = base + len(good), lines + good.count(b"\n")
                    continue
                return base + exc.start, lines + data[: exc.start].count(b"\n"), exc.reason
            if not chunk:
                return None
            base, lines, pending = base + len(data), lines + data.count(b"\n"), b""


def _encoding_error(path: Path, exc: UnicodeDecodeError) -> DataError:
    """Explain a file that is not UTF-8: where the first bad byte is and how to fix it."""
    where = _first_bad_byte(path)
    with _open_binary(path) as stream:
        head = stream.read(2)
    source = "utf-16" if head in (b"\xff\xfe", b"\xfe\xff") else "latin1"
    at = f"{where[2]} at byte {where[0]}, line {where[1]}" if where else exc.reason
    message = (
        f"{path}: not valid UTF-8: {at}; re-encode the file as UTF-8, "
        f"e.g. iconv -f {source} -t utf-8 {path.name} > fixed.csv"
    )
    return DataError(message, path=path)


def _check_delimiter(path: Path) -> None:
    """Refuse a CSV whose header line is split by ';', tab or '|' rather than commas."""
    with _open_binary(path) as stream:
        header = stream.readline(1 << 16).decode("utf-8-sig", errors="replace")
    if "," in header:
        return
    counts = {d: header.count(d) for d in _DELIMITERS}
    found = max(counts, key=lambda d: counts[d])
    if counts[found]:
        message = (
            f"{path}: the header {header.strip()[:80]!r} looks {_DELIMITERS[found]}-separated; "
            "fedfraud reads comma-separated CSV (or Parquet): re-save the file with ',' as the delimiter"
        )
        raise DataError(message, path=path)


def read_csv_file(path: Path) -> pd.DataFrame:
    """Read a comma-separated UTF-8 file, explaining encoding, delimiter and parse problems."""
    try:
        _check_delimiter(path)
        return pd.read_csv(path, encoding="utf-8", low_memory=False)
    except UnicodeDecodeError as exc:
        raise _encoding_error(path, exc) from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: the file is empty (no header and no rows)", path=path) from exc
    except (pd.errors.ParserError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read as CSV: {exc}", path=path) from exc


def read_parquet_file(path: Path) -> pd.DataFrame:
    """Read a Parquet file, turning pyarrow's errors into DataError."""
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes)", path=path)
    try:
        return pd.read_parquet(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        message = f"{path}: cannot read as Parquet (corrupt or not Parquet?): {exc}"
        raise DataError(message, path=path) from exc
