"""The report's "Trust" section: what :mod:`lastlayer.report` shows of a run summary's ``trust``
entry (tables as rows of text, charts drawn on a matplotlib Figure it hands in)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: ``chart(draw, *args)``: the report's SVG ``data:`` URI of ``draw(figure, *args)``.
Chart = Callable[..., str | None]
#: The report's thumbnails of images given as ``{path, true_label, predicted_label, score,
#: true_score}``.
Thumbnails = Callable[[Sequence[Mapping[str, Any]]], Sequence[Any]]
#: The most suspected wrong labels shown as thumbnails.
MAX_SUSPECT_THUMBNAILS = 48


def page(trust: Mapping[str, Any] | None, chart: Chart, thumbnails: Thumbnails) -> dict[str, Any]:
    """The section's content: ``calibration`` (rows and the reliability diagram), ``unknown``
    (rows) and ``label_issues`` (counts and thumbnails), each ``None`` when the run has none."""
    found = trust or {}
    return {
        "calibration": _calibration(found.get("calibration"), chart),
        "unknown": _unknown(found.get("unknown")),
        "label_issues": _label_issues(found.get("label_issues"), thumbnails),
        "duplicates": _duplicates(found.get("duplicates")),
    }


def _duplicates(d: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not d:
        return None
    rows = []
    for number, group in enumerate(d["listed"], 1):
        kinds = [k for k in ("leak", "conflict") if group[k]]
        for m in group["members"]:
            rows.append((str(number), m["path"], m["label"], m["split"], ", ".join(kinds)))
    return {key: d[key] for key in ("threshold", "images", "pairs", "groups", "leaks", "conflicts")} | {
        "rows": rows,
        "listed": len(d["listed"]),
    }


def _label_issues(issues: Mapping[str, Any] | None, thumbnails: Thumbnails) -> dict[str, Any] | None:
    if not issues:
        return None
    shown = [
        {
            "path": s["path"],
            "true_label": s["given_label"],
            "predicted_label": s["suggested_label"],
            "score": s["suggested_score"],
            "true_score": s["given_score"],
        }
        for s in issues["listed"][:MAX_SUSPECT_THUMBNAILS]
    ]
    return {
        "suspected": issues["suspected"],
        "images": issues["images"],
        "folds": issues["folds"],
        "shown": thumbnails(shown),
    }


def _unknown(u: Mapping[str, Any] | None) -> list[tuple[str, str]] | None:
    if not u:
        return None
    return [
        ("the model says", f"{u['label']!r} above a distance of {u['threshold']:.4g} (output {u['output']})"),
        ("threshold", f"keeps {100 * u['recall']:.0f}% of the {u['held_out_n']} validation images under it"),
        ("test images called unknown", _share(u["test_unknown_share"])),
        ("test accuracy on those it answers", _share(u["test_accuracy_answered"])),
        ("test accuracy, unknown counted wrong", _share(u["test_accuracy_unknown_wrong"])),
    ]


def _share(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _calibration(c: Mapping[str, Any] | None, chart: Chart) -> dict[str, Any] | None:
    if not c:
        return None
    rows = [("test split", _share(c["test_ece_before"]), _share(c["test_ece_after"]))]
    if c.get("out_of_fold_ece_before") is not None:
        rows.append(("out of fold", _share(c["out_of_fold_ece_before"]), _share(c["out_of_fold_ece_after"])))
    return {
        "temperature": f"{c['temperature']:.3f}",
        "fitted_on": f"{c['fitted_n']} {c['fitted_on'].replace('_', '-')} predictions",
        "rows": rows,
        "chart": chart(_reliability, c["test_reliability_before"], c["test_reliability_after"])
        if sum(c["test_reliability_before"]["count"])
        else None,
    }


def _reliability(fig: Figure, before: Mapping[str, list[Any]], after: Mapping[str, list[Any]]) -> bool:
    """Accuracy against confidence per bin, before and after the temperature, over the diagonal."""
    fig.set_size_inches(5.2, 4.4)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="perfectly calibrated")
    for bins, name, colour in ((before, "before", "#dd8452"), (after, "after", "#4c72b0")):
        points = [(c, a) for c, a in zip(bins["confidence"], bins["accuracy"], strict=True) if c is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", color=colour, label=f"{name} the temperature", linewidth=1.4)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (top probability, 15 bins)")
    ax.set_ylabel("accuracy in the bin")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    return True
