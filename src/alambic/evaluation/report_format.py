"""Reading a report's figures for display: the headline setting, the rows of one setting, number formats. Shared
by the report's markdown, its plots and the model card, below all three."""

from __future__ import annotations


def format_value(value, spec: str = ".3g", suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{spec}}{suffix}"


def format_number(value) -> str:
    """One decimal from 1 up (134.5, 81.4, 542.3), none from 1000 up, three significant digits below 1 (0.0535)."""
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.3g}"


def format_percent(value) -> str:
    """12.3%, and three significant digits below 10% (0.00205%), so a collapsed model does not read 0.0%."""
    if value is None:
        return "-"
    return f"{value:.1f}%" if abs(value) >= 10 else f"{value:.3g}%"


def headline(report: dict) -> dict:
    """The (device, seq_len, batch) the summary table and the plot use: CPU, the longest length timed."""
    settings = report["settings"]
    return {"device": "cpu" if "cpu" in settings["devices"] else settings["devices"][0],
            "seq_len": max(settings["seq_lens"]), "batch_size": settings["batch_size"]}


def speed_row(row: dict, device: str, batch: int, length: int) -> dict | None:
    return next((s for s in row["speed"] if (s["device"], s["batch_size"], s["seq_len"]) == (device, batch, length)),
                None)


def speedup_row(row: dict, device: str, batch: int, length: int) -> dict | None:
    return next((s for s in row["ratios"]["speed"]
                 if (s["device"], s["batch_size"], s["seq_len"]) == (device, batch, length)), None)
