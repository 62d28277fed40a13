"""Render tidy rows (a pandas DataFrame) as a table, CSV, JSON or Markdown."""

import pandas as pd

FORMATS = ("table", "csv", "json", "markdown")


def render(df: pd.DataFrame, fmt: str) -> str:
    if fmt == "table":
        return df.to_string(index=False)
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return df.to_json(orient="records", indent=1)
    if fmt == "markdown":
        return df.to_markdown(index=False)
    raise ValueError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
